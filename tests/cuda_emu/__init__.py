"""CUDA emulator for tests: vtprune's CUDA kernels (csrc/*.cu, unchanged) run on the CPU.

:func:`load` builds (once, cached; see :mod:`cuda_emu.build`) and imports a module with exactly
``vtprune._C``'s interface whose kernels run on the emulator (``emu.cpp``): CUDA threads are
fibers, barriers and warp intrinsics are checked rendezvous, shared memory is per block and
poisoned. :class:`Emulator` adds the emulator's controls (schedule order, poison, emulated
devices) and :meth:`Emulator.same_under_schedules`, which runs a call under several schedules and
requires bit-identical results. See README.md for what this proves and what it does not.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch

from .build import BuildError, ToolMissing, build

__all__ = ["Emulator", "Schedule", "load", "unavailable_reason", "BuildError", "ToolMissing"]

_ORDERS = {"forward": 0, "reverse": 1, "random": 2}
DEFAULT_POISON = 0x7FFF7FFF  # NaN as fp32 / fp16 / bf16, about 2^31 as an integer
H100_OPTIN = 232448  # the default emulated device's cudaDevAttrMaxSharedMemoryPerBlockOptin


@dataclass(frozen=True)
class Schedule:
    """How the emulator runs a launch: the order of threads (and blocks), thread-major or
    warp-major (see emu.cpp, "Scheduling"), and the word unwritten shared memory is filled with."""

    order: str = "forward"
    warp_major: bool = False
    seed: int = 0
    poison: int = DEFAULT_POISON

    def __str__(self) -> str:
        seed = f":{self.seed}" if self.order == "random" else ""
        return f"{self.order}{'-warp' if self.warp_major else ''}{seed}/poison=0x{self.poison:08x}"


def _parse_schedules(text: str) -> list[Schedule]:
    """``"forward,reverse-warp,random-warp:7"`` (order[-warp][:seed]), with alternating poison words
    so that a read of unwritten shared memory also changes the result."""
    out = []
    for i, item in enumerate(p.strip() for p in text.split(",") if p.strip()):
        name, _, seed = item.partition(":")
        order, warp_major = (name[: -len("-warp")], True) if name.endswith("-warp") else (name, False)
        if order not in _ORDERS:
            raise ValueError(f"VTPRUNE_EMU_SCHEDULES: unknown schedule {item!r} (forward, reverse, random:SEED, each optionally -warp)")
        out.append(Schedule(order, warp_major, int(seed or 0), DEFAULT_POISON if i % 2 == 0 else 0))
    if not out:
        raise ValueError("VTPRUNE_EMU_SCHEDULES is empty")
    return out


#: The schedules every emulated op runs under (``VTPRUNE_EMU_SCHEDULES`` overrides). They differ in
#: thread order, granularity and poison: thread-major forward with NaN poison, warp-major reverse
#: with zero poison.
DEFAULT_SCHEDULES = "forward,reverse-warp"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that NaNs compare by payload and -0.0 differs from 0.0."""
    return t.detach().contiguous().view(torch.uint8) if t.numel() else t.detach().reshape(-1)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(_bits(a), _bits(b))
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class Emulator:
    """The loaded emulator module (``module``, the vtprune._C interface) and its controls."""

    def __init__(self, path: Path):
        self.path = path
        spec = importlib.util.spec_from_file_location("vtprune_cuda_emu._C", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.module: ModuleType = module
        # The same shared object (dlopen returns the handle Python already has): its C symbols.
        lib = ctypes.CDLL(str(path))
        lib.emu_set_order.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong]
        lib.emu_set_poison.argtypes = [ctypes.c_uint]
        lib.emu_last_detail.restype = ctypes.c_char_p
        lib.emu_error_string.restype = ctypes.c_char_p
        lib.emu_launch_count.restype = ctypes.c_ulonglong
        lib.emu_switch_count.restype = ctypes.c_ulonglong
        self.lib = lib
        self.schedules = _parse_schedules(os.environ.get("VTPRUNE_EMU_SCHEDULES", DEFAULT_SCHEDULES))
        self._schedule = Schedule()
        self._apply(self._schedule)
        self._checking = False

    # ---- controls

    def _apply(self, s: Schedule) -> None:
        if self.lib.emu_set_order(_ORDERS[s.order], int(s.warp_major), s.seed) != 0:
            raise ValueError(f"bad schedule {s}")
        self.lib.emu_set_poison(s.poison)
        self._schedule = s

    @contextlib.contextmanager
    def schedule(self, s: Schedule) -> Iterator[None]:
        """Run launches under ``s`` inside the block."""
        previous = self._schedule
        self._apply(s)
        try:
            yield
        finally:
            self._apply(previous)

    @contextlib.contextmanager
    def smem_optin(self, optin_bytes: int) -> Iterator[int]:
        """Launches inside the block run on an emulated device whose opt-in shared memory limit
        (cudaDevAttrMaxSharedMemoryPerBlockOptin) is ``optin_bytes`` (H100: 232448, the default
        device; A100: 166912). Each limit is its own device, created once and never changed,
        because the kernels cache the attribute per device. Yields the device index."""
        with self.device(optin_bytes) as device:
            yield device

    @contextlib.contextmanager
    def device(self, optin_bytes: int = H100_OPTIN, compute_capability: tuple[int, int] = (9, 0)) -> Iterator[int]:
        """Launches inside the block run on an emulated device with this opt-in shared memory
        limit and compute capability (the default device is an H100: 232448 B, 9.0; an A100 is
        166912 B, 8.0, where thread-block clusters are refused). Every pointer reports this
        device, so the launchers switch to it. Devices are created once and never change.
        Yields the device index."""
        major, minor = compute_capability
        device = self.lib.emu_device_for(int(optin_bytes), int(major), int(minor))
        if device < 0:
            raise ValueError(f"cannot emulate a device with {optin_bytes} B of opt-in shared memory and compute capability {major}.{minor}")
        if self.lib.emu_set_pointer_device(device) != 0:
            raise RuntimeError(f"emulated device {device} missing")
        try:
            yield device
        finally:
            self.lib.emu_set_pointer_device(0)

    def last_detail(self) -> str:
        """The emulator's explanation of the last error it raised."""
        return self.lib.emu_last_detail().decode()

    def error_string(self, err: int) -> str:
        return self.lib.emu_error_string(err).decode()

    def counters(self) -> tuple[int, int]:
        """(launches, fiber switches) so far in this process."""
        return int(self.lib.emu_launch_count()), int(self.lib.emu_switch_count())

    # ---- race check

    def same_under_schedules(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` run under every schedule of :attr:`schedules`; the results must
        be bit-identical (else AssertionError: a race or a read of unwritten memory). Calls nested
        inside ``fn`` run once per outer run, not again under every schedule."""
        if self._checking:
            return fn(*args, **kwargs)
        self._checking = True
        try:
            results = []
            for s in self.schedules:
                with self.schedule(s):
                    results.append(fn(*args, **kwargs))
        finally:
            self._checking = False
        for s, r in zip(self.schedules[1:], results[1:]):
            if not _same(results[0], r):
                name = getattr(fn, "__qualname__", repr(fn))
                raise AssertionError(
                    f"cuda_emu: {name} gave different results under schedules {self.schedules[0]} and {s}: "
                    f"a race between threads or blocks, or a read of unwritten shared memory\n"
                    f"{results[0]!r}\nvs\n{r!r}"
                )
        return results[0]


_loaded: dict[bool, Emulator] = {}


def load(asan: bool | None = None) -> Emulator:
    """The emulator (built if needed, loaded once per process). ``asan=None`` reads
    ``VTPRUNE_EMU_ASAN=1``: the AddressSanitizer build, for a process started with
    ``LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0``.

    Raises ToolMissing when g++ or pybind11 is missing, BuildError when the build fails.
    """
    if asan is None:
        asan = os.environ.get("VTPRUNE_EMU_ASAN") == "1"
    if asan not in _loaded:
        _loaded[asan] = Emulator(build(asan=asan))
    return _loaded[asan]


def unavailable_reason() -> str | None:
    """Why the emulator cannot be built here (no compiler, no pybind11), or None."""
    from .build import _pybind11_include, find_compiler

    try:
        find_compiler()
        _pybind11_include()
    except ToolMissing as exc:
        return str(exc)
    return None
