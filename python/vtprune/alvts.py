"""ALVTS (SPEC §3): low-rank query/key factors of a layer, the visual-token scores they give,
their calibration against the full-rank scores, and routing of the kept tokens through a layer.

* :class:`LowRankSelector` holds one layer's factors; :func:`alvts_scores` scores the visual
  tokens with them (through the ``vtprune::attention_importance`` custom op: fast, no autograd).
* :func:`full_rank_scores` gives the same score ``S*`` from the layer's full ``W_q``/``W_k``.
* :func:`calibrate_lowrank` trains the factors on the MSE to ``S*`` (the "importance
  consistency constraint"), with the LVLM frozen. Its differentiable scores run the torch
  backend's plain-op implementation of the same attention importance; the score formula
  itself (query groups, ``S_v2v * S_t2v``, visual columns) lives once, in :func:`_scores_from_qk`.
* :func:`route_layer` runs a decoder layer on the kept visual tokens plus all text tokens and
  leaves the pruned ones unchanged, in original order.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from . import _validation as V
from .ops import attention_importance, lowrank_factorize
from .torch_backend.attention import attention_importance as _attention_importance_torch

# (q, k, query_groups, num_groups, causal, scale) -> [B, G, L]: mean attention each key receives
_ImportanceFn = Callable[[Tensor, Tensor, Tensor, int, bool, float], Tensor]


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
        if num_heads is None and u_q.shape[0] != u_k.shape[0]:
            # one rank-R head scores through U_q^T U_k, which needs Dq == Dk
            raise ValueError(
                f"with num_heads=None (one head) U_q and U_k must have the same rows (Dq == Dk); got Dq = "
                f"{u_q.shape[0]}, Dk = {u_k.shape[0]}: pass num_heads and num_kv_heads for grouped-query weights"
            )

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


# ----------------------------------------------------------------------------- scores


def _check_hidden_and_mask(hidden: Any, visual_mask: Any, *, same_count: bool = True) -> tuple[Tensor, Tensor, bool]:
    """``hidden [B, L, D] | [L, D]`` and bool ``visual_mask [B, L] | [L]`` -> batched views, unbatched."""
    x, unbatched = V.batched_tokens(hidden, "hidden")
    V.check_tensor(visual_mask, "visual_mask")
    if visual_mask.dtype != torch.bool:
        raise TypeError(f"visual_mask must be a bool tensor; got {visual_mask.dtype}")
    mask = visual_mask.unsqueeze(0) if unbatched and visual_mask.dim() == 1 else visual_mask
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"visual_mask must have shape {tuple(x.shape[:2])} to match hidden; got {tuple(visual_mask.shape)}")
    V.check_same_device(mask, "visual_mask", x, "hidden")
    if same_count:
        counts = mask.sum(dim=-1)
        if V.eager() and x.shape[0] > 0 and (bool((counts != counts[0]).any()) or int(counts[0]) == 0):
            raise ValueError("visual_mask must mark the same, non-zero number of visual tokens in every row")
    return x, mask, unbatched


def _scores_from_qk(
    q: Tensor, k: Tensor, mask: Tensor, causal: bool, scale: float, importance: _ImportanceFn, real: Tensor | None = None
) -> Tensor:
    """SPEC §3's score from projected ``q``/``k`` and a validated ``mask [B, L]``: ``[B, N]``.

    ``S(i) = S_v2v(i) * S_t2v(i)``: the mean attention visual token ``i`` receives from the
    visual queries (group 0) times that from the text queries (group 1), at the visual columns.
    ``real`` (bool ``[B, L]``, padding last: see :func:`_padding_last`) leaves padding out of
    the queries; with the causal mask no real query reaches a key after it.
    """
    groups = torch.where(mask, 0, 1).to(torch.int64)  # group 0: visual queries, 1: text queries
    if real is not None:
        groups = groups.masked_fill(~real, -1)  # padding asks nothing
    imp = importance(q, k, groups, 2, causal, scale)
    score = imp[:, 0] * imp[:, 1]
    return score[mask].view(mask.shape[0], -1)


def _op_importance(backend: str) -> _ImportanceFn:
    """The custom op (fast backends, no autograd)."""
    return lambda q, k, g, n, c, s: attention_importance(q, k, g, num_groups=n, causal=c, scale=s, backend=backend)


def _torch_importance(q: Tensor, k: Tensor, g: Tensor, n: int, c: bool, s: float) -> Tensor:
    """The torch backend's chunked plain-op implementation, called directly: differentiable."""
    return _attention_importance_torch(q, k, g, n, c, s, 0, q.shape[2])


