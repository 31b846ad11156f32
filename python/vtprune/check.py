"""``vtprune check``: every backend usable here against the reference, on random inputs.

What a user runs after installing on their GPU. For every backend other than ``reference`` that
can run on the chosen device, every op in that backend's ``OPS`` table (so ops added to a backend
later are picked up without touching this file), and every requested dtype the backend takes,
random inputs are drawn (odd sizes, a padded batch with ``lengths``, packed varlen sequences)
and the backend's answer, obtained through the public ``torch.ops.vtprune`` custom op exactly
as a user's call reaches it, is judged against :mod:`vtprune.reference` with the op's rule from
:mod:`vtprune._verify`, the rules the test suite applies:

* SCOPE (``scope_select``, ``scope_select_varlen``): equal picks, in pick order, up to the first
  near-tie of the reference run; a valid greedy run (float64 scores) after a divergence there.
* HoloV (``holov_select``): equal indices, unless a float64 recomputation shows a budget or a
  ranking decision within ``1e-5`` of flipping; then the selection invariants.
* ``crop_budgets``, ``crop_topk``: equal.
* ``coverage_max_sim``, ``attention_importance``: against float64, error at most twice
  PyTorch's own at the working precision (the reference in float32) plus ``1e-6``.

An op found in a backend's table without a rule here is reported as a failure, never skipped.
:func:`run_checks` returns a :class:`Report`; :func:`main` prints the table and exits 1 on any
failure (``--json PATH`` writes the report as JSON too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import _dispatch, reference
from ._verify import (
    VerificationError,
    assert_valid_selection,
    check_error_vs_torch,
    check_scope_picks,
    crop_counts,
    holov_near_tie,
    sorted_rows_check,
)
from .cli import positive_int

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DEFAULT_DTYPES = tuple(DTYPES)
#: Absolute slack on top of twice PyTorch's error: fp32 math, and fp64 (where PyTorch's error is 0).
_FLOOR = {torch.float64: 1e-12}
_FLOOR_DEFAULT = 1e-6
_KMAX = 64  # greedy steps per SCOPE case: the reference and the float64 checks cost O(k N^2)

__all__ = ["Case", "Row", "Report", "CHECKED_OPS", "run_checks", "main", "add_arguments"]


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One random input: the op's internal arguments (CPU, case dtype) and a reproducible label."""

    label: str
    args: tuple
    ctx: dict = field(default_factory=dict)
    _ref: Any = None

    def reference(self, op: str) -> Any:
        """The reference output, computed once and shared by every backend judged on this case."""
        if self._ref is None:
            self._ref = reference.OPS[op](*self.args)
        return self._ref


