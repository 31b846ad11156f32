"""Triton kernel: attention received per key from groups of queries (SPEC §3), flash-style.

Same contract as :func:`vtprune.reference.attention_importance`:
``q [B, Hq, L, d]``, ``k [B, Hk, L, d]`` (query head ``h`` reads kv head ``h // (Hq // Hk)``),
``query_groups int64 [B, L]`` (-1, or any id outside ``[0, G)``, leaves a query out) ->
``float32 [B, G, key_end - key_start]``: for each group ``g`` the mean over its queries ``j`` of
``softmax_i(q_j . k_i * scale)`` (causal: keys ``i <= j`` only), averaged over the ``Hq`` heads;
a group without queries gives zeros. fp16/bf16/fp32 inputs, fp32 math and output.

Design (the ``L x L`` attention is never materialized)
-----------------------------------------------------
1. ``_lse_kernel``, grid ``(B * Hq, query blocks)``: each program owns a ``[BLOCK_M, d]`` block
   of queries and walks the keys it may see in ``BLOCK_N`` blocks, keeping the running row max
   and sum of exponentials (online softmax) -> row log-sum-exp ``lse [B, Hq, L]`` fp32.
   Causal: only queries ``j >= key_start`` are needed (earlier ones see no reported key) and a
   query block stops at its last query's position.
2. ``_colsum_kernel``, grid ``(B * Hq, key blocks of [key_start, key_end), group chunks)``: each
   program owns a ``[d, BLOCK_N]`` block of keys and walks the query blocks (causal: only
   those at or after its first key), recomputes the logits, ``p = exp(logit - lse_row)``, and
   sums ``p`` over the queries of each group into a ``[G_BLK, BLOCK_N]`` accumulator (a static
   loop over the chunk's ``G_BLK <= 8`` groups of ``sum(where(group == g, p, 0), axis=0)``; with
   more groups a third grid axis splits them into chunks). It writes per-head partial sums
   ``[B, Hq, G, key_end - key_start]``; the wrapper sums them over the heads in torch (no
   atomics: deterministic) and divides by ``Hq`` times the group's query count.

Logits are ``tl.dot`` products with fp32 accumulation: 16-bit inputs go to the tensor cores as
they are (their products are exact in fp32), fp32 inputs use ``input_precision="ieee"`` (TF32
would round the inputs to 10 mantissa bits). Under the interpreter bf16 tiles are upcast to fp32
first (its ``tl.dot`` does not read bf16), which gives the same products. Extra memory: ``lse`` (``4 * B * Hq * L`` bytes) and
the partial sums (``4 * B * Hq * G * (key_end - key_start)`` bytes), never ``O(L^2)``.
Head dims up to 256 (``BLOCK_D = next_pow2(d)``, masked), any ``L``; the low-rank (ALVTS) form
is simply one head of width ``R``.

Head-dim slices (``BLOCK_K``). 16-bit tiles hold the whole head dim (``BLOCK_K = BLOCK_D``): the
held query (or key) block is read once per program and the tensor-core dot keeps its operands
compact. The fp32 ieee dot has no tensor-core path: it is an FMA loop in which each thread keeps
its rows of one operand and columns of the other over the full reduction length, so whole-d fp32
tiles spilled 5 to 11 KB per thread at d = 128/256 (ptxas of triton 3.9, sm_80 and sm_90). fp32
therefore walks the head dim in ``BLOCK_K = 16`` slices (``_sliced_logits``), re-reading both
operands' slices from memory for every block pair (they stay in L1/L2: the held block is the same
for the whole walk). The slices feed the dot's accumulator (``tl.dot(a, b, acc)``), so no
per-slice partial sum is rounded on its own before being added.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["attention_importance"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK_D = 256  # largest head dim (BLOCK_D)
_MAX_G_BLK = 8  # groups per program (static loop); more groups -> a third grid axis
_FP32_BLOCK_K = 16  # head-dim slice of the fp32 (FMA) dot


@triton.jit
def _sliced_logits(q_rows, m_ok, k_cols, n_ok, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``q . k`` of a ``[BLOCK_M]`` query block and a ``[BLOCK_N]`` key block, fp32 ieee, over
    ``BLOCK_K``-wide slices of the head dim read from memory (the fp32 path, see the module doc).

    ``q_rows``: ``[BLOCK_M, 1]`` row pointers, ``k_cols``: ``[1, BLOCK_N]`` row pointers of the keys.
    """
    offs_k = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        dk = d0 + offs_k
        d_ok = dk < D
        qs = tl.load(q_rows + dk[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        ks = tl.load(k_cols + dk[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        # accumulator form: each slice's products go onto the running logits, no per-slice sums
        s = tl.dot(qs.to(tl.float32), ks.to(tl.float32), s, input_precision="ieee")
    return s


@triton.jit
def _lse_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,  # fp32 [B * Hq, L]
    L,
    D,
    HQ,
    REP,  # Hq // Hk
    q_begin,  # first query whose lse is needed
    scale,
    sqb,
    sqh,
    sql,
    skb,
    skh,
    skl,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 tiles and an ieee dot (fp32 inputs; bf16 in the interpreter)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,  # head-dim slice of the dot: BLOCK_D (q held whole) or less (sliced)
):
    # (batch, head) on axis 0 (limit 2**31 - 1); the query blocks on axis 1.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    kvh = (h // REP).to(tl.int64)
    h = h.to(tl.int64)

    m0 = q_begin + pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_rows = q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sql
    if BLOCK_K == BLOCK_D:
        q = tl.load(q_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * skb + kvh * skh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if CAUSAL:
        n_end = tl.minimum(L, m0 + BLOCK_M)  # keys past the block's last query are masked for all
    else:
        n_end = L
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        k_cols = k_base + offs_n.to(tl.int64)[None, :] * skl
        if BLOCK_K == BLOCK_D:
            # the key block read transposed, [BLOCK_D, BLOCK_N]
            kt = tl.load(k_cols + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            if DOT_FP32:
                s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt)
        else:
            s = _sliced_logits(q_rows, m_ok, k_cols, n_ok, D, BLOCK_M, BLOCK_N, BLOCK_K)
        s = s * scale
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows that have seen no key yet (only padding rows past L) keep finite arithmetic
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)


@triton.jit
def _colsum_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,  # fp32 [B * Hq, L]
    grp_ptr,  # int64 [B, L]
    part_ptr,  # fp32 [B, Hq, G, W]
    L,
    D,
    HQ,
    REP,
    G,
    key_start,
    key_end,
    scale,
    sqb,
    sqh,
    sql,
    skb,
    skh,
    skl,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 tiles and an ieee dot (fp32 inputs; bf16 in the interpreter)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,  # head-dim slice of the dot: BLOCK_D (k held whole) or less (sliced)
    G_BLK: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_g = tl.program_id(2)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    kvh = (h // REP).to(tl.int64)
    h = h.to(tl.int64)
    g0 = pid_g * G_BLK
    W = key_end - key_start

    n0 = key_start + pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < key_end
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    k_cols = k_ptr + b * skb + kvh * skh + offs_n.to(tl.int64)[None, :] * skl
    if BLOCK_K == BLOCK_D:
        kt = tl.load(k_cols + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    q_base = q_ptr + b * sqb + h * sqh
    lse_row = lse_ptr + pid_bh.to(tl.int64) * L
    grp_row = grp_ptr + b * L

    g_rows = g0 + tl.arange(0, G_BLK)
    acc = tl.zeros([G_BLK, BLOCK_N], dtype=tl.float32)
    if CAUSAL:
        m_begin = n0  # earlier queries see none of this block's keys
    else:
        m_begin = 0
    for m0 in range(m_begin, L, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        q_rows = q_base + offs_m.to(tl.int64)[:, None] * sql
        if BLOCK_K == BLOCK_D:
            q = tl.load(q_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        grp = tl.load(grp_row + offs_m, mask=m_ok, other=-1)
        lse = tl.load(lse_row + offs_m, mask=m_ok, other=0.0)
        if BLOCK_K == BLOCK_D:
            if DOT_FP32:
                s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt)
        else:
            s = _sliced_logits(q_rows, m_ok, k_cols, n_ok, D, BLOCK_M, BLOCK_N, BLOCK_K)
        s = s * scale
        valid = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        # masked before the exp, so no overflow is ever produced (and never meets a 0 weight)
        p = tl.exp(tl.where(valid, s, float("-inf")) - lse[:, None])
        for gi in tl.static_range(G_BLK):
            col = tl.sum(tl.where(grp[:, None] == g0 + gi, p, 0.0), axis=0)
            acc += tl.where(g_rows[:, None] == g0 + gi, col[None, :], 0.0)

    # part[b, h, g, n - key_start]
    part = part_ptr + (b * HQ + h) * G * W
    ptrs = part + g_rows.to(tl.int64)[:, None] * W + (offs_n - key_start)[None, :]
    tl.store(ptrs, acc, mask=(g_rows < G)[:, None] & n_ok[None, :])


def _is_interpreted() -> bool:
    # The decorator picked interpreter vs compiler at import time; ask the result, not the env.
    return type(_lse_kernel).__name__ == "InterpretedFunction"


def _check_inputs(q: Tensor, k: Tensor, query_groups: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("query_groups", query_groups)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, L, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype not in _SUPPORTED or k.dtype != q.dtype:
        raise TypeError(f"q and k must share a dtype among float32, float16, bfloat16; got {q.dtype}, {k.dtype}")
    b, hq, length, d = q.shape
    if k.shape[0] != b or k.shape[2] != length or k.shape[3] != d or k.shape[1] < 1 or hq % k.shape[1]:
        raise ValueError(f"k must be [B, Hk, L, d] with Hq a multiple of Hk to match q {tuple(q.shape)}; got {tuple(k.shape)}")
    if tuple(query_groups.shape) != (b, length):
        raise ValueError(f"query_groups must be [B, L] = ({b}, {length}); got {tuple(query_groups.shape)}")
    if d > _MAX_BLOCK_D:
        raise ValueError(f"the triton attention kernel takes head dims up to {_MAX_BLOCK_D}; got d = {d}")
    if q.device.type == "cuda" or (q.device.type == "cpu" and _is_interpreted()):
        return
    raise ValueError(
        f"the triton backend needs CUDA tensors (q is on {q.device}); CPU tensors work only under "
        "the Triton interpreter, with TRITON_INTERPRET=1 set before vtprune.triton_kernels.attention "
        "is first imported"
    )


def _blocks(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) keeping every tile within registers.

    16-bit: the whole head dim in one slice (``BLOCK_K = BLOCK_D``), held for the whole walk.
    fp32: the FMA dot holds each thread's operand rows and columns over the whole slice, so the
    head dim goes in 16-wide slices; 8 warps share the 64 x 64 logits tile. On triton 3.9's
    ptxas this spills nothing for head dims 64 to 256 on sm_80 and sm_90, where whole-d tiles
    spilled 5 to 11 KB per thread.
    """
    if dtype == torch.float32:
        if block_d <= _FP32_BLOCK_K:
            return 64, 64, block_d, 4
        return 64, 64, _FP32_BLOCK_K, 8
    if block_d <= 128:
        return 64, 64, block_d, 4
    return 64, 32, block_d, 4


def attention_importance(
    q: Tensor,
    k: Tensor,
    query_groups: Tensor,
    num_groups: int,
    causal: bool,
    scale: float,
    key_start: int,
    key_end: int,
    **blocks: int,
) -> Tensor:
    """Mean softmax attention each key in ``[key_start, key_end)`` receives from each query group.

    Args:
        q: ``[B, Hq, L, d]`` float32/float16/bfloat16, on CUDA (or CPU under ``TRITON_INTERPRET=1``);
            any strides (copied only if the last one is not 1). ``d <= 256``.
        k: ``[B, Hk, L, d]``, q's dtype and device, ``Hq % Hk == 0``.
        query_groups: integer ``[B, L]``, each query's group; ids outside ``[0, G)`` leave it out.
        num_groups: ``G >= 1``.
        causal: query ``j`` sees keys ``i <= j`` only.
        scale: logit scale.
        key_start, key_end: the keys reported, ``0 <= key_start < key_end <= L``.
        blocks: optional ``block_m`` / ``block_n`` overrides (powers of 2, >= 16), for tests.

    Returns:
        ``float32 [B, G, key_end - key_start]``.
    """
    _check_inputs(q, k, query_groups)
    batch, hq, length, d = q.shape
    hk = k.shape[1]
    device = q.device
    num_groups = int(num_groups)
    key_start, key_end = int(key_start), int(key_end)
    width = key_end - key_start
    if not 0 <= key_start < key_end <= length:
        raise ValueError(f"need 0 <= key_start < key_end <= L = {length}; got ({key_start}, {key_end})")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1; got {num_groups}")
    groups = query_groups.to(device=device, dtype=torch.int64).contiguous()
    if batch == 0 or hq == 0 or d == 0:
        # Nothing to launch (no pointer to hand the kernels): the PyTorch backend's answer.
        from vtprune.torch_backend.attention import attention_importance as torch_impl

        return torch_impl(q, k, groups, num_groups, causal, scale, key_start, key_end)

    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()

    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16
    bm, bn, bk, warps = _blocks(block_d, q.dtype)
    bm = blocks.pop("block_m", bm)
    bn = blocks.pop("block_n", bn)
    if blocks:
        raise TypeError(f"unknown block options {sorted(blocks)}")
    for name, blk in (("block_m", bm), ("block_n", bn)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of 2 >= 16, got {blk}")
    g_blk = min(_MAX_G_BLK, triton.next_power_of_2(num_groups))

    causal = bool(causal)
    scale = float(scale)
    rep = hq // hk
    # fp32 inputs need the ieee dot; the interpreter's dot cannot read bf16 tiles (it multiplies
    # their raw bits), so there bf16 tiles are upcast too (exact: bf16 products fit in fp32).
    dot_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _is_interpreted())
    q_begin = key_start if causal else 0  # causal: earlier queries see no reported key

    lse = torch.empty((batch * hq, length), device=device, dtype=torch.float32)
    part = torch.empty((batch, hq, num_groups, width), device=device, dtype=torch.float32)
    q_strides = (q.stride(0), q.stride(1), q.stride(2))
    k_strides = (k.stride(0), k.stride(1), k.stride(2))
    meta = dict(
        CAUSAL=causal, DOT_FP32=dot_fp32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_K=bk, num_warps=warps
    )
    grid1 = (batch * hq, triton.cdiv(length - q_begin, bm))
    grid2 = (batch * hq, triton.cdiv(width, bn), triton.cdiv(num_groups, g_blk))

    def launch() -> None:
        _lse_kernel[grid1](q, k, lse, length, d, hq, rep, q_begin, scale, *q_strides, *k_strides, **meta)
        _colsum_kernel[grid2](
            q, k, lse, groups, part, length, d, hq, rep, num_groups, key_start, key_end, scale,
            *q_strides, *k_strides, G_BLK=g_blk, **meta,
        )

    if device.type == "cuda":
        # Triton launches on torch's current device/stream; make that the tensors' device.
        with torch.cuda.device(device):
            launch()
    else:
        launch()

    gid = torch.arange(num_groups, device=device)
    counts = (groups[:, None, :] == gid[None, :, None]).sum(dim=-1, keepdim=True).to(torch.float32)  # [B, G, 1]
    sums = part.sum(dim=1)  # over the heads, in a fixed order
    return torch.where(counts > 0, sums / (counts.clamp_min(1) * hq), torch.zeros((), device=device))
