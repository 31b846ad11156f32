"""Kernel launches stubbed out, and the top-level torch op count, for looking at the host path of
the GPU ops on CPU tensors.

One place for ``benchmarks/host_overhead.py`` (which times that path and lists its ops) and
``tests/test_host_overhead.py`` (which bounds the op count), so the bound the tests enforce is
counted exactly as the benchmark reports it. Not imported by :mod:`vtprune.bench`: what is here
patches vtprune's modules in place, and ``stubbed("triton")`` imports Triton.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Callable, Iterator

#: The ``vtprune.triton_kernels`` modules whose ``@triton.jit`` kernels :func:`stubbed` replaces.
TRITON_KERNEL_MODULES = ("scope", "holov", "attention", "coverage", "similarity")


class StubC(types.ModuleType):
    """``vtprune._C``'s interface with launchers that return at once (for
    :func:`vtprune._cuda._emulated`)."""

    def __init__(self) -> None:
        super().__init__("vtprune_stub_C")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name.endswith("_workspace_bytes"):
            return lambda *args, **kwargs: 256
        return lambda *args, **kwargs: None


class NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


# The wrappers' device check (``_common.interpreted``) goes by this class name: with it, the stubs
# take CPU tensors as interpreted kernels would.
NoLaunch.__name__ = "InterpretedFunction"


@contextlib.contextmanager
def stubbed(backend: str) -> Iterator[None]:
    """Kernel launches of ``backend`` (``"cuda"`` or ``"triton"``) replaced by no-ops for the
    duration. The Triton wrappers also need ``TRITON_INTERPRET=1`` to take CPU tensors."""
    if backend == "cuda":
        from vtprune import _cuda

        with _cuda._emulated(StubC()):
            yield
        return
    saved = []
    for name in TRITON_KERNEL_MODULES:
        module = vars(importlib.import_module(f"vtprune.triton_kernels.{name}"))
        for attr, value in list(module.items()):
            if type(value).__name__ in ("JITFunction", "InterpretedFunction"):  # @triton.jit kernels
                saved.append((module, attr, value))
                module[attr] = NoLaunch()
    try:
        yield
    finally:
        for module, attr, value in saved:
            module[attr] = value


@contextlib.contextmanager
def device_side_values() -> Iterator[None]:
    """The wrappers' value checks decide as for index tensors on the GPU (read only with
    ``check_values=True``), so the CPU stand-ins take the GPU path's checks, not the CPU's."""
    from vtprune import _validation

    real = getattr(_validation, "read_values", None)
    if real is None:  # an older vtprune: its checks read the tensors on every device
        yield
        return
    _validation.read_values = lambda x, check_values: check_values and _validation.eager()
    try:
        yield
    finally:
        _validation.read_values = real


def top_level_ops(fn: Callable[[], object]) -> list[str]:
    """Top-level torch operators one call of ``fn`` dispatches (operators nested in another
    operator not counted), after one warm-up call (which may fill per-shape caches)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            names.append(ev.name[len("aten::"):])
    return names
