"""Optimized pure-PyTorch backend: every op of SPEC.md, vectorized, on any device.

This is the backend ``"auto"`` runs on the CPU, and the one that takes fp64 everywhere.
Same internal signatures as :mod:`vtprune.reference` (validated, batched inputs); every
entry of :data:`OPS` is tested against the reference (``tests/test_torch_backend.py``).

* SCOPE: incremental gains over an exactly symmetric similarity, float64 accumulation on
  the CPU; a sync-free dense loop elsewhere (:mod:`.scope`).
* HoloV: every crop of every image from one batched Gram matrix, budgets in closed form,
  per-crop top-k as two stable sorts (:mod:`.holov`).
* Coverage and attention importance: chunked matmuls, no ``N x N`` / ``L x L`` buffers
  (:mod:`.coverage`, :mod:`.attention`).
"""

from __future__ import annotations

from typing import Callable

from .attention import attention_importance
from .coverage import coverage_max_sim
from .holov import crop_budgets, crop_topk, holov_select
from .scope import scope_select, scope_select_varlen

OPS: dict[str, Callable] = {
    "scope_select": scope_select,
    "scope_select_varlen": scope_select_varlen,
    "holov_select": holov_select,
    "crop_budgets": crop_budgets,
    "crop_topk": crop_topk,
    "coverage_max_sim": coverage_max_sim,
    "attention_importance": attention_importance,
}

__all__ = ["OPS"]
