"""Triton kernel: similarity of every token to its closest selected token.

``out[b, u] = max_{s in indices[b]} sim(u, s)`` with SPEC §1's
``sim(u, v) = <x_u, x_v> / (max(|x_u|, 1e-6) * max(|x_v|, 1e-6))``: the inner quantity of
``facility_location`` and ``theta_coverage``. Same contract as ``vtprune._C.coverage_max_sim``.

Each program owns a block of tokens u of one image and walks the selected set in blocks, so the
similarity block is a small [BLOCK_U, BLOCK_D] x [BLOCK_D, BLOCK_S] product. Tiles are converted to
fp32 before ``tl.dot`` and the dot is forced to ``ieee`` precision: the default TF32 path would
round the inputs to 10 mantissa bits, far outside the 1e-5 agreement the backends promise.

That ieee dot is an FMA loop in which each thread keeps its rows and columns of the two operands
over the whole slice, for every input dtype, so the feature slices are at most 32 wide: with
64-wide slices triton 3.9's ptxas spilled 9 KB per thread on sm_80 for fp32 rows that are not
16-byte aligned (D % 4 != 0, element-wise loads) and 136 to 184 bytes for aligned rows; with 32
it spills at most a few dozen bytes on sm_80 and sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vtprune.triton_kernels._common import SUPPORTED_FLOATS, check_device, interpreted

__all__ = ["coverage_max_sim"]

_EPS = 1e-6  # SPEC §1 norm floor: a zero token has similarity 0 with everything
_BLOCK_U = 64
_BLOCK_S = 32
_MAX_BLOCK_D = 32  # feature slice of the fp32 FMA dot (see the module doc)


@triton.jit
def _coverage_max_sim_kernel(
    x_ptr,
    idx_ptr,
    len_ptr,
    out_ptr,
    N,
    D,
    K,
    stride_b,
    stride_n,
    EPS: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Batch on axis 0 (limit 2**31 - 1); the token blocks, few, on axis 1 (limit 65535).
    b = tl.program_id(0).to(tl.int64)
    pid_u = tl.program_id(1)
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)

    # Clamped so a bad length can never push reads past the N rows that exist.
    length = tl.load(len_ptr + b)
    length = tl.minimum(tl.maximum(length, 0), N)
    u_valid = offs_u < length

    # int64 offsets: B * N * D can exceed 2**31 elements for large batches.
    x_b = x_ptr + b * stride_b
    u_rows = x_b + offs_u.to(tl.int64)[:, None] * stride_n

    ssu = tl.zeros([BLOCK_U], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        xu = tl.load(u_rows + offs_d[None, :], mask=u_valid[:, None] & (offs_d < D)[None, :], other=0.0)
        xu = xu.to(tl.float32)
        ssu += tl.sum(xu * xu, axis=1)
    norm_u = tl.maximum(tl.sqrt(ssu), EPS)

    best = tl.full([BLOCK_U], float("-inf"), dtype=tl.float32)
    for s0 in range(0, K, BLOCK_S):
        offs_j = s0 + tl.arange(0, BLOCK_S)
        sel = tl.load(idx_ptr + b * K + offs_j, mask=offs_j < K, other=-1)
        # Indices are validated in Python, but out-of-range ones are skipped rather than read.
        s_valid = (sel >= 0) & (sel < length)
        s_rows = x_b + tl.where(s_valid, sel, 0)[:, None] * stride_n

        dot = tl.zeros([BLOCK_U, BLOCK_S], dtype=tl.float32)
        sss = tl.zeros([BLOCK_S], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = (offs_d < D)[None, :]
            xu = tl.load(u_rows + offs_d[None, :], mask=u_valid[:, None] & d_ok, other=0.0).to(tl.float32)
            xs = tl.load(s_rows + offs_d[None, :], mask=s_valid[:, None] & d_ok, other=0.0).to(tl.float32)
            dot += tl.dot(xu, tl.trans(xs), input_precision="ieee")
            sss += tl.sum(xs * xs, axis=1)
        norm_s = tl.maximum(tl.sqrt(sss), EPS)

        sim = dot / (norm_u[:, None] * norm_s[None, :])
        # A NaN similarity (NaN/Inf input) makes the row's result NaN, as torch's max does in the
        # reference and like the CUDA kernel. Tracked apart: tl.max / tl.maximum need not keep NaN.
        nan_here = tl.max((s_valid[None, :] & (sim != sim)).to(tl.int32), axis=1) > 0
        sim = tl.where(s_valid[None, :] & (sim == sim), sim, float("-inf"))
        best = tl.where(nan_here | (best != best), float("nan"), tl.maximum(best, tl.max(sim, axis=1)))

    out = tl.where(u_valid, best, 0.0)
    tl.store(out_ptr + b * N + offs_u, out, mask=offs_u < N)


def _is_interpreted() -> bool:
    return interpreted(_coverage_max_sim_kernel)


def _check_inputs(tokens: Tensor, indices: Tensor, lengths: Tensor | None) -> None:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    if tokens.dtype not in SUPPORTED_FLOATS:
        raise TypeError(f"tokens must be float32, float16 or bfloat16, got {tokens.dtype}")
    B = tokens.shape[0]
    if not isinstance(indices, Tensor) or indices.dim() != 2 or indices.shape[0] != B:
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise ValueError(f"indices must be an integer tensor [B={B}, K], got {shape}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
            shape = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
            raise ValueError(f"lengths must be an integer tensor [B={B}], got {shape}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    check_device(tokens, "tokens", "coverage", _is_interpreted())


def _empty_selection_result(N: int, indices: Tensor, lengths: Tensor) -> Tensor:
    """The result without launching, for K == 0 or D == 0 (no pointer to hand the kernel)."""
    pos = torch.arange(N, device=indices.device)
    valid_u = pos[None, :] < lengths.clamp(0, N)[:, None]
    any_sel = ((indices >= 0) & (indices < lengths.clamp(0, N)[:, None])).any(dim=1)
    # D == 0: every vector is the zero vector, so every similarity is 0; no selection: -inf.
    per_image = torch.where(any_sel, 0.0, float("-inf")).to(torch.float32)
    return torch.where(valid_u, per_image[:, None], torch.zeros((), device=indices.device))


def coverage_max_sim(tokens: Tensor, indices: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Similarity of every token to its most similar selected token.

    Args:
        tokens: ``[B, N, D]`` float32/float16/bfloat16, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``). Any strides; copied only if the last one is not 1.
        indices: ``[B, K]`` integer, the selected token indices of each image. Entries outside
            ``[0, lengths[b])`` are skipped.
        lengths: ``[B]`` integer, valid tokens per image (clamped to ``[0, N]``); ``None`` = all N.

    Returns:
        ``float32 [B, N]``: ``max_s sim(u, s)`` for ``u < lengths[b]`` (``-inf`` if image ``b``
        has no valid selected index), ``0`` for padded ``u``. All math in fp32.
    """
    _check_inputs(tokens, indices, lengths)
    B, N, D = tokens.shape
    device = tokens.device
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    indices = indices.to(device=device, dtype=torch.int64).contiguous()
    if lengths is None:
        lengths = torch.full((B,), N, device=device, dtype=torch.int64)
    else:
        lengths = lengths.to(device=device, dtype=torch.int64).contiguous()
    K = indices.shape[1]

    if B == 0 or N == 0:
        return torch.zeros((B, N), device=device, dtype=torch.float32)
    if K == 0 or D == 0:
        return _empty_selection_result(N, indices, lengths)

    out = torch.empty((B, N), device=device, dtype=torch.float32)
    block_d = max(16, min(_MAX_BLOCK_D, triton.next_power_of_2(D)))  # tl.dot needs >= 16
    grid = (B, triton.cdiv(N, _BLOCK_U))
    launch_args = dict(EPS=_EPS, BLOCK_U=_BLOCK_U, BLOCK_S=_BLOCK_S, BLOCK_D=block_d, num_warps=4)
    if device.type == "cuda":
        # Triton launches on torch's current device/stream; make that the tensors' device.
        with torch.cuda.device(device):
            _coverage_max_sim_kernel[grid](
                tokens, indices, lengths, out, N, D, K, tokens.stride(0), tokens.stride(1), **launch_args
            )
    else:
        _coverage_max_sim_kernel[grid](
            tokens, indices, lengths, out, N, D, K, tokens.stride(0), tokens.stride(1), **launch_args
        )
    return out
