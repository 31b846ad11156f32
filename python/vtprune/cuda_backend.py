"""The ``cuda`` backend: glue from the internal op signatures to the ``vtprune._C`` kernels."""

from __future__ import annotations

from torch import Tensor

from . import _cuda


def coverage_max_sim(tokens: Tensor, indices: Tensor, lengths: Tensor) -> Tensor:
    return _cuda.coverage_max_sim(tokens.contiguous(), indices.contiguous(), lengths.contiguous())


OPS = {
    "coverage_max_sim": coverage_max_sim,
    # the SCOPE wrappers take the internal signatures as they are
    "scope_select": _cuda.scope_select,
    "scope_select_varlen": _cuda.scope_select_varlen,
    # HoloV: the wrappers take the internal signatures as they are
    "holov_select": _cuda.holov_select,
    "crop_budgets": _cuda.crop_budgets,
    "crop_topk": _cuda.crop_topk,
}
