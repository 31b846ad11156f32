"""Acceptance criteria shared by the test suite and ``vtprune check``.

A backend's answer is judged against :mod:`vtprune.reference` by one of three rules, and this
module holds each rule once so the tests (through ``tests/conftest.py``) and the user-facing
checker (:mod:`vtprune.check`) can never disagree on what "correct" means:

* **Greedy selections (SCOPE).** Equal to the reference pick for pick, up to the first *near-tie*
  of the reference trajectory: a step whose two best candidate scores, recomputed in float64,
  are within :data:`TIE_REL` of each other, where either implementation's fp32 rounding may
  legitimately decide. From a divergence after such a step on, every pick must still be a valid
  greedy pick: within ``rel`` of the best float64 score given the earlier picks.
* **Top-k style selections (HoloV, budgets, per-crop top-k).** Exactly the reference's, unless a
  float64 recomputation shows a decision within :data:`TIE_REL` of flipping; then the structural
  invariants only.
* **Real-valued outputs (coverage, attention importance).** FlashAttention's rule: against a
  float64 reference on the same dtype-rounded inputs, the error may be at most twice the error
  of PyTorch's own computation at the working precision (the reference in float32), plus a
  small absolute floor.

Every check raises :class:`VerificationError` (an ``AssertionError``, so pytest reports it as a
failed assertion) with a message that says what differed; none relies on ``assert`` statements,
so they keep working under ``python -O``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TIE_REL",
    "VerificationError",
    "np_cosine",
    "np_facility_location",
    "np_weights",
    "np_scope_scores",
    "check_greedy_picks",
    "check_fl_greedy_picks",
    "assert_valid_selection",
    "assert_same_greedy",
    "first_near_tie",
    "check_scope_picks",
    "holov_near_tie",
    "max_abs_error",
    "check_error_vs_torch",
    "sorted_rows_check",
    "crop_counts",
]

#: Relative gap under which two float64 scores count as a near-tie (fp32 rounding may decide).
TIE_REL = 1e-5


class VerificationError(AssertionError):
    """A backend's output does not meet the acceptance rule; the message says where and how."""


def _fail(message: str) -> None:
    raise VerificationError(message)


