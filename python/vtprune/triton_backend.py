"""The ``triton`` backend: glue from the internal op signatures to ``vtprune.triton_kernels``.

Imported only when the backend is first used, so ``TRITON_INTERPRET`` set before that
point decides whether kernels compile for the GPU or run in the interpreter.
"""

from __future__ import annotations

from torch import Tensor

from vtprune.triton_kernels import coverage as _coverage
from vtprune.triton_kernels import scope as _scope


def coverage_max_sim(tokens: Tensor, indices: Tensor, lengths: Tensor) -> Tensor:
    return _coverage.coverage_max_sim(tokens.contiguous(), indices.contiguous(), lengths.contiguous())


def scope_select(
    tokens: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float,
    combine: str,
    lengths: Tensor | None,
    sorted: bool,
) -> Tensor:
    return _scope.scope_select(tokens, saliency, k, alpha, combine, lengths, sorted)


def scope_select_varlen(
    tokens: Tensor,
    saliency: Tensor,
    cu_seqlens: Tensor,
    k_per_seq: Tensor,
    alpha: float,
    combine: str,
    sorted: bool,
) -> tuple[Tensor, Tensor]:
    return _scope.scope_select_varlen(tokens, saliency, cu_seqlens, k_per_seq, alpha, combine, sorted)


OPS = {
    "coverage_max_sim": coverage_max_sim,
    "scope_select": scope_select,
    "scope_select_varlen": scope_select_varlen,
}
