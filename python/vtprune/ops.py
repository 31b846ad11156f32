"""Public ops: validation, then one ``torch.library`` custom op per kernel family.

The custom ops (``torch.ops.vtprune.*``) take validated, batched tensors and a backend
name; they resolve the backend inside (an opaque step for ``torch.compile``) and carry
fake implementations so ``torch.compile(fullgraph=True)`` traces through them. The Python
wrappers below add the unbatched and keyword forms, and run the checks of
:mod:`vtprune._validation` before anything reaches a kernel.

Host overhead. A call on CUDA tensors is timed from the host's first instruction to the last
kernel's end, so the wrappers keep the host path short (``benchmarks/host_overhead.py``
measures it, ``tests/test_host_overhead.py`` guards it): in plain eager mode they resolve the
backend once (cached) and call its implementation directly (:func:`_direct`), skipping the
``torch.library`` dispatch, which adds tens of microseconds and nothing else there; whenever
something could observe the difference (``torch.compile``, a dispatch or function mode, fake
or subclass tensors, functorch transforms, autograd on a float input, the profiler) the call
goes through the custom op. Value checks that would read a CUDA tensor (a device sync) run only
with ``check_values=True``, or when the backend is one of the PyTorch ones, which do not clamp
(see :mod:`vtprune._validation`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _validation as V
from ._dispatch import resolve
from .reference import facility_location_from_max_sim, lowrank_factorize as _lowrank_factorize, theta_coverage_from_max_sim

_INT64 = torch.int64

#: The backends whose kernels clamp index values (lengths, budgets, ...) so that an unchecked bad
#: value can never read out of bounds; with them the value checks may skip device tensors.
_CLAMPING_BACKENDS = ("cuda", "triton")

_C = torch._C
_profiler_enabled = torch._C._autograd._profiler_enabled


def _direct(*tensors: Tensor | None) -> bool:
    """True when calling the backend implementation directly is indistinguishable from calling the
    custom op: no dispatch or function mode, no functorch transform, no profiler (which should
    see the op by name), no ``torch.jit.trace``, plain CPU/CUDA tensors, and no float input that
    autograd would track.
    The caller checks that dynamo is not tracing (:func:`vtprune._validation.eager`)."""
    if (
        _C._len_torch_dispatch_stack()
        or _C._is_torch_function_mode_enabled()
        or _C._are_functorch_transforms_active()
        or _profiler_enabled()
        or _C._get_tracing_state() is not None  # torch.jit.trace records the op, not its insides
    ):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor or t.device.type not in ("cpu", "cuda") or (grad and t.requires_grad):
            return False
    return True


def _eager_impl(op: str, backend: str, x: Tensor) -> tuple[str, Callable] | None:
    """``(backend name, implementation)`` of ``op`` for ``x`` in eager mode, ``None`` under
    ``torch.compile`` (the custom op resolves it then, opaquely). Raises as :func:`resolve` does.
    Callers skip it for an empty batch, which returns before any backend runs (as it always has,
    whatever the backend)."""
    if not V.eager():
        return None
    return resolve(op, backend, x.device, x.dtype)


def _strict(check_values: bool, resolved: tuple[str, Callable] | None) -> bool:
    """Whether value checks read device tensors: asked for, or a backend that does not clamp."""
    return check_values or resolved is None or resolved[0] not in _CLAMPING_BACKENDS

# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("vtprune::scope_select", mutates_args=())
def _scope_select_op(
    tokens: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float,
    combine: str,
    lengths: Optional[Tensor],
    sorted: bool,
    backend: str,
) -> Tensor:
    _, impl = resolve("scope_select", backend, tokens.device, tokens.dtype)
    return impl(tokens, saliency, k, alpha, combine, lengths, sorted)


@_scope_select_op.register_fake
def _(tokens, saliency, k, alpha, combine, lengths, sorted, backend):
    return tokens.new_empty((tokens.shape[0], k), dtype=_INT64)


@torch.library.custom_op("vtprune::scope_select_varlen", mutates_args=())
def _scope_select_varlen_op(
    tokens: Tensor,
    saliency: Tensor,
    cu_seqlens: Tensor,
    k_per_seq: Tensor,
    alpha: float,
    combine: str,
    sorted: bool,
    backend: str,
    max_seqlen: Optional[int] = None,
    k_uniform: Optional[int] = None,
    total_k: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    _, impl = resolve("scope_select_varlen", backend, tokens.device, tokens.dtype)
    indices, cu_k = impl(tokens, saliency, cu_seqlens, k_per_seq, alpha, combine, sorted, max_seqlen, k_uniform, total_k)
    return indices, cu_k


@_scope_select_varlen_op.register_fake
def _(tokens, saliency, cu_seqlens, k_per_seq, alpha, combine, sorted, backend, max_seqlen=None, k_uniform=None, total_k=None):
    # one k for every sequence: B * k picks; per-sequence budgets: their sum, given or known only at run time
    if k_uniform is not None:
        total = (cu_seqlens.shape[0] - 1) * k_uniform
    else:
        total = total_k if total_k is not None else torch.library.get_ctx().new_dynamic_size()
    return tokens.new_empty((total,), dtype=_INT64), cu_seqlens.new_empty(cu_seqlens.shape, dtype=_INT64)


@torch.library.custom_op("vtprune::holov_select", mutates_args=())
def _holov_select_op(
    tokens: Tensor,
    attn: Tensor,
    k: int,
    num_crops: Optional[int],
    alpha: float,
    rank_by: str,
    lengths: Optional[Tensor],
    sorted: bool,
    backend: str,
) -> Tensor:
    _, impl = resolve("holov_select", backend, tokens.device, tokens.dtype)
    return impl(tokens, attn, k, num_crops, alpha, rank_by, lengths, sorted)


@_holov_select_op.register_fake
def _(tokens, attn, k, num_crops, alpha, rank_by, lengths, sorted, backend):
    return tokens.new_empty((tokens.shape[0], k), dtype=_INT64)


@torch.library.custom_op("vtprune::crop_budgets", mutates_args=())
def _crop_budgets_op(weights: Tensor, k: int, capacity: Tensor, backend: str) -> Tensor:
    _, impl = resolve("crop_budgets", backend, weights.device, weights.dtype)
    return impl(weights, k, capacity)


@_crop_budgets_op.register_fake
def _(weights, k, capacity, backend):
    return weights.new_empty(weights.shape, dtype=_INT64)


@torch.library.custom_op("vtprune::crop_topk", mutates_args=())
def _crop_topk_op(scores: Tensor, crop_sizes: Tensor, budgets: Tensor, k: int, sorted: bool, backend: str) -> Tensor:
    _, impl = resolve("crop_topk", backend, scores.device, scores.dtype)
    return impl(scores, crop_sizes, budgets, k, sorted)


@_crop_topk_op.register_fake
def _(scores, crop_sizes, budgets, k, sorted, backend):
    return scores.new_empty((scores.shape[0], k), dtype=_INT64)


@torch.library.custom_op("vtprune::coverage_max_sim", mutates_args=())
def _coverage_max_sim_op(tokens: Tensor, indices: Tensor, lengths: Tensor, backend: str) -> Tensor:
    _, impl = resolve("coverage_max_sim", backend, tokens.device, tokens.dtype)
    return impl(tokens, indices, lengths)


@_coverage_max_sim_op.register_fake
def _(tokens, indices, lengths, backend):
    dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    return tokens.new_empty(tokens.shape[:2], dtype=dtype)


@torch.library.custom_op("vtprune::attention_importance", mutates_args=())
def _attention_importance_op(
    q: Tensor,
    k: Tensor,
    query_groups: Tensor,
    num_groups: int,
    causal: bool,
    scale: float,
    key_start: int,
    key_end: int,
    backend: str,
) -> Tensor:
    _, impl = resolve("attention_importance", backend, q.device, q.dtype)
    return impl(q, k, query_groups, num_groups, causal, scale, key_start, key_end)


@_attention_importance_op.register_fake
def _(q, k, query_groups, num_groups, causal, scale, key_start, key_end, backend):
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((q.shape[0], num_groups, key_end - key_start), dtype=dtype)


# ----------------------------------------------------------------------------- public API


def fused_scope_select(
    tokens: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float = 1.0,
    *,
    combine: str = "mul",
    lengths: Tensor | None = None,
    sorted: bool = True,
    backend: str = "auto",
    check_values: bool = False,
) -> Tensor:
    """Select ``k`` tokens per image with SCOPE's saliency-weighted coverage greedy (SPEC §1).

    Args:
        tokens: ``[B, N, D]`` or ``[N, D]`` visual tokens (fp16/bf16/fp32; fp64 on the
            PyTorch backends). Math is fp32 whatever the dtype.
        saliency: ``[B, N]`` or ``[N]``, e.g. CLS->patch attention summed over heads.
            Negative values count as 0.
        k: tokens to keep, ``1 <= k <= N`` (and ``<= lengths[b]``).
        alpha: exponent on the saliency, ``>= 0``; 0 is pure coverage.
        combine: ``"mul"`` (gain x saliency^alpha, the official default) or ``"add"``.
        lengths: optional ``[B]`` int tensor; image ``b`` uses its first ``lengths[b]`` tokens.
        sorted: ascending indices (True) or the greedy pick order (False).
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        check_values: raise on NaN/Inf inputs (syncs the device).

    Returns:
        int64 ``[B, k]`` (``[k]`` for unbatched input) token indices.
    """
    x, unbatched = V.batched_tokens(tokens)
    sal = V.per_token(saliency, "saliency", x, unbatched)
    batch, n = x.shape[:2]
    k = V.check_k(k, n)
    alpha = V.check_alpha(alpha)
    combine = V.check_choice(combine, "combine", ("mul", "add"))
    backend = V.check_backend(backend)
    resolved = _eager_impl("scope_select", backend, x) if batch > 0 else None  # B = 0 runs nothing
    lens = V.check_lengths(lengths, batch, n, x.device, k, _strict(check_values, resolved))
    if check_values:
        V.check_finite(tokens=x, saliency=sal)
    if batch == 0:
        return x.new_empty((0, k), dtype=_INT64)
    if resolved is not None and _direct(x, sal, lens):
        out = resolved[1](x, sal, k, alpha, combine, lens, bool(sorted))
    else:
        out = _scope_select_op(x, sal, k, alpha, combine, lens, bool(sorted), backend)
    return out[0] if unbatched else out


def scope_select_varlen(
    tokens: Tensor,
    saliency: Tensor,
    cu_seqlens: Tensor,
    k: int | Tensor,
    alpha: float = 1.0,
    *,
    combine: str = "mul",
    sorted: bool = True,
    backend: str = "auto",
    check_values: bool = False,
    max_seqlen: int | None = None,
    total_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """SCOPE on packed sequences of different lengths, FlashAttention-style (SPEC §1).

    Args:
        tokens: ``[T, D]`` tokens of all sequences back to back.
        saliency: ``[T]``.
        cu_seqlens: ``[B+1]`` int32/int64 offsets, ``0 = cu[0] < cu[1] < ... < cu[B] = T``.
        k: one budget for every sequence, or an int tensor ``[B]`` of per-sequence budgets.
        alpha, combine, sorted, backend, check_values: as in :func:`fused_scope_select`.
        max_seqlen: optional upper bound on the sequence lengths, as FlashAttention's varlen
            functions take it. The GPU backends size their padded batch from it instead of
            reading the longest length from the device: with it and an int ``k`` the call never
            syncs (for ``max_seqlen <= 4096``; see docs/semantics.md on larger images), so it can
            be captured in a CUDA graph (a tensor ``k`` also needs ``total_k``). It must be at
            least the longest sequence; that is checked wherever the offsets are read (CPU
            tensors, ``check_values=True``, the PyTorch backends); unchecked, a longer sequence
            is cut to its first ``max_seqlen`` tokens.
        total_k: optional ``sum(k)`` for a tensor ``k``, the output's length: with it and
            ``max_seqlen`` a call with per-sequence budgets reads nothing from the device either
            (and ``torch.compile`` sees a static size). It must equal ``sum(k)`` (for an int
            ``k``, ``B * k``); that is checked wherever the budgets are read (as for
            ``max_seqlen``); unchecked, another value gives that many indices, wrong but each
            inside the sequence it is listed under.

    Returns:
        ``(indices, cu_k)``: int64 indices into ``T`` (sequence ``b``'s picks at
        ``indices[cu_k[b]:cu_k[b+1]]``) and ``cu_k`` ``[B+1]`` in ``cu_seqlens``' dtype.
    """
    V.check_float(tokens, "tokens")
    V.check_rank(tokens, "tokens", (2,), "[T, D]")
    V.check_float(saliency, "saliency")
    V.check_rank(saliency, "saliency", (1,), "[T]")
    if saliency.shape[0] != tokens.shape[0]:
        raise ValueError(f"saliency must have shape [T] = ({tokens.shape[0]},) to match tokens; got {tuple(saliency.shape)}")
    V.check_same_device(saliency, "saliency", tokens, "tokens")
    alpha = V.check_alpha(alpha)
    combine = V.check_choice(combine, "combine", ("mul", "add"))
    backend = V.check_backend(backend)
    resolved = _eager_impl("scope_select_varlen", backend, tokens) if tokens.shape[0] > 0 else None
    strict = _strict(check_values, resolved)
    cu, cu_values = V.check_cu_seqlens(cu_seqlens, tokens.shape[0], tokens.device, strict)
    ks = V.check_k_per_seq(k, cu, tokens.device, cu_values, strict)
    max_seqlen = V.check_max_seqlen(max_seqlen, cu_values)
    k_uniform = None if isinstance(k, Tensor) else int(k)
    total_k = V.check_total_k(total_k, k, k_uniform, cu.shape[0] - 1, strict)
    if check_values:
        V.check_finite(tokens=tokens, saliency=saliency)
    if cu.shape[0] == 1:
        return tokens.new_empty((0,), dtype=_INT64), cu_seqlens.new_zeros((1,))
    hints = (max_seqlen, k_uniform, total_k)
    if resolved is not None and _direct(tokens, saliency, cu, ks):
        indices, cu_k = resolved[1](tokens, saliency, cu, ks, alpha, combine, bool(sorted), *hints)
    else:
        indices, cu_k = _scope_select_varlen_op(tokens, saliency, cu, ks, alpha, combine, bool(sorted), backend, *hints)
    return indices, (cu_k if cu_k.dtype == cu_seqlens.dtype else cu_k.to(cu_seqlens.dtype))


def holov_select(
    tokens: Tensor,
    attn: Tensor,
    k: int,
    *,
    num_crops: int | None = None,
    alpha: float = 0.09,
    rank_by: str = "attn",
    lengths: Tensor | None = None,
    sorted: bool = True,
    backend: str = "auto",
    check_values: bool = False,
) -> Tensor:
    """Select ``k`` tokens per image with HoloV's per-crop adaptive budgets (SPEC §2).

    Args:
        tokens: ``[B, N, D]`` or ``[N, D]`` (the projected features in the paper).
        attn: ``[B, N]`` or ``[N]`` CLS->patch attention (mean or sum over heads).
        k: tokens to keep, ``1 <= k <= N`` (and ``<= lengths[b]``).
        num_crops: contiguous crops per image, ``1 <= num_crops <= N`` (and ``<= lengths[b]``);
            default ``min(N, max(1, 1024 * N // (576 * k)))`` per image.
        alpha: weight of the similarity-variance term, ``>= 0``.
        rank_by: rank inside a crop by ``"attn"`` (official code) or ``"score"`` (paper text).
        lengths: optional ``[B]`` valid-token counts.
        sorted: ascending indices (True) or crops in order, descending key inside (False).
        backend, check_values: as in :func:`fused_scope_select`.

    Returns:
        int64 ``[B, k]`` (``[k]`` unbatched).
    """
    x, unbatched = V.batched_tokens(tokens)
    a = V.per_token(attn, "attn", x, unbatched)
    batch, n = x.shape[:2]
    k = V.check_k(k, n)
    if num_crops is not None:
        num_crops = V.check_int(num_crops, "num_crops")
        if num_crops < 1 or num_crops > n:
            raise ValueError(f"num_crops must satisfy 1 <= num_crops <= N = {n}; got {num_crops}")
    alpha = V.check_alpha(alpha)
    rank_by = V.check_choice(rank_by, "rank_by", ("attn", "score"))
    backend = V.check_backend(backend)
    resolved = _eager_impl("holov_select", backend, x) if batch > 0 else None
    strict = _strict(check_values, resolved)
    lens = V.check_lengths(lengths, batch, n, x.device, k, strict)
    if lens is not None and num_crops is not None and batch > 0 and V.read_values(lengths, strict):
        shortest = min(lengths.tolist())
        if num_crops > shortest:
            raise ValueError(f"num_crops must be <= every lengths[b]; got {num_crops} and min(lengths) = {shortest}")
    if check_values:
        V.check_finite(tokens=x, attn=a)
    if batch == 0:
        return x.new_empty((0, k), dtype=_INT64)
    if resolved is not None and _direct(x, a, lens):
        out = resolved[1](x, a, k, num_crops, alpha, rank_by, lens, bool(sorted))
    else:
        out = _holov_select_op(x, a, k, num_crops, alpha, rank_by, lens, bool(sorted), backend)
    return out[0] if unbatched else out


def crop_budgets(
    weights: Tensor, k: int, capacity: Tensor, *, backend: str = "auto", check_values: bool = False
) -> Tensor:
    """Split ``k`` tokens over crops by weight, respecting each crop's capacity (SPEC §2).

    Args:
        weights: ``[B, C]`` or ``[C]`` float crop weights (HoloV: normalized crop scores).
        k: the total budget, ``1 <= k <= sum(capacity[b])``.
        capacity: int ``[B, C]`` or ``[C]``, tokens available in each crop (0 = absent crop).
            Its values are checked when it is on the CPU, or with ``check_values=True``.
        backend: as in :func:`fused_scope_select`.
        check_values: check ``capacity``'s values even on the GPU (syncs the device).

    Returns:
        int64 budgets of ``weights``' shape, each row summing to ``k``, never above capacity.
    """
    V.check_float(weights, "weights")
    V.check_rank(weights, "weights", (1, 2), "[B, C] or [C]")
    unbatched = weights.dim() == 1
    w = weights.unsqueeze(0) if unbatched else weights
    V.check_tensor(capacity, "capacity")
    if capacity.dtype not in V.INDEX_DTYPES:
        raise TypeError(f"capacity must be an int32 or int64 tensor; got {capacity.dtype}")
    cap = capacity.unsqueeze(0) if capacity.dim() == 1 and unbatched else capacity
    if tuple(cap.shape) != tuple(w.shape):
        raise ValueError(f"capacity must have the shape of weights {tuple(weights.shape)}; got {tuple(capacity.shape)}")
    V.check_same_device(cap, "capacity", w, "weights")
    k = V.check_int(k, "k")
    backend = V.check_backend(backend)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    resolved = _eager_impl("crop_budgets", backend, w) if w.shape[0] > 0 else None
    if w.shape[0] > 0 and w.shape[1] > 0 and V.read_values(cap, _strict(check_values, resolved)):
        lowest, room = torch.stack([cap.min(), cap.sum(dim=-1).min()]).tolist()
        if lowest < 0:
            raise ValueError(f"capacity must be >= 0; got a capacity of {lowest}")
        if k > room:
            raise ValueError(f"k must be <= the total capacity of every row; got k = {k} and a row of capacity {room}")
    elif w.shape[0] > 0 and w.shape[1] == 0 and V.eager():
        raise ValueError(f"k must be <= the total capacity of every row; got k = {k} and a row of capacity 0")
    if w.shape[0] == 0:
        return w.new_empty(w.shape, dtype=_INT64)
    cap = V.as_int64_on(cap, cap.device)
    if resolved is not None and _direct(w, cap):
        out = resolved[1](w, k, cap)
    else:
        out = _crop_budgets_op(w, k, cap, backend)
    return out[0] if unbatched else out


def crop_topk(
    scores: Tensor,
    crop_sizes: int | Tensor,
    budgets: Tensor,
    *,
    k: int | None = None,
    sorted: bool = True,
    backend: str = "auto",
    check_values: bool = False,
) -> Tensor:
    """Top ``budgets[c]`` tokens by score inside each contiguous crop: a ragged per-segment top-k.

    Args:
        scores: ``[B, N]`` or ``[N]`` float ranking keys (NaN ranks last).
        crop_sizes: an int ``C`` (``C`` equal crops as in SPEC §2: ``N // C``, the first
            ``N % C`` one larger) or an int tensor ``[B, C]`` / ``[C]`` of sizes summing to at most ``N``.
        budgets: int ``[B, C]`` / ``[C]``, ``0 <= budgets <= crop size``, rows summing to ``k``.
        k: the row sum of ``budgets``; pass it to avoid reading the budgets on the host.
        sorted: ascending indices, or crops in order with descending score inside.
        backend: as in :func:`fused_scope_select`.
        check_values: check the values of ``crop_sizes``/``budgets`` even on the GPU (syncs the
            device); index tensors on the CPU are always checked.

    Returns:
        int64 ``[B, k]`` (``[k]`` unbatched).
    """
    V.check_float(scores, "scores")
    V.check_rank(scores, "scores", (1, 2), "[B, N] or [N]")
    unbatched = scores.dim() == 1
    s = scores.unsqueeze(0) if unbatched else scores
    batch, n = s.shape
    V.check_tensor(budgets, "budgets")
    if budgets.dtype not in V.INDEX_DTYPES:
        raise TypeError(f"budgets must be an int32 or int64 tensor; got {budgets.dtype}")
    V.check_rank(budgets, "budgets", (1,) if unbatched else (2,), "[C]" if unbatched else "[B, C]")
    q = budgets.unsqueeze(0) if unbatched else budgets
    sizes_given = isinstance(crop_sizes, Tensor)
    if sizes_given:
        if crop_sizes.dtype not in V.INDEX_DTYPES:
            raise TypeError(f"crop_sizes must be an int or an int32/int64 tensor; got {crop_sizes.dtype}")
        sizes = crop_sizes.unsqueeze(0) if unbatched and crop_sizes.dim() == 1 else crop_sizes
    else:
        c = V.check_int(crop_sizes, "crop_sizes")
        if c < 1 or c > n:
            raise ValueError(f"crop_sizes as a crop count must satisfy 1 <= C <= N = {n}; got {c}")
        base, extra = divmod(n, c)
        sizes = torch.full((batch, c), base, dtype=_INT64, device=s.device)
        if extra:
            sizes[:, :extra] += 1
    if sizes.dim() != 2 or tuple(sizes.shape) != (batch, q.shape[1]) or tuple(q.shape) != (batch, sizes.shape[1]):
        raise ValueError(
            f"crop_sizes {tuple(sizes.shape)} and budgets {tuple(q.shape)} must both be [B, C] with B = {batch}"
        )
    V.check_same_device(q, "budgets", s, "scores")
    backend = V.check_backend(backend)
    resolved = _eager_impl("crop_topk", backend, s) if batch > 0 else None
    strict = _strict(check_values, resolved)
    if k is None:  # read from the budgets: a device sync for budgets on the GPU, as documented
        row_sums = q.sum(dim=-1).tolist()
        k = row_sums[0] if batch > 0 else 0
        if any(r != k for r in row_sums):
            raise ValueError("budgets must sum to the same k in every row")
    k = V.check_int(k, "k")
    if batch > 0 and sizes_given and V.read_values(sizes, strict):
        lowest, widest = torch.stack([sizes.min(), sizes.sum(dim=-1).max()]).tolist() if sizes.numel() else (0, 0)
        if lowest < 0 or widest > n:
            raise ValueError(f"crop_sizes must be >= 0 and sum to at most N = {n}")
    if batch > 0 and V.read_values(q, strict):
        sizes_q = sizes.to(q.device)
        bad = (q < 0) | (q > sizes_q)
        if bool(bad.any()):  # the first offender is looked up only on the way to the error
            row, c = bad.nonzero()[0].tolist()
            raise ValueError(
                "budgets must satisfy 0 <= budgets[c] <= crop_sizes[c]; "
                f"got budgets[{row}, {c}] = {int(q[row, c])} with crop_sizes[{row}, {c}] = {int(sizes_q[row, c])}"
            )
        if bool((q.sum(dim=-1) != k).any()):
            raise ValueError(f"budgets must sum to k = {k} in every row")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if batch == 0:
        return s.new_empty((0, k), dtype=_INT64)
    sizes = V.as_int64_on(sizes, s.device)
    q = V.as_int64_on(q, q.device)
    if resolved is not None and _direct(s, sizes, q):
        out = resolved[1](s, sizes, q, k, bool(sorted))
    else:
        out = _crop_topk_op(s, sizes, q, k, bool(sorted), backend)
    return out[0] if unbatched else out


def _coverage(tokens: Tensor, indices: Tensor, lengths: Tensor | None, backend: str) -> tuple[Tensor, Tensor | None, bool]:
    x, unbatched = V.batched_tokens(tokens)
    batch, n = x.shape[:2]
    backend = V.check_backend(backend)
    # Checked on every device, as before: the PyTorch coverage gathers with these indices.
    lens = V.check_lengths(lengths, batch, n, x.device, check_values=True)
    idx = V.check_indices(indices, batch, n, unbatched, lens, x.device, check_values=True)
    full = lens if lens is not None else torch.full((batch,), n, dtype=_INT64, device=x.device)
    if batch == 0:
        return x.new_zeros((0, n), dtype=torch.float32), lens, unbatched
    return _coverage_max_sim_op(x, idx, full, backend), lens, unbatched


def facility_location(
    tokens: Tensor, indices: Tensor, *, lengths: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """Coverage objective ``sum_u max(0, max_{s in S} sim(u, s))`` of a selection (SPEC §1).

    Args:
        tokens: ``[B, N, D]`` or ``[N, D]``.
        indices: int ``[B, K]`` or ``[K]`` selected token indices.
        lengths: optional ``[B]`` valid-token counts (padding is not counted).
        backend: as in :func:`fused_scope_select`.

    Returns:
        ``[B]`` (a 0-d tensor for unbatched input), fp32 (fp64 for fp64 tokens).
    """
    max_sim, _, unbatched = _coverage(tokens, indices, lengths, backend)
    value = facility_location_from_max_sim(max_sim)
    return value[0] if unbatched else value


def theta_coverage(
    tokens: Tensor, indices: Tensor, theta: float, *, lengths: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """θ-coverage (SCOPE's Definition 1): the share of tokens within similarity θ of the selection.

    Args:
        tokens, indices, lengths, backend: as in :func:`facility_location`.
        theta: similarity threshold in ``[-1, 1]``.

    Returns:
        ``[B]`` (0-d for unbatched input) fractions in ``[0, 1]``.
    """
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not -1.0 <= float(theta) <= 1.0:
        raise ValueError(f"theta must be a float in [-1, 1]; got {theta!r}")
    max_sim, lens, unbatched = _coverage(tokens, indices, lengths, backend)
    value = theta_coverage_from_max_sim(max_sim, float(theta), lens)
    return value[0] if unbatched else value


def attention_importance(
    q: Tensor,
    k: Tensor,
    query_groups: Tensor,
    *,
    num_groups: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    key_range: tuple[int, int] | None = None,
    backend: str = "auto",
    check_values: bool = False,
) -> Tensor:
    """Mean softmax attention each key receives from each group of queries, averaged over heads.

    The ``L x L`` attention is never materialized by the fast backends (row log-sum-exp,
    then column accumulation).

    Args:
        q: ``[B, Hq, L, d]`` queries, ``d >= 1``.
        k: ``[B, Hk, L, d]`` keys, ``Hq >= 1`` a multiple of ``Hk`` (grouped-query attention).
        query_groups: int ``[B, L]``, the group id of each query; -1 leaves it out.
        num_groups: ``G``; default the largest id + 1, at least 1 (pass it to avoid a device sync).
        causal: keys after the query get no attention.
        scale: logit scale, default ``1 / sqrt(d)``.
        key_range: ``(start, end)`` keys to report; default all ``L``.
        backend: as in :func:`fused_scope_select`.
        check_values: check that ``query_groups`` lies in ``[-1, G)`` even on the GPU (syncs the
            device); on the CPU it is always checked.

    Returns:
        ``[B, G, end - start]`` fp32 (fp64 for fp64 inputs); zeros for a group with no queries.
    """
    V.check_float(q, "q")
    V.check_float(k, "k")
    V.check_rank(q, "q", (4,), "[B, Hq, L, d]")
    V.check_rank(k, "k", (4,), "[B, Hk, L, d]")
    b, hq, length, d = q.shape
    if k.shape[0] != b or k.shape[2] != length or k.shape[3] != d:
        raise ValueError(f"k must have shape [B, Hk, L, d] = [{b}, Hk, {length}, {d}] to match q; got {tuple(k.shape)}")
    if hq < 1 or k.shape[1] < 1 or hq % k.shape[1] != 0:  # Hq = 0 would average over no heads: NaN
        raise ValueError(f"q's heads ({hq}) must be a positive multiple of k's heads ({k.shape[1]})")
    if d < 1:  # the default scale 1 / sqrt(d), and the logits themselves, need a head dim
        raise ValueError(f"q and k must have a last dim (head dim d) >= 1; got d = {d}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}; got {k.dtype}")
    V.check_same_device(k, "k", q, "q")
    V.check_tensor(query_groups, "query_groups")
    if query_groups.dtype not in V.INDEX_DTYPES or tuple(query_groups.shape) != (b, length):
        raise ValueError(f"query_groups must be an int tensor of shape [B, L] = ({b}, {length}); got {query_groups.dtype} {tuple(query_groups.shape)}")
    V.check_same_device(query_groups, "query_groups", q, "q")
    if num_groups is None:
        # at least one group: ids all -1 (no query counted) give one group of zeros, not an error
        num_groups = max(int(query_groups.max()) + 1, 1) if query_groups.numel() else 1
    num_groups = V.check_int(num_groups, "num_groups")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1; got {num_groups}")
    backend = V.check_backend(backend)
    resolved = _eager_impl("attention_importance", backend, q)
    if query_groups.numel() and V.read_values(query_groups, _strict(check_values, resolved)):
        lowest, highest = torch.stack(torch.aminmax(query_groups)).tolist()
        if lowest < -1 or highest >= num_groups:
            raise ValueError(f"query_groups must lie in [-1, num_groups = {num_groups})")
    if key_range is not None and (not isinstance(key_range, (tuple, list)) or len(key_range) != 2):
        raise ValueError(f"key_range must be a (start, end) pair; got {key_range!r}")
    start, end = (0, length) if key_range is None else (V.check_int(key_range[0], "key_range[0]"), V.check_int(key_range[1], "key_range[1]"))
    if not 0 <= start < end <= length:
        raise ValueError(f"key_range must satisfy 0 <= start < end <= L = {length}; got ({start}, {end})")
    if scale is None:
        scale = d ** -0.5
    scale = float(scale)
    groups = V.as_int64_on(query_groups, q.device)
    if resolved is not None and _direct(q, k, groups):
        return resolved[1](q, k, groups, num_groups, bool(causal), scale, start, end)
    return _attention_importance_op(q, k, groups, num_groups, bool(causal), scale, start, end, backend)


def lowrank_factorize(weight: Tensor, rank: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Rank-``R`` factors ``W ~ U V`` from the truncated SVD (SPEC §3): ``U [D_out, R]``, ``V [R, D_in]``.

    One ``torch.linalg.svd`` on every backend (``backend`` is checked for the API's uniformity).
    """
    V.check_float(weight, "weight")
    V.check_rank(weight, "weight", (2,), "[D_out, D_in]")
    rank = V.check_int(rank, "rank")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must satisfy 1 <= rank <= min(D_out, D_in) = {min(weight.shape)}; got {rank}")
    V.check_backend(backend)
    return _lowrank_factorize(weight, rank)


def gather_tokens(tokens: Tensor, indices: Tensor, *, backend: str = "auto") -> Tensor:
    """The selected tokens, ``tokens[b, indices[b]]``: ``[B, k, D]`` (``[k, D]`` unbatched).

    A single ``torch.gather`` on every backend (``backend`` is checked for the API's uniformity).
    """
    V.check_tensor(tokens, "tokens")
    V.check_rank(tokens, "tokens", (2, 3), "[B, N, D] or [N, D]")
    unbatched = tokens.dim() == 2
    x = tokens.unsqueeze(0) if unbatched else tokens
    V.check_backend(backend)
    # Checked on every device: torch.gather with an out-of-range index would assert on the GPU.
    idx = V.check_indices(indices, x.shape[0], x.shape[1], unbatched, None, x.device, check_values=True)
    out = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return out[0] if unbatched else out
