"""HoloV (SPEC §2) vectorized over images and crops, and its two building blocks.

* :func:`crop_budgets` — the budget split with its cyclic hand-outs in closed form, so no
  loop depends on ``k`` or on the number of crops.
* :func:`crop_topk` — a ragged per-crop top-k as two stable sorts (rank key, then crop id)
  and a rank-below-budget test.
* :func:`holov_select` — the crop statistics of every crop of every image from one batched
  Gram matrix ``[B, C, M, M]``.

No Python loop runs over images or crops, and nothing syncs with the host except a few
shape decisions (crop counts, the largest crop) taken once per call.

On the CPU, :func:`holov_select` hands float32/float16/bfloat16 tokens to the C++ engine of
``vtprune._cpu`` (``csrc/cpu/holov_cpu.cpp``) when it is built: the same selection in one call,
with each crop's Gram computed on one triangle only and none of the small tensor ops whose
fixed costs dominate on the CPU. ``VTPRUNE_HOLOV_CPU_ENGINE`` chooses (see :data:`_ENGINE`).
"""

from __future__ import annotations

import ctypes
import os
import re
import sys

import torch
from torch import Tensor

from ..similarity import HOLOV_EPS, compute_dtype
from . import scope as _scope

# The CPU engine: "auto" = the C++ engine of vtprune._cpu when it is built, else the torch code
# below; "torch" = always the torch code; "cpp" = always the C++ engine (an error if it is not
# built). Either way only CPU tokens of float32, float16 or bfloat16 (converted to float32 first,
# as the reference does) reach the C++ engine: float64 and other devices take the torch code.
# Tests switch it per case.
_ENGINE = os.environ.get("VTPRUNE_HOLOV_CPU_ENGINE", "auto").strip().lower() or "auto"
_ENGINES = ("auto", "torch", "cpp")
_CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Gram kernel of the C++ engine: "auto" (the best this CPU runs) or one of holov_isas(); tests
# set it to reach every kernel.
_ISA = "auto"
# Whether the C++ engine runs its threads as a team of the OpenMP runtime torch's CPU ops use
# (found once, see _torch_omp_parallel) rather than as threads of its own; tests switch it.
_USE_TORCH_OMP = True
_omp_parallel_address: int | None = None

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- budgets


def _descending_order(weights: Tensor) -> Tensor:
    """Crop order by descending weight, ties to the lowest crop, NaN after every number."""
    is_nan = torch.isnan(weights)
    key = torch.where(is_nan, torch.zeros_like(weights), -weights)
    order = torch.sort(key, dim=1, stable=True).indices
    # a second stable sort on the NaN flag moves NaN crops last, keeping the rest in order
    nan_last = torch.sort(is_nan.gather(1, order).to(torch.uint8), dim=1, stable=True).indices
    return order.gather(1, nan_last)


def _cyclic_fill(spare: Tensor, amount: Tensor, rank: Tensor, eligible_rank_order: Tensor) -> Tensor:
    """What each crop receives when ``amount`` tokens go +1 at a time, cycling over the crops in
    order and skipping a crop once it has received ``spare`` (its room).

    After ``t`` full rounds crop ``c`` has ``min(spare_c, t)``; ``t`` is the largest value with
    ``sum_c min(spare_c, t) <= amount``, found in closed form on the sorted ``spare``. The
    remaining tokens go +1 to the first crops in hand-out order that still have room after
    ``t`` rounds. ``rank[b, c]`` is crop ``c``'s position in the hand-out order and
    ``eligible_rank_order`` the crops sorted by that position.
    """
    count = spare.shape[1]
    v = torch.sort(spare, dim=1).values  # ascending
    csum = torch.cumsum(v, dim=1)
    left = torch.arange(count, 0, -1, device=spare.device)[None, :]  # crops with spare >= v_j
    at_v = csum - v + v * left  # sum_c min(spare_c, v_j)
    m = (at_v <= amount[:, None]).sum(dim=1, keepdim=True)  # breakpoints that fit: a prefix
    # crops below the m-th breakpoint are full; the others get t each, t < v_m
    prefix = torch.where(m > 0, csum.gather(1, (m - 1).clamp_min(0)), torch.zeros_like(m))
    rounds = torch.where(
        m >= count,
        v[:, -1:],  # every crop is full
        torch.div(amount[:, None] - prefix, (count - m).clamp_min(1), rounding_mode="floor"),
    )
    given = torch.minimum(spare, rounds)
    rest = amount[:, None] - given.sum(dim=1, keepdim=True)
    room = spare > rounds
    # position of each crop among the crops that still have room, in hand-out order
    room_in_order = room.gather(1, eligible_rank_order)
    seat_in_order = torch.cumsum(room_in_order.to(torch.int64), dim=1)
    seat = seat_in_order.gather(1, rank)
    extra = room & (seat <= rest)
    return given + extra.to(given.dtype)


