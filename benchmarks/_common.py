"""What the pytest-benchmark files share: device, dtype, the (shape, provider) grid, one cell."""

from __future__ import annotations

import pytest
import torch

from vtprune.bench import OpBench, Provider, sync

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def bench_params(op: OpBench, cpu_shapes: list[str]) -> list:
    """``(shape, provider)`` pairs: every shape on a GPU, ``cpu_shapes`` on a CPU; default providers."""
    shapes = [n for n in op.shapes if n not in op.quick_shapes] if DEVICE.type == "cuda" else cpu_shapes
    provs = [name for name, p in op.providers(DEVICE, DTYPE).items() if isinstance(p, Provider) and p.default]
    return [pytest.param(s, p, id=f"{s}-{p}") for s in shapes for p in provs]


def run_cell(benchmark, op: OpBench, shape: str, provider: str) -> torch.Tensor:
    """Benchmark one provider on one shape after checking its output; returns the output."""
    case = op.shapes[shape]
    prov = op.providers(DEVICE, DTYPE)[provider]
    if op.work(case) > prov.max_work:
        pytest.skip(f"{provider} is too slow for {shape} on {DEVICE}")
    if getattr(case, "n", 0) > prov.max_n:
        pytest.skip(f"{provider} takes at most {prov.max_n:g} tokens, {shape} has {case.n}")
    inputs = op.make_inputs(case, DEVICE, DTYPE)
    first = prov.fn(inputs)
    if prov.exact:
        verdict = op.agrees(first, op.reference(inputs), inputs)  # a bool, or (bool, note)
        same, note = verdict if isinstance(verdict, tuple) else (verdict, "")
        assert same, f"{provider} disagrees with the check on {shape}: {note}"

    def call():
        out = prov.fn(inputs)
        sync(DEVICE)
        return out

    return benchmark(call)
