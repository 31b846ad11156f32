"""Print the benchmark table and write it as JSON and markdown.

    python benchmarks/run.py                         # SCOPE, the CPU shapes (or all shapes on a GPU)
    python benchmarks/run.py --shapes llava15-k64 n2880-k160 --repeat 7
    python benchmarks/run.py --dtype bfloat16 --out benchmarks/results/h100   # on a GPU

Every provider runs on the same inputs in one process; ``vs baseline`` is the time of
``reference_loop`` (the official algorithm) divided by the provider's, and ``same picks``
compares each provider's selection with the torch backend's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=["scope"], default="scope")
    p.add_argument("--shapes", nargs="*", choices=sorted(harness.SCOPE_SHAPES), help="default: all on CUDA, the CPU set on CPU")
    p.add_argument("--providers", nargs="*", help="default: every provider usable here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, help="folder for <op>.json and <op>.md")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    names = args.shapes or (list(harness.SCOPE_SHAPES) if device.type == "cuda" else list(harness.SCOPE_CPU_SHAPES))
    shapes = [harness.SCOPE_SHAPES[n] for n in names]
    print(f"{'case':42s} {'provider':15s} {'dtype':9s} {'median ms':>10} {'vs base':>9} {'peak MiB':>9} {'same':>5s}")
    report = harness.run_scope(shapes, device, dtype, args.repeat, args.providers)
    print()
    print(harness.markdown(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.op}.json").write_text(json.dumps(report.to_dict(), indent=2))
        (args.out / f"{args.op}.md").write_text(harness.markdown(report))
        print(f"wrote {args.out / (args.op + '.json')} and {args.out / (args.op + '.md')}")
    return 1 if any(r.same_as_reference is False for r in report.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
