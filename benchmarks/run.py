"""Print the benchmark tables and write each op's as JSON and markdown (``vtprune bench``).

    python benchmarks/run.py --op scope                 # SCOPE: the CPU set here, every shape on a GPU
    python benchmarks/run.py --op holov --out benchmarks/results/h100
    python benchmarks/run.py --op attention --dtype bfloat16 --out DIR --plot DIR/attention.png
    python benchmarks/run.py --op all --quick           # seconds, any machine
    python benchmarks/run.py --list                     # named shapes and providers

The same options as ``vtprune bench`` (this script is that command, kept here next to the
results it writes). Every provider runs on the same inputs in one process; ``vs baseline``
is the baseline's time (or peak memory) divided by the provider's, and ``same`` compares
each provider's output with the torch backend's. Exit status 1 when an output disagrees or a
provider raised (out of memory excepted: that is an ``OOM`` row).
"""

from __future__ import annotations

import argparse

from vtprune.bench import add_bench_arguments, run_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
