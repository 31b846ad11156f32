"""The reference: every op of ``SPEC.md`` written to be read, not to be fast.

Each fast backend (``torch``, ``triton``, ``cuda``) is tested against these functions,
so they favour plain loops over images, crops and greedy steps, and recompute from
scratch where a fast version would update incrementally. Math is float32 (float64
stays float64) whatever the input dtype.

Internal signatures: inputs arrive validated and batched (``[B, N, D]`` tokens,
``lengths`` ``None`` or an int64 ``[B]`` tensor); the public wrappers in
:mod:`vtprune.ops` add the unbatched and keyword forms.
"""

from __future__ import annotations

import builtins
import math

import torch
from torch import Tensor

from .similarity import compute_dtype, cosine_similarity, holov_normalize, normalize_rows, saliency_weights

NEG_INF = float("-inf")


def _valid_lengths(lengths: Tensor | None, batch: int, n: int) -> list[int]:
    if lengths is None:
        return [n] * batch
    return [int(v) for v in lengths.tolist()]


def _argmax_unselected(score: Tensor, selected: Tensor) -> int:
    """Lowest-index argmax over unselected entries; NaN counts as -inf (SPEC §1)."""
    score = torch.where(torch.isnan(score) | selected, torch.full_like(score, NEG_INF), score)
    best = int(torch.argmax(score))  # torch.argmax returns the first maximal index
    if score[best] == NEG_INF:
        best = int(torch.nonzero(~selected)[0])
    return best


# ----------------------------------------------------------------------------- SCOPE


def _scope_one(x: Tensor, sal: Tensor, k: int, alpha: float, combine: str) -> list[int]:
    """Greedy picks, in pick order, for one image of ``n`` valid tokens."""
    n = x.shape[0]
    sim = cosine_similarity(x)  # sim[u, v]
    w = saliency_weights(sal, alpha)
    cover = torch.zeros(n, dtype=sim.dtype, device=sim.device)
    selected = torch.zeros(n, dtype=torch.bool, device=sim.device)
    picks: list[int] = []
    for _ in range(k):
        gain = (sim - cover[:, None]).clamp_min(0).sum(dim=0)  # sum over u, for every v
        score = gain * w if combine == "mul" else gain + w
        t = _argmax_unselected(score, selected)
        picks.append(t)
        selected[t] = True
        cover = torch.maximum(cover, sim[:, t])
    return picks


def scope_select(
    tokens: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float,
    combine: str,
    lengths: Tensor | None,
    sorted: bool,
) -> Tensor:
    """SCOPE greedy selection (SPEC §1) on ``[B, N, D]`` tokens; returns ``[B, k]`` int64."""
    batch, n = tokens.shape[:2]
    out = torch.empty(batch, k, dtype=torch.int64, device=tokens.device)
    for b, nb in enumerate(_valid_lengths(lengths, batch, n)):
        picks = _scope_one(tokens[b, :nb], saliency[b, :nb], k, alpha, combine)
        out[b] = torch.tensor(picks, dtype=torch.int64)
    return out.sort(dim=-1).values if sorted else out


