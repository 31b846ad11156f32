"""pytest-benchmark microbenchmarks of attention importance (ALVTS), one per (shape, provider).

    python -m pytest benchmarks/test_bench_attention.py --benchmark-columns=median,iqr,rounds

Not part of the test suite (``tests/``): nothing here asserts a speed. On a CPU the small
shapes run; on a GPU every shape of the issue runs (an out-of-memory provider is skipped).
The cases and providers are those of ``vtprune bench --op attention``
(:mod:`vtprune.bench.attention`); each output is checked first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, whatever pytest's import mode
from _common import bench_params, run_cell  # noqa: E402
from vtprune.bench import attention  # noqa: E402


@pytest.mark.parametrize(
    ("shape", "provider"),
    bench_params(attention.BENCH, cpu_shapes=["quick-lowrank-L192", "quick-exact-L96", "lowrank-r128-L640"]),
)
def test_attention(benchmark, shape, provider):
    sh = attention.SHAPES[shape]
    try:
        out = run_cell(benchmark, attention.BENCH, shape, provider)
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{provider} runs out of GPU memory at {shape}")
    assert out.shape == (sh.b, 2, sh.n_visual)
