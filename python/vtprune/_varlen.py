"""Fixed-``k`` and packed-sequence (varlen) SCOPE on top of a padded-batch engine, shared by the backends.

The Triton and CUDA SCOPE kernels and the torch engine all run a padded batch
``[B, max_len, D]`` with per-image ``lengths``; this module turns the FlashAttention-style packed
form (``tokens [T, D]``, ``cu_seqlens [B+1]``) into that batch and the picks back into packed
indices, so every backend packs and unpacks identically.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._dispatch import constant_index
from ._validation import as_int64_on

#: ``(x [B, max_len, D], sal [B, max_len], k_per_image int64 [B], k_max, lengths int64 [B] or None
#: for all, sorted)`` -> picks int64 ``[B, k_max]``, row ``b`` valid up to ``k_per_image[b]``: in
#: pick order, or ascending when ``sorted`` (the GPU kernels write them so, saving a sort launch).
PaddedPicks = Callable[[Tensor, Tensor, Tensor, int, "Tensor | None", bool], Tensor]

#: A GPU backend's ``scope_picks(tokens, saliency, k_per_image, k_max, alpha, combine, lengths,
#: sorted=..., **options)``.
ScopePicks = Callable[..., Tensor]


def bind_scope_picks(scope_picks: ScopePicks, alpha: float, combine: str, options: dict) -> PaddedPicks:
    """``scope_picks`` with ``alpha``, ``combine`` and the backend's test knobs fixed."""

    def padded_picks(x: Tensor, sal: Tensor, ks: Tensor, k_max: int, lengths: Tensor | None, sorted: bool) -> Tensor:
        return scope_picks(x, sal, ks, k_max, alpha, combine, lengths, sorted=sorted, **options)

    return padded_picks


def sort_prefixes(picks: Tensor, ks: Tensor, width: int) -> Tensor:
    """Row ``b`` of ``picks [B, k_max]`` ascending in its first ``ks[b]`` entries (indices below
    ``width``); for a PaddedPicks whose kernel cannot sort."""
    keep = torch.arange(picks.shape[1], device=picks.device)[None, :] < ks[:, None]
    # the unused tail of a row (past its k_b) sorts after every kept pick
    return torch.where(keep, picks, torch.full_like(picks, width)).sort(dim=1).values


def select_batched(
    tokens: Tensor, saliency: Tensor, k: int, lengths: Tensor | None, sorted: bool, padded_picks: PaddedPicks
) -> Tensor:
    """The same ``k`` for every image of ``tokens [B, N, D]``: int64 ``[B, k]``, ascending or in pick order."""
    k = int(k)
    # a cached constant: a fresh fill would cost the host a launch on every call
    ks = constant_index(tokens.shape[0], k, tokens.device)
    return padded_picks(tokens, saliency, ks, k, lengths, sorted)


def select_packed(
    tokens: Tensor,
    saliency: Tensor,
    cu_seqlens: Tensor,
    k_per_seq: Tensor,
    sorted: bool,
    padded_picks: PaddedPicks,
    max_seqlen: int | None = None,
    k_uniform: int | None = None,
    total_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``padded_picks`` on the packed sequences; ``(indices into T [sum k], cu_k [B+1])``, int64.

    The sequences are padded into one batch, so every sequence runs in the same launch and
    stops after its own ``k_b`` picks. Inputs are expected validated (``cu_seqlens`` strictly
    increasing from 0 to ``T``, ``1 <= k_b <= seqlen_b``); the kernels clamp bad values, so they
    can never read out of bounds. Padded slots hold copies of real tokens, which the kernels
    never read (they stop at ``lengths``).

    The output shapes come from the host: ``max_seqlen`` (an upper bound on the sequence lengths,
    as in FlashAttention), and ``k_uniform`` (the one ``k`` of every sequence, when there is one)
    or ``total_k`` (``sum(k)`` of per-sequence budgets; their widest row is then bounded by
    ``max_seqlen``, since ``k_b <= seqlen_b``). What they leave unknown is read from the device
    in one small sync; with ``max_seqlen`` and one of the others, nothing is. A ``max_seqlen``
    below the longest sequence cuts the longer ones to their first ``max_seqlen`` tokens, and a
    ``total_k`` other than ``sum(k)`` gives that many indices, wrong but never read out of bounds
    (the public op rejects both wherever it reads the offsets and budgets).
    """
    device = tokens.device
    cu = as_int64_on(cu_seqlens, device)
    ks = as_int64_on(k_per_seq, device)
    batch = ks.shape[0]
    if k_uniform is not None:
        cu_k = torch.arange(0, (batch + 1) * k_uniform, k_uniform, dtype=torch.int64, device=device)
    else:
        cu_k = torch.nn.functional.pad(ks.cumsum(0), (1, 0))  # [0, k_0, k_0 + k_1, ...]
    if batch == 0 or tokens.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=device), cu_k
    starts = cu[:-1, None]
    lengths = torch.diff(cu)
    if max_seqlen is not None:
        # no sequence is longer than T; a bound below the longest one must not let a kernel read
        # past its padded row
        max_len = min(max_seqlen, tokens.shape[0])
        lengths = lengths.clamp(max=max_len)
    if k_uniform is not None:
        k_max, total = k_uniform, batch * k_uniform
    elif total_k is not None and max_seqlen is not None:
        k_max, total = max_len, total_k  # k_b <= seqlen_b <= max_len: rows padded to max_len
    if max_seqlen is None or (k_uniform is None and total_k is None):
        # the one sync: whatever of the output shapes the host was not told
        read = [int(v) for v in torch.stack([lengths.max(), ks.max(), cu_k[-1]]).tolist()]
        if max_seqlen is None:
            max_len = read[0]
        if k_uniform is None:
            k_max, total = read[1], (read[2] if total_k is None else total_k)
    if max_len <= 0 or k_max <= 0 or total <= 0:
        return torch.empty(0, dtype=torch.int64, device=device), cu_k
    src = (starts + torch.arange(max_len, device=device)).clamp(0, tokens.shape[0] - 1)
    picks = padded_picks(tokens[src], saliency[src], ks, k_max, lengths, sorted)
    if k_uniform is not None:
        # every row is exactly k long: row b packs at b * k
        return (picks + starts).reshape(-1), cu_k
    # Sequence b's first k_b picks, packed, gathered without a boolean mask (no further sync).
    j = torch.arange(total, device=device)
    seq = torch.searchsorted(cu_k[1:], j, right=True)
    if total_k is not None:  # an unchecked hint may not be sum(k): no position past the last row
        seq = seq.clamp(max=batch - 1)
    offset = j - cu_k[seq]
    if total_k is not None:  # ... nor past a row's written picks (its last one repeats)
        offset = torch.minimum(offset, ks[seq].clamp(1, k_max) - 1).clamp_min(0)
    indices = picks[seq, offset] + cu[seq]
    return indices, cu_k
