"""Triton kernel: SCOPE saliency-coverage greedy selection (SPEC §1), all ``k`` steps in one launch.

Same contract as :func:`vtprune.reference.scope_select` / ``scope_select_varlen``: batched,
``lengths``, packed varlen with one ``k`` per sequence, ``sorted`` both ways, ``combine`` "mul" or
"add", fp16/bf16/fp32 inputs, fp32 math, int64 indices.

Design
------
1. Similarity. fp32 tokens: in torch, :func:`vtprune.similarity.scope_similarity`, i.e.
   ``S = normalize_rows(x) @ normalize_rows(x)^T`` evaluated in fp32 (the reference's formula; like
   the reference and the torch backend it follows torch's float32 matmul precision, so it is TF32
   only if the caller enabled TF32 for matmuls). fp16/bf16 tokens: one launch of
   :mod:`vtprune.triton_kernels.similarity` (tensor-core products, norms from the same tiles),
   within a few fp32 ulps of the torch values. The weights ``w = max(sal, 0) ** alpha`` come from
   :func:`vtprune.similarity.saliency_weights`.
   Storage, decided per image by its own length (never by the padded width of the batch, so an
   image's picks do not depend on what it is batched with; a batch mixing both kinds runs as two
   launches, each padded only to its own longest image):
   - up to ``SCOPE_FP32_MAX_N = 4096`` tokens S is kept in fp32, ``4 * B * N**2`` bytes (1.3 MiB
     per image at N = 576, 33 MiB at N = 2880, 64 MiB at 4096), the reference's own fp32 values;
   - above, S is built in fp32 and rounded once to fp16: ``2 * B * N**2`` bytes (512 MiB per
     image at N = 16384); the torch path (fp32 tokens) adds one fp32 row block and the fp32
     normalized tokens (``4 * B * N * D``), the fused kernel (16-bit tokens) nothing. The
     kernel upcasts every load, so all the arithmetic below stays fp32 and the picks are the greedy picks of the rounded S (see docs/semantics.md).
   The scratch rows of step 2 add ``28 * B * N`` bytes (``N`` rounded up to a multiple of 4), in one
   zeroed allocation.
2. One persistent launch, ``grid = (B,)``: program ``b`` runs every greedy step of image ``b``.
   Its state lives in small global scratch rows (L2-resident): gains ``[N]`` fp32, coverage ``[N]``
   fp32, open-term counts ``[N]`` (fp32: whole numbers below ``2**24`` are exact), a selected flag
   ``[N]`` int8 and a list of the rows whose coverage changed in the current step. Everything is walked in ``BLOCK_U x BLOCK_V`` tiles, so any ``N`` works.
   - init: ``gain(v) = sum_u max(0, S[u, v])`` over valid ``u`` (coverage starts at 0);
   - pick: tile-wise argmax of ``score(v) = max(gain(v), 0) * w(v)`` (or ``+ w(v)``) over valid
     unselected ``v``; NaN scores count as ``-inf``; the per-tile maxima are merged with a strict
     ``>`` so the lowest index wins ties; if the best is ``-inf`` the lowest unselected valid index
     is taken (SPEC §1);
   - coverage: the column ``S[:, t]`` (read as a column, exactly as the reference does, so no
     symmetry of ``S`` is assumed) is compared with the coverage; the rows ``u`` whose coverage
     rises are compacted (prefix sum) into a list with their old/new coverage ``lo``/``hi``;
   - incremental gains: ``gain(v) -= sum_{u in list} min(max(S[u, v] - lo_u, 0), hi_u - lo_u)``,
     i.e. ``max(0, S - c_old) - max(0, S - c_new)`` written so that a covered entry gives exactly
     0. A step costs ``|changed| x N`` instead of the reference's ``N x N`` (the changed set
     shrinks quickly as the selection grows). Alongside, ``open(v)`` counts the terms
     ``max(0, S[u, v] - c(u))`` still positive (exact integers); at ``open(v) = 0`` the gain is
     exactly 0, as the reference computes it, so the drift of the float sums cannot break the
     ties of fully covered tokens (duplicates of picked ones).
     The listed rows' coverage is written after the gain update. ``tl.debug_barrier()`` separates
     every global write from reads of it by other threads (warps may hold replicated copies of a
     small tile and reduce it without synchronizing, so even "read, then write" of the same
     element inside one phase would race).
   Updates are summed in a fixed order (rows ascending, one tile of columns at a time), so the
   result is deterministic. Gains stay fp32: the incremental sums agree with the reference's
   recomputed sums to a few fp32 ulps of the initial gain, so the picks are equal unless two
   scores are that close (a near-tie, where the reference's own rounding decides).
3. ``sorted=True``: after the last step the kernel compacts the selected flags in index order
   (a prefix sum per tile), so no sort runs after it. The varlen packing/unpacking are torch ops
   in the wrapper (:mod:`vtprune._varlen`).

The kernel reads only inside ``[0, length_b)`` (lengths clamped to ``[1, N]``, per-image ``k``
clamped to ``[0, min(length_b, K_MAX)]``), so bad values cannot read or write out of bounds.
Offsets into S are int64 (``B * N * N`` reaches ``2**31`` at ``B = 8, N = 16384``); the
per-row scratch offsets ``b * N + i`` are int64 as well.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vtprune._dispatch import constant_index, kernel_weights
from vtprune._validation import as_int64_on
from vtprune._varlen import bind_scope_picks, select_batched, select_packed
from vtprune.similarity import scope_similarity, scope_storage_groups
from vtprune.triton_kernels._common import check_float, interpreted
from vtprune.triton_kernels.similarity import scope_similarity as fused_similarity

__all__ = ["scope_picks", "scope_select", "scope_select_varlen"]

# Tile sizes: BLOCK_U rows of S (the reduction axis) by BLOCK_V columns (candidates).
# 32 x 256 fp32 = 32 KiB per tile, 32 values per thread with 8 warps.
_BLOCK_U = 32
_BLOCK_V = 256
_NUM_WARPS = 8
_BIG = 2**31 - 1  # "no index" sentinel, larger than any valid index


@triton.jit
def _scope_greedy_kernel(
    s_ptr,  # fp32 or fp16 [B, N, N]  similarity, row-major, contiguous (upcast on load)
    w_ptr,  # fp32/fp16/bf16 [B, N] (row stride W_STRIDE): weights read as max(w, 0); unused if UNIT_W
    len_ptr,  # int64 [B]     valid tokens per image
    k_ptr,  # int64 [B]       picks per image
    gain_ptr,  # fp32 [B, N]  scratch: current gains
    cov_ptr,  # fp32 [B, N]   scratch: coverage, zero-initialized
    sel_ptr,  # int8 [B, N]   scratch: selected flags, zero-initialized
    open_ptr,  # fp32 [B, N]  scratch: count of the still-positive terms of each gain (exact below 2**24)
    lu_ptr,  # int32 [B, N]   scratch: rows whose coverage changed this step
    llo_ptr,  # fp32 [B, N]   scratch: their old coverage
    lhi_ptr,  # fp32 [B, N]   scratch: their new coverage
    out_ptr,  # int64 [B, K_MAX] picks in pick order (entries >= k_b left untouched)
    N,
    K_MAX,
    W_STRIDE,
    MUL: tl.constexpr,
    SORTED: tl.constexpr,
    UNIT_W: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BIG: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    # Clamped so that no value of lengths / k can push a read or write out of bounds.
    length = tl.minimum(tl.maximum(tl.load(len_ptr + b), 1), N).to(tl.int32)
    kb = tl.minimum(tl.maximum(tl.load(k_ptr + b), 0), tl.minimum(length, K_MAX)).to(tl.int32)

    s_b = s_ptr + b * N * N  # int64 offsets: B * N * N can exceed 2**31
    row = b * N
    w_b = w_ptr + b * W_STRIDE
    gain_b = gain_ptr + row
    cov_b = cov_ptr + row
    sel_b = sel_ptr + row
    open_b = open_ptr + row
    lu_b = lu_ptr + row
    llo_b = llo_ptr + row
    lhi_b = lhi_ptr + row
    out_b = out_ptr + b * K_MAX

    ar_u = tl.arange(0, BLOCK_U)
    ar_v = tl.arange(0, BLOCK_V)

    # ---- initial gains: gain(v) = sum_u max(0, S[u, v]) over valid u (coverage is 0), and
    # open(v) = #{u : S[u, v] > 0}, the terms of gain(v) still positive. open is exact where the
    # incremental float gains drift, so a fully covered token (gain exactly 0 in the reference)
    # scores exactly 0 here too and ties at 0 go to the lowest index, not to rounding residue.
    for v0 in range(0, length, BLOCK_V):
        offs_v = v0 + ar_v
        v_ok = offs_v < length
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        opened = tl.zeros([BLOCK_V], dtype=tl.float32)
        for u0 in range(0, length, BLOCK_U):
            offs_u = u0 + ar_u
            u_ok = offs_u < length
            s = tl.load(
                s_b + offs_u.to(tl.int64)[:, None] * N + offs_v[None, :],
                mask=u_ok[:, None] & v_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(tl.where(s < 0.0, 0.0, s), axis=0)  # NaN stays NaN, as clamp_min(0)
            opened += tl.sum((s > 0.0).to(tl.float32), axis=0)  # NaN: never open
        tl.store(gain_b + offs_v, acc, mask=v_ok)
        tl.store(open_b + offs_v, opened, mask=v_ok)
    tl.debug_barrier()  # gains written by some threads are read by others below

    for i in range(0, kb):
        # ---- pick: lowest-index argmax of the score over valid unselected tokens
        best_val = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], BIG, tl.int32)
        first_free = tl.full([], BIG, tl.int32)
        for v0 in range(0, length, BLOCK_V):
            offs_v = v0 + ar_v
            v_ok = offs_v < length
            g = tl.load(gain_b + offs_v, mask=v_ok, other=0.0)
            if UNIT_W:  # alpha = 0: w = 1 (0 ** 0 = 1)
                wv = tl.full([BLOCK_V], 1.0, tl.float32)
            else:  # max(w, 0), NaN kept: the saliency itself for alpha = 1
                wv = tl.load(w_b + offs_v, mask=v_ok, other=0.0).to(tl.float32)
                wv = tl.where(wv < 0.0, 0.0, wv)
            taken = tl.load(sel_b + offs_v, mask=v_ok, other=1)
            n_open = tl.load(open_b + offs_v, mask=v_ok, other=1.0)
            # The exact gain is >= 0, and exactly 0 with no open term; the drift of the
            # incremental sums must change neither. NaN stays NaN.
            g = tl.where((g < 0.0) | ((n_open == 0.0) & (g == g)), 0.0, g)
            if MUL:
                score = g * wv
            else:
                score = g + wv
            free = v_ok & (taken == 0)
            score = tl.where(free & (score == score), score, float("-inf"))
            m = tl.max(score, axis=0)
            im = tl.min(tl.where(score == m, offs_v, BIG), axis=0)
            better = m > best_val  # strict: an equal score in a later tile loses
            best_idx = tl.where(better, im, best_idx)
            best_val = tl.where(better, m, best_val)
            first_free = tl.minimum(first_free, tl.min(tl.where(free, offs_v, BIG), axis=0))
        t = tl.where(best_val > float("-inf"), best_idx, first_free)
        t = tl.minimum(t, length - 1)  # never out of bounds (first_free is < length when kb <= length)

        # Every thread must be done reading the flags before one of them marks t (with few
        # candidates per tile, warps hold replicated copies and reduce without syncing).
        tl.debug_barrier()
        if not SORTED:
            tl.store(out_b + i, t.to(tl.int64))
        tl.store(sel_b + t, 1)
        tl.debug_barrier()

        # ---- coverage: list the rows u with S[u, t] > c(u), with old and new values. The
        # coverage itself is written only after the gain update: a thread writing c(u) here
        # could race with a replica of the same element still reading it.
        count = tl.full([], 0, tl.int32)
        for u0 in range(0, length, BLOCK_U):
            offs_u = u0 + ar_u
            u_ok = offs_u < length
            col = tl.load(s_b + offs_u.to(tl.int64) * N + t, mask=u_ok, other=0.0).to(tl.float32)  # S[u, t]
            c = tl.load(cov_b + offs_u, mask=u_ok, other=0.0)
            changed = u_ok & (col > c)  # NaN never changes the coverage
            ch = changed.to(tl.int32)
            pos = count + tl.cumsum(ch, axis=0) - ch  # exclusive prefix sum: rows stay ascending
            tl.store(lu_b + pos, offs_u, mask=changed)
            tl.store(llo_b + pos, c, mask=changed)
            tl.store(lhi_b + pos, col, mask=changed)
            count += tl.sum(ch, axis=0)
        tl.debug_barrier()  # the list is read back by other threads

        # ---- gains: gain(v) -= sum_{u changed} min(max(S[u, v] - lo_u, 0), hi_u - lo_u), and
        # open(v) -= #{u changed : lo_u < S[u, v] <= hi_u} (the terms this step closes)
        for v0 in range(0, length, BLOCK_V):
            offs_v = v0 + ar_v
            v_ok = offs_v < length
            acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            closed = tl.zeros([BLOCK_V], dtype=tl.float32)
            for j0 in range(0, count, BLOCK_U):
                offs_j = j0 + ar_u
                j_ok = offs_j < count
                u = tl.load(lu_b + offs_j, mask=j_ok, other=0)
                lo = tl.load(llo_b + offs_j, mask=j_ok, other=0.0)
                hi = tl.load(lhi_b + offs_j, mask=j_ok, other=0.0)
                s = tl.load(
                    s_b + u.to(tl.int64)[:, None] * N + offs_v[None, :],
                    mask=j_ok[:, None] & v_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                d = tl.minimum(tl.maximum(s - lo[:, None], 0.0), (hi - lo)[:, None])
                acc += tl.sum(tl.where(j_ok[:, None], d, 0.0), axis=0)
                shut = j_ok[:, None] & (s > lo[:, None]) & (s <= hi[:, None])
                closed += tl.sum(shut.to(tl.float32), axis=0)
            g = tl.load(gain_b + offs_v, mask=v_ok, other=0.0)
            tl.store(gain_b + offs_v, g - acc, mask=v_ok)
            n_open = tl.load(open_b + offs_v, mask=v_ok, other=0.0)
            tl.store(open_b + offs_v, n_open - closed, mask=v_ok)
        # ---- coverage of the listed rows: c(u) = S[u, t]
        for j0 in range(0, count, BLOCK_U):
            offs_j = j0 + ar_u
            j_ok = offs_j < count
            u = tl.load(lu_b + offs_j, mask=j_ok, other=0)
            hi = tl.load(lhi_b + offs_j, mask=j_ok, other=0.0)
            tl.store(cov_b + u, hi, mask=j_ok)
        tl.debug_barrier()  # gains, flags, coverage and the list are read by other threads next step

    if SORTED:
        # the picks ascending: the selected flags compacted in index order (no sort launch)
        base = tl.full([], 0, tl.int32)
        for v0 in range(0, length, BLOCK_V):
            offs_v = v0 + ar_v
            taken = tl.load(sel_b + offs_v, mask=offs_v < length, other=0).to(tl.int32)
            pos = base + tl.cumsum(taken, axis=0) - taken
            tl.store(out_b + pos, offs_v.to(tl.int64), mask=taken != 0)
            base += tl.sum(taken, axis=0)


def _is_interpreted() -> bool:
    return interpreted(_scope_greedy_kernel)


def _check_tokens(tokens: Tensor, rank: int, shape_doc: str) -> None:
    check_float(tokens, "tokens", rank, shape_doc, "scope", _is_interpreted())


def _pow2_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def scope_picks(
    tokens: Tensor,
    saliency: Tensor,
    k_per_image: Tensor,
    k_max: int,
    alpha: float,
    combine: str,
    lengths: Tensor | None = None,
    *,
    sorted: bool = False,
    block_u: int | None = None,
    block_v: int | None = None,
    similarity_dtype: torch.dtype | None = None,
) -> Tensor:
    """SCOPE greedy picks: int64 ``[B, k_max]``, in pick order, or ascending with ``sorted`` (the
    kernel writes them so: no sort launch).

    Args:
        tokens: ``[B, N, D]`` float32/float16/bfloat16 on CUDA (CPU under the interpreter).
        saliency: ``[B, N]`` float.
        k_per_image: int ``[B]``, picks of image ``b`` (clamped to ``[0, min(lengths[b], k_max)]``);
            entries ``>= k_per_image[b]`` of row ``b`` are left uninitialized.
        k_max: columns of the result.
        alpha, combine: as in SPEC §1 (``combine`` is "mul" or "add").
        lengths: optional int ``[B]`` valid tokens per image (clamped to ``[1, N]``).
        sorted: the first ``k_b`` entries of row ``b`` ascending instead of in pick order.
        block_u, block_v: tile sizes (powers of 2 >= 16), for tests; defaults suit the GPU.
        similarity_dtype: storage of S for every image, ``torch.float32`` or ``torch.float16``,
            for tests (fp16 on sizes the interpreter can run). ``None``: each image by its own
            length (:func:`vtprune.similarity.scope_storage_groups`).
    """
    _check_tokens(tokens, 3, "[B, N, D]")
    if combine not in ("mul", "add"):
        raise ValueError(f"combine must be 'mul' or 'add', got {combine!r}")
    if similarity_dtype not in (None, torch.float32, torch.float16):
        raise ValueError(f"similarity_dtype must be None, torch.float32 or torch.float16, got {similarity_dtype}")
    for name, blk in (("block_u", block_u), ("block_v", block_v)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name} must be a power of 2 >= 16, got {blk}")
    batch, n, _ = tokens.shape
    device = tokens.device
    out = torch.empty(batch, k_max, dtype=torch.int64, device=device)
    if batch == 0 or n == 0 or k_max == 0:
        return out
    # no-op conversions are skipped: each would still cost a dispatch on the host
    lengths = constant_index(batch, n, device) if lengths is None else as_int64_on(lengths, device).contiguous()
    k_per_image = as_int64_on(k_per_image, device).contiguous()

    if similarity_dtype is None:
        plan = scope_storage_groups(n, lengths)
    else:
        plan = [(None, n, similarity_dtype)]
    for rows, width, storage in plan:
        if rows is None:
            x, sal = (tokens, saliency) if width == n else (tokens[:, :width], saliency[:, :width])
            _launch(x, sal, k_per_image, lengths, out, alpha, combine, sorted, storage, block_u, block_v)
        else:
            # images of the other storage run separately, each group padded only to its own width
            r = rows.to(device)
            part = torch.empty(r.shape[0], k_max, dtype=torch.int64, device=device)
            _launch(
                tokens[r, :width], saliency[r, :width], k_per_image[r], lengths[r], part,
                alpha, combine, sorted, storage, block_u, block_v,
            )
            out[r] = part
    return out


def _launch(
    tokens: Tensor,
    saliency: Tensor,
    k_per_image: Tensor,
    lengths: Tensor,
    out: Tensor,
    alpha: float,
    combine: str,
    sorted: bool,
    storage: torch.dtype,
    block_u: int | None,
    block_v: int | None,
) -> None:
    """One kernel launch over ``tokens [B, N, D]``, S stored as ``storage``; fills ``out [B, k_max]``."""
    batch, n, _ = tokens.shape
    device = tokens.device
    # [B, N, N] fp32 or fp16, contiguous; 16-bit tokens in one launch of our own kernel
    if tokens.dtype in (torch.float16, torch.bfloat16):
        sim = fused_similarity(tokens, storage)
    else:
        sim = scope_similarity(tokens, storage)
    w, unit_w = kernel_weights(saliency, alpha)

    # The seven scratch rows in one zeroed allocation instead of seven (each costs the host a call;
    # zeroing the rows that need no zeros costs the device one memset of 28 * B * N bytes). The
    # kernel takes each as a flat [B * N] row block (element b * N + i), so a plane of [B, N_pad]
    # 4-byte words holds any of them (the int8 flags in its first quarter); N_pad, a multiple of
    # 4, keeps every plane 16-byte aligned as separate allocations were.
    n_pad = (n + 3) // 4 * 4
    cover, selected, gain, list_lo, list_hi, list_u, n_open = torch.zeros(
        7, batch, n_pad, dtype=torch.float32, device=device
    ).unbind(0)
    selected, list_u = selected.view(torch.int8), list_u.view(torch.int32)  # n_open stays fp32: exact counts

    bu = block_u or _pow2_block(n, _BLOCK_U)
    bv = block_v or _pow2_block(n, _BLOCK_V)
    k_max = out.shape[1]
    args = (sim, w, lengths, k_per_image, gain, cover, selected, n_open, list_u, list_lo, list_hi, out, n, k_max, w.stride(0))
    meta = dict(MUL=combine == "mul", SORTED=bool(sorted), UNIT_W=unit_w, BLOCK_U=bu, BLOCK_V=bv, BIG=_BIG, num_warps=_NUM_WARPS)
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        # Triton launches on torch's current device/stream; make that the tensors' device (only
        # when it is not already: the switch costs the host microseconds per call).
        with torch.cuda.device(device):
            _scope_greedy_kernel[(batch,)](*args, **meta)
    else:
        _scope_greedy_kernel[(batch,)](*args, **meta)


def scope_select(
    tokens: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float = 1.0,
    combine: str = "mul",
    lengths: Tensor | None = None,
    sorted: bool = True,
    **blocks: int,
) -> Tensor:
    """SCOPE (SPEC §1) on ``[B, N, D]`` tokens: int64 ``[B, k]``, ascending or in pick order."""
    _check_tokens(tokens, 3, "[B, N, D]")
    return select_batched(tokens, saliency, k, lengths, sorted, bind_scope_picks(scope_picks, alpha, combine, blocks))


def scope_select_varlen(
    tokens: Tensor,
    saliency: Tensor,
    cu_seqlens: Tensor,
    k_per_seq: Tensor,
    alpha: float = 1.0,
    combine: str = "mul",
    sorted: bool = True,
    max_seqlen: int | None = None,
    k_uniform: int | None = None,
    total_k: int | None = None,
    **blocks: int,
) -> tuple[Tensor, Tensor]:
    """SCOPE on packed sequences ``tokens [T, D]``, ``cu_seqlens [B+1]``, one ``k`` per sequence.

    The sequences are padded into a ``[B, max_len, D]`` batch and run in the same single launch,
    each image stopping after its own ``k_b`` picks. Returns ``(indices into T [sum k], cu_k [B+1])``,
    both int64. Inputs are expected validated (``cu_seqlens`` strictly increasing from 0 to ``T``,
    ``1 <= k_b <= seqlen_b``); bad values are clamped inside the kernel, never read out of bounds.
    ``max_seqlen``/``k_uniform``/``total_k``: the output shapes, when known on the host (no device read then).
    """
    _check_tokens(tokens, 2, "[T, D]")
    padded_picks = bind_scope_picks(scope_picks, alpha, combine, blocks)
    return select_packed(tokens, saliency, cu_seqlens, k_per_seq, sorted, padded_picks, max_seqlen, k_uniform, total_k)
