"""Coverage of a selection: ``max_{s in S} sim(u, s)`` for every token, batched and chunked."""

from __future__ import annotations

import torch
from torch import Tensor

from ..similarity import normalize_rows

# Bound on the [B, chunk, K] similarity block, in elements (a few tens of MiB).
_BLOCK_ELEMS = 1 << 23


def coverage_max_sim(tokens: Tensor, indices: Tensor, lengths: Tensor | None) -> Tensor:
    """``out[b, u] = max_{s in indices[b]} sim(u, s)`` for ``u < lengths[b]``, 0 at padding; ``[B, N]``.

    Similarity of SPEC §1 (``eps = 1e-6`` norm floor: a zero token has similarity 0 with
    everything), fp32 math (fp64 stays fp64). One batched matmul against the gathered
    selection, chunked over ``u`` so memory stays ``O(chunk * K)``.
    """
    batch, n, dim = tokens.shape
    x = normalize_rows(tokens)
    kk = indices.shape[1]
    out = torch.zeros(batch, n, dtype=x.dtype, device=x.device)
    if batch == 0 or n == 0 or kk == 0:
        return out
    sel = x.gather(1, indices.to(torch.int64)[:, :, None].expand(-1, -1, dim))  # [B, K, D]
    sel_t = sel.mT
    rows = max(1, _BLOCK_ELEMS // max(batch * kk, 1))
    for r0 in range(0, n, rows):
        out[:, r0 : r0 + rows] = torch.matmul(x[:, r0 : r0 + rows], sel_t).amax(dim=-1)
    if lengths is not None:
        valid = torch.arange(n, device=x.device)[None, :] < lengths[:, None]
        out = torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
