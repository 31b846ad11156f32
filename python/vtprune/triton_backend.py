"""The ``triton`` backend: the op table of ``vtprune.triton_kernels``.

Imported only when the backend is first used, so ``TRITON_INTERPRET`` set before that
point decides whether kernels compile for the GPU or run in the interpreter.
"""

from __future__ import annotations

from torch import Tensor

from vtprune.triton_kernels import attention as _attention
from vtprune.triton_kernels import coverage as _coverage
from vtprune.triton_kernels import holov as _holov
from vtprune.triton_kernels import scope as _scope


def coverage_max_sim(tokens: Tensor, indices: Tensor, lengths: Tensor) -> Tensor:
    return _coverage.coverage_max_sim(tokens.contiguous(), indices.contiguous(), lengths.contiguous())


# The scope and HoloV kernels take the internal signatures as they are.
OPS = {
    "coverage_max_sim": coverage_max_sim,
    "scope_select": _scope.scope_select,
    "scope_select_varlen": _scope.scope_select_varlen,
    "attention_importance": _attention.attention_importance,
    "holov_select": _holov.holov_select,
    "crop_budgets": _holov.crop_budgets,
    "crop_topk": _holov.crop_topk,
}
