"""pytest-benchmark microbenchmarks of SCOPE, one per (shape, provider).

    python -m pytest benchmarks/test_bench_scope.py --benchmark-columns=median,iqr,rounds
    python -m pytest benchmarks/test_bench_scope.py -k "llava15-k64" --benchmark-compare

Not part of the test suite (``tests/``): nothing here asserts a speed. On a CPU only the
shapes a 2-core machine finishes quickly run; on a GPU every shape of the issue runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = list(harness.SCOPE_SHAPES) if DEVICE.type == "cuda" else ["llava15-k64"]
PROVIDERS = {p.name: p for p in harness.scope_providers(DEVICE)}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", SHAPES)
def test_scope(benchmark, shape, provider):
    sh = harness.SCOPE_SHAPES[shape]
    prov = PROVIDERS[provider]
    if float(sh.b) * sh.k * sh.n * sh.n > prov.max_work:
        pytest.skip(f"{provider} is too slow for {shape} on {DEVICE}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sh.b, sh.n, sh.d, generator=g).to(DEVICE, DTYPE)
    s = torch.rand(sh.b, sh.n, generator=g).to(DEVICE, DTYPE)

    def call():
        out = prov.fn(x, s, sh.k)
        harness.sync(DEVICE)
        return out

    out = benchmark(call)
    assert out.shape == (sh.b, sh.k)
