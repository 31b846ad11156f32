"""Backend registry: which backends exist, whether they can run here, and which one runs an op.

Each backend is a module exposing ``OPS: dict[str, Callable]`` (op name -> implementation
with the internal signature of :mod:`vtprune.reference`). Modules are imported lazily, so
``import vtprune`` never imports Triton (whose ``@triton.jit`` reads ``TRITON_INTERPRET``
when a kernel module is imported) and never touches the CUDA driver.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

BACKENDS = ("reference", "torch", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS

_MODULES = {
    "reference": "vtprune.reference",
    "torch": "vtprune.torch_backend",
    "triton": "vtprune.triton_backend",
    "cuda": "vtprune.cuda_backend",
}

# Fastest first, for CUDA tensors; CPU tensors always get the torch backend under "auto".
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on this machine, and if not, why."""

    usable: bool
    reason: str

    def __bool__(self) -> bool:
        return self.usable


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_status() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return BackendStatus(False, f"triton is not installed ({exc}); pip install 'triton>=3.6'")
    if triton_interpret():
        return BackendStatus(True, f"triton {triton.__version__} in the interpreter (TRITON_INTERPRET=1, CPU tensors)")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no GPU: torch.cuda.is_available() is False (set TRITON_INTERPRET=1 to run the kernels on the CPU)")
    return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")


def _cuda_status() -> BackendStatus:
    from . import _cuda

    usable, reason = _cuda.status()
    return BackendStatus(usable, reason)


@lru_cache(maxsize=None)
def _status_cached(name: str, interpret: bool) -> BackendStatus:
    if name in ("reference", "torch"):
        return BackendStatus(True, "pure PyTorch, any device")
    if name == "triton":
        return _triton_status()
    return _cuda_status()


def _cuda_emulated() -> bool:
    """True inside ``vtprune._cuda._emulated`` (tests/cuda_emu): backend="cuda" then runs the CUDA
    kernels on the CPU emulator and takes CPU tensors. Read without importing ``_cuda``."""
    cuda = sys.modules.get("vtprune._cuda")
    return cuda is not None and cuda._emulation is not None


def status(name: str) -> BackendStatus:
    """Usability of one backend (cached; the interpreter switch is part of the key)."""
    if name == "cuda" and _cuda_emulated():
        return BackendStatus(True, "CUDA kernels on the CPU emulator (tests only)")
    return _status_cached(name, triton_interpret())


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable here and, if not, why."""
    return {name: status(name) for name in BACKENDS}


@lru_cache(maxsize=None)
def _ops(name: str) -> dict[str, Callable]:
    return importlib.import_module(_MODULES[name]).OPS


def implements(backend: str, op: str) -> bool:
    return status(backend).usable and op in _ops(backend)


# The kernels compute in fp32 and read 16/32-bit floats; fp64 stays on the PyTorch backends.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _device_ok(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when ``backend`` can take tensors on ``device`` of ``dtype``, else why not."""
    if backend in ("cuda", "triton") and dtype is not None and dtype not in _KERNEL_DTYPES:
        return f"backend={backend!r} takes float16, bfloat16 or float32 inputs, got {dtype} (use backend='torch')"
    if backend == "cuda" and device.type != ("cpu" if _cuda_emulated() else "cuda"):
        return f"backend='cuda' needs CUDA tensors, got tensors on {device}"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
        return f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
    return None


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, Callable]:
    """The backend name and implementation that run ``op`` for tensors on ``device``.

    An explicit backend that cannot run raises ``RuntimeError`` saying why; there is no
    silent fallback. ``"auto"`` takes the fastest usable backend implementing ``op``.
    """
    if backend == "auto":
        order = _AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
        for name in order:
            if _device_ok(name, device, dtype) is None and implements(name, op):
                return name, _ops(name)[op]
        raise RuntimeError(f"no backend can run {op} on {device}")  # torch covers every op
    st = status(backend)
    if not st.usable:
        raise RuntimeError(f"backend={backend!r} is not available: {st.reason}")
    problem = _device_ok(backend, device)
    if problem is not None:
        raise RuntimeError(problem)
    problem = _device_ok(backend, device, dtype)
    if problem is not None:
        raise TypeError(problem)
    impls = _ops(backend)
    if op not in impls:
        have = ", ".join(sorted(impls)) or "nothing yet"
        raise NotImplementedError(f"backend={backend!r} does not implement {op} yet (it implements: {have})")
    return backend, impls[op]