def _as_f64(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- float64 models of SPEC §1


def np_cosine(x) -> np.ndarray:
    """SPEC §1 similarity in float64: <x_u, x_v> / (max(|x_u|, 1e-6) max(|x_v|, 1e-6))."""
    x = _as_f64(x)
    norms = np.maximum(np.linalg.norm(x, axis=-1), 1e-6)
    xn = x / norms[:, None]
    return xn @ xn.T


def np_facility_location(sim: np.ndarray, picks) -> float:
    """sum_u max(0, max_{s in S} sim(u, s)), straight from the definition."""
    picks = list(picks)
    if not picks:
        return 0.0
    return float(np.maximum(sim[:, picks].max(axis=1), 0.0).sum())


def np_weights(sal, alpha: float) -> np.ndarray:
    """SPEC §1 weights ``max(saliency, 0) ** alpha`` with ``0 ** 0 = 1``, in float64."""
    s = np.maximum(_as_f64(sal), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((s == 0) & (alpha == 0), 1.0, s**alpha)


def np_scope_scores(sim: np.ndarray, w: np.ndarray, picks, combine: str) -> np.ndarray:
    """SCOPE scores of every token given the earlier picks, recomputed from scratch."""
    n = sim.shape[0]
    cover = np.zeros(n)
    for t in picks:
        cover = np.maximum(cover, sim[:, t])
    gain = np.maximum(sim - cover[:, None], 0.0).sum(axis=0)
    return gain * w if combine == "mul" else gain + w


def _score_slack(n: int, w: np.ndarray, a: int, b: int, combine: str) -> float:
    # fp32 gains carry an absolute error of up to ~1e-7 per summed term (n terms); a "mul"
    # score scales that by its weight.
    return 1e-6 * n * ((w[a] + w[b]) if combine == "mul" else 2.0)


def check_greedy_picks(tokens, saliency, picks, alpha: float, combine: str, rel: float = 1e-5) -> None:
    """Each pick (in pick order) maximizes the SCOPE score given the earlier picks.

    A pick is accepted when its float64 score is within ``rel`` (relative) of the best
    unselected score, plus a tiny absolute slack for scores that are mathematically 0.
    """
    sim = np_cosine(tokens)
    w = np_weights(saliency, alpha)
    n = sim.shape[0]
    picks = [int(p) for p in picks]
    if len(set(picks)) != len(picks):
        _fail(f"repeated picks {picks}")
    if not all(0 <= p < n for p in picks):
        _fail(f"picks out of range {picks} (N = {n})")
    for i, t in enumerate(picks):
        score = np_scope_scores(sim, w, picks[:i], combine)
        score[picks[:i]] = -np.inf
        arg = int(score.argmax())
        best = float(score[arg])
        if score[t] == best:  # also equal infinite scores (an infinite saliency), where best - tol is NaN
            continue
        tol = rel * abs(best) + _score_slack(n, w, t, arg, combine)
        if not score[t] >= best - tol:
            _fail(
                f"step {i}: picked {t} with score {score[t]!r}, but the best unselected score is {best!r} "
                f"(token {arg}); picks so far {picks[:i]}"
            )


def check_fl_greedy_picks(tokens, picks, rel: float = 1e-5) -> None:
    """Each pick maximizes the facility-location gain FL(S + v) - FL(S)."""
    sim = np_cosine(tokens)
    n = sim.shape[0]
    picks = [int(p) for p in picks]
    for i, t in enumerate(picks):
        base = np_facility_location(sim, picks[:i])
        gains = np.array(
            [-np.inf if v in picks[:i] else np_facility_location(sim, picks[:i] + [v]) - base for v in range(n)]
        )
        best = float(gains.max())
        if not gains[t] >= best - (rel * abs(best) + 1e-6 * n):
            _fail(f"step {i}: picked {t} with FL gain {gains[t]!r}, best {best!r} (token {int(gains.argmax())})")


def assert_valid_selection(idx: Tensor, k: int, limits) -> None:
    """``idx [B, k]``: int64, ``k`` distinct indices per row, each in ``[0, limits[b])``."""
    if idx.dtype != torch.int64:
        _fail(f"indices must be int64, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[1] != k:
        _fail(f"indices must have shape [B, {k}], got {tuple(idx.shape)}")
    for b, row in enumerate(idx.tolist()):
        lim = limits if isinstance(limits, int) else int(limits[b])
        if len(set(row)) != k:
            _fail(f"row {b} has repeated indices: {row}")
        if not all(0 <= v < lim for v in row):
            _fail(f"row {b} has indices out of [0, {lim}): {row}")


def assert_same_greedy(got, want, tokens, saliency, alpha: float, combine: str, rel: float = 1e-5) -> None:
    """Two SCOPE runs (pick order) on the same image agree, except after a near-tie.

    Different but valid computations (padded vs alone, packed vs per sequence, two backends)
    may round a mathematically exact tie differently (e.g. two tokens that only cover each
    other have equal gains at alpha = 0). So: equal, or at the first step where they differ
    the two picks' float64 scores are within ``rel`` of each other and both runs are valid
    greedy runs.
    """
    got, want = [int(v) for v in got], [int(v) for v in want]
    if len(got) != len(want):
        _fail(f"runs of different lengths: {len(got)} vs {len(want)}")
    if got == want:
        return
    i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
    sim = np_cosine(tokens)
    w = np_weights(saliency, alpha)
    score = np_scope_scores(sim, w, got[:i], combine)
    a, b = score[got[i]], score[want[i]]
    if not abs(a - b) <= rel * max(abs(a), abs(b)) + _score_slack(sim.shape[0], w, got[i], want[i], combine):
        _fail(f"picks differ at step {i} without a tie: {got} vs {want}; scores {a!r} vs {b!r}")
    check_greedy_picks(tokens, saliency, got, alpha, combine, rel)
    check_greedy_picks(tokens, saliency, want, alpha, combine, rel)


def first_near_tie(tokens, saliency, picks, alpha: float, combine: str, tie_rel: float = TIE_REL) -> int:
    """First step of the pick sequence whose best two float64 scores are within ``tie_rel``
    (relative) plus the absolute slack fp32 sums of ``N`` terms carry (as in
    :func:`assert_same_greedy`: scores far below the first ones are decided by rounding too).
    Two equal infinite scores are a tie; one infinite score above finite ones is not.

    ``len(picks)`` when the whole sequence is free of near-ties.
    """
    sim = np_cosine(tokens)
    w = np_weights(saliency, alpha)
    n = sim.shape[0]
    cover = np.zeros(n)
    taken = np.zeros(n, dtype=bool)
    for i, t in enumerate(int(p) for p in picks):
        if n - i >= 2:
            gain = np.maximum(sim - cover[:, None], 0.0).sum(axis=0)
            score = gain * w if combine == "mul" else gain + w
            score = np.where(taken, -np.inf, score)
            second, first = np.argsort(score, kind="stable")[-2:]
            hi, lo = score[first], score[second]
            if np.isinf(hi):
                if hi == lo:
                    return i
            elif hi - lo <= tie_rel * max(abs(hi), 1e-30) + _score_slack(n, w, int(first), int(second), combine):
                return i
        taken[t] = True
        cover = np.maximum(cover, sim[:, t])
    return len(picks)


def check_scope_picks(got, want, tokens, saliency, alpha: float, combine: str) -> str | None:
    """One image's SCOPE run (pick order) against the reference's on the same inputs.

    Passes when the runs are equal, or when they first differ at or after the reference's
    first near-tie and ``got`` is a valid greedy run throughout. Returns ``None`` for equal runs,
    a note naming the divergence otherwise; raises :class:`VerificationError` on a failure.
    ``tokens``/``saliency`` are the image's valid rows, as the backend saw them (dtype-rounded).
    """
    g, r = [int(v) for v in got], [int(v) for v in want]
    if len(g) != len(r):
        _fail(f"{len(g)} picks, the reference has {len(r)}")
    if g == r:
        return None
    n = tokens.shape[0]
    if len(set(g)) != len(g) or not all(0 <= v < n for v in g):
        _fail(f"picks are not {len(g)} distinct indices in [0, {n}): {g}")
    tie = first_near_tie(tokens, saliency, r, alpha, combine)
    diverge = next(i for i, (p, q) in enumerate(zip(g, r)) if p != q)
    if diverge < tie:
        _fail(
            f"picks diverge from the reference at step {diverge} ({g[diverge]} vs {r[diverge]}) "
            f"with no near-tie before it (first near-tie: step {tie}); picks {g[:diverge + 1]}..."
        )
    check_greedy_picks(tokens, saliency, g, alpha, combine)
    return f"diverged at step {diverge} after a near-tie at step {tie}, still a valid greedy run"


# ----------------------------------------------------------------------------- HoloV


def _budgets_stable(weights: list[float], k: int, sizes: list[int], rel: float) -> str | None:
    """``None`` if nudging any crop weight by ``rel`` cannot change the budgets, else why it can."""
    from .reference import _budgets_one

    base = _budgets_one(weights, k, sizes)
    scale = max((abs(v) for v in weights if not math.isnan(v)), default=0.0)
    suspects = set()
    for c, v in enumerate(weights):
        wk = v * k
        if not math.isnan(wk) and abs(wk - round(wk)) <= 2 * rel * max(abs(wk), 1.0):
            suspects.add(c)  # floor(w k) may land on either side of an integer
    order = sorted(range(len(weights)), key=lambda c: (math.isnan(weights[c]), -weights[c] if not math.isnan(weights[c]) else 0.0))
    for a, b in zip(order, order[1:]):
        wa, wb = weights[a], weights[b]
        if not (math.isnan(wa) or math.isnan(wb)) and abs(wa - wb) <= 2 * rel * scale:
            suspects.update((a, b))  # the leftover order may swap
    for c in sorted(suspects):
        for sign in (-1.0, 1.0):
            nudged = list(weights)
            nudged[c] = weights[c] + sign * 2 * rel * max(abs(weights[c]), scale, 1e-30)
            if _budgets_one(nudged, k, sizes) != base:
                return f"crop {c}'s weight {weights[c]:.9g} is within {rel:g} of changing the budgets"
    return None


def holov_near_tie(
    tokens: Tensor, attn: Tensor, k: int, num_crops: int | None, alpha: float, rank_by: str, rel: float = TIE_REL
) -> str | None:
    """Why one image's HoloV selection is within ``rel`` of a different answer, or ``None``.

    Recomputes SPEC §2 in float64 on the image's valid rows (as the backend saw them) and looks
    for decisions that fp32 rounding could flip: a crop budget whose ``floor(w k)`` or leftover
    order is that close, or (``rank_by="score"``) two ranking keys that close at a crop's cut.
    Ranking by ``attn`` compares the input values themselves, which no backend rounds.
    """
    from .reference import _crop_stats, crop_sizes_for, default_num_crops

    x, a = tokens.detach().cpu().double(), attn.detach().cpu().double()
    n = x.shape[0]
    crops = num_crops if num_crops is not None else default_num_crops(n, k)
    sizes = crop_sizes_for(n, crops)
    scores, keys, start = [], [], 0
    for size in sizes:
        score, h = _crop_stats(x[start : start + size], a[start : start + size], alpha)
        scores.append(float(score))
        keys.append(h)
        start += size
    total = sum(scores) + 1e-6
    weights = [s / total for s in scores]
    why = _budgets_stable(weights, k, sizes, rel)
    if why is not None or rank_by != "score":
        return why
    from .reference import _budgets_one

    for c, (q, h) in enumerate(zip(_budgets_one(weights, k, sizes), keys)):
        if 0 < q < h.numel():
            top = torch.sort(h, descending=True).values
            inside, outside = float(top[q - 1]), float(top[q])
            if inside - outside <= rel * max(abs(inside), 1e-30):
                return f"crop {c}: ranking keys {inside:.9g} and {outside:.9g} at its cut (q = {q}) are a near-tie"
    return None


# ----------------------------------------------------------------------------- real-valued outputs


def max_abs_error(got: Tensor, want: Tensor, mask: Tensor | None = None) -> float:
    """``max |got - want|`` in float64 over ``mask`` (all entries by default); equal infinities count as 0."""
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    if g.shape != w.shape:
        _fail(f"shape {tuple(g.shape)}, expected {tuple(w.shape)}")
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))  # also equal infinities
    diff = torch.where(same, torch.zeros_like(g), (g - w).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    if mask is not None:
        diff = diff[mask.cpu()]
    return float(diff.max()) if diff.numel() else 0.0


def check_error_vs_torch(
    got: Tensor, want64: Tensor, torch_same_precision: Tensor, floor: float, factor: float = 2.0, mask: Tensor | None = None
) -> tuple[float, float]:
    """FlashAttention's accuracy rule; returns ``(error, PyTorch's error)``.

    ``want64`` is the float64 reference and ``torch_same_precision`` PyTorch's own computation
    at the working precision, both on the same dtype-rounded inputs as ``got``. Raises
    :class:`VerificationError` when ``error > factor * PyTorch's error + floor``.
    """
    err = max_abs_error(got, want64, mask)
    torch_err = max_abs_error(torch_same_precision, want64, mask)
    if not err <= factor * torch_err + floor:
        _fail(f"max error {err:.3g} vs float64, above {factor:g} x PyTorch's {torch_err:.3g} + {floor:g}")
    return err, torch_err


def sorted_rows_check(idx: Tensor) -> None:
    """Every row ascending (the ``sorted=True`` contract)."""
    if idx.numel() and not bool((idx[..., 1:] > idx[..., :-1]).all()):
        _fail("sorted=True output is not strictly ascending")


def crop_counts(idx: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """How many of ``idx`` fall into each contiguous crop of ``sizes``."""
    bounds = np.cumsum([0, *sizes])
    which = np.searchsorted(bounds, np.asarray(list(idx), dtype=np.int64), side="right") - 1
    return [int(c) for c in np.bincount(which, minlength=len(sizes))[: len(sizes)]]