def crop_budgets(weights: Tensor, k: int, capacity: Tensor) -> Tensor:
    """Per-crop budgets (SPEC §2 with the capacity rule); ``[B, C]`` int64, each row summing to ``k``.

    Crops of capacity 0 are absent. ``q = floor(w * k)`` (NaN weight: 0 and ordered last;
    negative: 0; weights summing above 1 rescaled to sum 1); the leftover ``k - sum q`` goes +1 per present crop in descending weight
    (ties: lowest crop), cycling; ``q`` is capped at capacity and the cut goes +1 at a time,
    cycling in the same order, to crops with room. Same result as the reference's loops,
    computed without any loop.
    """
    device = weights.device
    batch, count = weights.shape
    cap = capacity.to(torch.int64)
    present = cap > 0
    # the reference floors in double precision on the compute-dtype value of the weight
    w = weights.to(compute_dtype(weights.dtype)).to(torch.float64)
    # floors of the weights clamped at 0 (NaN: 0), rescaled to sum 1 when they sum above it
    # (with the reference's 1e-6 slack), so sum(q) <= k whatever the caller passes
    pos = torch.where(torch.isnan(w) | ~present, torch.zeros_like(w), w.clamp_min(0))
    total = pos.sum(dim=1, keepdim=True)
    scale = torch.where(total > 1.0 + 1e-6, 1.0 / total, torch.ones_like(total))
    q = torch.floor(pos * scale * k).clamp(0, k).to(torch.int64)
    q = torch.where(present, q, torch.zeros_like(q))

    order = _descending_order(w)  # [B, C] crop ids in hand-out order
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(count, device=device).expand(batch, count).contiguous())

    # 1) the leftover of the floors, +1 per present crop in order, cycling (no capacity yet)
    leftover = (k - q.sum(dim=1)).clamp_min(0)
    present_in_order = present.gather(1, order)
    seat = torch.cumsum(present_in_order.to(torch.int64), dim=1).gather(1, rank) - 1  # 0-based among present
    n_present = present.sum(dim=1).clamp_min(1)
    full_rounds = torch.div(leftover, n_present, rounding_mode="floor")
    part = leftover - full_rounds * n_present
    q = q + torch.where(present, full_rounds[:, None] + (seat < part[:, None]).to(torch.int64), torch.zeros_like(q))

    # 2) cap at capacity, hand what was cut to the crops with room, cycling in the same order.
    # Usually nothing overflows; on the CPU one check (a free sync there) skips the hand-out.
    if device.type == "cpu" and not bool((q > cap).any()):
        return q
    surplus = (q - cap).clamp_min(0).sum(dim=1)
    q = torch.minimum(q, cap)
    spare = (cap - q).clamp_min(0)
    return q + _cyclic_fill(spare, surplus, rank, order)


# ----------------------------------------------------------------------------- top-k in crops


def _segment_topk(key: Tensor, crop_id: Tensor, starts: Tensor, budgets: Tensor, k: int, sorted: bool) -> Tensor:
    """Top ``budgets[c]`` of ``key`` in each crop; ``crop_id`` = C for tokens in no crop."""
    batch, n = key.shape
    count = budgets.shape[1]
    # stable sort on -key keeps the lowest index first among equal keys, as the reference;
    # then a stable sort on the crop id groups the crops in order, keeping that inner order
    by_key = torch.sort(-key, dim=1, stable=True).indices
    by_crop = torch.sort(crop_id.gather(1, by_key), dim=1, stable=True).indices
    order = by_key.gather(1, by_crop)  # crops in order, descending key inside
    cid = crop_id.gather(1, order)
    inside = cid < count
    cid_c = cid.clamp_max(count - 1)
    pos = torch.arange(n, device=key.device)[None, :]
    rank = pos - starts.gather(1, cid_c)  # crops are contiguous, so they stay at their offsets
    keep = inside & (rank < budgets.gather(1, cid_c))
    # compact the kept tokens to the front without a host sync: their slot is their running count
    slot = torch.where(keep, torch.cumsum(keep.to(torch.int64), dim=1) - 1, torch.full_like(pos, k)).clamp_max(k)
    out = torch.zeros(batch, k + 1, dtype=torch.int64, device=key.device)
    out.scatter_(1, slot, order)
    out = out[:, :k]
    return out.sort(dim=1).values if sorted else out.contiguous()