def scope_select_varlen(
    tokens: Tensor,
    saliency: Tensor,
    cu_seqlens: Tensor,
    k_per_seq: Tensor,
    alpha: float,
    combine: str,
    sorted: bool,
    max_seqlen: int | None = None,
    k_uniform: int | None = None,
    total_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """SCOPE on packed sequences: ``tokens [T, D]``, ``cu_seqlens [B+1]``, one ``k`` per sequence.

    Returns ``(indices into T, cu_k [B+1])``, both int64. ``max_seqlen``, ``k_uniform`` and
    ``total_k`` are the fast backends' shape hints; the reference reads the offsets and budgets on
    the host instead.
    """
    bounds = cu_seqlens.tolist()
    ks = k_per_seq.tolist()
    parts = []
    for b, kb in enumerate(ks):
        start, end = bounds[b], bounds[b + 1]
        picks = torch.tensor(_scope_one(tokens[start:end], saliency[start:end], kb, alpha, combine), dtype=torch.int64)
        if sorted:
            picks = picks.sort().values
        parts.append(picks + start)
    indices = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    cu_k = torch.zeros(len(ks) + 1, dtype=torch.int64)
    cu_k[1:] = torch.tensor(ks, dtype=torch.int64).cumsum(0)
    return indices.to(tokens.device), cu_k.to(tokens.device)


def reference_loop(tokens: Tensor, saliency: Tensor, k: int, alpha: float = 1.0) -> Tensor:
    """SCOPE as the official code runs it: dense ``N x N`` work every step, in the input dtype.

    This is the baseline every benchmark reports its ratio against. It keeps the
    official code's shape (a batched dense gain recomputation per step, selected
    columns masked, ``argmax`` over the masked gains) and adds only the ``eps`` of
    SPEC §1 so zero tokens do not turn into NaN. Returns indices in pick order.
    """
    unbatched = tokens.dim() == 2
    if unbatched:
        tokens, saliency = tokens[None], saliency[None]
    dtype = tokens.dtype
    normed = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = torch.bmm(normed, normed.transpose(1, 2))
    batch, n = tokens.shape[:2]
    rows = torch.arange(batch, device=tokens.device)
    weights = saliency.clamp_min(0).to(dtype) ** alpha
    selected = torch.zeros(batch, n, dtype=torch.bool, device=tokens.device)
    cover = torch.zeros(batch, n, dtype=dtype, device=tokens.device)
    picks = torch.empty(batch, k, dtype=torch.int64, device=tokens.device)
    zero = torch.zeros((), dtype=dtype, device=tokens.device)
    for i in range(k):
        gains = torch.maximum(zero, sim.masked_fill(selected[:, None, :], 0) - cover[:, :, None]).sum(dim=1)
        gains = (gains * weights).masked_fill(selected, NEG_INF)
        best = gains.argmax(dim=1)
        selected[rows, best] = True
        picks[:, i] = best
        cover = torch.maximum(cover, sim[rows, best])
    return picks[0] if unbatched else picks


def holov_reference_loop(tokens: Tensor, attn: Tensor, num_crops: int, k: int, alpha: float = 0.09) -> Tensor:
    """HoloV as the official code runs it: Python loops over images and crops, one crop at a time.

    This is the baseline the HoloV benchmark reports its ratios against. It follows ``HoloV()``
    of obananas/HoloV (``llava/model/utils.py``) step by step: per image, contiguous crops
    (``N // C`` tokens, the first ``N % C`` one larger); per crop a normalization, an ``M x M``
    matmul, an eye mask, mean and variance of the similarities and the attention scaling;
    budgets ``floor(w * k)`` with the leftover given by a ``topk`` of the weights, one index at
    a time with host reads; then a ``topk`` by attention inside each crop.

    Where it differs from the official function (none of it changes the per-crop work):
    it returns indices (crops in order, descending attention inside a crop) instead of
    gathering the tokens; it computes in float32 (float64 stays) where the official code runs
    in the model's dtype, so that its picks can be compared exactly with SPEC §2; a crop whose
    budget reaches its size is listed whole in raster order and the output is cut to ``k``,
    as the official code does, and where the official code would pad with zero vectors the
    index is -1. While every budget is below its crop's size (the benchmark shapes), it picks
    what ``holov_select(..., sorted=False)`` picks, up to ties.
    """
    unbatched = tokens.dim() == 2
    if unbatched:
        tokens, attn = tokens[None], attn[None]
    dt = compute_dtype(tokens.dtype)
    tokens, attn = tokens.to(dt), attn.to(dt)
    batch, n = tokens.shape[:2]
    eps = 1e-6
    out = torch.full((batch, k), -1, dtype=torch.int64, device=tokens.device)
    for b in range(batch):
        sizes = crop_sizes_for(n, num_crops)
        starts = [sum(sizes[:c]) for c in range(len(sizes))]
        crop_scores = []
        for start, m in zip(starts, sizes):
            a = attn[b, start : start + m]
            if m <= 1:
                crop_scores.append(a.mean())
                continue
            x = tokens[b, start : start + m]
            f = x / (x.norm(dim=1, keepdim=True) + eps)
            s = (f @ f.T) * (1 - torch.eye(m, dtype=dt, device=tokens.device))
            mean = s.sum(dim=1) / (m - 1)
            var = ((s - mean[:, None]) ** 2).sum(dim=1) / (m - 1)
            scaled = 1e3 * a
            gamma = scaled.abs().mean() / (var.abs().mean() + eps)
            crop_scores.append((scaled + alpha * gamma * var).mean())
        scores = torch.stack(crop_scores)
        weights = scores / (scores.sum() + eps)
        budgets = (weights * k).floor().long()
        leftover = int(k - budgets.sum().item())
        if leftover > 0:
            for c in torch.topk(weights, min(leftover, len(sizes))).indices[:leftover]:
                budgets[c] += 1
        picks = []
        for c, (start, m) in enumerate(zip(starts, sizes)):
            q = int(budgets[c].item())
            if q <= 0:
                continue
            if q >= m:
                picks.append(torch.arange(start, start + m, device=tokens.device))
            else:
                picks.append(torch.topk(attn[b, start : start + m], q).indices + start)
        chosen = torch.cat(picks)[:k] if picks else out.new_empty(0)
        out[b, : chosen.numel()] = chosen
    return out[0] if unbatched else out


# ----------------------------------------------------------------------------- HoloV


def default_num_crops(n: int, k: int) -> int:
    """SPEC §2 default: ``min(n, max(1, (1024 * n) // (576 * k)))``."""
    return min(n, max(1, (1024 * n) // (576 * k)))


def crop_sizes_for(n: int, num_crops: int) -> list[int]:
    """Contiguous crops of ``n`` tokens: ``n // C`` each, the first ``n % C`` one larger."""
    base, extra = divmod(n, num_crops)
    return [base + 1 if c < extra else base for c in range(num_crops)]


def _crop_stats(x: Tensor, attn: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``(score_c, h)`` of one crop, SPEC §2."""
    a = 1000.0 * attn
    m = x.shape[0]
    if m <= 1:
        return attn.mean(), a
    f = holov_normalize(x)
    s = f @ f.T
    s.fill_diagonal_(0)
    mean = s.sum(dim=1) / (m - 1)
    var = ((s - mean[:, None]) ** 2).sum(dim=1) / (m - 1)
    gamma = a.abs().mean() / (var.abs().mean() + 1e-6)
    h = a + alpha * gamma * var
    return h.mean(), h


def _sorted_desc(values: list[float]) -> list[int]:
    """Indices by descending value, ties to the lowest index, NaN last."""

    def key(c: int) -> tuple[bool, float, int]:
        v = values[c]
        return (math.isnan(v), 0.0 if math.isnan(v) else -v, c)

    return builtins.sorted(range(len(values)), key=key)


def _hand_out(q: list[int], amount: int, order: list[int], room: list[int] | None) -> None:
    """Give ``amount`` tokens +1 at a time, cycling over ``order``, skipping crops without room."""
    while amount > 0:
        gave = False
        for c in order:
            if amount == 0:
                break
            if room is not None and q[c] >= room[c]:
                continue
            q[c] += 1
            amount -= 1
            gave = True
        if not gave:
            raise RuntimeError("crop_budgets: k exceeds the total capacity")


def _budgets_one(w: list[float], k: int, cap: list[int]) -> list[int]:
    present = [c for c in range(len(w)) if cap[c] > 0]
    # Floors come from the weights clamped at 0 (NaN: 0) and, if they sum above 1, rescaled
    # to sum 1, so that sum(q) <= k whatever the caller passes; valid weights are unchanged.
    pos = [0.0 if math.isnan(w[c]) else max(w[c], 0.0) for c in range(len(w))]
    total = sum(pos[c] for c in present)
    # The slack keeps fp32 rounding of valid weights (0.6 + 0.4 > 1 in fp32) from rescaling
    # them; sum(floor(w k)) <= k still holds for any k below 1e6.
    scale = 1.0 / total if total > 1.0 + 1e-6 else 1.0
    q = [0] * len(w)
    for c in present:
        q[c] = math.floor(pos[c] * scale * k)
    order = [c for c in _sorted_desc(w) if cap[c] > 0]
    _hand_out(q, k - sum(q), order, None)  # the leftover of the floors, by weight
    surplus = sum(max(0, q[c] - cap[c]) for c in present)
    for c in present:
        q[c] = min(q[c], cap[c])
    _hand_out(q, surplus, order, cap)  # what the capacity cut, to crops with room
    return q


def crop_budgets(weights: Tensor, k: int, capacity: Tensor) -> Tensor:
    """Per-crop budgets summing to ``k`` (SPEC §2, with the capacity rule); ``[B, C]`` int64.

    Crops of capacity 0 are absent. ``q = floor(w * k)``, with NaN and negative weights
    counted as 0 (NaN ordered last) and weights summing above 1 rescaled to sum 1; the leftover goes +1 per crop in descending weight (ties: lowest crop),
    cycling if it exceeds the crops; then ``q`` is capped at capacity and what was cut is
    handed out +1 at a time, cycling in the same order, to crops with room.
    """
    w_rows = weights.to(compute_dtype(weights.dtype)).tolist()
    cap_rows = capacity.tolist()
    out = [_budgets_one(w, k, cap) for w, cap in zip(w_rows, cap_rows)]
    return torch.tensor(out, dtype=torch.int64, device=weights.device).reshape(weights.shape)


def _topk_in_crops(key: Tensor, sizes: list[int], budgets: list[int], sorted: bool) -> Tensor:
    picks = []
    start = 0
    for size, q in zip(sizes, budgets):
        seg = key[start : start + size]
        # stable sort on -key keeps the lowest index first among ties
        order = torch.sort(-seg, stable=True).indices[:q]
        picks.append(order + start)
        start += size
    out = torch.cat(picks) if picks else torch.empty(0, dtype=torch.int64)
    return out.sort().values if sorted else out


def crop_topk(scores: Tensor, crop_sizes: Tensor, budgets: Tensor, k: int, sorted: bool) -> Tensor:
    """Top ``budgets[b, c]`` tokens by ``scores`` inside each contiguous crop; ``[B, k]`` int64.

    Ties go to the lowest index. ``sorted=False`` lists crops in order and, inside a
    crop, descending score.
    """
    key = scores.to(compute_dtype(scores.dtype))
    key = torch.where(torch.isnan(key), torch.full_like(key, NEG_INF), key)
    rows = [
        _topk_in_crops(key[b], crop_sizes[b].tolist(), budgets[b].tolist(), sorted)
        for b in range(scores.shape[0])
    ]
    if not rows:
        return torch.empty(0, k, dtype=torch.int64, device=scores.device)
    return torch.stack(rows).to(scores.device)


def holov_select(
    tokens: Tensor,
    attn: Tensor,
    k: int,
    num_crops: int | None,
    alpha: float,
    rank_by: str,
    lengths: Tensor | None,
    sorted: bool,
) -> Tensor:
    """HoloV (SPEC §2) on ``[B, N, D]`` tokens; returns ``[B, k]`` int64."""
    batch, n = tokens.shape[:2]
    out = torch.empty(batch, k, dtype=torch.int64, device=tokens.device)
    attn = attn.to(compute_dtype(attn.dtype))
    for b, nb in enumerate(_valid_lengths(lengths, batch, n)):
        c_count = num_crops if num_crops is not None else default_num_crops(nb, k)
        sizes = crop_sizes_for(nb, c_count)
        scores, keys = [], []
        start = 0
        for size in sizes:
            score, h = _crop_stats(tokens[b, start : start + size], attn[b, start : start + size], alpha)
            scores.append(score)
            keys.append(h if rank_by == "score" else attn[b, start : start + size])
            start += size
        score_t = torch.stack(scores)
        w = score_t / (score_t.sum() + 1e-6)
        budgets = _budgets_one(w.tolist(), k, sizes)
        key = torch.cat(keys)
        key = torch.where(torch.isnan(key), torch.full_like(key, NEG_INF), key)
        out[b] = _topk_in_crops(key, sizes, budgets, sorted)
    return out


# ----------------------------------------------------------------------------- coverage


def coverage_max_sim(tokens: Tensor, indices: Tensor, lengths: Tensor | None) -> Tensor:
    """``max_{s in S} sim(u, s)`` for every valid token ``u``, 0 at padding; ``[B, N]``."""
    batch, n = tokens.shape[:2]
    out = torch.zeros(batch, n, dtype=compute_dtype(tokens.dtype), device=tokens.device)
    for b, nb in enumerate(_valid_lengths(lengths, batch, n)):
        x = normalize_rows(tokens[b, :nb])
        out[b, :nb] = (x @ x[indices[b]].T).max(dim=1).values
    return out


def facility_location_from_max_sim(max_sim: Tensor) -> Tensor:
    """``sum_u max(0, max_s sim(u, s))``; padding rows hold 0 so they add nothing."""
    return max_sim.clamp_min(0).sum(dim=-1)


def theta_coverage_from_max_sim(max_sim: Tensor, theta: float, lengths: Tensor | None) -> Tensor:
    """Share of valid tokens whose best similarity to the selection is ``>= theta``."""
    n = max_sim.shape[-1]
    valid = torch.arange(n, device=max_sim.device)[None, :] < (
        lengths[:, None] if lengths is not None else torch.full((max_sim.shape[0], 1), n, device=max_sim.device)
    )
    hits = ((max_sim >= theta) & valid).sum(dim=-1).to(max_sim.dtype)
    return hits / valid.sum(dim=-1).to(max_sim.dtype)


# ----------------------------------------------------------------------------- ALVTS


def attention_importance(
    q: Tensor,
    k: Tensor,
    query_groups: Tensor,
    num_groups: int,
    causal: bool,
    scale: float,
    key_start: int,
    key_end: int,
) -> Tensor:
    """Mean softmax attention each key receives from each query group, averaged over heads.

    ``q [B, Hq, L, d]``, ``k [B, Hk, L, d]`` (grouped-query: head ``h`` reads kv head
    ``h // (Hq // Hk)``), ``query_groups [B, L]`` (-1 ignores a query). Materializes the
    ``L x L`` attention, as the reference may. Returns ``[B, G, key_end - key_start]``;
    a group without queries gives zeros.
    """
    dt = compute_dtype(q.dtype)
    q, k = q.to(dt), k.to(dt)
    hq, hk, length = q.shape[1], k.shape[1], q.shape[2]
    k = k.repeat_interleave(hq // hk, dim=1)
    logits = (q @ k.mT) * scale  # [B, H, L(query), L(key)]
    if causal:
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, NEG_INF)
    attn = torch.softmax(logits, dim=-1).mean(dim=1)  # [B, L, L]
    onehot = torch.stack([query_groups == g for g in range(num_groups)], dim=1).to(dt)  # [B, G, L]
    counts = onehot.sum(dim=-1, keepdim=True)
    sums = onehot @ attn  # [B, G, L(key)]
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return means[..., key_start:key_end].contiguous()


def lowrank_factorize(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD ``W ~ U V`` with the singular values split evenly (SPEC §3).

    ``W [D_out, D_in]`` gives ``U [D_out, R] = U_full[:, :R] S^(1/2)`` and
    ``V [R, D_in] = S^(1/2) V_full[:, :R]^T``.
    """
    w = weight.to(compute_dtype(weight.dtype))
    u_full, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    return u_full[:, :rank] * root, root[:, None] * vh[:rank]


#: The reference as a backend (see :mod:`vtprune._dispatch`).
OPS = {
    "scope_select": scope_select,
    "scope_select_varlen": scope_select_varlen,
    "holov_select": holov_select,
    "crop_budgets": crop_budgets,
    "crop_topk": crop_topk,
    "coverage_max_sim": coverage_max_sim,
    "attention_importance": attention_importance,
}
