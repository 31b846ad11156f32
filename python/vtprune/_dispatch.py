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


def _compute_status(name: str, interpret: bool) -> BackendStatus:
    if name in ("reference", "torch"):
        return BackendStatus(True, "pure PyTorch, any device")
    if name == "triton":
        return _triton_status()
    return _cuda_status()


class _StatusMemo:
    """Memo of :func:`_compute_status` by ``(name, interpret)``, like ``functools.lru_cache``, except
    that :meth:`cache_clear` also drops the cached resolutions of :func:`resolve` built on it."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, bool], BackendStatus] = {}

    def __call__(self, name: str, interpret: bool) -> BackendStatus:
        key = (name, interpret)
        st = self._memo.get(key)
        if st is None:
            st = self._memo[key] = _compute_status(name, interpret)
        return st

    def cache_clear(self) -> None:
        self._memo.clear()
        _RESOLVED.clear()


_status_cached = _StatusMemo()


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


#: ``resolve``'s answers, keyed by everything they depend on (see :func:`resolve`). Only successful
#: resolutions are kept: an error is raised afresh each time, with its current reason.
_RESOLVED: dict[tuple, tuple[str, dict[str, Callable]]] = {}


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, Callable]:
    """The backend name and implementation that run ``op`` for tensors on ``device``.

    An explicit backend that cannot run raises ``RuntimeError`` saying why; there is no
    silent fallback. ``"auto"`` takes the fastest usable backend implementing ``op``.

    Answers are cached (this runs on every call of every op): the key holds the device type,
    the dtype and the two switches a resolution can depend on besides them, the Triton
    interpreter and the CUDA emulator of the tests; the value is the backend's name and op table,
    so the implementation is read from the table on every call. Clearing the status cache
    (``_status_cached.cache_clear()``) clears this one too, and failures are never cached.
    """
    key = (op, backend, device.type, dtype, _cuda_emulated(), os.environ.get("TRITON_INTERPRET"))
    hit = _RESOLVED.get(key)
    if hit is not None:
        name, table = hit
        impl = table.get(op)  # looked up each time: the tables stay the one source of truth
        if impl is not None:
            return name, impl
    name, impl = _resolve(op, backend, device, dtype)
    _RESOLVED[key] = (name, _ops(name))
    return name, impl


def _resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype | None) -> tuple[str, Callable]:
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


# ----------------------------------------------------------------------------- constants for the kernels

#: ``(device, length, value)`` -> an int64 ``[length]`` tensor full of ``value``: the per-image
#: ``k`` and the default ``lengths`` the GPU wrappers hand their kernels, which only read them.
_CONSTANTS: dict[tuple[torch.device, int, int], torch.Tensor] = {}
_CONSTANTS_MAX = 256


def constant_index(length: int, value: int, device: torch.device) -> torch.Tensor:
    """A read-only int64 ``[length]`` tensor of ``value`` on ``device``, made once per key.

    Saves a fill launch per call on the GPU paths. Not cached while the current CUDA stream is
    being captured into a graph (the fill would only be recorded, not run: the tensor is made
    afresh and captured instead), nor beyond :data:`_CONSTANTS_MAX` keys (entries are never
    dropped, so no kernel on another stream can still be reading a freed one). A new CUDA entry
    waits once for its fill, so that any stream may read it from then on. Callers must not write
    to the result.
    """
    key = (device, length, value)
    hit = _CONSTANTS.get(key)
    if hit is not None:
        return hit
    out = torch.full((length,), value, dtype=torch.int64, device=device)
    if len(_CONSTANTS) >= _CONSTANTS_MAX:
        return out
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return out
        torch.cuda.current_stream(device).synchronize()  # once per key, never in steady state
    _CONSTANTS[key] = out
    return out


#: Saliency dtypes the GPU greedy kernels read directly.
_KERNEL_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_weights(saliency: torch.Tensor, alpha: float) -> tuple[torch.Tensor, bool]:
    """SCOPE's weights w(v) as the GPU greedy kernels take them: ``(w, unit)``. The kernels read
    ``max(w, 0)`` (NaN kept) from ``w``'s rows (unit element stride, any row stride, fp32/fp16/
    bf16), or use 1 for every token when ``unit``. So ``alpha = 1`` (the official default) passes
    the saliency itself and ``alpha = 0`` (pure coverage) nothing: the host launches no kernel
    for either. Any other ``alpha``, or a float64 saliency (rounded to fp32 once):
    :func:`saliency_weights_f32`, whose ``max(., 0)`` is itself."""
    if alpha == 0.0:
        return saliency, True
    if alpha == 1.0 and saliency.stride(-1) == 1 and saliency.dtype in _KERNEL_WEIGHT_DTYPES:
        return saliency, False
    return saliency_weights_f32(saliency, alpha), False


def saliency_weights_f32(saliency: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`vtprune.similarity.saliency_weights` as the kernels read it: float32, contiguous.

    Equal to ``saliency_weights(saliency, alpha).float().contiguous()`` bit for bit, in fewer
    torch ops for the default ``alpha = 1``: ``x ** 1`` is ``x`` exactly (NaN included), so the
    power is left out, and 16-bit saliency is clamped in place in its float32 copy.
    """
    if alpha == 1.0:
        if saliency.dtype == torch.float32:
            return saliency.clamp_min(0).contiguous()
        if saliency.dtype in (torch.float16, torch.bfloat16):
            return saliency.to(torch.float32).clamp_min_(0).contiguous()
    from .similarity import saliency_weights

    w = saliency_weights(saliency, alpha)
    return (w if w.dtype == torch.float32 else w.to(torch.float32)).contiguous()
