"""Input checks for every public op, in one place.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or
value) with a message that names the argument, what was expected and what was given.
Checks that need tensor *values* (``lengths``, ``cu_seqlens``, a per-sequence ``k``, indices,
crop sizes and budgets) run in eager mode only: under ``torch.compile`` they would break the
graph, and the kernels clamp those values anyway so an unchecked bad value can never read out
of bounds. They also run only where reading the values costs no device sync
(:func:`read_values`): on index tensors that live on the CPU, or on any device with
``check_values=True``, which asks for the sync (as the NaN/Inf checks do; :mod:`vtprune.ops`
also asks for it on the PyTorch backends, which do not clamp). A public call on CUDA tensors
running the CUDA or Triton kernels with the default ``check_values=False`` never waits for the
device (SPEC §4).

These checks run on every call, so they stay cheap: no torch op unless the check needs one,
and no conversion of a tensor that already has the wanted dtype and device.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch
from torch import Tensor

from ._dispatch import BACKEND_CHOICES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def eager() -> bool:
    """False while dynamo traces: value checks are skipped then (see module docstring)."""
    return not torch.compiler.is_compiling()


def read_values(x: Tensor, check_values: bool) -> bool:
    """Whether the value checks of the index tensor ``x`` run: in eager mode, when ``x`` is on the
    CPU (reading it is free) or ``check_values`` asks for a device sync."""
    return (check_values or x.device.type == "cpu") and eager()


def as_int64_on(x: Tensor, device: torch.device) -> Tensor:
    """``x`` as int64 on ``device``, without a (no-op) dispatch when it already is."""
    if x.dtype == torch.int64 and x.device == device:
        return x
    return x.to(device=device, dtype=torch.int64)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_backend(backend: Any) -> str:
    return check_choice(backend, "backend", BACKEND_CHOICES)


def check_tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    return x


def check_float(x: Any, name: str) -> Tensor:
    """A floating tensor of a supported dtype (no int, bool or complex)."""
    check_tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {x.dtype}")
    return x


def check_rank(x: Tensor, name: str, ranks: Sequence[int], shape_doc: str) -> None:
    if x.dim() not in ranks:
        raise ValueError(f"{name} must have shape {shape_doc}; got a {x.dim()}-D tensor of shape {tuple(x.shape)}")


def check_same_device(x: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}); got {x.device}")


def batched_tokens(tokens: Any, name: str = "tokens") -> tuple[Tensor, bool]:
    """``[B, N, D]`` or ``[N, D]`` float tokens -> (the ``[B, N, D]`` view, was it unbatched)."""
    check_float(tokens, name)
    check_rank(tokens, name, (2, 3), "[B, N, D] or [N, D]")
    unbatched = tokens.dim() == 2
    tokens = tokens.unsqueeze(0) if unbatched else tokens
    if tokens.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one feature (D >= 1); got shape {tuple(tokens.shape)}")
    return tokens, unbatched


def per_token(x: Any, name: str, tokens: Tensor, unbatched: bool, tokens_name: str = "tokens") -> Tensor:
    """A ``[B, N]`` (``[N]`` when unbatched) float tensor matching ``tokens [B, N, D]``."""
    check_float(x, name)
    want = "[N]" if unbatched else "[B, N]"
    check_rank(x, name, (1,) if unbatched else (2,), f"{want} to match {tokens_name}")
    x = x.unsqueeze(0) if unbatched else x
    if tuple(x.shape) != tuple(tokens.shape[:2]):
        b, n = tokens.shape[:2]
        raise ValueError(
            f"{name} must have shape {want} = {(n,) if unbatched else (b, n)} to match {tokens_name}; "
            f"got {tuple(x.shape[1:]) if unbatched else tuple(x.shape)}"
        )
    check_same_device(x, name, tokens, tokens_name)
    return x


def check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or isinstance(value, Tensor):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__}") from None


def check_k(k: Any, n: int, name: str = "k") -> int:
    k = check_int(k, name)
    if k < 1 or k > n:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= N = {n}; got {k}")
    return k


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a float; got {type(alpha).__name__}")
    if not eager():
        return alpha  # may be a symbolic float under torch.compile(dynamic=True)
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{name} must be finite and >= 0; got {alpha}")
    return alpha


def check_lengths(
    lengths: Any, batch: int, n: int, device: torch.device, k: int | None = None, check_values: bool = False
) -> Tensor | None:
    """Valid-token counts ``[B]`` -> int64 on ``device``; each in ``[1, N]`` and ``>= k``.

    The values are checked where :func:`read_values` allows (CPU ``lengths``, or ``check_values``).
    """
    if lengths is None:
        return None
    check_tensor(lengths, "lengths")
    if lengths.dtype not in INDEX_DTYPES:
        raise TypeError(f"lengths must be an int32 or int64 tensor; got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must have shape [B] = ({batch},); got {tuple(lengths.shape)}")
    if batch > 0 and read_values(lengths, check_values):
        values = lengths.tolist()
        lo, hi = min(values), max(values)
        if lo < 1 or hi > n:
            raise ValueError(f"lengths must lie in [1, N = {n}]; got values in [{lo}, {hi}]")
        if k is not None and k > lo:
            raise ValueError(f"k must be <= every lengths[b]; got k = {k} and min(lengths) = {lo}")
    return as_int64_on(lengths, device)


def check_cu_seqlens(
    cu_seqlens: Any, total: int, device: torch.device, check_values: bool = False
) -> tuple[Tensor, list[int] | None]:
    """Packed-sequence offsets ``[B+1]``: start at 0, strictly increasing, end at ``T``.

    Returns the int64 offsets on ``device`` and, when the values were read (:func:`read_values`),
    the offsets as a host list (else ``None``).
    """
    check_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor; got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must have shape [B+1] with B >= 0; got {tuple(cu_seqlens.shape)}")
    values = None
    if read_values(cu_seqlens, check_values):
        values = cu_seqlens.tolist()
        if values[0] != 0 or values[-1] != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {total}; got {values[0]} ... {values[-1]}")
        bad = next((i for i, (a, b) in enumerate(zip(values, values[1:])) if b <= a), None)
        if bad is not None:
            raise ValueError(
                "cu_seqlens must be strictly increasing (every sequence needs >= 1 token); "
                f"got cu_seqlens[{bad}] = {values[bad]}, cu_seqlens[{bad + 1}] = {values[bad + 1]}"
            )
    return as_int64_on(cu_seqlens, device), values


def check_max_seqlen(max_seqlen: Any, cu_values: list[int] | None) -> int | None:
    """``max_seqlen``: ``None``, or an int upper bound on the sequence lengths (checked against them
    when the offsets were read, see :func:`check_cu_seqlens`)."""
    if max_seqlen is None:
        return None
    max_seqlen = check_int(max_seqlen, "max_seqlen")
    if max_seqlen < 1:
        raise ValueError(f"max_seqlen must be >= 1; got {max_seqlen}")
    if cu_values is not None and len(cu_values) > 1:
        longest = max(b - a for a, b in zip(cu_values, cu_values[1:]))
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen must be >= the longest sequence ({longest} tokens); got {max_seqlen}")
    return max_seqlen


def check_k_per_seq(
    k: Any, cu_seqlens: Tensor, device: torch.device, cu_values: list[int] | None = None, check_values: bool = False
) -> Tensor:
    """``k`` as an int or an int tensor ``[B]`` -> int64 ``[B]``, each in ``[1, seqlen_b]``.

    ``cu_values``: the offsets read on the host by :func:`check_cu_seqlens` (``None`` when they were
    not read: then the budgets are not checked against the sequence lengths, see :func:`read_values`).
    """
    batch = cu_seqlens.shape[0] - 1
    if isinstance(k, Tensor):
        if k.dtype not in INDEX_DTYPES:
            raise TypeError(f"k must be an int or an int32/int64 tensor [B]; got a {k.dtype} tensor")
        if k.dim() != 1 or k.shape[0] != batch:
            raise ValueError(f"k as a tensor must have shape [B] = ({batch},); got {tuple(k.shape)}")
        ks = as_int64_on(k, device)
        k_values = k.tolist() if cu_values is not None and batch > 0 and read_values(k, check_values) else None
    else:
        k_int = check_int(k, "k")
        ks = torch.full((batch,), k_int, dtype=torch.int64, device=device)
        k_values = [k_int] * batch
    if cu_values is not None and k_values is not None:
        for b, kb in enumerate(k_values):
            seqlen = cu_values[b + 1] - cu_values[b]
            if not 1 <= kb <= seqlen:
                raise ValueError(
                    f"k must satisfy 1 <= k <= seqlen for every sequence; sequence {b} has "
                    f"{seqlen} tokens and k = {kb}"
                )
    return ks


def check_total_k(total_k: Any, k: Any, k_uniform: int | None, batch: int, check_values: bool) -> int | None:
    """``total_k``: ``None``, or an int equal to ``sum(k)`` (``batch * k`` for an int ``k``, checked
    always; against a ``k`` tensor where :func:`read_values` allows)."""
    if total_k is None:
        return None
    total_k = check_int(total_k, "total_k")
    if total_k < 0:
        raise ValueError(f"total_k must be >= 0 (the sum of the budgets k); got {total_k}")
    if k_uniform is not None:
        want = batch * k_uniform
    elif batch > 0 and read_values(k, check_values):
        want = int(k.sum())
    else:
        return total_k
    if total_k != want:
        raise ValueError(f"total_k must equal sum(k) = {want}; got {total_k}")
    return total_k


def check_indices(
    indices: Any, batch: int, n: int, unbatched: bool, lengths: Tensor | None, device: torch.device, check_values: bool = False
) -> Tensor:
    """Selected indices ``[B, K]`` (``[K]`` unbatched), each in ``[0, lengths[b])`` (values checked
    where :func:`read_values` allows)."""
    check_tensor(indices, "indices")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be an int32 or int64 tensor; got {indices.dtype}")
    want = "[K]" if unbatched else "[B, K]"
    check_rank(indices, "indices", (1,) if unbatched else (2,), want)
    indices = indices.unsqueeze(0) if unbatched else indices
    if indices.shape[0] != batch or indices.shape[1] < 1:
        raise ValueError(f"indices must have shape {want} with B = {batch} and K >= 1; got {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"indices must be on the same device as tokens ({device}); got {indices.device}")
    if batch > 0 and read_values(indices, check_values):
        limit = lengths[:, None] if lengths is not None else n
        bad = (indices < 0) | (indices >= limit)
        if bool(bad.any()):  # the first offender is looked up only on the way to the error
            row, col = bad.nonzero()[0].tolist()
            raise ValueError(
                f"indices must lie in [0, N) (and below lengths[b] when given); N = {n}, "
                f"got indices[{row}, {col}] = {int(indices[row, col])}"
            )
    return as_int64_on(indices, device)


def check_finite(**tensors: Tensor | None) -> None:
    """For ``check_values=True``: every named float tensor is free of NaN and Inf."""
    for name, x in tensors.items():
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf values (check_values=True)")