class _Draw:
    """Random choices for one trial, from a seed that does not depend on the backend."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def int(self, lo: int, hi: int) -> int:
        """Uniform in ``[lo, hi]``."""
        return int(torch.randint(lo, hi + 1, (1,), generator=self.g))

    def choice(self, options: Sequence):
        return options[self.int(0, len(options) - 1)]

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.g, dtype=torch.float64)

    def rand(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.g, dtype=torch.float64)

    def lengths(self, batch: int, n: int) -> list[int]:
        """A padded batch: the first image fills the width, the others are shorter (at random)."""
        return [n] + [self.int(max(1, n // 3), n) for _ in range(batch - 1)]

    def tokens(self, batch: int, n: int, d: int, kind: int) -> Tensor:
        """Gaussian tokens (kind 0), tight clusters (1: near-ties), or duplicates and zero tokens (2)."""
        x = self.randn(batch, n, d)
        if kind == 1 and n > 1:
            centers = self.randn(batch, 4, d)
            pick = torch.randint(0, 4, (n,), generator=self.g)
            x = centers[:, pick] + 0.05 * x
        elif kind == 2 and n > 2:
            x[:, n // 2 :: 5] = x[:, : len(range(n // 2, n, 5))]
            x[:, 1::7] = 0.0
        return x


def _lens_tensor(lens: list[int] | None) -> Tensor | None:
    return None if lens is None else torch.tensor(lens, dtype=torch.int64)


# Shapes per profile: "full" on real hardware and the torch backend, "interp" for Triton kernels
# running in the interpreter on CPU tensors (seconds per call), each with a --quick subset. Sizes
# are odd on purpose; the largest ones span several kernel tiles in N and in D (masked tails).
_SCOPE_SHAPES = {  # (B, N, D, padded)
    "full": [(1, 1, 8, False), (3, 7, 16, True), (2, 97, 33, True), (1, 577, 200, False)],
    "quick": [(1, 1, 8, False), (3, 7, 16, True), (2, 97, 33, True)],
    "interp": [(1, 1, 8, False), (2, 7, 16, True), (2, 41, 16, True)],
    "interp-quick": [(2, 7, 16, True)],
}
_VARLEN_SEQS = {
    "full": [[1], [7, 1, 13], [40, 97, 5, 23]],
    "quick": [[1], [7, 1, 13]],
    "interp": [[1], [7, 1, 13]],
    "interp-quick": [[7, 1, 5]],
}
_HOLOV_SHAPES = {
    "full": [(1, 1, 8, False), (3, 7, 16, True), (2, 97, 32, True), (2, 577, 64, False)],
    "quick": [(1, 1, 8, False), (3, 7, 16, True), (2, 97, 32, True)],
    "interp": [(1, 1, 8, False), (3, 7, 16, True), (2, 41, 16, True)],
    "interp-quick": [(3, 7, 16, True)],
}
_COVERAGE_SHAPES = {  # (B, N, D, K)
    "full": [(1, 1, 5, 1), (3, 7, 16, 7), (3, 97, 33, 20), (1, 577, 200, 64)],
    "quick": [(1, 1, 5, 1), (3, 7, 16, 7), (3, 97, 33, 20)],
    "interp": [(1, 1, 5, 1), (3, 7, 16, 7), (2, 97, 33, 20)],
    "interp-quick": [(3, 7, 16, 7)],
}
_ATTENTION_SHAPES = {  # (B, Hq, Hk, L, d, G)
    "full": [(1, 4, 2, 1, 16, 2), (2, 4, 2, 7, 3, 3), (1, 4, 2, 97, 24, 2), (1, 2, 1, 300, 128, 3)],
    "quick": [(1, 4, 2, 1, 16, 2), (2, 4, 2, 7, 3, 3), (1, 4, 2, 97, 24, 2)],
    "interp": [(1, 4, 2, 1, 16, 2), (2, 4, 2, 7, 3, 3), (1, 2, 1, 61, 16, 2)],
    "interp-quick": [(2, 4, 2, 7, 3, 3)],
}
_BUDGET_CASES = {"full": 6, "quick": 6, "interp": 6, "interp-quick": 3}
_TOPK_CASES = {"full": 4, "quick": 2, "interp": 2, "interp-quick": 1}


def _scope_cases(r: _Draw, dtype: torch.dtype, profile: str, trial: int) -> list[Case]:
    cases = []
    for i, (batch, n, d, padded) in enumerate(_SCOPE_SHAPES[profile]):
        lens = r.lengths(batch, n) if padded else None
        kind = (trial + i) % 3
        k = r.int(1, min(min(lens or [n]), _KMAX))
        alpha = r.choice((0.0, 0.5, 1.0, 2.0))
        combine = r.choice(("mul", "add"))
        x = r.tokens(batch, n, d, kind).to(dtype)
        sal = r.rand(batch, n).to(dtype)
        label = f"B={batch} N={n} D={d} k={k} alpha={alpha} combine={combine} lengths={lens} tokens={('gaussian', 'clustered', 'duplicates+zeros')[kind]}"
        args = (x, sal, k, alpha, combine, _lens_tensor(lens), False)
        cases.append(Case(label, args, {"lens": lens or [n] * batch, "also_sorted": i == len(_SCOPE_SHAPES[profile]) - 1}))
    return cases


def _judge_scope(case: Case, got: Tensor, rerun: Callable[[tuple], Any]) -> tuple[None, None, str | None]:
    x, sal, k, alpha, combine, _, _ = case.args
    want = case.reference("scope_select")
    assert_valid_selection(got.cpu(), k, case.ctx["lens"])
    notes = []
    for b, nb in enumerate(case.ctx["lens"]):
        note = check_scope_picks(got[b].cpu(), want[b], x[b, :nb], sal[b, :nb], alpha, combine)
        if note:
            notes.append(f"image {b}: {note}")
    if case.ctx.get("also_sorted"):
        asc = rerun(case.args[:-1] + (True,))
        if not torch.equal(asc.cpu(), got.cpu().sort(dim=-1).values):
            raise VerificationError("sorted=True is not the sorted pick-order (sorted=False) result")
    return None, None, "; ".join(notes) or None


def _varlen_cases(r: _Draw, dtype: torch.dtype, profile: str, trial: int) -> list[Case]:
    cases = []
    for i, seqlens in enumerate(_VARLEN_SEQS[profile]):
        d = r.choice((8, 16, 33))
        total = sum(seqlens)
        x = r.tokens(1, total, d, (trial + i) % 3)[0].to(dtype)
        sal = r.rand(total).to(dtype)
        cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int64)
        if (trial + i) % 2:
            ks = [r.int(1, min(s, _KMAX)) for s in seqlens]
        else:
            ks = [r.int(1, min(min(seqlens), _KMAX))] * len(seqlens)
        alpha = r.choice((0.0, 1.0, 2.5))
        combine = r.choice(("mul", "add"))
        label = f"seqlens={seqlens} D={d} k={ks} alpha={alpha} combine={combine}"
        args = (x, sal, cu, torch.tensor(ks, dtype=torch.int64), alpha, combine, False)
        cases.append(Case(label, args, {"seqlens": seqlens, "also_sorted": i == len(_VARLEN_SEQS[profile]) - 1}))
    return cases


def _judge_varlen(case: Case, got: tuple[Tensor, Tensor], rerun) -> tuple[None, None, str | None]:
    x, sal, cu, ks, alpha, combine, _ = case.args
    idx, cu_k = (t.cpu() for t in got)
    want_idx, want_cu_k = case.reference("scope_select_varlen")
    if idx.dtype != torch.int64 or not torch.equal(cu_k, want_cu_k):
        raise VerificationError(f"indices {idx.dtype} (want int64), cu_k {cu_k.tolist()} (want {want_cu_k.tolist()})")
    notes = []
    bounds = cu.tolist()
    for b in range(len(case.ctx["seqlens"])):
        s0, s1 = bounds[b], bounds[b + 1]
        mine = idx[int(cu_k[b]) : int(cu_k[b + 1])] - s0
        theirs = want_idx[int(want_cu_k[b]) : int(want_cu_k[b + 1])] - s0
        note = check_scope_picks(mine, theirs, x[s0:s1], sal[s0:s1], alpha, combine)
        if note:
            notes.append(f"sequence {b}: {note}")
    if case.ctx.get("also_sorted"):
        asc, asc_cu = (t.cpu() for t in rerun(case.args[:-1] + (True,)))
        parts = [idx[int(cu_k[b]) : int(cu_k[b + 1])].sort().values for b in range(len(bounds) - 1)]
        if not (torch.equal(asc_cu, cu_k) and torch.equal(asc, torch.cat(parts))):
            raise VerificationError("sorted=True is not the per-sequence sorted pick-order (sorted=False) result")
    return None, None, "; ".join(notes) or None


def _holov_cases(r: _Draw, dtype: torch.dtype, profile: str, trial: int) -> list[Case]:
    cases = []
    for i, (batch, n, d, padded) in enumerate(_HOLOV_SHAPES[profile]):
        lens = r.lengths(batch, n) if padded else None
        shortest = min(lens or [n])
        # k from N/12 up (the default crop count stays <= ~28, and 1-token crops still come up at
        # small N); explicit crop counts up to 40: the reference walks crops in Python.
        k = r.int(max(1, shortest // 12), min(shortest, 192))
        num_crops = None if (trial + i) % 2 == 0 else r.int(1, min(shortest, 40))
        alpha = r.choice((0.0, 0.09, 1.0))
        rank_by = r.choice(("attn", "score"))
        sorted_ = bool(r.int(0, 1))
        x = r.tokens(batch, n, d, (trial + i) % 3).to(dtype)
        attn = r.rand(batch, n).to(dtype)
        label = f"B={batch} N={n} D={d} k={k} num_crops={num_crops} alpha={alpha} rank_by={rank_by} lengths={lens} sorted={sorted_}"
        args = (x, attn, k, num_crops, alpha, rank_by, _lens_tensor(lens), sorted_)
        cases.append(Case(label, args, {"lens": lens or [n] * batch}))
    return cases


def _judge_holov(case: Case, got: Tensor, rerun) -> tuple[None, None, str | None]:
    x, attn, k, num_crops, alpha, rank_by, _, sorted_ = case.args
    got = got.cpu()
    want = case.reference("holov_select")
    assert_valid_selection(got, k, case.ctx["lens"])
    notes = []
    for b, nb in enumerate(case.ctx["lens"]):
        if torch.equal(got[b], want[b]):
            continue
        why = holov_near_tie(x[b, :nb], attn[b, :nb], k, num_crops, alpha, rank_by)
        if why is None:
            raise VerificationError(
                f"image {b} differs from the reference with no near-tie: {got[b].tolist()} vs {want[b].tolist()}"
            )
        sizes = reference.crop_sizes_for(nb, num_crops if num_crops is not None else reference.default_num_crops(nb, k))
        counts = crop_counts(got[b].tolist(), sizes)
        if any(c > s for c, s in zip(counts, sizes)):
            raise VerificationError(f"image {b}: more picks than tokens in a crop ({counts} in crops of {sizes})")
        if sorted_:
            sorted_rows_check(got[b])
        notes.append(f"image {b} differs after a near-tie ({why}); invariants hold")
    return None, None, "; ".join(notes) or None


def _budget_cases(r: _Draw, dtype: torch.dtype, profile: str, trial: int) -> list[Case]:
    cases = []
    kinds = ("normalized", "small", "nan", "zero", "ties+negative", "one-crop-overflows")
    for i in range(_BUDGET_CASES[profile]):
        kind = kinds[(trial + i) % len(kinds)]
        batch, crops = 3, r.int(1, 9)
        cap = torch.randint(0, 6, (batch, crops), generator=r.g)
        cap[:, 0] += 1
        k = r.int(1, int(cap.sum(1).min()))
        w = r.rand(batch, crops)
        if kind == "normalized":
            w = w / (w.sum(1, keepdim=True) + 1e-6)
        elif kind == "small":  # a leftover larger than the crop count: the hand-out cycles
            w = w * 0.05
        elif kind == "nan":
            w = w / (w.sum(1, keepdim=True) + 1e-6)
            w[r.rand(batch, crops) < 0.4] = float("nan")
        elif kind == "zero":
            w = torch.zeros(batch, crops, dtype=torch.float64)
        elif kind == "ties+negative":
            w = torch.randint(-1, 3, (batch, crops), generator=r.g).double()
            w = w / (w.clamp_min(0).sum(1, keepdim=True) + 1e-6)
        else:  # everything on a crop that cannot hold it: the surplus cycles over the others
            w = torch.zeros(batch, crops, dtype=torch.float64)
            w[:, 0] = 1.0
        label = f"{kind} weights, C={crops} k={k} capacity={cap.tolist()}"
        cases.append(Case(label, (w.to(dtype), k, cap)))
    return cases


def _judge_exact(op: str) -> Callable:
    def judge(case: Case, got: Tensor, rerun) -> tuple[None, None, None]:
        want = case.reference(op)
        got = got.cpu()
        if got.dtype != want.dtype or not torch.equal(got, want):
            raise VerificationError(f"got {got.tolist()} ({got.dtype}), the reference {want.tolist()} ({want.dtype})")
        return None, None, None

    return judge


def _topk_cases(r: _Draw, dtype: torch.dtype, profile: str, trial: int) -> list[Case]:
    cases = []
    for _ in range(_TOPK_CASES[profile]):
        batch, n, crops = 3, r.int(1, 97), r.int(1, 8)
        cuts = torch.sort(torch.randint(0, n + 1, (batch, crops), generator=r.g), dim=1).values
        sizes = torch.diff(cuts, dim=1, prepend=torch.zeros(batch, 1, dtype=torch.int64))
        sizes[sizes.sum(1) == 0, 0] = 1  # every row needs k >= 1 token (n >= 1, so this still fits)
        k = int(sizes.sum(1).min())
        budgets = torch.zeros_like(sizes)
        for b in range(batch):  # any budgets within the sizes that sum to k
            left = k
            for c in torch.randperm(crops, generator=r.g).tolist():
                take = min(left, int(sizes[b, c]))
                budgets[b, c] = take
                left -= take
        scores = torch.randint(0, 5, (batch, n), generator=r.g).double()  # many exact ties
        scores = scores + (r.rand(batch, n) < 0.5) * r.rand(batch, n)
        scores[r.rand(batch, n) < 0.1] = float("nan")
        sorted_ = bool(r.int(0, 1))
        label = f"N={n} sizes={sizes.tolist()} budgets={budgets.tolist()} sorted={sorted_}"
        cases.append(Case(label, (scores.to(dtype), sizes, budgets, k, sorted_)))
    return cases


def _coverage_cases(r: _Draw, dtype: torch.dtype, profile: str, trial: int) -> list[Case]:
    cases = []
    for batch, n, d, kk in _COVERAGE_SHAPES[profile]:
        x = r.randn(batch, n, d)
        x[:, torch.randint(0, n, (max(1, n // 10),), generator=r.g)] = 0.0  # zero tokens: 0, never NaN
        lens = r.lengths(batch, n)
        rows = []
        for nb in lens:
            if kk <= nb:
                rows.append(torch.randperm(nb, generator=r.g)[:kk])
            else:  # more picks than valid tokens: repeats are part of the contract
                rows.append(torch.randint(0, nb, (kk,), generator=r.g))
        label = f"B={batch} N={n} D={d} K={kk} lengths={lens}"
        cases.append(Case(label, (x.to(dtype), torch.stack(rows), torch.tensor(lens, dtype=torch.int64)), {"lens": lens}))
    return cases


def _judge_coverage(case: Case, got: Tensor, rerun) -> tuple[float, float, None]:
    x, idx, lens = case.args
    got = got.cpu()
    want_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if got.dtype != want_dtype or got.shape != x.shape[:2]:
        raise VerificationError(f"output {got.dtype} {tuple(got.shape)}, expected {want_dtype} {tuple(x.shape[:2])}")
    valid = torch.arange(x.shape[1])[None, :] < lens[:, None]
    if bool((got[~valid] != 0).any()):
        raise VerificationError("padding positions (beyond lengths[b]) are not exactly 0")
    want64 = reference.coverage_max_sim(x.double(), idx, lens)
    same = reference.coverage_max_sim(x if x.dtype == torch.float64 else x.float(), idx, lens)
    err, torch_err = check_error_vs_torch(got, want64, same, _FLOOR.get(x.dtype, _FLOOR_DEFAULT), mask=valid)
    return err, 2 * torch_err + _FLOOR.get(x.dtype, _FLOOR_DEFAULT), None


def _attention_cases(r: _Draw, dtype: torch.dtype, profile: str, trial: int) -> list[Case]:
    cases = []
    for batch, hq, hk, length, d, groups in _ATTENTION_SHAPES[profile]:
        q = r.randn(batch, hq, length, d).to(dtype)
        k = r.randn(batch, hk, length, d).to(dtype)
        qg = torch.randint(-1, max(groups - 1, 1), (batch, length), generator=r.g)  # the last group stays empty
        causal = bool(r.int(0, 1))
        scale = d**-0.5 * r.choice((0.5, 1.0, 2.0))
        start = r.int(0, length - 1)
        end = r.int(start + 1, length)
        label = f"B={batch} Hq={hq} Hk={hk} L={length} d={d} G={groups} causal={causal} scale={scale:.4g} keys=[{start}, {end})"
        cases.append(Case(label, (q, k, qg, groups, causal, scale, start, end)))
    return cases


def _judge_attention(case: Case, got: Tensor, rerun) -> tuple[float, float, None]:
    q, k, qg, groups, causal, scale, start, end = case.args
    got = got.cpu()
    want_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shape = (q.shape[0], groups, end - start)
    if got.dtype != want_dtype or tuple(got.shape) != shape:
        raise VerificationError(f"output {got.dtype} {tuple(got.shape)}, expected {want_dtype} {shape}")
    rest = (qg, groups, causal, scale, start, end)
    want64 = reference.attention_importance(q.double(), k.double(), *rest)
    same = reference.attention_importance(q, k, *rest)  # the reference computes in fp32 (fp64 stays)
    floor = _FLOOR.get(q.dtype, _FLOOR_DEFAULT)
    err, torch_err = check_error_vs_torch(got, want64, same, floor)
    return err, 2 * torch_err + floor, None


@dataclass(frozen=True)
class _OpCheck:
    make_cases: Callable[[_Draw, torch.dtype, str, int], list[Case]]
    judge: Callable[[Case, Any, Callable[[tuple], Any]], tuple[float | None, float | None, str | None]]
    rule: str


#: The rule for every op the checker knows; an op of a backend table missing here fails the check.
CHECKED_OPS: dict[str, _OpCheck] = {
    "scope_select": _OpCheck(_scope_cases, _judge_scope, "equal picks up to a near-tie, valid greedy after"),
    "scope_select_varlen": _OpCheck(_varlen_cases, _judge_varlen, "equal picks up to a near-tie, valid greedy after"),
    "holov_select": _OpCheck(_holov_cases, _judge_holov, "equal, invariants where a decision is a near-tie"),
    "crop_budgets": _OpCheck(_budget_cases, _judge_exact("crop_budgets"), "equal"),
    "crop_topk": _OpCheck(_topk_cases, _judge_exact("crop_topk"), "equal"),
    "coverage_max_sim": _OpCheck(_coverage_cases, _judge_coverage, "error <= 2 x PyTorch's (fp32) + 1e-6 vs float64"),
    "attention_importance": _OpCheck(_attention_cases, _judge_attention, "error <= 2 x PyTorch's (fp32) + 1e-6 vs float64"),
}


# ----------------------------------------------------------------------------- running


@dataclass
class Row:
    """One (op, backend, dtype): how many cases ran, how many failed, and the worst numbers."""

    op: str
    backend: str
    dtype: str
    rule: str = ""
    cases: int = 0
    failed: int = 0
    worst_error: float | None = None  # real-valued ops: the largest error vs float64
    worst_bound: float | None = None  # ... and the bound (2 x PyTorch's + floor) of the tightest case
    notes: list[str] = field(default_factory=list)  # passing cases that needed the near-tie rule
    first_failure: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.failed == 0 and self.cases > 0

    def detail(self) -> str:
        """The table's last column: the first failure, or the worst error, or how exact it was."""
        if self.first_failure is not None:
            return f"{self.failed}/{self.cases} failed; first: {self.first_failure}"
        if self.cases == 0:
            return "no cases ran"
        if self.worst_error is not None:
            return f"max err {self.worst_error:.2g} (bound {self.worst_bound:.2g})"
        if self.notes:
            return f"exact in {self.cases - len(self.notes)}/{self.cases}; {len(self.notes)} valid after a near-tie"
        return "exact"

    def to_json(self) -> dict:
        return {
            "op": self.op,
            "backend": self.backend,
            "dtype": self.dtype,
            "rule": self.rule,
            "cases": self.cases,
            "failed": self.failed,
            "passed": self.passed,
            "worst_error": _finite_or_text(self.worst_error),
            "worst_bound": _finite_or_text(self.worst_bound),
            "near_tie_notes": self.notes,
            "first_failure": self.first_failure,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Report:
    """Everything ``vtprune check`` found, as printed and as written by ``--json``."""

    device: str
    dtypes: list[str]
    seed: int
    trials: int | None
    quick: bool
    rows: list[Row] = field(default_factory=list)
    not_checked: dict[str, str] = field(default_factory=dict)  # backend -> why not
    not_applicable: list[str] = field(default_factory=list)  # "backend dtype: why"
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def to_json(self) -> dict:
        import vtprune

        return {
            "vtprune": vtprune.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": self.device,
            "device_name": torch.cuda.get_device_name(torch.device(self.device)) if self.device.startswith("cuda") else platform.processor() or "cpu",
            "triton_interpret": _dispatch.triton_interpret(),
            "dtypes": self.dtypes,
            "seed": self.seed,
            "trials": self.trials,
            "quick": self.quick,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "results": [r.to_json() for r in self.rows],
            "not_checked": self.not_checked,
            "not_applicable": self.not_applicable,
        }


def _move(args: tuple, device: torch.device) -> tuple:
    return tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)


