"""pytest-benchmark microbenchmarks of HoloV, one per (shape, provider).

    python -m pytest benchmarks/test_bench_holov.py --benchmark-columns=median,iqr,rounds

Not part of the test suite (``tests/``): nothing here asserts a speed. On a CPU two shapes
run; on a GPU every shape of the issue runs. The cases and providers are those of
``vtprune bench --op holov`` (:mod:`vtprune.bench.holov`); each output is checked first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, whatever pytest's import mode
from _common import bench_params, run_cell  # noqa: E402
from vtprune.bench import holov  # noqa: E402


@pytest.mark.parametrize(("shape", "provider"), bench_params(holov.BENCH, cpu_shapes=["quick-n193-k16", "llava15-k64"]))
def test_holov(benchmark, shape, provider):
    out = run_cell(benchmark, holov.BENCH, shape, provider)
    sh = holov.SHAPES[shape]
    assert out.shape == (sh.b, sh.k)
