"""Thin torch-side wrapper around the compiled CUDA module ``vtprune._C``.

``vtprune._C`` is optional (it is built only where nvcc was found) and, even when built, usable
only with an NVIDIA driver, a GPU and a CUDA build of torch. This module imports it lazily and
turns each of those conditions into a readable reason, so ``backend="auto"`` can fall back
quietly and ``backend="cuda"`` can fail with a message that says what is missing.

``vtprune._C`` is torch-free: it takes ``data_ptr()``s, sizes, strides and a raw stream handle.
Everything torch-specific (devices, dtypes, allocation, streams) is done here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["status", "is_available", "coverage_max_sim", "DTYPE_CODES"]

#: dtype codes understood by vtprune._C (csrc/common.cuh, enum DType)
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_NOT_BUILT = "not built (vtprune._C missing: installed without nvcc or with VTPRUNE_BUILD_CUDA=0)"

_module: ModuleType | None = None
_import_error: str | None = None
_usable = False  # sticky once true: a GPU does not disappear from a running process


def _load() -> ModuleType | None:
    """Import vtprune._C once, remembering why it failed if it did."""
    global _module, _import_error
    if _module is not None or _import_error is not None:
        return _module
    try:
        _module = importlib.import_module("vtprune._C")
    except ModuleNotFoundError as exc:
        # Only a missing _C means "not built"; a missing dependency of it is a broken build.
        _import_error = _NOT_BUILT if exc.name == "vtprune._C" else f"vtprune._C failed to import: {exc}"
    except ImportError as exc:  # e.g. built for another Python, or an undefined symbol
        _import_error = f"vtprune._C is present but failed to import: {exc}"
    return _module


def status() -> tuple[bool, str]:
    """Whether the CUDA backend can run here: ``(usable, reason)``.

    ``usable`` is True only when ``vtprune._C`` imports, ``torch.cuda.is_available()`` and
    ``vtprune._C.device_count() > 0``. ``reason`` is ``"ok"`` then, otherwise one of
    ``"not built (...)"``, ``"no GPU: <CUDA error string>"``, ``"torch has no CUDA (...)"``,
    ``"torch.cuda.is_available() is False ..."``.
    """
    global _usable
    if _usable:
        return True, "ok"
    module = _load()
    if module is None:
        return False, _import_error or _NOT_BUILT
    # The GPU check comes first: on a GPU-less box the missing GPU is the real reason, whatever
    # flavour of torch happens to be installed.
    if module.device_count() <= 0:
        return False, f"no GPU: {module.cuda_status()}"
    if torch.version.cuda is None:
        return False, f"torch has no CUDA (torch {torch.__version__} is a build without CUDA support)"
    if not torch.cuda.is_available():
        return False, (
            f"torch.cuda.is_available() is False although vtprune._C sees "
            f"{module.device_count()} device(s) (torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    _usable = True
    return True, "ok"


def is_available() -> bool:
    """``status()[0]``."""
    return status()[0]


def _require() -> ModuleType:
    usable, reason = status()
    if not usable:
        raise RuntimeError(f"backend='cuda' is not available: {reason}")
    assert _module is not None
    return _module


def _as_index_tensor(name: str, value: Tensor, shape: str, ndim: int, batch: int, device: torch.device) -> Tensor:
    """``value`` as a contiguous int64 tensor on ``device`` after checking it is ``[batch, ...]``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.dim() != ndim or value.shape[0] != batch:
        raise ValueError(f"{name} must have shape {shape}, got {list(value.shape)}")
    return value.to(device=device, dtype=torch.int64).contiguous()


def coverage_max_sim(tokens: Tensor, indices: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Similarity of every token to its most similar selected token, on the CUDA kernel.

    Args:
        tokens: ``[B, N, D]`` float32/float16/bfloat16 CUDA tensor (copied only if its last stride
            is not 1).
        indices: ``[B, K]`` integer tensor of selected token indices; entries outside
            ``[0, lengths[b])`` are skipped.
        lengths: ``[B]`` integer tensor, valid tokens per image (clamped to ``[0, N]``);
            ``None`` means all ``N``.

    Returns:
        ``float32 [B, N]`` on ``tokens.device``: ``max_s sim(u, s)`` (SPEC §1 similarity, fp32
        math) for ``u < lengths[b]``, ``-inf`` for such ``u`` when image ``b`` has no valid
        selected index, and ``0`` for padded ``u``.

    Raises:
        RuntimeError: ``backend='cuda' is not available: <reason>`` when vtprune._C cannot run
            here, or the CUDA error if the launch fails.
        TypeError / ValueError: bad dtype, shape or device.
    """
    module = _require()
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got shape {list(tokens.shape)}")
    if tokens.dtype not in DTYPE_CODES:
        raise TypeError(f"tokens must be float32, float16 or bfloat16, got {tokens.dtype}")
    if tokens.device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, tokens are on {tokens.device}")
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()

    B, N, D = tokens.shape
    device = tokens.device
    indices = _as_index_tensor("indices", indices, f"[B={B}, K]", 2, B, device)
    K = indices.shape[1]
    if lengths is None:
        lengths = torch.full((B,), N, device=device, dtype=torch.int64)
    else:
        lengths = _as_index_tensor("lengths", lengths, f"[B={B}]", 1, B, device)

    out = torch.empty((B, N), device=device, dtype=torch.float32)
    if B == 0 or N == 0:
        return out
    with torch.cuda.device(device):
        # Launch on torch's current stream so the kernel is ordered with the surrounding torch ops.
        stream = torch.cuda.current_stream(device).cuda_stream
        module.coverage_max_sim(
            tokens.data_ptr(),
            DTYPE_CODES[tokens.dtype],
            B,
            N,
            D,
            tokens.stride(0),
            tokens.stride(1),
            indices.data_ptr(),
            K,
            lengths.data_ptr(),
            out.data_ptr(),
            stream,
        )
    return out
