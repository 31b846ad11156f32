"""pytest-benchmark microbenchmarks of SCOPE, one per (shape, provider).

    python -m pytest benchmarks/test_bench_scope.py --benchmark-columns=median,iqr,rounds
    python -m pytest benchmarks/test_bench_scope.py -k "llava15-k64" --benchmark-compare

Not part of the test suite (``tests/``): nothing here asserts a speed. On a CPU only a shape
a 2-core machine finishes quickly runs; on a GPU every shape of the issue runs. The cases
and providers are those of ``vtprune bench --op scope`` (:mod:`vtprune.bench.scope`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, whatever pytest's import mode
from _common import bench_params, run_cell  # noqa: E402
from vtprune.bench import scope  # noqa: E402


@pytest.mark.parametrize(("shape", "provider"), bench_params(scope.BENCH, cpu_shapes=["llava15-k64"]))
def test_scope(benchmark, shape, provider):
    out = run_cell(benchmark, scope.BENCH, shape, provider)
    sh = scope.SHAPES[shape]
    assert out.shape == (sh.b, sh.k)
