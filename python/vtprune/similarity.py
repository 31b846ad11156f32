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


#: Images with more tokens than this keep the SCOPE similarity in float16 (2 bytes per entry, so
#: N = 16384 needs 512 MiB instead of 1 GiB). Decided by N alone, never by the batch size, so an
#: image gets the same picks whatever it is batched with.
SCOPE_FP32_MAX_N = 4096


def scope_similarity_dtype(n: int) -> torch.dtype:
    """Storage dtype of the ``[N, N]`` SCOPE similarity the kernels read: float32 up to
    :data:`SCOPE_FP32_MAX_N` tokens (bitwise the reference's values), float16 above."""
    return torch.float32 if n <= SCOPE_FP32_MAX_N else torch.float16


def scope_similarity(tokens: Tensor, storage: torch.dtype | None = None, row_chunk: int = 1024) -> Tensor:
    """``[B, N, N]`` cosine similarity (SPEC §1) of ``tokens [B, N, D]``, contiguous, for the kernels.

    float32 storage is one ``bmm`` of the fp32-normalized rows (the reference's formula).
    float16 storage (default above :data:`SCOPE_FP32_MAX_N` tokens) is computed the same way in
    fp32, ``row_chunk`` rows at a time, and rounded once, so the extra memory is ``2 * B * N**2``
    bytes plus one ``[B, row_chunk, N]`` fp32 block, never a full fp32 matrix.
    """
    storage = storage or scope_similarity_dtype(tokens.shape[-2])
    if storage not in (torch.float32, torch.float16):
        raise ValueError(f"storage must be torch.float32 or torch.float16, got {storage}")
    xn = normalize_rows(tokens)
    if storage == torch.float32:
        return torch.bmm(xn, xn.transpose(1, 2)).contiguous()
    batch, n, _ = xn.shape
    out = torch.empty(batch, n, n, dtype=storage, device=xn.device)
    for start in range(0, n, row_chunk):
        stop = min(start + row_chunk, n)
        out[:, start:stop] = torch.bmm(xn[:, start:stop], xn.transpose(1, 2))
    return out


def scope_storage_groups(n: int, lengths: Tensor | None) -> list[tuple[Tensor | None, int, torch.dtype]]:
    """Split a padded batch of width ``n`` so that every image gets the storage of its own length.

    The rule of :func:`scope_similarity_dtype` is applied to each image's own token count
    (``lengths[b]`` clamped to ``[1, n]``, or ``n``), never to the padded width, so a short image
    padded next to a long one keeps its float32 picks. Returns ``(rows, width, storage)`` triples:
    run the images ``rows`` (an int64 CPU index, ``None`` for the whole batch) on their first
    ``width`` positions with ``storage``. Up to :data:`SCOPE_FP32_MAX_N` positions that is one
    triple and nothing is read from the device; above it ``lengths`` is read on the host (one
    sync, negligible next to the work on an image that large).
    """
    if n <= SCOPE_FP32_MAX_N or lengths is None:
        return [(None, n, scope_similarity_dtype(n))]
    lens = lengths.clamp(1, n).tolist()
    small = [b for b, length in enumerate(lens) if length <= SCOPE_FP32_MAX_N]
    large = [b for b, length in enumerate(lens) if length > SCOPE_FP32_MAX_N]
    groups = []
    for rows, storage in ((small, torch.float32), (large, torch.float16)):
        if rows:
            index = None if len(rows) == len(lens) else torch.tensor(rows, dtype=torch.int64)
            groups.append((index, max(lens[b] for b in rows), storage))
    return groups