def _case_seed(seed: int, op: str, dtype: str, profile: str, trial: int) -> int:
    # The same inputs for every backend judged on this op/dtype, whatever order they run in.
    return zlib.crc32(f"{seed}/{op}/{dtype}/{profile}/{trial}".encode())


def _short(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip().replace("\n", " ")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text if isinstance(exc, VerificationError) else f"{type(exc).__name__}: {text}"


def _check_one(op: str, backend: str, dtype_name: str, device: torch.device, profile: str, trials: int, seed: int, cache: dict) -> Row:
    spec = CHECKED_OPS.get(op)
    row = Row(op, backend, dtype_name, rule=spec.rule if spec else "")
    t0 = time.perf_counter()
    if spec is None:
        row.cases, row.failed = 1, 1
        row.first_failure = f"no check is defined for {op!r}: add a case generator and a rule to vtprune.check.CHECKED_OPS"
        return row
    custom_op = getattr(torch.ops.vtprune, op)
    dtype = DTYPES[dtype_name]

    def call(args: tuple) -> Any:
        return custom_op(*_move(args, device), backend)

    for trial in range(trials):
        key = (op, dtype_name, profile, trial)
        if key not in cache:
            cache[key] = spec.make_cases(_Draw(_case_seed(seed, op, dtype_name, profile, trial)), dtype, profile, trial)
        for case in cache[key]:
            row.cases += 1
            where = f"[trial {trial}: {case.label}]"
            try:
                got = call(case.args)
                outs = got if isinstance(got, tuple) else (got,)
                if not all(isinstance(t, Tensor) and t.device.type == device.type for t in outs):
                    where_to = [t.device.type if isinstance(t, Tensor) else type(t).__name__ for t in outs]
                    raise VerificationError(f"outputs on {where_to}, expected tensors on {device.type} like the inputs")
                err, bound, note = spec.judge(case, got, call)
            except Exception as exc:  # noqa: BLE001 - a crashing backend is a failed case, reported like one
                row.failed += 1
                if row.first_failure is None:
                    row.first_failure = f"{where} {_short(exc)}"
                continue
            if note:
                row.notes.append(f"{where} {note}")
            if err is not None and (row.worst_error is None or err > row.worst_error):
                row.worst_error, row.worst_bound = err, bound
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row.seconds = time.perf_counter() - t0
    return row


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: torch.cuda.is_available() is False on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    return dev


def run_checks(
    *,
    device: str | torch.device | None = "auto",
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    seed: int = 0,
    trials: int | None = None,
    quick: bool = False,
    backends: Sequence[str] | None = None,
    ops: Sequence[str] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> Report:
    """Judge every usable backend (other than ``reference``) against the reference.

    Args:
        device: where the backends run: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
            The reference always runs on CPU copies of the same inputs.
        dtypes: names from :data:`DTYPES`; a dtype a backend does not take (float64 on the
            kernels) is listed in ``Report.not_applicable``, not run.
        seed: inputs are a function of ``seed``, op, dtype and trial only.
        trials: rounds of fresh random inputs over each op's shape list; default 2 (1 with
            ``quick`` or for Triton in the interpreter).
        quick: fewer and smaller shapes.
        backends: restrict to these backends (default: every one usable on ``device``).
        ops: restrict to these ops (default: every op in each backend's table).
        on_row: called with each finished :class:`Row` (for printing as it goes).
    """
    dev = _pick_device(device)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"dtypes must be drawn from {list(DTYPES)}; got {list(dtypes)}")
    wanted = list(_dispatch.BACKENDS[1:]) if backends is None else list(backends)
    bad = [b for b in wanted if b not in _dispatch.BACKENDS[1:]]
    if bad:
        raise ValueError(f"backends must be drawn from {list(_dispatch.BACKENDS[1:])}; got {bad}")
    if trials is not None and trials < 1:
        raise ValueError(f"trials must be >= 1; got {trials}")
    report = Report(device=str(dev), dtypes=list(dtypes), seed=seed, trials=trials, quick=quick)
    t0 = time.perf_counter()
    cache: dict = {}
    for name in wanted:
        try:
            st = _dispatch.status(name)
        except Exception as exc:  # noqa: BLE001
            report.not_checked[name] = f"status check failed: {type(exc).__name__}: {exc}"
            continue
        if not st.usable:
            report.not_checked[name] = st.reason
            continue
        problem = _dispatch._device_ok(name, dev)
        if problem is not None:
            report.not_checked[name] = problem
            continue
        try:
            table = _dispatch._ops(name)
        except Exception as exc:  # noqa: BLE001 - usable but broken: a failure, not a skip
            row = Row("(import)", name, "-", cases=1, failed=1, first_failure=f"backend module failed to import: {_short(exc)}")
            report.rows.append(row)
            if on_row:
                on_row(row)
            continue
        known = [op for op in reference.OPS if op in table]
        names = known + sorted(op for op in table if op not in reference.OPS)
        if ops is not None:
            names = [op for op in names if op in ops]
        interpreted = name == "triton" and dev.type == "cpu"
        profile = ("interp" if interpreted else "full") + ("-quick" if quick else "")
        profile = "quick" if profile == "full-quick" else profile
        n_trials = trials if trials is not None else (1 if quick or interpreted else 2)
        for dtype_name in dtypes:
            problem = _dispatch._device_ok(name, dev, DTYPES[dtype_name])
            if problem is not None:
                report.not_applicable.append(f"{name} {dtype_name}: {problem}")
                continue
            for op in names:
                row = _check_one(op, name, dtype_name, dev, profile, n_trials, seed, cache)
                report.rows.append(row)
                if on_row:
                    on_row(row)
    report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------- command line


_COLUMNS = (("op", 20), ("backend", 7), ("dtype", 8), ("cases", 5), ("result", 6))


def _format_row(row: Row) -> str:
    cells = (row.op, row.backend, row.dtype, str(row.cases), "pass" if row.passed else "FAIL")
    parts = [c.rjust(w) if name == "cases" else c.ljust(w) for c, (name, w) in zip(cells, _COLUMNS)]
    return "  ".join(parts) + "  " + row.detail()


def _header() -> str:
    parts = [n.rjust(w) if n == "cases" else n.ljust(w) for n, w in _COLUMNS]
    head = "  ".join(parts) + "  worst error / first failure"
    return head + "\n" + "  ".join("-" * w for _, w in _COLUMNS) + "  " + "-" * 27


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vtprune check`` (shared by the ``vtprune`` command line)."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the backends run (default: cuda if available)")
    parser.add_argument(
        "--dtypes",
        default=",".join(DEFAULT_DTYPES),
        metavar="LIST",
        help=f"comma-separated, from {', '.join(DTYPES)} (default: all; float64 runs on the torch backend only)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random inputs depend on this only (default 0)")
    parser.add_argument("--trials", type=positive_int, default=None, metavar="T", help="rounds of fresh inputs over each op's shapes (default 2; 1 with --quick or in the Triton interpreter)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes: a smoke test in seconds")
    parser.add_argument("--backends", default=None, metavar="LIST", help="comma-separated subset of torch, triton, cuda (default: every usable one)")
    parser.add_argument("--ops", default=None, metavar="LIST", help="comma-separated subset of the ops (default: every op each backend implements)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the full report (every row, every near-tie note) as JSON")


