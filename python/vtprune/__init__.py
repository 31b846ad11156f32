"""vtprune: fused kernels for pruning the visual tokens of multimodal LLMs.

Public ops (each takes ``backend="auto" | "reference" | "torch" | "triton" | "cuda"``):
SCOPE (:func:`fused_scope_select`, :func:`scope_select_varlen`), HoloV
(:func:`holov_select`, :func:`crop_budgets`, :func:`crop_topk`), ALVTS
(:func:`alvts_scores`, :func:`attention_importance`, :func:`lowrank_factorize`), and the
coverage metrics :func:`facility_location` and :func:`theta_coverage`.
"""

from __future__ import annotations

from ._dispatch import BackendStatus, backends
from .alvts import LowRankSelector, alvts_scores, calibrate_lowrank, full_rank_scores, route_layer
from .ops import (
    attention_importance,
    crop_budgets,
    crop_topk,
    facility_location,
    fused_scope_select,
    gather_tokens,
    holov_select,
    lowrank_factorize,
    scope_select_varlen,
    theta_coverage,
)

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "LowRankSelector",
    "alvts_scores",
    "attention_importance",
    "backends",
    "calibrate_lowrank",
    "crop_budgets",
    "crop_topk",
    "facility_location",
    "full_rank_scores",
    "fused_scope_select",
    "gather_tokens",
    "holov_select",
    "lowrank_factorize",
    "route_layer",
    "scope_select_varlen",
    "theta_coverage",
]
