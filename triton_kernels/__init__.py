"""Triton kernels of vtprune, installed as ``vtprune.triton_kernels``.

Importing this package does not import triton: each public name is resolved from its kernel
module on first access (PEP 562), so ``import vtprune`` stays cheap and works without triton.
``import triton`` happens only inside the kernel modules of this package.

The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter: set
``TRITON_INTERPRET=1`` *before* a kernel module is first imported, because ``@triton.jit`` decides
between compiling and interpreting when it decorates.

Supported triton versions: 3.6 and later (no newer APIs are used).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = [
    "attention_importance",
    "coverage_max_sim",
    "crop_budgets",
    "crop_topk",
    "holov_select",
    "interpreting",
    "scope_select",
    "scope_select_varlen",
    "status",
]

# public name -> kernel module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "coverage_max_sim": ".coverage",
    "scope_select": ".scope",
    "scope_select_varlen": ".scope",
    "attention_importance": ".attention",
    "holov_select": ".holov",
    "crop_budgets": ".holov",
    "crop_topk": ".holov",
}

MIN_TRITON = (3, 6)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def status() -> tuple[bool, str]:
    """Whether the Triton backend can be used here, and why not if it cannot.

    Returns ``(usable, reason)``. This only checks that a recent enough triton imports; whether a
    given tensor can run (CUDA tensor, or CPU tensor under ``TRITON_INTERPRET=1``) is checked by
    each kernel wrapper.
    """
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - a broken triton install is "unavailable" too
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'triton>=3.6'"
    version = getattr(triton, "__version__", "0")
    if _version_tuple(version) < MIN_TRITON:
        return False, f"triton {version} is too old (need >= {'.'.join(map(str, MIN_TRITON))})"
    mode = "interpreter" if interpreting() else "compiled"
    return True, f"triton {version} ({mode})"


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set, i.e. kernels imported from now on run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
