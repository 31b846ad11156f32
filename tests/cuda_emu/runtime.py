"""The ``cuda_rt`` fixture: every CUDA kernel test runs on a GPU ("gpu") and on the emulator ("emu").

Test modules import the fixture (``from cuda_emu.runtime import cuda_rt``) and take their device
from it (``cuda_rt.device``: ``cuda`` or ``cpu``). The "gpu" runtime skips without a usable CUDA
backend, as the tests did before. The "emu" runtime builds the emulator once per process (skipping
only when g++ or pybind11 is missing; a failed build is an error) and, for the test's duration:

* routes ``backend="cuda"`` and the ``vtprune._cuda`` wrappers to it (``_cuda._emulated``);
* runs every kernel entry point under each of the emulator's schedules (two by default:
  thread-major forward order with NaN poison, warp-major reverse order with zero poison) and fails
  the test if the results are not bit-identical (a race, or a read of unwritten shared memory);
* fills tensors from ``torch.empty`` with NaN / the largest integer (torch's deterministic mode),
  so output slots a kernel leaves untouched compare equal between schedules and a kernel that
  reads uninitialized workspace sees poison.

``cuda_rt.emu`` lets a test shrink a case where the emulator is too slow (documented there).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
import torch

import cuda_emu
from vtprune import _cuda, cuda_backend

__all__ = ["CudaRuntime", "cuda_rt", "emulating", "emulator_or_skip", "CUDA_OK", "CUDA_REASON"]

CUDA_OK, CUDA_REASON = _cuda.status()

#: The kernel entry points of vtprune._cuda (everything that launches goes through one of them).
ENTRY_POINTS = ("coverage_max_sim", "scope_picks", "scope_select", "scope_select_varlen", "holov_select", "crop_budgets", "crop_topk")


@dataclass(frozen=True)
class CudaRuntime:
    """Where a CUDA kernel test runs: ``name`` "gpu" or "emu", tensors on ``device``."""

    name: str
    device: torch.device
    emulator: cuda_emu.Emulator | None = None

    @property
    def emu(self) -> bool:
        return self.emulator is not None


def emulator_or_skip() -> cuda_emu.Emulator:
    """The emulator, or a skip when this machine cannot build it (no g++ / pybind11)."""
    reason = cuda_emu.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CUDA emulator cannot be built here: {reason}")
    return cuda_emu.load()


def _checked(emulator: cuda_emu.Emulator, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return emulator.same_under_schedules(fn, *args, **kwargs)

    return run


@contextlib.contextmanager
def emulating(emulator: cuda_emu.Emulator) -> Iterator[None]:
    """The CUDA backend on the emulator, every entry point checked under every schedule."""
    saved_module = {name: getattr(_cuda, name) for name in ENTRY_POINTS}
    saved_ops = dict(cuda_backend.OPS)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        for name, fn in saved_module.items():
            setattr(_cuda, name, _checked(emulator, fn))
        for name, fn in saved_ops.items():
            cuda_backend.OPS[name] = _checked(emulator, fn)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        with _cuda._emulated(emulator.module):
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        cuda_backend.OPS.clear()
        cuda_backend.OPS.update(saved_ops)
        for name, fn in saved_module.items():
            setattr(_cuda, name, fn)


@pytest.fixture(params=["gpu", "emu"])
def cuda_rt(request) -> Iterator[CudaRuntime]:
    """The runtime of a CUDA kernel test (see the module docstring)."""
    if request.param == "gpu":
        if not CUDA_OK:
            pytest.skip(f"backend='cuda' is not usable here: {CUDA_REASON}")
        yield CudaRuntime("gpu", torch.device("cuda"))
        return
    emulator = emulator_or_skip()
    with emulating(emulator):
        yield CudaRuntime("emu", torch.device("cpu"), emulator)
