"""``vtprune bench`` (and ``benchmarks/run.py``): parse the options, run the tables, write them.

    vtprune bench --quick --json bench.json --plot bench.png     # seconds, any machine
    vtprune bench --op holov --shapes llava15-k64 serving-b32    # named shapes
    vtprune bench --op attention --out results/h100              # <op>.json and <op>.md
    vtprune bench --list                                         # shapes and providers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cli import positive_int
from . import attention, holov, scope
from .progress import Progress
from .report import SCHEMA, TEXT_HEADER, Report, markdown
from .runner import OpBench, run_op

#: Every benchmarked op, in the order ``--op all`` runs them.
OPS: dict[str, OpBench] = {"scope": scope.BENCH, "holov": holov.BENCH, "attention": attention.BENCH}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``vtprune bench`` to ``parser`` (also used by ``benchmarks/run.py``)."""
    parser.add_argument("--op", choices=(*OPS, "all"), default="all", help="which op's table (default all)")
    parser.add_argument("--shapes", nargs="+", metavar="NAME",
                        help="named shapes (see --list); default: every shape on a GPU, the CPU set on a CPU")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help="providers to run (see --list); default: every one usable here")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="input dtype (default bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    parser.add_argument("--repeat", type=positive_int, default=5, metavar="R", help="timed runs per cell, median reported (default 5)")
    parser.add_argument("--max-seconds", type=_seconds, default=10.0, metavar="S",
                        help="stop a cell's timed runs after S seconds, keeping at least one (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="small CPU-friendly shapes, one warm-up call, no torch.compile: the whole run takes seconds")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every report to one JSON file")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write latency vs N / k / L per provider (needs matplotlib)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write <op>.json and <op>.md per op into DIR")
    parser.add_argument("--list", action="store_true", help="print the shapes and providers of each op, then exit")
    return parser


def _error(message: str) -> int:
    print(f"vtprune bench: error: {message}", file=sys.stderr)
    return 2


def _list(ops: list[OpBench], device: torch.device, dtype: torch.dtype) -> int:
    for op in ops:
        print(f"{op.name} (baseline {op.baseline}; same = {op.check})")
        cpu, quick = set(op.cpu_shapes), set(op.quick_shapes)
        for name, case in op.shapes.items():
            tags = [t for t, on in (("cpu default", name in cpu), ("quick", name in quick), ("GPU only", case.gpu_only)) if on]
            print(f"  {name:22s} {case.label()}" + (f"  [{', '.join(tags)}]" if tags else ""))
        for name, prov in op.providers(device, dtype).items():
            state = "usable" if not isinstance(prov, str) else f"not here: {prov}"
            if not isinstance(prov, str) and not prov.default:
                state = f"only when named ({prov.note})" if prov.note else "only when named"
            print(f"  provider {name:15s} {state}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Run the tables ``args`` asks for; 0 when every output agrees, 1 otherwise, 2 on bad options."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: torch.cuda.is_available() is False on this machine")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    ops = list(OPS.values()) if args.op == "all" else [OPS[args.op]]
    if args.list:
        return _list(ops, device, dtype)
    if args.quick and args.shapes:
        return _error("--quick picks its own shapes; give --quick or --shapes, not both")

    plan: list[tuple[OpBench, list[str]]] = []
    for op in ops:
        names = op.default_shapes(device, args.quick) if not args.shapes else [n for n in args.shapes if n in op.shapes]
        if names:
            plan.append((op, names))
    if args.shapes:
        unknown = [n for n in args.shapes if not any(n in op.shapes for op in ops)]
        if unknown:
            known = "; ".join(f"{op.name}: {', '.join(op.shapes)}" for op in ops)
            return _error(f"--shapes: unknown {', '.join(unknown)} (known: {known})")
    providers_by_op: dict[str, list[str] | None] = {op.name: None for op, _ in plan}
    if args.providers:
        unknown = [p for p in args.providers if not any(p in op.provider_names for op, _ in plan)]
        if unknown:
            known = "; ".join(f"{op.name}: {', '.join(op.provider_names)}" for op, _ in plan)
            return _error(f"--providers: unknown {', '.join(unknown)} (known: {known})")
        for op, _ in plan:
            providers_by_op[op.name] = [p for p in args.providers if p in op.provider_names]
            for name in providers_by_op[op.name]:
                prov = op.providers(device, dtype)[name]
                if isinstance(prov, str):
                    return _error(f"--providers: {op.name} provider {name!r} cannot run here: {prov}")
        plan = [(op, names) for op, names in plan if providers_by_op[op.name]]
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401 - checked before the run, not after it
        except ImportError as exc:
            return _error(f"--plot needs matplotlib ({exc}); pip install matplotlib (or 'vtprune[demo]')")

    total = 0
    for op, names in plan:
        n_prov = len(providers_by_op[op.name] or [p for p in op.providers(device, dtype).values()
                                                  if not isinstance(p, str) and p.default and (p.quick or not args.quick)])
        total += len(names) * n_prov
    reports: list[Report] = []
    with Progress(total, desc="vtprune bench") as bar:
        for op, names in plan:
            bar.write(f"\n== {op.name}: baseline {op.baseline}, {str(dtype).replace('torch.', '')} on {device} ==")
            bar.write(TEXT_HEADER)
            reports.append(run_op(op, names, device, dtype, args.repeat, providers_by_op[op.name], quick=args.quick,
                                  warmup=1 if args.quick else 3, max_seconds=args.max_seconds,
                                  log=bar.write, step=bar.step))
    _write_outputs(reports, args)
    failed = [(rep.op, r) for rep in reports for r in rep.failed()]
    for op_name, r in failed:
        what = "differs from the check" if r.same_as_reference is False else r.note
        print(f"vtprune bench: FAIL {op_name} {r.case} {r.provider}: {what}", file=sys.stderr)
    return 1 if failed else 0


def _write_outputs(reports: list[Report], args: argparse.Namespace) -> None:
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"schema": SCHEMA, "reports": [r.to_dict() for r in reports]}, indent=2))
        print(f"wrote {args.json}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for r in reports:
            (args.out / f"{r.op}.json").write_text(json.dumps(r.to_dict(), indent=2))
            (args.out / f"{r.op}.md").write_text(markdown(r))
            print(f"wrote {args.out / (r.op + '.json')} and {args.out / (r.op + '.md')}")
    if args.plot is not None and reports:
        from .plot import plot_reports

        print(f"wrote {plot_reports(reports, args.plot)}")