DESCRIPTION = (
    "Check every backend usable here against the pure-PyTorch reference: every op each backend "
    "implements, on random inputs (odd sizes, padded batches with lengths, packed varlen "
    "sequences), in each dtype it takes. Selections must equal the reference's (greedy ones up to "
    "a float64 near-tie, then stay valid greedy runs); coverage and attention scores must be within "
    "twice PyTorch's own fp32 error of a float64 reference. Prints a table and exits 1 on any failure. "
    "Without a GPU it checks the torch backend on the CPU, and the Triton kernels too (slowly, in "
    "Triton's interpreter) if TRITON_INTERPRET=1 is set in the environment before vtprune starts."
)


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def main(args: argparse.Namespace) -> int:
    """``vtprune check`` with parsed ``args``: print the table, write ``--json``, return the exit code."""
    dtypes = _split(args.dtypes) or []
    dev = _pick_device(args.device)
    where = f"{dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    if dev.type == "cpu" and _dispatch.triton_interpret():
        where += ", TRITON_INTERPRET=1: Triton kernels run in the interpreter (small shapes)"
    print(f"vtprune check on {where}; dtypes {', '.join(dtypes)}; seed {args.seed}" + (" (quick)" if args.quick else ""))
    print()
    print(_header())
    sys.stdout.flush()

    def show(row: Row) -> None:
        print(_format_row(row))
        sys.stdout.flush()

    try:
        report = run_checks(
            device=dev,
            dtypes=dtypes,
            seed=args.seed,
            trials=args.trials,
            quick=args.quick,
            backends=_split(args.backends),
            ops=_split(args.ops),
            on_row=show,
        )
    except ValueError as exc:
        print(f"vtprune check: error: {exc}", file=sys.stderr)
        return 2
    print()
    for name, why in report.not_checked.items():
        print(f"not checked: {name}: {why}")
    for line in report.not_applicable:
        print(f"not applicable: {line}")
    if args.ops is not None:
        missing = [op for op in _split(args.ops) or [] if not any(r.op == op for r in report.rows)]
        if missing:
            print(f"not implemented by any checked backend: {', '.join(missing)}")
    failed = [r for r in report.rows if not r.passed]
    cases = sum(r.cases for r in report.rows)
    if not report.rows:
        print(f"FAILED: nothing was checked on {dev} ({report.seconds:.1f} s)")
    elif failed:
        names = ", ".join(f"{r.op}/{r.backend}/{r.dtype}" for r in failed)
        print(f"FAILED: {len(failed)} of {len(report.rows)} rows ({names}); {cases} cases in {report.seconds:.1f} s")
    else:
        print(f"all {len(report.rows)} rows passed: {cases} cases in {report.seconds:.1f} s")
    if args.json:
        path = os.path.abspath(args.json)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=2, allow_nan=False)
        print(f"wrote {path}")
    return 0 if report.passed else 1


def _finite_or_text(value: float | None) -> float | str | None:
    """JSON has no inf/nan: a non-finite error (a NaN output) is written as text."""
    return value if value is None or math.isfinite(value) else str(value)
