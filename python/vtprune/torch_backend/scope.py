"""SCOPE greedy selection (SPEC §1) in plain PyTorch, fast on the CPU, correct on any device.

The reference recomputes every gain from scratch at every step: ``k`` passes over the
``N x N`` similarity. Here the gains are maintained incrementally. When ``t`` is picked,
only the rows ``u`` whose coverage rises (``sim(u, t) > c(u)``) change any gain, by

    gain(v) -= sum_{u changed} clamp(sim(u, v), c_old(u), c_new(u)) - c_old(u)

so a step costs ``|changed| x N`` instead of ``N x N``. The changed set shrinks fast (on
random features about ``N / (step + 1)`` rows), so the whole greedy loop costs a few dense
passes over ``S``, and the similarity GEMM dominates. ``S`` is built bitwise symmetric, so the
changed rows are read as contiguous rows ``S[u, :]``.

Two loops:

* CPU (:class:`_CpuGreedy`): the incremental update above, gains accumulated in float64 so
  that the rounding of many small updates cannot reorder candidates that the reference
  orders, plus an exact recomputation of gains that drift near zero whenever they could
  decide a pick (a fully covered token has gain exactly 0, and ties at 0 break by index).
* other devices (:func:`_greedy_dense`): sizing the gather of the changed rows would need a
  host sync per step, so the gains are recomputed densely as in the reference, with no host
  sync at all; one ``N x N`` pass per step is cheap on a GPU.

Storage of ``S`` (docs/semantics.md, the same rule as the Triton kernel): images of up to
``SCOPE_FP32_MAX_N = 4096`` tokens use float32 ``S``, exactly as before; larger ones select on
``S`` rounded once to float16 (each image by its own length, so padding next to a longer image
changes nothing). float64 inputs keep a float64 ``S`` at any size.

* dense loop: the float16 ``S`` is stored as such (``2 * B * N**2`` bytes, 512 MiB at
  N = 16384) and upcast one block of rows at a time (``_DENSE_BLOCK_ELEMS``), so no ``N x N``
  fp32 temporary exists; a batch mixing both storages runs as two groups.
* CPU loops: both engines read float32 rows (the C++ engine takes float/double pointers,
  NumPy's float16 arithmetic is emulated and slow), so the rounded values are held in the
  float32 ``S``: ``4 * B * N**2`` bytes on the CPU (1 GiB at N = 16384), the picks the same as
  the dense loop's up to fp32 near-ties.

Ties: scores within a few ulps of the best (a band far below real score gaps but above the
rounding noise of an ``N``-term sum) count as tied and go to the lowest index (SPEC §1), so
duplicate tokens, symmetric pairs and constant saliency pick the same tokens whichever way
the sums were rounded, alone or padded in a batch.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from .._varlen import select_packed, sort_prefixes
from ..similarity import compute_dtype, normalize_rows, saliency_weights, scope_similarity, scope_storage_groups

_NEG_INF = float("-inf")
# Scores are >= 0 or NaN (gain >= 0 and w >= 0); a NaN score must lose to every number but
# still beat the -inf of selected/padded tokens, so "all remaining NaN" picks the lowest
# unselected index as the reference does.
_NAN_SCORE = -1.0
# Tie band, in eps of the compute dtype relative to the best score. The reference's fp32
# gains are within ~1.6 eps of exact at N = 2880 (ours closer), so 4 eps catches mathematical
# ties; a sweep of 60 random cases matched the reference with 4 eps and missed one with 8.
_TIE_EPS = 4.0
# Below this many tokens one full GEMM is cheaper than the blocked triangular one.
_TRI_MIN_N = 384
# Changed-row updates up to this many elements run in NumPy, larger ones in torch
# (measured at N = 576: 2.0 ms for the loop, against 2.4 all-NumPy and 2.8 all-torch).
_NUMPY_MAX_ELEMS = 1 << 15
# Elements of S processed per chunk in the CPU update (4 MiB of fp32), so the gather, the
# clamps and the column sum of one chunk stay in cache.
_CHUNK_ELEMS = 1 << 20
# The CPU greedy loop: "auto" = the C++ engine vtprune._cpu when it is built and S is
# float32/float64, else the NumPy engine (_CpuGreedy); "numpy" = always the NumPy engine;
# "cpp" = always vtprune._cpu (an error if it is not built). Tests switch it per case.
_ENGINE = os.environ.get("VTPRUNE_SCOPE_CPU_ENGINE", "auto").strip().lower() or "auto"
_CPP_FUNCS = {torch.float32: "scope_greedy_f32", torch.float64: "scope_greedy_f64"}
# fp32 elements per row block when the dense loop upcasts a float16 S (64 MiB), so that it
# never holds an N x N fp32 temporary.
_DENSE_BLOCK_ELEMS = 1 << 24


def _symmetric_similarity(x: Tensor) -> Tensor:
    """``x @ x^T`` for row-normalized ``x [B, N, D]``; bitwise symmetric on the CPU.

    On the CPU only the upper block triangle is multiplied (about half the flops of the GEMM,
    which dominates the whole selection) and mirrored; the diagonal blocks are symmetrized so
    that ``S[u, v] == S[v, u]`` exactly, which the row-gather update relies on.
    """
    batch, n, _ = x.shape
    if x.device.type != "cpu" or n < _TRI_MIN_N:
        s = torch.matmul(x, x.mT)
        if x.device.type == "cpu":
            s = s.triu() + s.triu(1).mT
        return s
    s = x.new_empty(batch, n, n)
    blocks = max(2, min(8, (n + 79) // 160))  # measured best: 4 blocks at N = 576, 8 at 2880
    bounds = [n * i // blocks for i in range(blocks + 1)]
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        blk = torch.matmul(x[:, r0:r1], x[:, r0:].mT)  # [B, r1 - r0, N - r0]
        s[:, r0:r1, r0:] = blk
        s[:, r1:, r0:r1] = blk[:, :, r1 - r0 :].mT
        diag = s[:, r0:r1, r0:r1]
        diag.copy_(diag.triu() + diag.triu(1).mT)
    return s


def _tie_threshold(best: Tensor, tau: float) -> Tensor:
    """Scores at or above this are tied with ``best``; the lowest index among them is picked."""
    return torch.where(torch.isfinite(best), best - tau * best.abs(), best)


# ----------------------------------------------------------------------------- any device


def _dense_gains(s: Tensor, cover: Tensor) -> Tensor:
    """``gain(v) = sum_u max(0, S[u, v] - c(u))`` for ``S [B, N, N]`` and coverage ``c [B, N]``.

    A float16 ``S`` is upcast to the coverage's dtype one block of rows at a time, so the extra
    memory is one ``_DENSE_BLOCK_ELEMS`` block, not an ``N x N`` fp32 matrix.
    """
    if s.dtype == cover.dtype:
        return (s - cover[:, :, None]).clamp_min(0).sum(dim=1)
    batch, n, _ = s.shape
    rows = max(1, _DENSE_BLOCK_ELEMS // max(batch * n, 1))
    gain = torch.zeros(batch, n, dtype=cover.dtype, device=s.device)
    for u0 in range(0, n, rows):
        blk = s[:, u0 : u0 + rows].to(cover.dtype)
        blk.sub_(cover[:, u0 : u0 + rows, None]).clamp_min_(0)  # NaN stays NaN, as in the reference
        gain += blk.sum(dim=1)
    return gain


def _greedy_dense(s: Tensor, w: Tensor, valid: Tensor | None, k: int, mul: bool, tau: float) -> Tensor:
    """The reference's loop, batched and without host syncs: picks ``[B, k]`` in pick order.

    ``S`` may be stored in float16; coverage, gains and scores are then float32.
    """
    batch, n, _ = s.shape
    device = s.device
    dtype = torch.promote_types(s.dtype, torch.float32)
    rows = torch.arange(batch, device=device)
    cover = torch.zeros(batch, n, dtype=dtype, device=device)
    excluded = torch.zeros(batch, n, dtype=torch.bool, device=device) if valid is None else ~valid
    picks = torch.empty(batch, k, dtype=torch.int64, device=device)
    neg_inf = torch.tensor(_NEG_INF, dtype=dtype, device=device)
    nan_score = torch.tensor(_NAN_SCORE, dtype=dtype, device=device)
    for i in range(k):
        # padded rows of S are 0 and their coverage stays 0, so they add nothing
        gain = _dense_gains(s, cover)
        score = gain * w if mul else gain + w
        score = torch.where(torch.isnan(score), nan_score, score)
        score = torch.where(excluded, neg_inf, score)
        thr = _tie_threshold(score.amax(dim=1, keepdim=True), tau)
        t = (score >= thr).to(torch.uint8).argmax(dim=1)  # first index in the tie band
        picks[:, i] = t
        excluded[rows, t] = True
        cover = torch.maximum(cover, s[rows, :, t].to(dtype))
    return picks


# ----------------------------------------------------------------------------- CPU


def _relu_row_sums(s: Tensor) -> Tensor:
    """``sum_u max(0, S[u, v])`` for every ``v`` in float64, from contiguous rows (S symmetric),
    in chunks so that no ``N x N`` temporary is allocated."""
    batch, n, _ = s.shape
    flat = s.view(batch * n, n)
    out = torch.empty(batch * n, dtype=torch.float64)
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    buf = torch.empty(min(rows, batch * n) * n, dtype=s.dtype)
    for r0 in range(0, batch * n, rows):
        blk = flat[r0 : r0 + rows]
        tmp = buf[: blk.numel()].view(blk.shape)
        torch.clamp_min(blk, 0, out=tmp)
        out[r0 : r0 + rows] = tmp.sum(dim=1, dtype=torch.float64)
    return out.view(batch, n)


class _CpuGreedy:
    """The incremental CPU loop over a batch; ``run(k)`` returns the picks ``[B, k]`` in pick order.

    The per-step bookkeeping (scores, pick, changed set, coverage) runs on NumPy views of the
    torch tensors: at LLaVA sizes much of the loop is the fixed cost of ~15 small vector ops
    per step, and a NumPy call costs about 1 us where a torch op costs about 3 us. The update
    of the changed rows runs in NumPy while small and in torch (faster kernels, several
    threads) from ``_NUMPY_MAX_ELEMS`` on. The changed rows of all images are gathered and
    updated together (image-major, no padding); only their final column sums are taken per
    image.
    """

    def __init__(self, s: Tensor, w: Tensor, valid: Tensor | None, mul: bool, tau: float):
        batch, n, _ = s.shape
        self.s, self.n, self.mul, self.tau = s, n, mul, tau
        gain = _relu_row_sums(s)  # float64 [B, N]
        w = w.to(torch.float64, copy=True)
        excluded = torch.zeros(batch, n, dtype=torch.bool) if valid is None else ~valid
        # A picked/padded token gets gain -inf and a neutral weight (1 for "mul", 0 for "add"),
        # so its score is -inf without a mask (-inf * 0 would be NaN). Only with non-finite
        # inputs, where an update can turn that -inf into NaN, is the mask applied every step.
        self.neutral = 1.0 if mul else 0.0
        if valid is not None:
            w.masked_fill_(excluded, self.neutral)
        # padded tokens have gain 0 here (zero rows), so one check covers every valid token
        self.nonfinite = not bool(torch.isfinite(gain).all() & torch.isfinite(w).all())
        if valid is not None:
            gain.masked_fill_(excluded, _NEG_INF)
        self.gain_t = gain
        self.gain, self.w, self.excluded = gain.numpy(), w.numpy(), excluded.numpy()
        # A gain that should be exactly 0 (a fully covered token) reaches it through float
        # cancellation, off by the drift of the accumulated updates (measured below
        # 0.01 * eps * n on random, clustered and smooth features). Gains under `tol` are
        # recomputed exactly whenever the best score is low enough for them to matter.
        self.tol = 8.0 * torch.finfo(s.dtype).eps * n
        w_max = float(self.w.max()) if self.w.size else 0.0
        if mul:
            self.suspect = 2.0 * self.tol * w_max if math.isfinite(w_max) else math.inf
        else:
            self.suspect = w_max + 2.0 * self.tol
        self.chunk_rows = max(1, _CHUNK_ELEMS // max(n, 1))

    def _score(self) -> np.ndarray:
        score = self.gain * self.w if self.mul else self.gain + self.w
        if self.nonfinite:
            score = np.nan_to_num(score, nan=_NAN_SCORE, posinf=math.inf, neginf=_NEG_INF)
            score[self.excluded] = _NEG_INF
        return score

    def _fix_low(self, s: np.ndarray, cover: np.ndarray) -> bool:
        """Recompute from scratch the gains that drifted near 0; True if there were any."""
        gain = self.gain.reshape(-1)
        low = np.flatnonzero((np.abs(gain) < self.tol) & (gain != 0))
        if low.size == 0:
            return False
        # row v of S is column v; minus the coverage of v's own image
        rows = s[low] - cover.reshape(-1, self.n)[low // self.n]
        gain[low] = np.maximum(rows, 0).sum(axis=1, dtype=np.float64)
        return True

    def _pick(self, s: np.ndarray, cover: np.ndarray) -> np.ndarray:
        """The next pick of every image: the first index of the tie band under the best score."""
        score = self._score()
        best = score.max(axis=1)
        if float(best.min()) <= self.suspect and self._fix_low(s, cover):
            score = self._score()
            best = score.max(axis=1)
        with np.errstate(invalid="ignore"):
            thr = np.where(np.isfinite(best), best - self.tau * np.abs(best), best)
        return (score >= thr[:, None]).argmax(axis=1)

    def _pick_one(self, s: np.ndarray, cover: np.ndarray) -> int:
        """:meth:`_pick` for a single image, with scalars: fewer and cheaper calls."""
        score = self._score()[0]
        t = int(score.argmax())  # the first maximal index
        best = float(score[t])
        if best <= self.suspect and self._fix_low(s, cover):
            score = self._score()[0]
            t = int(score.argmax())
            best = float(score[t])
        if t > 0 and math.isfinite(best):
            thr = best - self.tau * abs(best)
            head = score[:t]
            if float(head.max()) >= thr:  # a lower index inside the tie band
                t = int((head >= thr).argmax())
        return t

    def run(self, k: int) -> Tensor:
        s_t, n = self.s, self.n
        batch = s_t.shape[0]
        flat_t = s_t.view(batch * n, n)
        s = flat_t.numpy()
        gain, w, excluded = self.gain, self.w, self.excluded
        flat_gain = gain.reshape(-1)
        cover = np.zeros(batch * n, dtype=s.dtype)
        zero_row = np.zeros((1, n), dtype=s.dtype)
        base = np.arange(batch) * n
        rows_all = np.arange(batch)
        buf = torch.empty(min(self.chunk_rows, batch * n) * n, dtype=s_t.dtype)
        picks = np.empty((batch, k), dtype=np.int64)
        for i in range(k):
            if batch == 1:
                t = self._pick_one(s, cover)
                picks[0, i] = t
                flat_gain[t] = _NEG_INF
                w[0, t] = self.neutral
                excluded[0, t] = True
                col = s[t]  # row t == column t
            else:
                t = self._pick(s, cover)
                picks[:, i] = t
                gain[rows_all, t] = _NEG_INF
                w[rows_all, t] = self.neutral
                excluded[rows_all, t] = True
                col = s[base + t].reshape(-1)  # rows t == columns t of every image, flattened
            changed = np.flatnonzero(col > cover)  # flat b * n + u, image-major
            m = changed.size
            if m == 0:
                continue
            lo = cover[changed]
            hi = col[changed]
            cover[changed] = hi
            width = hi - lo
            if batch > 1:
                owner = changed // n
            if m * n <= _NUMPY_MAX_ELEMS:
                # min(relu(S - lo), hi - lo): an entry already covered (S <= lo) gives exactly 0
                rows = s[changed]
                rows -= lo[:, None]
                np.maximum(rows, zero_row, out=rows)  # 2x faster than a scalar 0 in NumPy 2.x
                np.minimum(rows, width[:, None], out=rows)
                if batch == 1:
                    flat_gain -= rows.sum(axis=0, dtype=np.float64)
                else:
                    self._sub_per_image(torch.from_numpy(rows), owner)
                continue
            changed_t = torch.from_numpy(changed)
            lo_t = torch.from_numpy(lo)[:, None]
            width_t = torch.from_numpy(width)[:, None]
            for c0 in range(0, m, self.chunk_rows):
                c1 = min(m, c0 + self.chunk_rows)
                rows_t = buf[: (c1 - c0) * n].view(c1 - c0, n)
                torch.index_select(flat_t, 0, changed_t[c0:c1], out=rows_t)
                # the same in torch: three cheap passes beat one clamp with tensor bounds
                rows_t.sub_(lo_t[c0:c1]).clamp_min_(0)
                torch.minimum(rows_t, width_t[c0:c1], out=rows_t)
                if batch == 1:
                    self.gain_t[0].sub_(rows_t.sum(dim=0))
                else:
                    self._sub_per_image(rows_t, owner[c0:c1])
        return torch.from_numpy(picks)

    def _sub_per_image(self, rows: Tensor, owner: np.ndarray) -> None:
        """``gain[b] -= sum of the rows owned by image b`` (``owner`` sorted, image-major).

        One torch column sum per image present: NumPy's ``add.reduceat`` and torch's
        ``segment_reduce`` are both 10-20x slower than these sums at these sizes.
        """
        cuts = np.flatnonzero(np.diff(owner)) + 1
        bounds = [0, *cuts.tolist(), owner.size]
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            self.gain_t[int(owner[s0])].sub_(rows[s0:s1].sum(dim=0))


# ----------------------------------------------------------------------------- CPU, C++

_cpu_module: ModuleType | None = None
_cpu_import_error: str | None = None


def cpu_engine_status() -> tuple[bool, str]:
    """Whether the C++ CPU engine ``vtprune._cpu`` imports: ``(built, reason)``."""
    global _cpu_module, _cpu_import_error
    if _cpu_module is None and _cpu_import_error is None:
        try:
            _cpu_module = importlib.import_module("vtprune._cpu")
        except ModuleNotFoundError as exc:
            _cpu_import_error = (
                "not built (installed without a C++ compiler/cmake or with VTPRUNE_BUILD_CPU=0)"
                if exc.name == "vtprune._cpu"
                else f"vtprune._cpu failed to import: {exc}"
            )
        except ImportError as exc:
            _cpu_import_error = f"vtprune._cpu is present but failed to import: {exc}"
    if _cpu_module is not None:
        return True, "ok"
    return False, _cpu_import_error or "not built"


def _cpp_greedy(s: Tensor, w: Tensor, lengths: Tensor | None, k: int, mul: bool, tau: float) -> Tensor | None:
    """The whole CPU loop in ``vtprune._cpu`` (same semantics as :class:`_CpuGreedy`), or None
    when that engine is not to be used here (not built, other dtype, or ``_ENGINE == "numpy"``)."""
    if _ENGINE == "numpy":
        return None
    built, reason = cpu_engine_status()
    func = _CPP_FUNCS.get(s.dtype)
    if not built or func is None:
        if _ENGINE == "cpp":
            raise RuntimeError(f"SCOPE CPU engine 'cpp' unavailable: {reason if not built else s.dtype}")
        return None
    batch, n, _ = s.shape
    s = s.contiguous()
    w = w.to(torch.float64).contiguous()
    lens = None if lengths is None else lengths.to(device="cpu", dtype=torch.int64).contiguous()
    out = torch.empty(batch, k, dtype=torch.int64)
    threads = min(batch, torch.get_num_threads())
    getattr(_cpu_module, func)(
        s.data_ptr(), w.data_ptr(), 0 if lens is None else lens.data_ptr(), batch, n, k, mul, tau, out.data_ptr(), threads
    )
    return out


# ----------------------------------------------------------------------------- ops


def _masked_rows(tokens: Tensor, valid: Tensor | None) -> Tensor:
    """Normalized rows, padded rows set to 0 (they may hold anything, NaN included), so that they
    have zero similarity and zero coverage and count in no gain."""
    x = normalize_rows(tokens)
    if valid is None:
        return x
    return torch.where(valid[:, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _round_to_half_(s: Tensor, lengths: Tensor | None, storage: torch.dtype | None) -> None:
    """Round in place, through float16, the similarity of every image whose storage is float16.

    The CPU engines read float32 rows, so the rounded values stay in the float32 buffer; a
    symmetric ``S`` stays symmetric. ``storage`` forces one storage for all images (tests).
    """
    batch, n, _ = s.shape
    if storage is None:
        plan = scope_storage_groups(n, lengths)
    else:
        plan = [(None, n, storage)]
    images: list[int] = []
    for rows, _, dtype in plan:
        if dtype == torch.float16:
            images += list(range(batch)) if rows is None else rows.tolist()
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for b in images:
        for r0 in range(0, n, step):
            blk = s[b, r0 : r0 + step]
            blk.copy_(blk.to(torch.float16))


def _dense_picks(
    tokens: Tensor, w: Tensor, lengths: Tensor | None, k: int, mul: bool, tau: float, storage: torch.dtype
) -> Tensor:
    """The dense loop on one storage group (``tokens [B, N, D]`` all stored as ``storage``)."""
    n = tokens.shape[1]
    valid = None if lengths is None else torch.arange(n, device=tokens.device)[None, :] < lengths[:, None]
    if storage == torch.float16:
        # zeroed padded tokens normalize to zero rows, as _masked_rows makes them
        zero = torch.zeros((), dtype=tokens.dtype, device=tokens.device)
        x = tokens if valid is None else torch.where(valid[:, :, None], tokens, zero)
        s = scope_similarity(x, torch.float16)
    else:
        s = _symmetric_similarity(_masked_rows(tokens, valid))
    return _greedy_dense(s, w, valid, k, mul, tau)


def scope_picks(
    tokens: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float,
    combine: str,
    lengths: Tensor | None,
    dense: bool | None = None,
    similarity_dtype: torch.dtype | None = None,
) -> Tensor:
    """SCOPE greedy picks ``[B, k]`` int64 in pick order (the engine behind both public forms).

    ``k`` may exceed a short image's length (varlen batches): once an image has no valid
    unselected token left its further picks are meaningless but harmless, and callers drop
    them. ``dense`` chooses the loop: ``None`` by device (incremental on the CPU, sync-free
    dense elsewhere), ``True`` the dense loop anywhere (how the tests reach it without a GPU).

    Storage of the similarity (docs/semantics.md): float32 for images of up to
    ``SCOPE_FP32_MAX_N`` tokens, rounded once to float16 above, decided per image by its own
    length; ``similarity_dtype`` (``torch.float32``/``torch.float16``) forces one storage for
    every image (tests). float64 inputs always keep a float64 similarity.
    """
    if similarity_dtype not in (None, torch.float32, torch.float16):
        raise ValueError(f"similarity_dtype must be None, torch.float32 or torch.float16, got {similarity_dtype}")
    batch, n, _ = tokens.shape
    device = tokens.device
    if batch == 0 or k == 0:
        return torch.empty(batch, k, dtype=torch.int64, device=device)
    w = saliency_weights(saliency, alpha)
    mul = combine == "mul"
    exact = compute_dtype(tokens.dtype) == torch.float64
    tau = _TIE_EPS * torch.finfo(compute_dtype(tokens.dtype)).eps
    if dense is None:
        dense = device.type != "cpu"
    if dense:
        if exact:
            plan = [(None, n, torch.float64)]
        elif similarity_dtype is not None:
            plan = [(None, n, similarity_dtype)]
        else:
            plan = scope_storage_groups(n, lengths)
        if len(plan) == 1 and plan[0][0] is None and plan[0][1] == n:
            return _dense_picks(tokens, w, lengths, k, mul, tau, plan[0][2])
        out = torch.empty(batch, k, dtype=torch.int64, device=device)
        for rows, width, storage in plan:
            # each storage group runs alone, padded only to its own longest image
            r = slice(None) if rows is None else rows.to(device)
            sub_lengths = None if lengths is None else lengths[r]
            out[r] = _dense_picks(tokens[r, :width], w[r, :width], sub_lengths, k, mul, tau, storage)
        return out
    valid = None if lengths is None else torch.arange(n, device=device)[None, :] < lengths[:, None]
    s = _symmetric_similarity(_masked_rows(tokens, valid))
    if not exact:
        _round_to_half_(s, lengths, similarity_dtype)
    picks = _cpp_greedy(s, w, lengths, k, mul, tau)
    if picks is not None:
        return picks
    return _CpuGreedy(s, w, valid, mul, tau).run(k)


def scope_select(
    tokens: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float,
    combine: str,
    lengths: Tensor | None,
    sorted: bool,
) -> Tensor:
    """SCOPE (SPEC §1) on ``[B, N, D]`` tokens; ``[B, k]`` int64, ascending or in pick order."""
    picks = scope_picks(tokens, saliency, k, alpha, combine, lengths)
    return picks.sort(dim=1).values if sorted else picks


def scope_select_varlen(
    tokens: Tensor,
    saliency: Tensor,
    cu_seqlens: Tensor,
    k_per_seq: Tensor,
    alpha: float,
    combine: str,
    sorted: bool,
    max_seqlen: int | None = None,
    k_uniform: int | None = None,
    total_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """SCOPE on packed sequences ``tokens [T, D]`` with ``cu_seqlens [B+1]`` and one ``k`` per sequence.

    Packed and unpacked as the GPU backends do (:func:`vtprune._varlen.select_packed`): the
    batched engine runs with ``k = max(k_per_seq)`` and, by the greedy prefix property, the first
    ``k_b`` picks of sequence ``b`` are its ``k_b``-selection. Padded slots copy a real token's
    saliency; that is harmless because a weight only enters the score of its own token, and
    padded tokens are never candidates. ``max_seqlen``, ``k_uniform`` and ``total_k``: the output shapes, when the
    caller knows them (see :func:`~vtprune._varlen.select_packed`). Returns ``(indices into T, cu_k
    [B+1])``, int64.
    """

    def padded_picks(x: Tensor, sal: Tensor, ks: Tensor, k_max: int, lengths: Tensor, sorted: bool) -> Tensor:
        picks = scope_picks(x, sal, k_max, alpha, combine, lengths.clamp_min(1))
        return sort_prefixes(picks, ks, x.shape[1]) if sorted else picks

    return select_packed(tokens, saliency, cu_seqlens, k_per_seq, sorted, padded_picks, max_seqlen, k_uniform, total_k)
