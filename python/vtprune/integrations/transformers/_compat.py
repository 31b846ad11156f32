"""The one place that imports ``transformers`` and checks the parts of it we rely on.

The integration reaches into model internals (the vision tower's layers, the projector,
``get_rope_index``, ...). Those move between ``transformers`` releases, so every access
goes through :func:`need`, which turns a missing attribute into an error naming the model
class, the installed version and the range this integration is tested with, instead of an
``AttributeError`` deep inside a forward pass.
"""

from __future__ import annotations

import re
from typing import Any

#: Oldest ``transformers`` release the integration is tested with. 5.2 is the first whose
#: ``generate`` extends caller-given ``position_ids`` step by step (5.0/5.1 repeat the last
#: prompt position, and Qwen2.5-VL fails), and the pruned inputs always carry position ids.
MIN_VERSION = (5, 2, 0)
MIN_VERSION_STR = ".".join(map(str, MIN_VERSION))
_INSTALL_HINT = "pip install 'vtprune[transformers]'"


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        match = re.match(r"\d+", piece)
        parts.append(int(match.group()) if match else 0)
    return tuple(parts)


def require_transformers() -> Any:
    """Import and return ``transformers``, or raise ``ImportError`` saying how to install it."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"vtprune.integrations.transformers needs the `transformers` package (>= {MIN_VERSION_STR}); "
            f"install it with: {_INSTALL_HINT}"
        ) from err
    if _parse(transformers.__version__) < MIN_VERSION:
        raise ImportError(
            f"vtprune.integrations.transformers needs transformers >= {MIN_VERSION_STR}; found "
            f"{transformers.__version__}. Upgrade with: {_INSTALL_HINT}"
        )
    return transformers


def version() -> str:
    """The installed ``transformers`` version string."""
    return require_transformers().__version__


def unsupported(model: Any, what: str) -> RuntimeError:
    """The error for a model whose internals are not what this integration expects."""
    return RuntimeError(
        f"{type(model).__name__} (transformers {version()}) {what}; vtprune.integrations.transformers "
        f"is tested with transformers >= {MIN_VERSION_STR} and the LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL "
        "classes it ships"
    )


def need(obj: Any, path: str, model: Any) -> Any:
    """``obj.<path>`` (dotted), or :func:`unsupported` naming the missing piece."""
    cur = obj
    for name in path.split("."):
        if not hasattr(cur, name):
            raise unsupported(model, f"has no `{path}`")
        cur = getattr(cur, name)
    return cur
