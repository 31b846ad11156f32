"""ALVTS (SPEC §3): low-rank query/key factors of a layer and the visual-token scores they give."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validation as V
from .ops import attention_importance, lowrank_factorize


class LowRankSelector(nn.Module):
    """Rank-``R`` factors ``W_q ~ U_q V_q`` and ``W_k ~ U_k V_k`` of one decoder layer.

    With ``num_heads=None`` the factors act as one rank-``R`` head,
    ``logits = P_q (U_q^T U_k) P_k^T / sqrt(head_dim)``; with ``num_heads`` set, the rows of
    ``U`` split into per-head blocks of ``head_dim`` and the per-head attention is averaged
    (``num_kv_heads`` key heads for grouped-query attention).
    """

    def __init__(
        self,
        u_q: Tensor,
        v_q: Tensor,
        u_k: Tensor,
        v_k: Tensor,
        *,
        head_dim: int,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        if u_q.shape[1] != v_q.shape[0] or u_k.shape[1] != v_k.shape[0] or v_q.shape != v_k.shape:
            raise ValueError(
                f"factors must be U_q [Dq, R], V_q [R, D], U_k [Dk, R], V_k [R, D]; got "
                f"{tuple(u_q.shape)}, {tuple(v_q.shape)}, {tuple(u_k.shape)}, {tuple(v_k.shape)}"
            )
        self.u_q, self.v_q = nn.Parameter(u_q), nn.Parameter(v_q)
        self.u_k, self.v_k = nn.Parameter(u_k), nn.Parameter(v_k)
        self.head_dim = V.check_int(head_dim, "head_dim")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        if num_heads is not None and (
            u_q.shape[0] != num_heads * head_dim or u_k.shape[0] != self.num_kv_heads * head_dim
        ):
            raise ValueError("U_q rows must be num_heads * head_dim and U_k rows num_kv_heads * head_dim")

    @classmethod
    def from_weights(
        cls,
        w_q: Tensor,
        w_k: Tensor,
        rank: int,
        *,
        head_dim: int,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
    ) -> "LowRankSelector":
        """Factors from the truncated SVD of the layer's ``W_q [Dq, D]`` and ``W_k [Dk, D]``."""
        u_q, v_q = lowrank_factorize(w_q, rank)
        u_k, v_k = lowrank_factorize(w_k, rank)
        return cls(u_q, v_q, u_k, v_k, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)

    def project(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Approximate ``(q [B, H, L, d], k [B, Hk, L, d])`` of ``hidden [B, L, D]``."""
        x = hidden.to(self.v_q.dtype)
        p_q, p_k = x @ self.v_q.T, x @ self.v_k.T  # [B, L, R]
        if self.num_heads is None:
            return (p_q @ (self.u_q.T @ self.u_k))[:, None], p_k[:, None]
        b, length = x.shape[:2]
        q = (p_q @ self.u_q.T).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = (p_k @ self.u_k.T).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k


def alvts_scores(
    hidden: Tensor,
    selector: LowRankSelector,
    visual_mask: Tensor,
    *,
    causal: bool = True,
    backend: str = "auto",
) -> Tensor:
    """ALVTS importance ``S_v2v * S_t2v`` of every visual token (SPEC §3).

    Args:
        hidden: ``[B, L, D]`` or ``[L, D]`` hidden states entering the layer.
        selector: the layer's :class:`LowRankSelector`.
        visual_mask: bool ``[B, L]`` or ``[L]``, True at visual tokens; every image must
            have the same number ``N`` of them.
        causal: apply the LLM's causal mask.
        backend: as in :func:`vtprune.fused_scope_select`.

    Returns:
        ``[B, N]`` (``[N]`` unbatched) scores in the visual tokens' order.
    """
    x, unbatched = V.batched_tokens(hidden, "hidden")
    V.check_tensor(visual_mask, "visual_mask")
    if visual_mask.dtype != torch.bool:
        raise TypeError(f"visual_mask must be a bool tensor; got {visual_mask.dtype}")
    mask = visual_mask.unsqueeze(0) if unbatched and visual_mask.dim() == 1 else visual_mask
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"visual_mask must have shape {tuple(x.shape[:2])} to match hidden; got {tuple(visual_mask.shape)}")
    V.check_same_device(mask, "visual_mask", x, "hidden")
    counts = mask.sum(dim=-1)
    if V.eager() and x.shape[0] > 0 and (bool((counts != counts[0]).any()) or int(counts[0]) == 0):
        raise ValueError("visual_mask must mark the same, non-zero number of visual tokens in every row")
    q, k = selector.project(x)
    groups = torch.where(mask, 0, 1).to(torch.int64)  # group 0: visual queries, 1: text queries
    imp = attention_importance(
        q, k, groups, num_groups=2, causal=causal, scale=selector.head_dim ** -0.5, backend=backend
    )
    score = imp[:, 0] * imp[:, 1]
    out = score[mask].view(x.shape[0], -1)
    return out[0] if unbatched else out
