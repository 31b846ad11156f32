"""Attention received per key from groups of queries, without the ``L x L`` attention matrix.

Queries are processed in chunks: for a chunk, the logits against every key they may see
give the row log-sum-exp (pass 1), and ``exp(logit - lse)`` of the reported keys is summed
into the per-group totals (pass 2), so memory is ``O(B * Hq * chunk * L)`` whatever ``L``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..similarity import compute_dtype

# Bound on one chunk's [B, Hq, chunk, L] logits, in elements (64 MiB of fp32).
_CHUNK_ELEMS = 1 << 24


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
    """Mean softmax attention each key in ``[key_start, key_end)`` receives from each query group.

    ``q [B, Hq, L, d]``, ``k [B, Hk, L, d]`` (query head ``h`` reads kv head ``h // (Hq // Hk)``),
    ``query_groups [B, L]`` (-1 leaves a query out). Returns ``[B, G, key_end - key_start]``,
    averaged over the ``Hq`` heads; a group without queries gives zeros. Causal: query ``j``
    sees keys ``i <= j`` only.
    """
    dt = compute_dtype(q.dtype)
    batch, hq, length, d = q.shape
    hk = k.shape[1]
    rep = hq // hk
    device = q.device
    width = key_end - key_start
    groups = query_groups.to(torch.int64)
    gid = torch.arange(num_groups, device=device)
    sums = torch.zeros(batch, num_groups, width, dtype=dt, device=device)
    kf = k.to(dt)
    qf = q.unflatten(1, (hk, rep))  # [B, Hk, rep, L, d]: the rep query heads reading one kv head
    chunk = max(1, _CHUNK_ELEMS // max(batch * hq * length, 1))
    for j0 in range(0, length, chunk):
        j1 = min(length, j0 + chunk)
        # causal: keys past the chunk's last query are masked for every query in it
        kend = j1 if causal else length
        if causal and kend <= key_start:
            continue  # no query of this chunk sees a reported key
        # the rep heads of a kv head share one matmul against it: [B, Hk, rep * c, kend]
        qc = qf[:, :, :, j0:j1].to(dt).reshape(batch, hk, rep * (j1 - j0), d)
        logits = torch.matmul(qc, kf[:, :, :kend].mT).view(batch, hk, rep, j1 - j0, kend)
        logits.mul_(scale)
        if causal:
            qpos = torch.arange(j0, j1, device=device)[:, None]
            kpos = torch.arange(kend, device=device)[None, :]
            logits.masked_fill_(kpos > qpos, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # pass 1: row normalizers
        hi = min(key_end, kend)
        if hi <= key_start:
            continue
        probs = torch.exp(logits[..., key_start:hi] - lse)  # pass 2: the reported columns
        per_query = probs.sum(dim=(1, 2)) / hq  # mean over the Hq heads: [B, c, hi - key_start]
        onehot = (groups[:, None, j0:j1] == gid[None, :, None]).to(dt)  # [B, G, c]
        sums[:, :, : hi - key_start] += torch.matmul(onehot, per_query)
    counts = (groups[:, None, :] == gid[None, :, None]).sum(dim=-1, keepdim=True).to(dt)  # [B, G, 1]
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros((), dtype=dt, device=device))
