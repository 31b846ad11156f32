"""Triton kernels: HoloV (SPEC §2) in two launches, and its building blocks ``crop_budgets`` and
``crop_topk`` as kernels of their own.

Same contracts as :func:`vtprune.reference.holov_select`, ``crop_budgets`` and ``crop_topk``:
batched, ``lengths``, ``rank_by`` "attn" or "score", ``sorted`` both ways, fp16/bf16/fp32 inputs,
fp32 math (fp64 for the budget floors, as the reference), int64 results.

Design
------
1. ``_crop_var_kernel`` (:func:`crop_variance`), grid ``(pairs, B)``: the work of image ``b`` is
   its (crop, ``BLOCK_M``-row block) pairs, taken in a grid-stride loop, so a single big crop
   (``C = 1``, ``M = N``) is spread over many programs instead of one. The crop layout (count
   ``C_b``, sizes ``n_b // C_b`` with the first ``n_b % C_b`` one larger) is derived inside the
   kernel from ``lengths[b]``, ``k`` and ``num_crops``, so the host needs no device value. On the
   GPU the grid is the bound ``C_max + (N - 1) // BLOCK_M`` on the pairs of any image (the default
   crop count grows with the length, so ``C_max`` is the full-length image's) and each program
   takes at most one pair; the interpreter, which pays per program, runs one program per image.
   A pair walks the crop's columns in ``BLOCK_N`` tiles; each Gram tile ``x_i . x_j`` is a
   ``tl.dot`` over ``BLOCK_D`` slices of the features (16-bit inputs on the tensor cores as they
   are, fp32 inputs as ``input_precision="ieee"``, never TF32; fp32 accumulation), scaled by
   ``1 / ((|x_i| + 1e-6)(|x_j| + 1e-6))`` and with the diagonal set to 0, so the normalized tokens
   are never written. Row statistics merge tile by tile (Chan et al.): each tile's mean and sum
   of squared deviations are exact two-pass values of the tile in registers, merged into the
   running ones. With ``T = sum_j S_ij`` and ``M2 = sum_j (S_ij - T/M)^2`` (all ``M`` entries,
   ``S_ii = 0`` included), SPEC's ``mean_i = T/(M-1)`` and
   ``var_i = sum_j (S_ij - mean_i)^2/(M-1) = (M2 + mean_i^2/M)/(M-1)``. The one-pass
   ``E[S^2] - mean^2`` cancels when the tokens are alike (similarities near their mean): on
   tokens with mean similarity ~0.9 it was 6e-5 to 2e-4 (relative) off float64, where the
   reference's two-pass fp32 values and these were both within 7e-7 of float64 (9e-7 of each
   other).
   Output: ``var [B, N]`` fp32 (rows of crops with ``M >= 2``).
2. One program per image (``_holov_kernel``, grid ``(B,)``) does the rest in phases, each phase
   a ``@triton.jit`` helper shared with the two stand-alone kernels:
   - crop statistics over ``[BLOCK_CC crops, BLOCK_J positions]`` tiles: ``gamma_c`` from the
     crop means of ``|a|`` and ``|var|``, then ``h_i`` (written to a ``[B, N]`` scratch row when
     ranking by score) and ``score_c = mean h`` (``attn`` for a one-token crop), and
     ``w_c = score_c / (sum_c score_c + 1e-6)``. These are crop-wide reductions, done here rather
     than in kernel 1 because a crop's rows are spread over several programs there, and a
     cross-program sum would need atomics (a run-to-run varying summation order);
   - ``_budgets_row``: SPEC's budgets exactly as the reference computes them. Floors
     ``floor(w * scale * k)`` in float64 on the fp32 weight (NaN and negative weights count 0,
     weights summing above ``1 + 1e-6`` rescaled); each crop's place in the hand-out order
     (descending weight, ties to the lowest crop, NaN last, absent crops left out) by pairwise
     counting in ``BLOCK_C x BLOCK_C`` tiles; the leftover goes round the order in closed form
     (``r // n`` each, +1 to the first ``r % n``); the capacity surplus goes round the crops with
     room: after ``t`` full rounds crop ``c`` has received ``min(spare_c, t)``, ``t`` is the
     largest value with ``sum_c min(spare_c, t) <= surplus`` (binary search), and the rest go +1
     to the first crops in order that still have room (their seat again by pairwise counting,
     only when such a rest exists). Only the crop order is kept in memory; every other per-crop
     quantity is recomputed from the weights, so no phase reads a value it also writes;
   - ``_topk_rows``: each token's rank inside its crop is the number of tokens of the same crop
     with a larger key, or an equal key and a lower index (NaN keys count as ``-inf``), counted
     over ``BLOCK_T x BLOCK_T`` tiles restricted to the crops a token tile touches, so the work
     is ``O(sum_c M_c^2)`` plus ``O(N * BLOCK_T)``. A token is kept when its rank is below its
     crop's budget. Ascending output (``sorted=True``): the kept tokens in index order, placed by
     a running prefix count; official order: ``sum_{c' < c} q_c' + rank``.
   Phases talk through small global scratch rows (L2-resident); ``tl.debug_barrier()`` separates
   every write from reads of it by other threads.
3. ``crop_budgets`` is phase ``_budgets_row`` alone (grid ``(B,)``); ``crop_topk`` builds the
   ragged layout (crop starts by a running prefix sum, each token's crop by a binary search over
   the crop ends) and runs ``_topk_rows`` (grid ``(B,)``).

Host syncs: none. The default crop count of the full-length image is a Python-int formula of
``N`` and ``k`` (shapes), and everything per image is computed on the device. Under the
interpreter the default tiles are bigger (NumPy arrays cost little per element, every loop step
costs Python overhead); the tests pass small tiles to cover the multi-tile paths there.
Values read from ``lengths``, ``num_crops``, ``capacity``, ``crop_sizes`` and ``budgets`` are
clamped in the kernels, so bad values can never read or write out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vtprune.reference import default_num_crops
from vtprune.triton_kernels._common import check_float, interpreted

__all__ = ["crop_budgets", "crop_topk", "crop_variance", "holov_select"]

_INDEX = (torch.int32, torch.int64)
_BIG = 2**30  # "no crop / no index" sentinel above any valid crop or token index
_MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2: images beyond it go on axis 2
_INT32_MAX = 2**31 - 1
# Kernel 2 tile sizes: BLOCK_C x BLOCK_C crop pairs (hand-out order), BLOCK_T x BLOCK_T token
# pairs (ranks inside crops); 64 x 64 int32 = 16 KiB of comparisons per step.
_BLOCK_C = 64
_BLOCK_T = 64
_STATS_TILE = 1024  # crops x positions per tile in the crop statistics phase
# Under the interpreter a tile is a NumPy array and every loop step costs Python overhead, so
# the defaults there are bigger tiles (tests pass small ones to cover the multi-tile paths).
_INTERP_BLOCK = 256
_INTERP_BLOCK_D = 4096


# ----------------------------------------------------------------------------- shared helpers


@triton.jit
def _crop_layout(n_b, k, num_crops):
    """``(C_b, base, extra)`` of an image of ``n_b`` tokens (SPEC §2), int32 scalars: ``C_b``
    crops of ``base`` tokens, the first ``extra`` one larger.

    ``num_crops > 0``: that many crops (at most ``n_b``); else the default
    ``min(n, max(1, (1024 * n) // (576 * k)))``, in int64 (``1024 * n`` may pass 2**31).
    """
    n64 = n_b.to(tl.int64)
    k64 = tl.maximum(k.to(tl.int64), 1)
    c_default = tl.minimum(n64, tl.maximum((1024 * n64) // (576 * k64), 1))
    c_given = tl.minimum(tl.maximum(num_crops.to(tl.int64), 1), n64)
    count = tl.where(num_crops > 0, c_given, c_default).to(tl.int32)
    n32 = n_b.to(tl.int32)
    base = n32 // count
    extra = n32 - base * count
    return count, base, extra


@triton.jit
def _before(w_j, j, w_i, i):
    """Whether crop ``j`` comes before crop ``i`` in hand-out order: descending weight, ties to the
    lowest crop, NaN after every number (and among themselves by crop)."""
    nan_j = w_j != w_j
    nan_i = w_i != w_i
    ahead = (w_j > w_i) | ((w_j == w_i) & (j < i))
    return ((~nan_j) & (nan_i | ahead)) | (nan_j & nan_i & (j < i))


@triton.jit
def _load_crops(w_ptr, cap_ptr, cc, ok, k, w_den, NORMALIZE: tl.constexpr):
    """``(weight fp32, capacity int32)`` of crops ``cc``.

    Capacities are clamped to ``[0, k]``: no crop can take more than ``k`` tokens, so the clamp
    changes no budget, and it keeps every count in int32. With ``NORMALIZE`` the weight is
    HoloV's ``w_c = score_c / (sum + 1e-6)``, correctly rounded as torch divides (plain ``/`` may
    be 2 ulps off on the GPU, and ``w`` decides floors and order).
    """
    cap = tl.load(cap_ptr + cc, mask=ok, other=0).to(tl.int64)
    cap = tl.minimum(tl.maximum(cap, 0), k.to(tl.int64)).to(tl.int32)
    w = tl.load(w_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    if NORMALIZE:
        w = tl.math.div_rn(w, tl.zeros_like(w) + w_den)
    return w, cap


@triton.jit
def _after_leftover(w, cap, rank, scale, kf, full, part):
    """``(q, q capped at capacity, what the cap cut)`` of crops with weights ``w``.

    ``q = floor(max(w, 0) * scale * k)`` in float64 (NaN weight: 0; absent crop: 0) plus the
    leftover's hand-out: ``full`` rounds for every present crop and one more for the first
    ``part`` in order (pass ``full = part = 0`` for the bare floors).
    """
    present = cap > 0
    pos = tl.where(present & (w > 0.0), w.to(tl.float64), 0.0)
    q = tl.minimum(tl.floor(pos * scale * kf), kf).to(tl.int32)
    q = tl.where(present, q + full + (rank < part).to(tl.int32), 0)
    return q, tl.minimum(q, cap), tl.maximum(q - cap, 0)


@triton.jit
def _handed_out(w_ptr, cap_ptr, rank_ptr, cc, ok, k, w_den, scale, kf, full, part, NORMALIZE: tl.constexpr):
    """``(capacity, place, q capped at capacity, what the cap cut)`` of crops ``cc`` once the floors
    and the leftover are handed out (their places already stored at ``rank_ptr``)."""
    w, cap = _load_crops(w_ptr, cap_ptr, cc, ok, k, w_den, NORMALIZE)
    rank = tl.load(rank_ptr + cc, mask=ok, other=0)
    _, q, cut = _after_leftover(w, cap, rank, scale, kf, full, part)
    return cap, rank, q, cut


@triton.jit
def _given_in_rounds(w_ptr, cap_ptr, rank_ptr, C, k, w_den, scale, kf, full, part, t, NORMALIZE: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """``sum_c min(spare_c, t)``: what ``t`` rounds of the capacity surplus hand out."""
    ar = tl.arange(0, BLOCK_C)
    given = tl.zeros([], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + ar
        cap, _, q, _ = _handed_out(w_ptr, cap_ptr, rank_ptr, cc, cc < C, k, w_den, scale, kf, full, part, NORMALIZE)
        given += tl.sum(tl.minimum(cap - q, t), axis=0)
    return given


@triton.jit
def _budgets_row(
    w_ptr,  # [C] float weights (raw crop scores when NORMALIZE)
    cap_ptr,  # [C] int capacities (0: absent crop)
    q_ptr,  # [C] int out: budgets
    rank_ptr,  # [C] int32 scratch: place of each present crop in the hand-out order
    C,
    k,
    w_den,  # fp32 divisor of the weights when NORMALIZE
    NORMALIZE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """SPEC §2 budgets of one row, equal to ``vtprune.reference._budgets_one``.

    Only the hand-out order is stored; each pass recomputes a crop's floor, leftover share and
    spare room from its weight, capacity and place, so no pass reads what it writes.
    """
    ar = tl.arange(0, BLOCK_C)
    kf = k.to(tl.float64)
    zero = tl.zeros([], tl.int32)

    # ---- sum of the clamped weights of present crops, in float64 like the reference
    total = tl.zeros([], tl.float64)
    n_present = zero
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + ar
        ok = cc < C
        w, cap = _load_crops(w_ptr, cap_ptr, cc, ok, k, w_den, NORMALIZE)
        present = ok & (cap > 0)
        total += tl.sum(tl.where(present & (w > 0.0), w.to(tl.float64), 0.0), axis=0)
        n_present += tl.sum(present.to(tl.int32), axis=0)
    # rescaled only above 1 + 1e-6, so fp32 rounding of valid weights never rescales them
    rescale = total > tl.full([], 1.0 + 1e-6, tl.float64)
    scale = tl.where(rescale, 1.0 / tl.where(rescale, total, 1.0), 1.0)

    # ---- the floors' sum, and each present crop's place in the hand-out order (pairwise)
    sum_q = zero
    for i0 in range(0, C, BLOCK_C):
        ii = i0 + ar
        i_ok = ii < C
        w_i, cap_i = _load_crops(w_ptr, cap_ptr, ii, i_ok, k, w_den, NORMALIZE)
        floors, _, _ = _after_leftover(w_i, cap_i, ii, scale, kf, zero, zero)
        sum_q += tl.sum(floors, axis=0)
        rank = tl.zeros([BLOCK_C], tl.int32)
        for j0 in range(0, C, BLOCK_C):
            jj = j0 + ar
            j_ok = jj < C
            w_j, cap_j = _load_crops(w_ptr, cap_ptr, jj, j_ok, k, w_den, NORMALIZE)
            ahead = _before(w_j[None, :], jj[None, :], w_i[:, None], ii[:, None])
            ahead = ahead & (j_ok & (cap_j > 0))[None, :]
            rank += tl.sum(ahead.to(tl.int32), axis=1)
        tl.store(rank_ptr + ii, rank, mask=i_ok)
    tl.debug_barrier()  # the places are read by other threads below

    # ---- the leftover k - sum(q): `full` rounds over the present crops, +1 to the first `part`
    left = tl.maximum(k - sum_q, 0)
    n_div = tl.maximum(n_present, 1)
    full = left // n_div
    part = left - full * n_div

    # ---- what the capacity cuts, and the largest room left
    surplus = zero
    max_spare = zero
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + ar
        ok = cc < C
        cap, _, q, cut = _handed_out(w_ptr, cap_ptr, rank_ptr, cc, ok, k, w_den, scale, kf, full, part, NORMALIZE)
        surplus += tl.sum(cut, axis=0)
        max_spare = tl.maximum(max_spare, tl.max(cap - q, axis=0))

    # ---- the surplus goes round the crops with room: after t full rounds crop c has
    # min(spare_c, t); t is the largest value with sum_c min(spare_c, t) <= surplus
    lo = zero
    hi = tl.where(surplus > 0, max_spare, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        given = _given_in_rounds(w_ptr, cap_ptr, rank_ptr, C, k, w_den, scale, kf, full, part, mid, NORMALIZE, BLOCK_C)
        fits = given <= surplus
        lo = tl.where(fits, mid, lo)
        hi = tl.where(fits, hi, mid - 1)
    rounds = lo
    given = _given_in_rounds(w_ptr, cap_ptr, rank_ptr, C, k, w_den, scale, kf, full, part, rounds, NORMALIZE, BLOCK_C)
    rest = surplus - given  # fewer than the crops still with room after `rounds` rounds
    # the rest: +1 to the first `rest` crops in order that still have room (seats by pairwise
    # counting, skipped when there is no rest)
    pair_end = tl.where(rest > 0, C, 0)
    for i0 in range(0, C, BLOCK_C):
        ii = i0 + ar
        i_ok = ii < C
        cap_i, rank_i, q_i, _ = _handed_out(w_ptr, cap_ptr, rank_ptr, ii, i_ok, k, w_den, scale, kf, full, part, NORMALIZE)
        spare_i = cap_i - q_i
        seat = tl.zeros([BLOCK_C], tl.int32)
        for j0 in range(0, pair_end, BLOCK_C):
            jj = j0 + ar
            j_ok = jj < C
            cap_j, rank_j, q_j, _ = _handed_out(w_ptr, cap_ptr, rank_ptr, jj, j_ok, k, w_den, scale, kf, full, part, NORMALIZE)
            room_j = j_ok & (cap_j - q_j > rounds)
            seat += tl.sum((room_j[None, :] & (rank_j[None, :] < rank_i[:, None])).to(tl.int32), axis=1)
        extra = ((spare_i > rounds) & (seat < rest)).to(tl.int32)
        tl.store(q_ptr + ii, q_i + tl.minimum(spare_i, rounds) + extra, mask=i_ok)


@triton.jit
def _rank_key(key_ptr, idx, ok):
    """fp32 ranking keys with NaN as ``-inf`` (it ranks below every number, ties by index)."""
    v = tl.load(key_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    return tl.where(v != v, float("-inf"), v)


@triton.jit
def _topk_rows(
    key_ptr,  # [N] float ranking keys
    cid_ptr,  # [N] int32 crop of each token (>= C: in no crop)
    start_ptr,  # [C] int32 first token of each crop
    end_ptr,  # [C] int32 one past its last token
    q_ptr,  # [C] int32 budgets (<= crop size)
    off_ptr,  # [C] int32 exclusive prefix sum of the budgets (official order only)
    out_ptr,  # [k] int64 out
    n_tok,  # tokens to rank: [0, n_tok)
    C,
    k,
    SORTED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BIG: tl.constexpr,
):
    """Keep the top ``q_c`` tokens of every crop; ties to the lowest index."""
    ar = tl.arange(0, BLOCK_T)
    kept = tl.zeros([], tl.int32)
    for i0 in range(0, n_tok, BLOCK_T):
        ii = i0 + ar
        i_ok = ii < n_tok
        c_i = tl.load(cid_ptr + ii, mask=i_ok, other=BIG)
        inside = i_ok & (c_i >= 0) & (c_i < C)
        c_s = tl.where(inside, c_i, 0)
        key_i = _rank_key(key_ptr, ii, i_ok)
        # the tokens to compare with: those of the crops this tile touches
        j_lo = tl.min(tl.load(start_ptr + c_s, mask=inside, other=BIG), axis=0)
        j_hi = tl.max(tl.load(end_ptr + c_s, mask=inside, other=0), axis=0)
        rank = tl.zeros([BLOCK_T], tl.int32)
        for j0 in range(j_lo, j_hi, BLOCK_T):
            jj = j0 + ar
            j_ok = jj < j_hi
            c_j = tl.load(cid_ptr + jj, mask=j_ok, other=-1)
            key_j = _rank_key(key_ptr, jj, j_ok)
            same = (c_j[None, :] == c_i[:, None]) & j_ok[None, :]
            ahead = (key_j[None, :] > key_i[:, None]) | ((key_j[None, :] == key_i[:, None]) & (jj[None, :] < ii[:, None]))
            rank += tl.sum((same & ahead).to(tl.int32), axis=1)
        keep = inside & (rank < tl.load(q_ptr + c_s, mask=inside, other=0))
        if SORTED:
            kk = keep.to(tl.int32)
            pos = kept + tl.cumsum(kk, axis=0) - kk
            kept += tl.sum(kk, axis=0)
        else:
            pos = tl.load(off_ptr + c_s, mask=inside, other=0) + rank
        tl.store(out_ptr + pos, ii.to(tl.int64), mask=keep & (pos >= 0) & (pos < k))


@triton.jit
def _budget_offsets(q_ptr, off_ptr, C, BLOCK_C: tl.constexpr):
    """``off_c = sum_{c' < c} q_c'`` (where crop ``c`` starts in the official output order)."""
    ar = tl.arange(0, BLOCK_C)
    run = tl.zeros([], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + ar
        ok = cc < C
        q = tl.load(q_ptr + cc, mask=ok, other=0)
        tl.store(off_ptr + cc, run + tl.cumsum(q, axis=0) - q, mask=ok)
        run += tl.sum(q, axis=0)


@triton.jit
def _inv_norm(sq):
    """``1 / (|x| + 1e-6)`` from the squared norms ``sq``, correctly rounded."""
    return tl.math.div_rn(tl.zeros_like(sq) + 1.0, tl.sqrt_rn(sq) + 1e-6)


@triton.jit
def _crop_tile(attn_b, var_b, start, m, multi, jj):
    """``(a, v, ok, tok)`` at positions ``jj`` of crops starting at ``start`` with ``m`` tokens:
    ``a = 1000 * attn``, ``v = var`` (0 in one-token crops, whose var is never written), the
    in-crop mask and the token indices."""
    ok = jj[None, :] < m[:, None]
    tok = start[:, None] + jj[None, :]
    a = 1000.0 * tl.load(attn_b + tok, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(var_b + tok, mask=ok & multi[:, None], other=0.0)
    return a, v, ok, tok


# ----------------------------------------------------------------------------- HoloV kernels


@triton.jit(do_not_specialize=["N", "D", "k", "num_crops", "B"])
def _crop_var_kernel(
    x_ptr,  # [B, N, D] tokens (last dim contiguous)
    len_ptr,  # int64 [B] valid tokens (unused unless HAS_LEN)
    var_ptr,  # fp32 [B, N] out: var_i of tokens in crops of >= 2 tokens
    B,
    N,
    D,
    k,
    num_crops,  # 0: the default count
    stride_b,
    stride_n,
    HAS_LEN: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 tiles and an ieee dot (fp32 inputs; bf16 in the interpreter)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GRID_Y: tl.constexpr,
):
    b = tl.program_id(1) + tl.program_id(2) * GRID_Y
    if HAS_LEN:
        n_b = tl.minimum(tl.maximum(tl.load(len_ptr + b, mask=b < B, other=1), 1), N).to(tl.int32)
    else:
        n_b = tl.zeros([], tl.int32) + N
    count, base, extra = _crop_layout(n_b, k, num_crops)
    row_blocks = tl.cdiv(base + (extra > 0).to(tl.int32), BLOCK_M)
    # (crop, row block) pairs in a grid-stride loop: on the GPU the grid covers them all and each
    # program takes at most one; the interpreter runs few programs that take many
    pairs = tl.where(b < B, count * row_blocks, 0)
    for p in range(tl.program_id(0), pairs, tl.num_programs(0)):
        c = p // row_blocks
        r0 = (p - c * row_blocks) * BLOCK_M
        m = base + (c < extra).to(tl.int32)
        if (m >= 2) & (r0 < m):
            start = c * base + tl.minimum(c, extra)
            b64 = b.to(tl.int64)
            x_b = x_ptr + b64 * stride_b
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < m
            row_ptr = x_b + (start + rows).to(tl.int64)[:, None] * stride_n
            ar_d = tl.arange(0, BLOCK_D)
            ar_n = tl.arange(0, BLOCK_N)

            sq = tl.zeros([BLOCK_M], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + ar_d
                xi = tl.load(row_ptr + dd[None, :], mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
                sq += tl.sum(xi * xi, axis=1)
            inv_i = _inv_norm(sq)

            # running row statistics over the column tiles seen so far: count, sum, mean, M2
            seen = tl.zeros([], tl.float32)
            total = tl.zeros([BLOCK_M], tl.float32)
            mean = tl.zeros([BLOCK_M], tl.float32)
            m2 = tl.zeros([BLOCK_M], tl.float32)
            for j0 in range(0, m, BLOCK_N):
                cols = j0 + ar_n
                col_ok = cols < m
                col_ptr = x_b + (start + cols).to(tl.int64)[None, :] * stride_n
                gram = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                csq = tl.zeros([BLOCK_N], tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + ar_d
                    d_ok = dd < D
                    xi = tl.load(row_ptr + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    xjt = tl.load(col_ptr + dd[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # [D, N]
                    xjf = xjt.to(tl.float32)
                    if DOT_FP32:
                        gram += tl.dot(xi.to(tl.float32), xjf, input_precision="ieee")
                    else:
                        gram += tl.dot(xi, xjt)
                    csq += tl.sum(xjf * xjf, axis=0)
                inv_j = _inv_norm(csq)
                s = gram * inv_i[:, None] * inv_j[None, :]
                s = tl.where(rows[:, None] == cols[None, :], 0.0, s)  # S_ii = 0 (even for NaN rows)
                s = tl.where(col_ok[None, :], s, 0.0)
                n_t = tl.minimum(m - j0, BLOCK_N).to(tl.float32)
                t_sum = tl.sum(s, axis=1)
                t_mean = tl.math.div_rn(t_sum, tl.zeros_like(t_sum) + n_t)
                dev = tl.where(col_ok[None, :], s - t_mean[:, None], 0.0)
                t_m2 = tl.sum(dev * dev, axis=1)
                # Chan et al.'s merge of two (count, mean, M2) summaries
                both = seen + n_t
                delta = t_mean - mean
                mean = mean + delta * (n_t / both)
                m2 = m2 + t_m2 + delta * delta * (seen * n_t / both)
                total += t_sum
                seen = both
            mf = m.to(tl.float32)
            mean_h = tl.math.div_rn(total, tl.zeros_like(total) + (mf - 1.0))  # SPEC: sum_j S_ij / (M - 1)
            var = tl.math.div_rn(m2 + mean_h * mean_h / mf, tl.zeros_like(total) + (mf - 1.0))
            tl.store(var_ptr + b64 * N + start + rows, var, mask=row_ok)


@triton.jit(do_not_specialize=["N", "k", "num_crops", "C_MAX"])
def _holov_kernel(
    attn_ptr,  # [B, N] float attention
    var_ptr,  # fp32 [B, N] from _crop_var_kernel
    len_ptr,  # int64 [B] (unused unless HAS_LEN)
    h_ptr,  # fp32 [B, N] scratch: token scores (RANK_SCORE only)
    cid_ptr,  # int32 [B, N] scratch: crop of each token
    crop_ptr,  # int32 [B, 6, C_MAX] scratch: start, end, size, q, off, rank
    score_ptr,  # fp32 [B, C_MAX] scratch: crop scores
    out_ptr,  # int64 [B, k] out
    N,
    k,
    num_crops,
    C_MAX,
    alpha,
    HAS_LEN: tl.constexpr,
    RANK_SCORE: tl.constexpr,
    SORTED: tl.constexpr,
    BLOCK_CC: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BIG: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if HAS_LEN:
        n_b = tl.minimum(tl.maximum(tl.load(len_ptr + b), 1), N).to(tl.int32)
    else:
        n_b = tl.zeros([], tl.int32) + N
    count, base, extra = _crop_layout(n_b, k, num_crops)
    count = tl.minimum(count, C_MAX)  # C_MAX bounds it already; never write past the scratch row
    attn_b = attn_ptr + b * N
    var_b = var_ptr + b * N
    h_b = h_ptr + b * N
    cid_b = cid_ptr + b * N
    crop_b = crop_ptr + b * 6 * C_MAX
    start_b = crop_b
    end_b = crop_b + C_MAX
    size_b = crop_b + 2 * C_MAX
    q_b = crop_b + 3 * C_MAX
    off_b = crop_b + 4 * C_MAX
    rank_b = crop_b + 5 * C_MAX
    score_b = score_ptr + b * C_MAX

    # ---- crop of every token (past the valid length: none)
    ar_t = tl.arange(0, BLOCK_T)
    split = extra * (base + 1)  # tokens of the larger crops
    for i0 in range(0, N, BLOCK_T):
        ii = i0 + ar_t
        crop = tl.where(ii < split, ii // (base + 1), extra + (ii - split) // tl.maximum(base, 1))
        tl.store(cid_b + ii, tl.where(ii < n_b, crop, count), mask=ii < N)

    # ---- crop statistics: gamma_c, h_i, score_c over [BLOCK_CC crops, BLOCK_J positions] tiles
    ar_c = tl.arange(0, BLOCK_CC)
    ar_j = tl.arange(0, BLOCK_J)
    m_max = base + (extra > 0).to(tl.int32)
    score_sum = tl.zeros([], tl.float32)
    for c0 in range(0, count, BLOCK_CC):
        cc = c0 + ar_c
        c_ok = cc < count
        m = tl.where(c_ok, base + (cc < extra).to(tl.int32), 0)
        start = cc * base + tl.minimum(cc, extra)
        multi = m >= 2
        abs_a = tl.zeros([BLOCK_CC], tl.float32)
        abs_v = tl.zeros([BLOCK_CC], tl.float32)
        for j0 in range(0, m_max, BLOCK_J):
            a, v, _, _ = _crop_tile(attn_b, var_b, start, m, multi, j0 + ar_j)
            abs_a += tl.sum(tl.abs(a), axis=1)
            abs_v += tl.sum(tl.abs(v), axis=1)
        mf = tl.maximum(m, 1).to(tl.float32)
        gamma = tl.math.div_rn(tl.math.div_rn(abs_a, mf), tl.math.div_rn(abs_v, mf) + 1e-6)
        a_gamma = alpha * gamma
        h_sum = tl.zeros([BLOCK_CC], tl.float32)
        for j0 in range(0, m_max, BLOCK_J):
            a, v, ok, tok = _crop_tile(attn_b, var_b, start, m, multi, j0 + ar_j)
            h = tl.where(multi[:, None], a + a_gamma[:, None] * v, a)  # one-token crop: h = a
            h_sum += tl.sum(tl.where(ok, h, 0.0), axis=1)
            if RANK_SCORE:
                tl.store(h_b + tok, h, mask=ok)
        first = tl.load(attn_b + start, mask=c_ok, other=0.0).to(tl.float32)
        score = tl.where(multi, tl.math.div_rn(h_sum, mf), first)  # one-token crop: its attn
        tl.store(score_b + cc, score, mask=c_ok)
        tl.store(start_b + cc, start, mask=c_ok)
        tl.store(end_b + cc, start + m, mask=c_ok)
        tl.store(size_b + cc, m, mask=c_ok)
        score_sum += tl.sum(tl.where(c_ok, score, 0.0), axis=0)
    tl.debug_barrier()  # scores, layout, h and crop ids are read by other threads below

    # ---- budgets of w_c = score_c / (sum_c score_c + 1e-6), then the offsets of the crops
    _budgets_row(score_b, size_b, q_b, rank_b, count, k, score_sum + 1e-6, True, BLOCK_C)
    tl.debug_barrier()
    if not SORTED:
        _budget_offsets(q_b, off_b, count, BLOCK_C)
        tl.debug_barrier()

    # ---- top q_c of every crop by attn or by h
    if RANK_SCORE:
        _topk_rows(h_b, cid_b, start_b, end_b, q_b, off_b, out_ptr + b * k, n_b, count, k, SORTED, BLOCK_T, BIG)
    else:
        _topk_rows(attn_b, cid_b, start_b, end_b, q_b, off_b, out_ptr + b * k, n_b, count, k, SORTED, BLOCK_T, BIG)


# ----------------------------------------------------------------------------- stand-alone kernels


@triton.jit(do_not_specialize=["C", "k"])
def _crop_budgets_kernel(
    w_ptr,  # [B, C] float weights
    cap_ptr,  # [B, C] int capacities
    q_ptr,  # int64 [B, C] out
    rank_ptr,  # int32 [B, C] scratch
    C,
    k,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = b * C
    _budgets_row(w_ptr + row, cap_ptr + row, q_ptr + row, rank_ptr + row, C, k, 1.0, False, BLOCK_C)


@triton.jit(do_not_specialize=["N", "C", "k", "SEARCH_STEPS"])
def _crop_topk_kernel(
    key_ptr,  # [B, N] float scores
    sizes_ptr,  # [B, C] int crop sizes
    budgets_ptr,  # [B, C] int budgets
    cid_ptr,  # int32 [B, N] scratch
    crop_ptr,  # int32 [B, 4, C] scratch: start, end, q, off
    out_ptr,  # int64 [B, k] out
    N,
    C,
    k,
    SEARCH_STEPS,  # bit length of C: steps of the binary search over crop ends
    SORTED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BIG: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start_b = crop_ptr + b * 4 * C
    end_b = start_b + C
    q_b = start_b + 2 * C
    off_b = start_b + 3 * C
    cid_b = cid_ptr + b * N
    key_b = key_ptr + b * N

    # ---- ragged layout: starts and ends by a running sum of the sizes (clamped to [0, N]),
    # budgets clamped to their crop, and the official-order offsets
    ar_c = tl.arange(0, BLOCK_C)
    run = tl.zeros([], tl.int64)
    run_q = tl.zeros([], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + ar_c
        ok = cc < C
        size = tl.load(sizes_ptr + b * C + cc, mask=ok, other=0).to(tl.int64)
        size = tl.minimum(tl.maximum(size, 0), N)
        incl = run + tl.cumsum(size, axis=0)
        start = tl.minimum(incl - size, N)
        end = tl.minimum(incl, N)
        q = tl.load(budgets_ptr + b * C + cc, mask=ok, other=0).to(tl.int64)
        q = tl.minimum(tl.maximum(q, 0), end - start).to(tl.int32)
        tl.store(start_b + cc, start.to(tl.int32), mask=ok)
        tl.store(end_b + cc, end.to(tl.int32), mask=ok)
        tl.store(q_b + cc, q, mask=ok)
        tl.store(off_b + cc, run_q + tl.cumsum(q, axis=0) - q, mask=ok)
        run += tl.sum(size, axis=0)
        run_q += tl.sum(q, axis=0)
    tl.debug_barrier()

    # ---- crop of every token: the first crop whose end lies past it (C: none)
    ar_t = tl.arange(0, BLOCK_T)
    for i0 in range(0, N, BLOCK_T):
        ii = i0 + ar_t
        i_ok = ii < N
        lo = tl.zeros([BLOCK_T], tl.int32)
        hi = tl.zeros([BLOCK_T], tl.int32) + C
        for _ in range(0, SEARCH_STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            end = tl.load(end_b + mid, mask=active & i_ok, other=0)
            right = active & (end <= ii)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & (~right), mid, hi)
        tl.store(cid_b + ii, lo, mask=i_ok)
    tl.debug_barrier()

    _topk_rows(key_b, cid_b, start_b, end_b, q_b, off_b, out_ptr + b * k, N, C, k, SORTED, BLOCK_T, BIG)


# ----------------------------------------------------------------------------- wrappers


def _is_interpreted() -> bool:
    return interpreted(_holov_kernel)


def _check_float(x: Tensor, name: str, rank: int, shape_doc: str) -> None:
    check_float(x, name, rank, shape_doc, "holov", _is_interpreted())


def _check_index(x: Tensor, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INDEX:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    return x.contiguous()


def _check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= _INT32_MAX:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= 2**31 - 1, got {k}")
    return k


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _block(name: str, given: int | None, default: int) -> int:
    """A tile size: ``given`` (tests) or ``default``; a power of 2 >= 16 either way."""
    blk = default if given is None else given
    if isinstance(blk, bool) or not isinstance(blk, int) or blk < 16 or blk & (blk - 1):
        raise ValueError(f"{name} must be a power of 2 >= 16, got {blk!r}")
    return blk


def _pair_blocks(count: int, block_c: int | None, block_t: int | None) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_T)`` of the crop-pair and token-pair tiles."""
    cap = _INTERP_BLOCK if _is_interpreted() else _BLOCK_C
    tcap = _INTERP_BLOCK if _is_interpreted() else _BLOCK_T
    return _block("block_c", block_c, _pow2(count, 16, cap)), _block("block_t", block_t, tcap)


def _launch(device: torch.device, kernel, grid, *args, **meta) -> None:
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        # Triton launches on torch's current device/stream; make that the tensors' device (only
        # when it is not already: the switch costs the host microseconds per call).
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _check_holov_args(tokens: Tensor, k: int, num_crops: int | None, lengths: Tensor | None):
    _check_float(tokens, "tokens", 3, "[B, N, D]")
    batch, n, _ = tokens.shape
    k = _check_k(k)
    if k > max(n, 1):
        raise ValueError(f"k must satisfy 1 <= k <= N = {n}, got {k}")
    if num_crops is not None:
        num_crops = _check_k(num_crops, "num_crops")
    if lengths is not None:
        lengths = _check_index(lengths, "lengths", (batch,), tokens.device).to(torch.int64)
    return k, num_crops, lengths


def _max_crops(n: int, k: int, num_crops: int | None) -> int:
    """Bound on the crops of any image of the batch, from the shapes alone (no device read): the
    default count grows with the length, so the full-length image has the most."""
    return min(num_crops, n) if num_crops is not None else default_num_crops(n, k)


def crop_variance(
    tokens: Tensor,
    k: int,
    num_crops: int | None = None,
    lengths: Tensor | None = None,
    *,
    block_m: int | None = None,
    block_d: int | None = None,
) -> Tensor:
    """HoloV's ``var_i`` of every token (SPEC §2), one launch: fp32 ``[B, N]``.

    Crops as in :func:`holov_select` (``k`` only enters through the default crop count). Tokens
    of one-token crops and past ``lengths[b]`` are left unwritten (the statistics phase never
    reads them). ``block_m``, ``block_d``: Gram tile and feature-slice sizes, for tests.
    """
    k, num_crops, lengths = _check_holov_args(tokens, k, num_crops, lengths)
    batch, n, dim = tokens.shape
    device = tokens.device
    var = torch.empty(batch, n, dtype=torch.float32, device=device)
    if batch == 0 or n == 0:
        return var
    c_max = _max_crops(n, k, num_crops)
    m_hint = -(-n // c_max)  # crop size of a full-length image: picks tile sizes only
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    interp = _is_interpreted()
    bm = _block("block_m", block_m, _pow2(m_hint, 16, _INTERP_BLOCK if interp else 64))
    d_cap = _INTERP_BLOCK_D if interp else (32 if tokens.dtype == torch.float32 else 64)
    bd = _block("block_d", block_d, _pow2(dim, 16, d_cap))
    # fp32 inputs need the ieee dot; the interpreter's dot cannot read bf16 tiles (it multiplies
    # their raw bits), so there bf16 tiles are upcast too (exact: bf16 products fit in fp32).
    dot_fp32 = tokens.dtype == torch.float32 or (tokens.dtype == torch.bfloat16 and interp)
    has_len = lengths is not None
    grid_y = min(batch, _MAX_GRID_Y)
    # one program per (crop, row block) on the GPU; the interpreter pays per program, not per pair
    grid = (1 if interp else c_max + (n - 1) // bm, grid_y, triton.cdiv(batch, grid_y))
    _launch(
        device, _crop_var_kernel, grid,
        tokens, lengths if has_len else var, var, batch, n, dim, k, num_crops or 0, tokens.stride(0), tokens.stride(1),
        HAS_LEN=has_len, DOT_FP32=dot_fp32, BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=bd, GRID_Y=_MAX_GRID_Y,
        # 64 x 64 tiles with 4 warps hit 255 registers and spill (ptxas, sm_90); 8 warps do not
        num_warps=8 if bm >= 64 else 4,
    )
    return var


def holov_select(
    tokens: Tensor,
    attn: Tensor,
    k: int,
    num_crops: int | None = None,
    alpha: float = 0.09,
    rank_by: str = "attn",
    lengths: Tensor | None = None,
    sorted: bool = True,
    *,
    block_m: int | None = None,
    block_d: int | None = None,
    block_c: int | None = None,
    block_t: int | None = None,
) -> Tensor:
    """HoloV (SPEC §2) on ``[B, N, D]`` tokens in two launches: int64 ``[B, k]``.

    Args:
        tokens: ``[B, N, D]`` float32/float16/bfloat16 on CUDA (CPU under the interpreter).
        attn: ``[B, N]`` float attention.
        k: tokens per image, ``1 <= k <= lengths[b]``.
        num_crops: crops per image (clamped to ``[1, lengths[b]]``), or None for SPEC's default
            per image.
        alpha: weight of the similarity-variance term.
        rank_by: "attn" (official code) or "score" (the paper's ``h``).
        lengths: optional int ``[B]`` valid tokens per image (clamped to ``[1, N]``).
        sorted: ascending indices, or crops in order with descending key inside.
        block_m, block_d, block_c, block_t: tile sizes (powers of 2 >= 16) of the Gram rows and
            columns, the feature slices, the crop pairs and the token pairs; for tests (the
            defaults suit the GPU, or the interpreter when it runs).
    """
    k, num_crops, lengths = _check_holov_args(tokens, k, num_crops, lengths)
    batch, n, _ = tokens.shape
    device = tokens.device
    _check_float(attn, "attn", 2, "[B, N]")
    if tuple(attn.shape) != (batch, n) or attn.device != device:
        raise ValueError(f"attn must be [B, N] = {(batch, n)} on {device}, got {tuple(attn.shape)} on {attn.device}")
    if rank_by not in ("attn", "score"):
        raise ValueError(f"rank_by must be 'attn' or 'score', got {rank_by!r}")
    out = torch.empty(batch, k, dtype=torch.int64, device=device)
    if batch == 0 or n == 0:
        return out
    var = crop_variance(tokens, k, num_crops, lengths, block_m=block_m, block_d=block_d)

    c_max = _max_crops(n, k, num_crops)
    m_hint = -(-n // c_max)
    bc, bt = _pair_blocks(c_max, block_c, block_t)
    block_j = _pow2(m_hint, 2, 256)
    rank_score = rank_by == "score"
    h = torch.empty(batch, n, dtype=torch.float32, device=device) if rank_score else var  # var: unused
    cid = torch.empty(batch, n, dtype=torch.int32, device=device)
    crop = torch.empty(batch, 6, c_max, dtype=torch.int32, device=device)
    score = torch.empty(batch, c_max, dtype=torch.float32, device=device)
    has_len = lengths is not None
    _launch(
        device, _holov_kernel, (batch,),
        attn.contiguous(), var, lengths if has_len else out, h, cid, crop, score, out,
        n, k, num_crops or 0, c_max, float(alpha),
        HAS_LEN=has_len, RANK_SCORE=rank_score, SORTED=bool(sorted),
        BLOCK_CC=max(1, _STATS_TILE // block_j), BLOCK_J=block_j, BLOCK_C=bc, BLOCK_T=bt, BIG=_BIG,
        num_warps=4,
    )
    return out


def crop_budgets(weights: Tensor, k: int, capacity: Tensor, *, block_c: int | None = None) -> Tensor:
    """Per-crop budgets (SPEC §2 with the capacity rule) in one launch: int64 ``[B, C]``.

    ``weights [B, C]`` float, ``capacity`` int ``[B, C]`` (0: absent crop; ``k`` must not exceed a
    row's total capacity, else that row sums to less than ``k``). Same result as
    :func:`vtprune.reference.crop_budgets`. ``block_c``: crop tile size, for tests.
    """
    _check_float(weights, "weights", 2, "[B, C]")
    batch, count = weights.shape
    device = weights.device
    k = _check_k(k)
    cap = _check_index(capacity, "capacity", (batch, count), device)
    out = torch.zeros(batch, count, dtype=torch.int64, device=device)
    if batch == 0 or count == 0:
        return out
    rank = torch.empty(batch, count, dtype=torch.int32, device=device)
    bc, _ = _pair_blocks(count, block_c, None)
    _launch(device, _crop_budgets_kernel, (batch,), weights.contiguous(), cap, out, rank, count, k, BLOCK_C=bc, num_warps=4)
    return out


def crop_topk(
    scores: Tensor,
    crop_sizes: Tensor,
    budgets: Tensor,
    k: int,
    sorted: bool = True,
    *,
    block_c: int | None = None,
    block_t: int | None = None,
) -> Tensor:
    """Top ``budgets[b, c]`` tokens by ``scores`` inside each contiguous crop, in one launch:
    int64 ``[B, k]``.

    ``scores [B, N]`` float (NaN ranks last), ``crop_sizes``/``budgets`` int ``[B, C]`` (sizes
    summing to at most ``N``, ``0 <= budgets <= sizes``, rows summing to ``k``; other values are
    clamped, never read out of bounds). Ties go to the lowest index. ``sorted=False`` lists crops
    in order and, inside a crop, descending score. Same result as
    :func:`vtprune.reference.crop_topk`. ``block_c``, ``block_t``: crop and token tile sizes, for
    tests.
    """
    _check_float(scores, "scores", 2, "[B, N]")
    batch, n = scores.shape
    device = scores.device
    k = _check_k(k)
    if not isinstance(crop_sizes, Tensor) or crop_sizes.dim() != 2 or crop_sizes.shape[0] != batch:
        raise ValueError(f"crop_sizes must be an int tensor [B, C] with B = {batch}")
    count = crop_sizes.shape[1]
    sizes = _check_index(crop_sizes, "crop_sizes", (batch, count), device)
    q = _check_index(budgets, "budgets", (batch, count), device)
    out = torch.empty(batch, k, dtype=torch.int64, device=device)
    if batch == 0 or n == 0 or count == 0:
        return out
    cid = torch.empty(batch, n, dtype=torch.int32, device=device)
    crop = torch.empty(batch, 4, count, dtype=torch.int32, device=device)
    bc, bt = _pair_blocks(count, block_c, block_t)
    _launch(
        device, _crop_topk_kernel, (batch,),
        scores.contiguous(), sizes, q, cid, crop, out, n, count, k, count.bit_length(),
        SORTED=bool(sorted), BLOCK_C=bc, BLOCK_T=bt, BIG=_BIG, num_warps=4,
    )
    return out