def _crop_ids(sizes: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(crop id of every position [B, N] (C past the last crop), crop starts [B, C])``."""
    ends = torch.cumsum(sizes, dim=1)
    starts = ends - sizes
    pos = torch.arange(n, device=sizes.device).expand(sizes.shape[0], n).contiguous()
    crop_id = torch.searchsorted(ends, pos, right=True)
    return crop_id, starts


def _rank_key(scores: Tensor) -> Tensor:
    key = scores.to(compute_dtype(scores.dtype))
    return torch.where(torch.isnan(key), torch.full_like(key, _NEG_INF), key)


def crop_topk(scores: Tensor, crop_sizes: Tensor, budgets: Tensor, k: int, sorted: bool) -> Tensor:
    """Top ``budgets[b, c]`` tokens by ``scores`` inside each contiguous crop; ``[B, k]`` int64.

    Ties go to the lowest index, NaN ranks last. ``sorted=False`` lists crops in order and,
    inside a crop, descending score.
    """
    n = scores.shape[1]
    sizes = crop_sizes.to(torch.int64)
    crop_id, starts = _crop_ids(sizes, n)
    return _segment_topk(_rank_key(scores), crop_id, starts, budgets.to(torch.int64), k, sorted)


# ----------------------------------------------------------------------------- HoloV


def _crop_layout(n_valid: Tensor, k: int, num_crops: int | None) -> tuple[Tensor, Tensor]:
    """``(crops per image [B], crop sizes [B, C_max])``: ``n // C`` each, the first ``n % C`` one larger."""
    if num_crops is not None:
        crops = torch.full_like(n_valid, num_crops)
    else:
        crops = torch.minimum(n_valid, torch.div(1024 * n_valid, 576 * k, rounding_mode="floor").clamp_min(1))
    c_max = int(crops.max())
    c = torch.arange(c_max, device=n_valid.device)[None, :]
    base = torch.div(n_valid, crops, rounding_mode="floor")[:, None]
    extra = (n_valid - base[:, 0] * crops)[:, None]
    sizes = torch.where(c < crops[:, None], base + (c < extra).to(torch.int64), torch.zeros_like(c))
    return crops, sizes


def _crop_stats(x: Tensor, attn: Tensor, m: Tensor, alpha: float, padded: bool = True) -> tuple[Tensor, Tensor]:
    """Crop scores ``[..., C]`` and token scores ``h [..., C, M]`` of crops laid out as
    ``x [..., C, M, D]`` (compute dtype, padding rows zero), ``attn [..., C, M]`` (padding 0),
    ``m [..., C]`` valid tokens per crop; ``padded=False`` promises every crop is full
    (``m == M``), which skips the masking.

    ``S = f f^T`` comes from the Gram matrix of the raw tokens scaled by ``1 / (|x| + eps)`` on
    both sides, so the normalized copy of the tokens is never written.
    """
    dt = x.dtype
    big_m = x.shape[-2]
    inv = 1.0 / (torch.linalg.vector_norm(x, dim=-1) + HOLOV_EPS)  # [..., C, M]
    s = torch.matmul(x, x.mT)
    s.mul_(inv[..., :, None]).mul_(inv[..., None, :])
    eye = torch.eye(big_m, dtype=torch.bool, device=x.device)
    s.masked_fill_(eye, 0)
    mf = m.to(dt)
    denom = (mf - 1).clamp_min(1)[..., None]  # M - 1, only used where M >= 2
    mean = s.sum(dim=-1) / denom  # padded columns of S are 0
    dev = (s - mean[..., None]).square_()
    if padded:
        tok_valid = torch.arange(big_m, device=x.device) < m[..., None]  # [..., C, M]
        dev.masked_fill_(~tok_valid[..., None, :], 0)
    var = dev.sum(dim=-1) / denom
    if padded:
        var = var.masked_fill(~tok_valid, 0)
    a = 1000.0 * attn
    mean_div = mf.clamp_min(1)
    gamma = a.abs().sum(dim=-1) / mean_div / (var.abs().sum(dim=-1) / mean_div + 1e-6)
    h = a + (alpha * gamma)[..., None] * var
    score = (h.masked_fill(~tok_valid, 0) if padded else h).sum(dim=-1) / mean_div
    # one-token crops: score_c = attn (not scaled), h = 1000 * attn; absent crops: 0
    single = m == 1
    score = torch.where(single, attn[..., 0], score)
    score = torch.where(m == 0, torch.zeros_like(score), score)
    h = torch.where(single[..., None], a, h)
    return score, h


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
    """HoloV (SPEC §2) on ``[B, N, D]`` tokens; returns ``[B, k]`` int64.

    On the CPU the C++ engine runs it when :data:`_ENGINE` allows (see :func:`cpu_engine_status`).
    Otherwise all crops of all images are scored by one batched matmul. Crops of equal size are
    read in place (a view of the tokens); otherwise the tokens are gathered into a padded
    ``[B, C_max, M_max, D]`` layout first.
    """
    picks = _cpp_holov_select(tokens, attn, k, num_crops, alpha, rank_by, lengths, sorted)
    if picks is not None:
        return picks
    batch, n, dim = tokens.shape
    device = tokens.device
    dt = compute_dtype(tokens.dtype)
    a32 = attn.to(dt)
    if lengths is None:
        n_valid = torch.full((batch,), n, dtype=torch.int64, device=device)
    else:
        n_valid = lengths.to(torch.int64)
    crops, sizes = _crop_layout(n_valid, k, num_crops)
    c_max = sizes.shape[1]
    crop_id, starts = _crop_ids(sizes, n)

    even = lengths is None and n % c_max == 0
    if even:
        big_m = n // c_max
        x = tokens.to(dt).reshape(batch, c_max, big_m, dim)
        a_crop = a32.reshape(batch, c_max, big_m)
        score, h = _crop_stats(x, a_crop, sizes, alpha, padded=False)
        h_flat = h.reshape(batch, n)
    else:
        big_m = int(sizes.max())
        j = torch.arange(big_m, device=device)
        src = starts[:, :, None] + j  # [B, C, M]
        ok = j < sizes[:, :, None]
        src = torch.where(ok, src, torch.zeros_like(src))
        flat = src.view(batch, -1)
        x = tokens.gather(1, flat[:, :, None].expand(-1, -1, dim)).to(dt).view(batch, c_max, big_m, dim)
        x = x.masked_fill(~ok[..., None], 0)
        a_crop = a32.gather(1, flat).view(batch, c_max, big_m).masked_fill(~ok, 0)
        score, h = _crop_stats(x, a_crop, sizes, alpha)
        if rank_by == "score":
            # back to token positions; padding slots all point at position 0, so write them nowhere
            dump = torch.where(ok, src, torch.full_like(src, n)).view(batch, -1)
            h_flat = torch.zeros(batch, n + 1, dtype=dt, device=device)
            h_flat.scatter_(1, dump, h.reshape(batch, -1))
            h_flat = h_flat[:, :n]
        else:
            h_flat = None

    w = score / (score.sum(dim=1, keepdim=True) + 1e-6)
    budgets = crop_budgets(w, k, sizes)
    key = _rank_key(h_flat if rank_by == "score" else a32)
    return _segment_topk(key, crop_id, starts, budgets, k, sorted)


# ----------------------------------------------------------------------------- CPU, C++


def cpu_engine_status() -> tuple[bool, str]:
    """Whether the C++ HoloV engine (``holov_select_f32`` of ``vtprune._cpu``) is available:
    ``(built, reason)``."""
    built, reason = _scope.cpu_engine_status()
    if not built:
        return False, reason
    if not hasattr(_scope._cpu_module, "holov_select_f32"):
        return False, "vtprune._cpu was built without the HoloV engine (rebuild it: pip install -e .)"
    return True, "ok"


def _cpp_engine_for(tokens: Tensor):
    """The ``vtprune._cpu`` module when the C++ engine is to run on ``tokens``, else None."""
    if _ENGINE not in _ENGINES:
        raise ValueError(f"VTPRUNE_HOLOV_CPU_ENGINE must be one of {_ENGINES}, got {_ENGINE!r}")
    if _ENGINE == "torch" or tokens.device.type != "cpu" or tokens.dtype not in _CPP_DTYPES:
        return None
    built, reason = cpu_engine_status()
    if not built:
        if _ENGINE == "cpp":
            raise RuntimeError(f"HoloV CPU engine 'cpp' unavailable: {reason}")
        return None
    return _scope._cpu_module


def _find_omp_parallel() -> int:
    """Address of ``GOMP_parallel`` in the OpenMP runtime torch runs its CPU ops on, or 0.

    Only a runtime already loaded in this process is looked at (``RTLD_NOLOAD``), the one in
    torch's own directory first; LLVM's and Intel's runtimes export ``GOMP_parallel`` too.
    """
    if not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return 0
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return 0
    libs = sorted(p for p in paths if re.match(r"lib(gomp|iomp5|omp)([-.]|$)", os.path.basename(p)))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    libs.sort(key=lambda p: not p.startswith(torch_dir))  # stable: torch's own first
    for path in libs:
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            return ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value or 0
        except (OSError, AttributeError):
            continue
    return 0


def _torch_omp_parallel() -> int:
    """``GOMP_parallel`` of torch's OpenMP runtime for the C++ engine, or 0 for its own threads.

    Why: right after a torch op, torch's OpenMP workers keep spinning for a few milliseconds,
    waiting for more work. Threads of the engine's own would then share the cores with them
    (measured on 2 cores: the engine ran 1.7x slower right after the official-style loop);
    as a team of the same runtime, the spinning workers take the engine's work instead.
    """
    global _omp_parallel_address
    if not _USE_TORCH_OMP:
        return 0
    if _omp_parallel_address is None:
        _omp_parallel_address = _find_omp_parallel()
    return _omp_parallel_address


def _cpp_args(tokens: Tensor, attn: Tensor, lengths: Tensor | None) -> tuple[list, list[Tensor]]:
    """Leading arguments of the ``vtprune._cpu`` HoloV functions, and the tensors that must
    outlive the call (the engine reads their memory)."""
    x = tokens.to(torch.float32).contiguous()
    a = attn.to(torch.float32).contiguous()
    lens = None if lengths is None else lengths.to(device="cpu", dtype=torch.int64).contiguous()
    batch, n, dim = x.shape
    args = [x.data_ptr(), a.data_ptr(), 0 if lens is None else lens.data_ptr(), batch, n, dim]
    return args, [t for t in (x, a, lens) if t is not None]


def _cpp_holov_select(
    tokens: Tensor,
    attn: Tensor,
    k: int,
    num_crops: int | None,
    alpha: float,
    rank_by: str,
    lengths: Tensor | None,
    sorted: bool,
) -> Tensor | None:
    """:func:`holov_select` by the C++ engine, or None when that engine is not to run here."""
    cpu = _cpp_engine_for(tokens)
    if cpu is None:
        return None
    args, keep = _cpp_args(tokens, attn, lengths)
    out = torch.empty(tokens.shape[0], k, dtype=torch.int64)
    cpu.holov_select_f32(
        *args, k, num_crops or 0, float(alpha), rank_by == "score", bool(sorted), out.data_ptr(),
        torch.get_num_threads(), _ISA, _torch_omp_parallel(),
    )
    del keep
    return out


def cpp_crop_stats(
    tokens: Tensor,
    attn: Tensor,
    k: int,
    num_crops: int | None,
    alpha: float,
    lengths: Tensor | None = None,
    isa: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The C++ engine's crop scores ``[B, N]`` (crop ``c`` at column ``c``, 0 past the image's
    crops) and token scores ``h [B, N]`` (0 past ``lengths``), float32; for tests and diagnosis.

    Raises ``RuntimeError`` when the engine is not built.
    """
    built, reason = cpu_engine_status()
    if not built:
        raise RuntimeError(f"HoloV CPU engine unavailable: {reason}")
    args, keep = _cpp_args(tokens, attn, lengths)
    batch, n = tokens.shape[:2]
    score = torch.empty(batch, n, dtype=torch.float32)
    h = torch.empty(batch, n, dtype=torch.float32)
    _scope._cpu_module.holov_crop_stats_f32(
        *args, k, num_crops or 0, float(alpha), score.data_ptr(), n, h.data_ptr(), torch.get_num_threads(), isa,
        _torch_omp_parallel(),
    )
    del keep
    return score, h