def _alvts_scores_differentiable(x: Tensor, selector: LowRankSelector, mask: Tensor, causal: bool = True) -> Tensor:
    """:func:`alvts_scores` on validated, batched inputs, with gradients to the selector's factors."""
    q, k = selector.project(x)
    return _scores_from_qk(q, k, mask, causal, selector.head_dim ** -0.5, _torch_importance)


def _padding_last(x: Tensor, mask: Tensor, attention_mask: Any, causal: bool, unbatched: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``x``, ``mask`` and the bool ``real`` tokens with each row's padding moved behind its real
    tokens (their order kept), so that under the causal mask no real query attends to padding:
    the scores are then those of the row alone, left or right padded. One gather."""
    V.check_tensor(attention_mask, "attention_mask")
    am = attention_mask.unsqueeze(0) if unbatched and attention_mask.dim() == 1 else attention_mask
    if tuple(am.shape) != tuple(mask.shape):
        raise ValueError(f"attention_mask must have shape {tuple(mask.shape)} to match hidden; got {tuple(attention_mask.shape)}")
    V.check_same_device(am, "attention_mask", x, "hidden")
    real = am != 0
    if V.eager():
        if bool((mask & ~real).any()):
            raise ValueError("visual_mask marks a padding position (attention_mask 0) as a visual token")
        if not causal and not bool(real.all()):
            raise ValueError("attention_mask with padding needs causal=True (without the causal mask padding keys would be seen)")
    order = torch.sort((~real).to(torch.int8), dim=-1, stable=True).indices  # real tokens first, in order
    x = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))
    return x, torch.gather(mask, 1, order), torch.gather(real, 1, order)


def alvts_scores(
    hidden: Tensor,
    selector: LowRankSelector,
    visual_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    causal: bool = True,
    backend: str = "auto",
) -> Tensor:
    """ALVTS importance ``S_v2v * S_t2v`` of every visual token (SPEC §3).

    Args:
        hidden: ``[B, L, D]`` or ``[L, D]`` hidden states entering the layer.
        selector: the layer's :class:`LowRankSelector`.
        visual_mask: bool ``[B, L]`` or ``[L]``, True at visual tokens; every image must
            have the same number ``N`` of them.
        attention_mask: optional ``[B, L]`` (``[L]``) padding mask as the model takes it, 0 at
            padding, left or right: padding tokens are then neither queries nor keys, so a
            padded row scores as it would alone. Needs ``causal=True``.
        causal: apply the LLM's causal mask.
        backend: as in :func:`vtprune.fused_scope_select`.

    Returns:
        ``[B, N]`` (``[N]`` unbatched) scores in the visual tokens' order. Not differentiable
        (the custom op has no autograd); :func:`calibrate_lowrank` uses a differentiable path.
    """
    x, mask, unbatched = _check_hidden_and_mask(hidden, visual_mask)
    real = None
    if attention_mask is not None:
        x, mask, real = _padding_last(x, mask, attention_mask, causal, unbatched)
    q, k = selector.project(x)
    out = _scores_from_qk(q, k, mask, causal, selector.head_dim ** -0.5, _op_importance(backend), real)
    return out[0] if unbatched else out


def full_rank_scores(
    hidden: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    visual_mask: Tensor,
    *,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int | None = None,
    causal: bool = True,
    backend: str = "auto",
) -> Tensor:
    """The exact ALVTS score ``S*`` of every visual token from the layer's full weights (SPEC §3).

    Per head ``h``: ``q_h = X W_q[h]^T``, ``k_h = X W_k[h // rep]^T``, attention
    ``mean_h softmax(q_h k_h^T / sqrt(head_dim))`` (never materialized), then
    ``S_v2v * S_t2v`` as in :func:`alvts_scores`. No biases and no RoPE: the same attention
    the low-rank selector approximates. Usable as ``full_scores_fn`` of
    :func:`calibrate_lowrank` via ``functools.partial`` (or a lambda).

    Args:
        hidden: ``[B, L, D]`` or ``[L, D]``.
        w_q: ``[num_heads * head_dim, D]``; ``w_k``: ``[num_kv_heads * head_dim, D]``
            (``nn.Linear`` weight layout).
        visual_mask, causal, backend: as in :func:`alvts_scores`.
        num_heads, head_dim, num_kv_heads: the layer's attention shape
            (``num_kv_heads`` defaults to ``num_heads``).

    Returns:
        ``[B, N]`` (``[N]`` unbatched), in the compute dtype (fp32, fp64 for fp64 inputs).
    """
    x, mask, unbatched = _check_hidden_and_mask(hidden, visual_mask)
    num_heads = V.check_int(num_heads, "num_heads")
    head_dim = V.check_int(head_dim, "head_dim")
    num_kv_heads = num_heads if num_kv_heads is None else V.check_int(num_kv_heads, "num_kv_heads")
    if num_heads < 1 or head_dim < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads, head_dim and num_kv_heads must be >= 1, num_heads a multiple of num_kv_heads; "
            f"got {num_heads}, {head_dim}, {num_kv_heads}"
        )
    dim = x.shape[-1]
    for w, name, heads in ((w_q, "w_q", num_heads), (w_k, "w_k", num_kv_heads)):
        V.check_float(w, name)
        if tuple(w.shape) != (heads * head_dim, dim):
            raise ValueError(f"{name} must have shape [{heads} * {head_dim}, D = {dim}]; got {tuple(w.shape)}")
        V.check_same_device(w, name, x, "hidden")
    b, length = x.shape[:2]
    xw = x.to(w_q.dtype)
    q = (xw @ w_q.T).view(b, length, num_heads, head_dim).transpose(1, 2)
    k = (xw @ w_k.to(w_q.dtype).T).view(b, length, num_kv_heads, head_dim).transpose(1, 2)
    out = _scores_from_qk(q, k, mask, causal, head_dim ** -0.5, _op_importance(V.check_backend(backend)))
    return out[0] if unbatched else out


# ----------------------------------------------------------------------------- calibration


def _as_batches(data: Any, masks: Any, name: str, mask_name: str) -> list[tuple[Tensor, Tensor]]:
    """A tensor or a sequence of tensors, with one mask or a parallel sequence -> [(x [B,L,D], mask [B,L])]."""
    if isinstance(data, Tensor):
        data = [data]
    elif not isinstance(data, (list, tuple)) or len(data) == 0:
        raise TypeError(f"{name} must be a tensor [B, L, D] or a non-empty list of them; got {type(data).__name__}")
    if isinstance(masks, (list, tuple)):
        if len(masks) != len(data):
            raise ValueError(f"{mask_name} as a list must have one mask per {name} batch ({len(data)}); got {len(masks)}")
    else:
        masks = [masks] * len(data)
    out = []
    for i, (x, m) in enumerate(zip(data, masks)):
        try:
            V.batched_tokens(x, "hidden")
            V.check_tensor(m, "visual_mask")
            if x.dim() == 3 and m.dim() == 1:  # one [L] mask for every row
                m = m.unsqueeze(0).expand(x.shape[0], -1)
            xb, mb, _ = _check_hidden_and_mask(x, m)
            if xb.shape[0] == 0:
                raise ValueError(f"hidden must hold at least one sequence; got shape {tuple(x.shape)}")
        except (TypeError, ValueError) as err:
            where = f"{name}[{i}]" if len(data) > 1 else name
            msg = str(err).replace("hidden", where).replace("visual_mask", mask_name)
            raise type(err)(msg) from None
        out.append((xb.detach(), mb))
    return out


def _relative_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``mean_b [ mean_i (pred - target)^2 / mean_i target^2 ]`` (scale-free; 1 = predicting 0)."""
    err = (pred - target).square().mean(dim=-1)
    ref = target.square().mean(dim=-1).clamp_min(torch.finfo(target.dtype).tiny)
    return (err / ref).mean()


def _evaluate(selector: LowRankSelector, batches: list[tuple[Tensor, Tensor, Tensor]], causal: bool) -> tuple[float, float]:
    """(relative MSE, raw MSE) of the selector's scores over ``(x, mask, target)`` batches, row-weighted."""
    rel = raw = 0.0
    rows = 0
    with torch.no_grad():
        for x, mask, target in batches:
            pred = _alvts_scores_differentiable(x, selector, mask, causal)
            n = x.shape[0]
            rel += float(_relative_mse(pred, target)) * n
            raw += float((pred - target).square().mean()) * n
            rows += n
    return rel / rows, raw / rows


def calibrate_lowrank(
    selector: LowRankSelector,
    full_scores_fn: Callable[..., Tensor],
    activations: Tensor | Sequence[Tensor],
    steps: int = 200,
    lr: float = 1e-2,
    *,
    visual_mask: Tensor | Sequence[Tensor],
    causal: bool = True,
    held_out: Tensor | Sequence[Tensor] | None = None,
    held_out_mask: Tensor | Sequence[Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``selector``'s factors so its scores match the full-rank ones (SPEC §3 calibration).

    The loss is the per-image **relative** MSE
    ``mean_b [ mean_i (S_b(i) - S*_b(i))^2 / mean_i S*_b(i)^2 ]``: the raw scores are products
    of two attention means, ``~ 1 / L^2`` each, so a raw MSE would be ``~ 1e-8`` and depend on
    ``L``; the relative one is scale-free (0 = exact, 1 = as bad as predicting zeros) and its
    gradient is the raw MSE's rescaled per image. ``S = `` ALVTS scores of the selector
    (differentiable, through the torch backend's plain-op attention importance),
    ``S* = full_scores_fn(hidden, visual_mask=mask)`` computed once per batch under ``no_grad``
    (the LVLM stays frozen; only ``selector.parameters()`` change, in place).

    Args:
        selector: the layer's :class:`LowRankSelector`, typically from
            :meth:`LowRankSelector.from_weights` (the SVD start).
        full_scores_fn: ``full_scores_fn(hidden [B, L, D], visual_mask=[B, L]) -> [B, N]`` full-rank scores,
            e.g. ``functools.partial(full_rank_scores, w_q=..., w_k=..., num_heads=..., head_dim=...)``
            (take care to pass the same ``causal``).
        activations: the hidden states entering the layer, ``[B, L, D]`` (or ``[L, D]``) or a
            list of such batches (they may differ in ``B`` and ``L``).
        steps: Adam steps, ``>= 0``; step ``t`` uses batch ``t % len(activations)``.
        lr: Adam learning rate, ``> 0``.
        visual_mask: bool ``[B, L]`` (or ``[L]``, shared by every row) for all batches, or a
            list with one mask per batch.
        causal: the LLM's causal mask in the selector's scores.
        held_out: optional activations (same forms) to report the loss on before and after.
        held_out_mask: their visual masks; default ``visual_mask``.

    Returns:
        A dict: ``"loss"`` (list of ``steps`` training losses, each before its step),
        ``"train_before"``/``"train_after"`` (relative MSE over all training batches),
        ``"held_out_before"``/``"held_out_after"`` (relative MSE, ``None`` without
        ``held_out``) and ``"held_out_mse_before"``/``"held_out_mse_after"`` (raw MSE).
    """
    if not isinstance(selector, LowRankSelector):
        raise TypeError(f"selector must be a LowRankSelector; got {type(selector).__name__}")
    if not callable(full_scores_fn):
        raise TypeError(f"full_scores_fn must be callable; got {type(full_scores_fn).__name__}")
    steps = V.check_int(steps, "steps")
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not float(lr) > 0 or float(lr) == float("inf"):
        raise ValueError(f"lr must be a finite float > 0; got {lr!r}")

    def with_targets(data, masks, name, mask_name):
        batches = []
        for i, (x, m) in enumerate(_as_batches(data, masks, name, mask_name)):
            with torch.no_grad():
                target = full_scores_fn(x, visual_mask=m)
            if not isinstance(target, Tensor) or tuple(target.shape) != (x.shape[0], int(m[0].sum()) if x.shape[0] else 0):
                raise ValueError(
                    f"full_scores_fn must return [B, N] scores for {name}[{i}] of shape {tuple(x.shape)}; got "
                    f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}"
                )
            batches.append((x, m, target.detach().to(device=selector.v_q.device, dtype=selector.v_q.dtype)))
        return batches

    train = with_targets(activations, visual_mask, "activations", "visual_mask")
    held = None
    if held_out is not None:
        held = with_targets(held_out, visual_mask if held_out_mask is None else held_out_mask, "held_out", "held_out_mask")

    result: dict[str, Any] = {"loss": [], "held_out_before": None, "held_out_after": None,
                              "held_out_mse_before": None, "held_out_mse_after": None}
    result["train_before"] = _evaluate(selector, train, causal)[0]
    if held is not None:
        result["held_out_before"], result["held_out_mse_before"] = _evaluate(selector, held, causal)

    params = [p for p in selector.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(lr))
    with torch.enable_grad():
        for step in range(steps):
            x, mask, target = train[step % len(train)]
            opt.zero_grad(set_to_none=True)
            loss = _relative_mse(_alvts_scores_differentiable(x, selector, mask, causal), target)
            loss.backward()
            opt.step()
            result["loss"].append(loss.item())

    result["train_after"] = _evaluate(selector, train, causal)[0]
    if held is not None:
        result["held_out_after"], result["held_out_mse_after"] = _evaluate(selector, held, causal)
    return result


# ----------------------------------------------------------------------------- routing


def route_layer(
    hidden: Tensor,
    keep_idx: Tensor,
    layer_fn: Callable[..., Any],
    *,
    visual_mask: Tensor,
    position_ids: Tensor | None = None,
) -> Tensor:
    """Run ``layer_fn`` on the kept visual tokens plus all text tokens; the rest skip it (SPEC §3).

    The routed tokens, in their original order, are gathered into ``sub [B, L', D]`` (every
    row routes the same ``L' = (L - N) + k`` tokens), ``layer_fn(sub, position_ids=sub_pos)``
    runs on them, and its output is scattered back; pruned visual tokens are returned
    unchanged. ``sub_pos`` are the kept tokens' original position ids, so a layer applying
    RoPE from ``position_ids`` and a causal mask over the sub-sequence order sees the same
    relative positions and the same "who precedes whom" as in the full sequence.
    Differentiable (one gather, one out-of-place scatter).

    Args:
        hidden: ``[B, L, D]`` (or ``[L, D]``) hidden states entering the layer.
        keep_idx: int ``[B, k]`` (``[k]`` unbatched), positions in ``L`` of the visual tokens
            to keep; each must be a visual token, no repeats in a row; ``k`` may be 0.
        layer_fn: ``layer_fn(sub_hidden [B, L', D], position_ids=[B, L'] int64)`` returning a
            tensor ``[B, L', D]`` (or a tuple/list whose first element is, as Hugging Face
            decoder layers do). It builds its own causal mask over the ``L'`` tokens.
        visual_mask: bool ``[B, L]`` (``[L]`` unbatched), True at visual tokens; every row
            must have the same number ``N`` of them.
        position_ids: int ``[B, L]`` or ``[L]`` (shared by every row); default ``arange(L)``.

    Returns:
        ``[B, L, D]`` (``[L, D]`` unbatched), ``hidden``'s dtype. An empty batch (``B = 0``)
        comes back as a copy without calling ``layer_fn`` (with no rows, ``N`` and so ``L'``
        are unknown).
    """
    x, mask, unbatched = _check_hidden_and_mask(hidden, visual_mask, same_count=False)
    batch, length, dim = x.shape
    if not callable(layer_fn):
        raise TypeError(f"layer_fn must be callable; got {type(layer_fn).__name__}")
    V.check_tensor(keep_idx, "keep_idx")
    if keep_idx.dtype not in V.INDEX_DTYPES:
        raise TypeError(f"keep_idx must be an int32 or int64 tensor; got {keep_idx.dtype}")
    want = "[k]" if unbatched else "[B, k]"
    V.check_rank(keep_idx, "keep_idx", (1,) if unbatched else (2,), want)
    idx = keep_idx.unsqueeze(0) if unbatched else keep_idx
    if idx.shape[0] != batch:
        raise ValueError(f"keep_idx must have shape {want} with B = {batch}; got {tuple(keep_idx.shape)}")
    V.check_same_device(idx, "keep_idx", x, "hidden")
    idx = idx.to(torch.int64)
    if position_ids is None:
        pos = torch.arange(length, device=x.device).expand(batch, length)
    else:
        V.check_tensor(position_ids, "position_ids")
        if position_ids.dtype not in V.INDEX_DTYPES:
            raise TypeError(f"position_ids must be an int32 or int64 tensor; got {position_ids.dtype}")
        pos = position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids
        if pos.dim() != 2 or pos.shape[1] != length or pos.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape [B, L] = ({batch}, {length}) or [L]; got {tuple(position_ids.shape)}")
        V.check_same_device(pos, "position_ids", x, "hidden")
        pos = pos.expand(batch, length)

    if batch == 0:  # no rows to read N from, nothing to route
        return x.clone()
    counts = mask.sum(dim=-1)
    route = ~mask
    if idx.shape[1] > 0:
        if V.eager():
            if bool(((idx < 0) | (idx >= length)).any()):
                raise ValueError(f"keep_idx must lie in [0, L = {length})")
            if not bool(mask.gather(1, idx).all()):
                raise ValueError("keep_idx must point at visual tokens (visual_mask True) only")
            if bool((idx.sort(dim=-1).values.diff(dim=-1) == 0).any()):
                raise ValueError("keep_idx must not repeat a position within a row")
        route = route.scatter(1, idx.clamp(0, length - 1), True)
    if V.eager() and bool((counts != counts[0]).any()):
        raise ValueError("visual_mask must mark the same number of visual tokens in every row (so the routed rows stack)")
    sub_len = length - int(counts[0]) + idx.shape[1]
    # routed positions in ascending order: a stable sort puts routed (key 0) before pruned (key 1)
    order = torch.sort((~route).to(torch.int8), dim=-1, stable=True).indices[:, :sub_len]
    sub = torch.gather(x, 1, order[..., None].expand(-1, -1, dim))
    out = layer_fn(sub, position_ids=torch.gather(pos, 1, order))
    if isinstance(out, (tuple, list)) and len(out) > 0:
        out = out[0]
    if not isinstance(out, Tensor) or tuple(out.shape) != (batch, sub_len, dim):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"layer_fn must return a tensor of shape [B, L', D] = ({batch}, {sub_len}, {dim}); got {got}")
    result = x.scatter(1, order[..., None].expand(-1, -1, dim), out.to(x.dtype))
    return result[0] if unbatched else result
