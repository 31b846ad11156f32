"""Triton kernel: SCOPE's cosine similarity ``S [B, N, N]`` from 16-bit tokens in one launch.

:func:`vtprune.similarity.scope_similarity` builds ``S`` in torch as the reference does: an fp32
copy of the tokens, their norms, a division, then an fp32 ``bmm`` (five launches and a
``4 * B * N * D`` byte copy, and above 4096 tokens a loop of row chunks). For fp16/bf16 tokens this
kernel computes the same quantity in one launch and reads every token tile straight from the
input:

    S[i, j] = <x_i, x_j> / (max(|x_i|, 1e-6) * max(|x_j|, 1e-6))

Program ``(m, n, b)`` owns the ``BLOCK_M x BLOCK_N`` tile of image ``b``. It walks the feature dim
in ``BLOCK_K`` chunks (64; 16 when the row stride is not a multiple of 16 elements); each chunk's
products go to the tensor cores in the input dtype (products of 16-bit values are exact in fp32,
accumulated in fp32), and the squared norms of the tile's row and column tokens are summed in fp32
from the same loaded chunks, so the norms cost no extra pass. The epilogue divides by the clamped
norms and stores fp32, or fp16 (rounded once from fp32) when the caller asks for 16-bit storage
(images above ``SCOPE_FP32_MAX_N`` tokens): ``2 * B * N**2`` bytes then, and nothing else of size
``N**2``.

Compared with the torch path the products are summed in another order and the division comes
after the sum instead of before, so entries differ from the reference's by a few fp32 ulps; that
is the precision of the reference itself (its fp32 ``bmm`` order is cuBLAS's), and SCOPE's picks
part from it only at near-ties (tests/test_triton_similarity.py measures it). fp32 tokens keep the
torch path, which is bitwise the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vtprune.similarity import SCOPE_EPS, scope_similarity_dtype
from vtprune.triton_kernels._common import check_device, interpreted

__all__ = ["scope_similarity"]

_BLOCK_M = 64
_BLOCK_N = 64
_BLOCK_K = 64
# Rows whose stride is not a multiple of 16 elements (D = 8, 40, 130, ...) are not known to be
# aligned, so the compiler loads them element by element; such 64-wide chunks spilled ~400 bytes
# per thread (bf16, D = 8, triton 3.9's ptxas on sm_80/sm_90), 16-wide ones spill nothing. Real
# hidden sizes keep _BLOCK_K.
_UNALIGNED_BLOCK_K = 16
_NUM_WARPS = 4


@triton.jit
def _scope_similarity_kernel(
    x_ptr,  # fp16/bf16 [B, N, D], last stride 1
    s_ptr,  # fp32 or fp16 [B, N, N], contiguous
    N,
    D,
    stride_xb,
    stride_xn,
    EPS: tl.constexpr,
    OUT_FP16: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its tl.dot does not read bf16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < N
    x_b = x_ptr + b * stride_xb
    row_base = x_b + rows.to(tl.int64)[:, None] * stride_xn
    col_base = x_b + cols.to(tl.int64)[:, None] * stride_xn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(row_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        c = tl.load(col_base + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        af = a.to(tl.float32)
        cf = c.to(tl.float32)
        row_ss += tl.sum(af * af, axis=1)
        col_ss += tl.sum(cf * cf, axis=1)
        if DOT_FP32:
            acc += tl.dot(af, tl.trans(cf), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(c))

    row_norm = tl.maximum(tl.sqrt(row_ss), EPS)
    col_norm = tl.maximum(tl.sqrt(col_ss), EPS)
    sim = acc / row_norm[:, None] / col_norm[None, :]
    if OUT_FP16:
        sim = sim.to(tl.float16)
    out = s_ptr + b * N * N + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, sim, mask=row_ok[:, None] & col_ok[None, :])


def _is_interpreted() -> bool:
    return interpreted(_scope_similarity_kernel)


def scope_similarity(tokens: Tensor, storage: torch.dtype | None = None) -> Tensor:
    """``[B, N, N]`` SCOPE similarity of 16-bit ``tokens [B, N, D]`` in one launch, contiguous.

    The contract of :func:`vtprune.similarity.scope_similarity` (same formula and the same storage
    rule: ``storage=None`` is float32 up to ``SCOPE_FP32_MAX_N`` tokens, float16 above), for
    float16/bfloat16 tokens on CUDA (CPU under the interpreter). Entries agree with it to a few
    fp32 ulps (see the module docstring).

    Raises:
        TypeError: ``tokens`` is not float16/bfloat16 (fp32 tokens use the torch path).
        ValueError: wrong rank, device or ``storage``.
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"tokens must be float16 or bfloat16 (float32 uses the torch path), got {tokens.dtype}")
    check_device(tokens, "tokens", "similarity", _is_interpreted())
    batch, n, dim = tokens.shape
    storage = storage or scope_similarity_dtype(n)
    if storage not in (torch.float32, torch.float16):
        raise ValueError(f"storage must be torch.float32 or torch.float16, got {storage}")
    out = torch.empty(batch, n, n, dtype=storage, device=tokens.device)
    if batch == 0 or n == 0:
        return out
    if dim == 0:
        return out.zero_()  # every norm is clamped, every product 0
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    grid = (triton.cdiv(n, _BLOCK_M), triton.cdiv(n, _BLOCK_N), batch)
    args = (tokens, out, n, dim, tokens.stride(0), tokens.stride(1))
    meta = dict(
        EPS=SCOPE_EPS,
        OUT_FP16=storage == torch.float16,
        DOT_FP32=_is_interpreted() and tokens.dtype == torch.bfloat16,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K if tokens.stride(1) % 16 == 0 else _UNALIGNED_BLOCK_K,
        num_warps=_NUM_WARPS,
    )
    if tokens.device.type == "cuda":
        with torch.cuda.device(tokens.device):
            _scope_similarity_kernel[grid](*args, **meta)
    else:
        _scope_similarity_kernel[grid](*args, **meta)
    return out
