"""The one place where vtprune defines how tokens are normalized and compared.

Every backend imports these definitions (or mirrors them exactly in a kernel), so
SCOPE's cosine similarity and HoloV's normalization never drift apart between
implementations.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Norm floor of SPEC §1: a zero token has similarity 0 with everything (no NaN).
SCOPE_EPS = 1e-6
#: Additive norm offset of SPEC §2 (HoloV's own normalization, kept as the paper's code has it).
HOLOV_EPS = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype all math runs in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(x: Tensor, eps: float = SCOPE_EPS) -> Tensor:
    """``x / max(|x|, eps)`` along the last dim, in the compute dtype."""
    x = x.to(compute_dtype(x.dtype))
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def cosine_similarity(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``sim(u, v)`` of SPEC §1 between the rows of ``x`` and of ``y`` (default ``x``)."""
    xn = normalize_rows(x)
    yn = xn if y is None else normalize_rows(y)
    return xn @ yn.mT


def holov_normalize(x: Tensor) -> Tensor:
    """``x / (|x| + 1e-6)`` along the last dim, the normalization of SPEC §2."""
    x = x.to(compute_dtype(x.dtype))
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + HOLOV_EPS)


def saliency_weights(saliency: Tensor, alpha: float) -> Tensor:
    """``max(saliency, 0) ** alpha`` with ``0 ** 0 = 1`` (SPEC §1), in the compute dtype."""
    s = saliency.to(compute_dtype(saliency.dtype)).clamp_min(0)
    return torch.pow(s, alpha)
