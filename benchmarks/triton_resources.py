"""Registers, spills and shared memory of every Triton kernel specialization, compiled without a GPU.

    python benchmarks/triton_resources.py                  # the table, sm_90 and sm_80
    python benchmarks/triton_resources.py --target sm_90   # one target
    python benchmarks/triton_resources.py --json out.json  # also the raw results ("-": stdout only)

Records the launches the wrappers make on the input cases of ``tests/triton_aot.py`` and compiles
each distinct specialization with Triton's compiler and its bundled ptxas (see that module).
Columns: registers per thread, spilled bytes per thread (stores/loads), dynamic shared memory per
block, warps, compile seconds, and the specialization (pointer dtypes, ``i32/16`` for an int known
divisible by 16, constexpr values). Exit status 1 when a specialization does not compile or a
kernel was never launched, 2 when this triton cannot compile ahead of time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import triton_aot  # noqa: E402


def _row(r: dict) -> list[str]:
    if not r["ok"]:
        return [r["kernel"], r["target"], "FAILED", "", "", "", f"{r['seconds']:.1f}", r.get("spec", "")]
    return [
        r["kernel"],
        r["target"],
        str(r["registers"]),
        f"{r['spill_stores']}/{r['spill_loads']}",
        f"{r['shared'] / 1024:.1f}",
        str(r["num_warps"]),
        f"{r['seconds']:.1f}",
        r["spec"],
    ]


def print_table(report: triton_aot.Report, out=sys.stdout) -> None:
    """The results as an aligned text table, one line per (specialization, target)."""
    header = ["kernel", "target", "regs", "spill st/ld", "smem KiB", "warps", "s", "specialization"]
    rows = [_row(r) for r in sorted(report.results, key=lambda r: (r["kernel"], r.get("spec", ""), r["target"]))]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header) - 1)]
    for row in [header] + rows:
        cells = [cell.ljust(w) if i in (0, 1) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        print("  ".join(cells + [row[-1]]), file=out)
    print(
        f"\n{len(report.kernels)} kernels, {report.launches} launches recorded in {report.record_seconds:.1f} s; "
        f"{len(report.results)} compiles in {report.compile_seconds:.1f} s",
        file=out,
    )
    for r in report.failures():
        print(f"\nFAILED {r['kernel']} [{r['target']}] {r.get('spec', '')}\n  cases: {r.get('cases')}\n{r['error']}", file=out)
    if report.unrecorded:
        print(f"\nkernels never launched by a case: {report.unrecorded}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=list(triton_aot.TARGETS), action="append", help="repeatable; default all")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default min(2, CPUs))")
    parser.add_argument("--json", metavar="PATH", help="write the raw results as JSON ('-': stdout, no table)")
    args = parser.parse_args(argv)
    problem = triton_aot.api_problem()
    if problem is not None:
        print(f"cannot compile ahead of time: {problem}", file=sys.stderr)
        return 2
    report = triton_aot.run_check(args.target, args.jobs)
    if args.json != "-":
        print_table(report)
    if args.json:
        data = json.dumps(vars(report), indent=1)
        if args.json == "-":
            print(data)
        else:
            Path(args.json).write_text(data)
    return 1 if report.failures() or report.unrecorded else 0


if __name__ == "__main__":
    raise SystemExit(main())
