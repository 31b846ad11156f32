"""The GPU targets of issues 3-5, checked against saved benchmark reports.

    python -m vtprune.bench.targets DIR     # DIR holds scope.json, holov.json, attention.json

Each target names a case by its sizes, a measure and a limit, as the issue states it. "Ours" is
the fastest *eager* kernel provider of the case (``cuda``, ``cuda_cluster`` or ``triton``) that
ran and agreed with the check: a user's call, host overhead included, so the CUDA-graph rows
(device time alone) do not count. Every target is stated for bf16 inputs on an H100/H200; a
report of another dtype is evaluated but marked as not comparable, and the device is printed
with the table. ``benchmarks/gpu_suite.sh`` appends this table to its summary.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .report import Report, Row

#: The providers that are a user's eager call of a kernel backend.
KERNEL_PROVIDERS = ("cuda", "cuda_cluster", "triton")
TARGET_DTYPE = "bfloat16"


@dataclass(frozen=True)
class Target:
    """One target of an issue. ``kind``:

    * ``latency``: ours ≤ ``limit`` µs;
    * ``speedup``: the baseline's time / ours ≥ ``limit``;
    * ``speedup_over``: provider ``versus``'s time / ours ≥ ``limit``;
    * ``memory_ratio``: the baseline's peak extra memory / ours ≥ ``limit``;
    * ``fits``: ours ran, within ``2 N² + 16 N D`` bytes of peak extra memory (issue 3's "about
      2·N² bytes plus O(N·D)"; the O(N·D) allowance, four fp32 copies of the tokens, is ours);
    * ``runs``: ours ran (the baseline's status is shown next to it).
    """

    issue: int
    op: str
    text: str
    match: dict[str, int]
    kind: str
    limit: float = 0.0
    versus: str = ""


@dataclass
class Verdict:
    target: Target
    case: str = ""
    provider: str = ""
    measured: str = "not measured"
    met: bool | None = None  # None: no row to judge
    notes: list[str] = field(default_factory=list)


def _targets() -> list[Target]:
    t = [
        Target(3, "scope", "B=1, N=576, k=64 ≤ 40 µs", {"B": 1, "N": 576, "k": 64}, "latency", 40),
        Target(3, "scope", "B=1, N=576, k=64 ≥ 50× reference_loop", {"B": 1, "N": 576, "k": 64}, "speedup", 50),
        Target(3, "scope", "B=1, N=576, k=64 ≥ 10× torch.compile", {"B": 1, "N": 576, "k": 64}, "speedup_over", 10,
               "torch.compile"),
        Target(3, "scope", "N=2880, k=640 ≤ 1 ms", {"B": 1, "N": 2880, "k": 640}, "latency", 1000),
        Target(3, "scope", "B=32, N=576, k=64 ≤ 150 µs", {"B": 32, "N": 576, "k": 64}, "latency", 150),
        Target(3, "scope", "N=16384, k=1024 completes within 2·N² + O(N·D) bytes", {"N": 16384, "k": 1024}, "fits"),
        Target(4, "holov", "B=1, N=576, D=4096, k=64 ≤ 30 µs", {"B": 1, "N": 576, "D": 4096, "k": 64}, "latency", 30),
        Target(4, "holov", "B=1, N=576, D=4096, k=64 ≥ 30× the official-style loop",
               {"B": 1, "N": 576, "D": 4096, "k": 64}, "speedup", 30),
        Target(4, "holov", "B=32, N=576, k=64 ≤ 100 µs", {"B": 32, "N": 576, "k": 64}, "latency", 100),
        Target(5, "attention", "L=640, R=256 ≤ 20 µs", {"L": 640, "H": 1, "d": 256}, "latency", 20),
    ]
    modes = {"R=128": {"H": 1, "d": 128}, "R=256": {"H": 1, "d": 256}, "exact H=32": {"H": 32, "Hkv": 32},
             "exact GQA H=32/8": {"H": 32, "Hkv": 8}}
    for mode, sizes in modes.items():
        at = {"L": 8192, **sizes}
        t.append(Target(5, "attention", f"L=8192 {mode}: ≥ 5× materialized", at, "speedup", 5))
        t.append(Target(5, "attention", f"L=8192 {mode}: ≤ 1/50 of its extra memory", at, "memory_ratio", 50))
    for mode, sizes in modes.items():
        t.append(Target(5, "attention", f"L=32768 {mode}: runs (materialized may not)", {"L": 32768, **sizes}, "runs"))
    return t


TARGETS = _targets()


def _ours(rows: list[Row]) -> Row | None:
    """The fastest eager kernel row that ran and agreed with the check."""
    ok = [r for r in rows if r.provider in KERNEL_PROVIDERS and r.status == "ok" and r.median_ms is not None
          and r.same_as_reference is not False]
    return min(ok, key=lambda r: r.median_ms) if ok else None


def _fits_bound_mib(params: dict[str, int]) -> float:
    n, d = params["N"], params.get("D", 0)
    return (2 * n * n + 16 * n * d) / 2**20


def evaluate(target: Target, report: Report | None) -> Verdict:
    """Judge ``target`` on ``report`` (``None``: the op was not benchmarked)."""
    v = Verdict(target)
    if report is None:
        return v
    rows = [r for r in report.rows if all(r.params.get(key) == value for key, value in target.match.items())]
    if not rows:
        return v
    v.case = rows[0].case
    if report.dtype != TARGET_DTYPE:
        v.notes.append(f"inputs {report.dtype}, the target is for {TARGET_DTYPE}")
    ours = _ours(rows)
    failed = [f"{r.provider}: {r.status}" for r in rows if r.provider in KERNEL_PROVIDERS and r.status != "ok"]
    if ours is None:
        v.measured, v.met = "no kernel provider ran", False
        v.notes += failed
        return v
    v.provider = ours.provider
    us = ours.median_ms * 1000
    kind = target.kind
    if kind == "latency":
        v.measured, v.met = f"{us:.1f} µs", us <= target.limit
    elif kind == "speedup":
        ratio = ours.ratio_vs_baseline
        v.measured, v.met = (f"{ratio:.1f}×", ratio >= target.limit) if ratio is not None else ("no baseline", None)
    elif kind == "speedup_over":
        other = next((r for r in rows if r.provider == target.versus and r.status == "ok" and r.median_ms), None)
        if other is None:
            v.measured = f"no {target.versus} row"
        else:
            ratio = other.median_ms / ours.median_ms
            v.measured, v.met = f"{ratio:.1f}× ({other.median_ms * 1000:.1f} vs {us:.1f} µs)", ratio >= target.limit
    elif kind == "memory_ratio":
        ratio = ours.mem_ratio_vs_baseline
        v.measured, v.met = (f"1/{ratio:.0f}", ratio >= target.limit) if ratio is not None else ("no memory figure", None)
    elif kind == "fits":
        bound = _fits_bound_mib(ours.params)
        if ours.peak_extra_mib is None:
            v.measured = f"ran in {us / 1000:.1f} ms, no memory figure"
        else:
            v.measured = f"{ours.peak_extra_mib:.0f} MiB of {bound:.0f}, {us / 1000:.1f} ms"
            v.met = ours.peak_extra_mib <= bound
    elif kind == "runs":
        base = next((r for r in rows if r.provider == report.baseline), None)
        v.measured, v.met = f"{us / 1000:.2f} ms", True
        if base is not None:
            v.notes.append(f"{report.baseline}: {base.status if base.status != 'ok' else 'ran too'}")
    else:
        raise ValueError(f"unknown target kind {kind!r}")
    return v


def load_reports(folder: str | Path) -> dict[str, Report]:
    """The reports ``<op>.json`` found in ``folder``, by op."""
    out = {}
    for op in ("scope", "holov", "attention"):
        path = Path(folder) / f"{op}.json"
        if path.is_file():
            out[op] = Report.from_dict(json.loads(path.read_text()))
    return out


def markdown(reports: dict[str, Report]) -> str:
    """The targets as a markdown section: one row per target, met / NOT met / not measured."""
    devices = sorted({f"{r.environment.get('device')} ({r.dtype})" for r in reports.values()})
    lines = [
        "## Issue targets",
        "",
        f"Measured on: {', '.join(devices) or 'nothing (no report found)'}. Ours: the fastest eager "
        f"kernel provider ({', '.join(KERNEL_PROVIDERS)}) of the case; see `vtprune/bench/targets.py`.",
        "",
        "| issue | target | case | ours | measured | met | note |",
        "|---|---|---|---|---|:---:|---|",
    ]
    for target in TARGETS:
        v = evaluate(target, reports.get(target.op))
        met = {True: "yes", False: "**NO**", None: "–"}[v.met]
        lines.append(f"| {target.issue} | {target.text} | {v.case} | {v.provider} | {v.measured} | {met} | "
                     f"{'; '.join(v.notes).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m vtprune.bench.targets DIR  (DIR holds scope.json, holov.json, attention.json)",
              file=sys.stderr)
        return 2
    print(markdown(load_reports(argv[0])), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
