"""Thin torch-side wrapper around the compiled CUDA module ``vtprune._C``.

``vtprune._C`` is optional (it is built only where nvcc was found) and, even when built, usable
only with an NVIDIA driver, a GPU and a CUDA build of torch. This module imports it lazily and
turns each of those conditions into a readable reason, so ``backend="auto"`` can fall back
quietly and ``backend="cuda"`` can fail with a message that says what is missing.

``vtprune._C`` is torch-free: it takes ``data_ptr()``s, sizes, strides and a raw stream handle.
Everything torch-specific (devices, dtypes, allocation, streams) is done here.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Callable, Iterator

import torch
from torch import Tensor

from ._dispatch import constant_index as _constant_index, kernel_weights as _kernel_weights
from ._varlen import bind_scope_picks, select_batched, select_packed
from . import similarity as _similarity
from .similarity import SCOPE_FP32_MAX_N, scope_similarity_dtype, scope_storage_groups

__all__ = ["status", "is_available", "coverage_max_sim", "DTYPE_CODES"]
__all__ += ["scope_similarity", "scope_picks", "scope_select", "scope_select_varlen", "scope_cluster_plan", "CLUSTER_SIZES"]

#: dtype codes understood by vtprune._C (csrc/common.cuh, enum DType)
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_NOT_BUILT = "not built (vtprune._C missing: installed without nvcc or with VTPRUNE_BUILD_CUDA=0)"

_module: ModuleType | None = None
_import_error: str | None = None
_usable = False  # sticky once true: a GPU does not disappear from a running process


def _load() -> ModuleType | None:
    """Import vtprune._C once, remembering why it failed if it did."""
    global _module, _import_error
    if _module is not None or _import_error is not None:
        return _module
    try:
        _module = importlib.import_module("vtprune._C")
    except ModuleNotFoundError as exc:
        # Only a missing _C means "not built"; a missing dependency of it is a broken build.
        _import_error = _NOT_BUILT if exc.name == "vtprune._C" else f"vtprune._C failed to import: {exc}"
    except ImportError as exc:  # e.g. built for another Python, or an undefined symbol
        _import_error = f"vtprune._C is present but failed to import: {exc}"
    return _module


def status() -> tuple[bool, str]:
    """Whether the CUDA backend can run here: ``(usable, reason)``.

    ``usable`` is True only when ``vtprune._C`` imports, ``torch.cuda.is_available()`` and
    ``vtprune._C.device_count() > 0``. ``reason`` is ``"ok"`` then, otherwise one of
    ``"not built (...)"``, ``"no GPU: <CUDA error string>"``, ``"torch has no CUDA (...)"``,
    ``"torch.cuda.is_available() is False ..."``.
    """
    global _usable
    if _usable:
        return True, "ok"
    module = _load()
    if module is None:
        return False, _import_error or _NOT_BUILT
    # The GPU check comes first: on a GPU-less box the missing GPU is the real reason, whatever
    # flavour of torch happens to be installed.
    if module.device_count() <= 0:
        return False, f"no GPU: {module.cuda_status()}"
    if torch.version.cuda is None:
        return False, f"torch has no CUDA (torch {torch.__version__} is a build without CUDA support)"
    if not torch.cuda.is_available():
        return False, (
            f"torch.cuda.is_available() is False although vtprune._C sees "
            f"{module.device_count()} device(s) (torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    _usable = True
    return True, "ok"


def is_available() -> bool:
    """``status()[0]``."""
    return status()[0]


# ----------------------------------------------------------------------------- test hook

#: Set only by :func:`_emulated` (tests/cuda_emu): the module the wrappers call instead of vtprune._C.
_emulation: ModuleType | None = None


@contextlib.contextmanager
def _emulated(module: ModuleType) -> Iterator[None]:
    """Test hook, not API: inside the block the wrappers (and ``backend="cuda"``) run on ``module``,
    a CPU build of the same kernels with vtprune._C's interface (tests/cuda_emu), taking CPU
    tensors where they otherwise require CUDA tensors, and launching on stream 0."""
    global _emulation
    if _emulation is not None:
        raise RuntimeError("vtprune._cuda._emulated is already active")
    _emulation = module
    try:
        yield
    finally:
        _emulation = None


def _kernel_device_type() -> str:
    """The device type the kernels take tensors on: "cuda", or "cpu" under :func:`_emulated`."""
    return "cuda" if _emulation is None else "cpu"


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)``; nothing under :func:`_emulated` (CPU tensors) or when
    ``device`` is already the current one (the usual case; switching costs the host microseconds)."""
    if _emulation is not None or device.index == _current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _current_device() -> int:
    """torch's current CUDA device; CUDA is initialized, since the caller holds CUDA tensors."""
    return torch._C._cuda_getDevice()


def _require() -> ModuleType:
    if _emulation is not None:
        return _emulation
    usable, reason = status()
    if not usable:
        raise RuntimeError(f"backend='cuda' is not available: {reason}")
    assert _module is not None
    return _module


def _check_tokens(tokens: Tensor, rank: int, shape_doc: str) -> None:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != rank:
        raise ValueError(f"tokens must be {shape_doc}, got shape {list(tokens.shape)}")
    if tokens.dtype not in DTYPE_CODES:
        raise TypeError(f"tokens must be float32, float16 or bfloat16, got {tokens.dtype}")
    if tokens.device.type != _kernel_device_type():
        raise ValueError(f"backend='cuda' needs CUDA tensors, tokens are on {tokens.device}")


def _token_args(tokens: Tensor) -> tuple[int, ...]:
    """``tokens [B, N, D]`` as the launchers take it: pointer, dtype code, sizes, batch and row strides."""
    batch, n, dim = tokens.shape
    return (tokens.data_ptr(), DTYPE_CODES[tokens.dtype], batch, n, dim, tokens.stride(0), tokens.stride(1))


def _launch(launcher: Callable[..., None], device: torch.device, *args: object, **kwargs: object) -> None:
    """Call a vtprune._C launcher on ``device`` with torch's current stream as its last argument.

    The current stream orders the kernel with the surrounding torch ops (and with CUDA graph
    capture).
    """
    if _emulation is not None:
        launcher(*args, 0, **kwargs)
        return
    if device.index == _current_device():
        launcher(*args, _raw_stream(device.index), **kwargs)
        return
    with torch.cuda.device(device):
        launcher(*args, _raw_stream(device.index), **kwargs)


def _raw_stream_public(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


#: torch's current stream of a device as an integer handle. The private getter (what Triton and
#: Inductor use) skips building a ``torch.cuda.Stream`` object, a few microseconds per launch.
_raw_stream: Callable[[int], int] = getattr(torch._C, "_cuda_getCurrentRawStream", _raw_stream_public)


def _as_index_tensor(name: str, value: Tensor, shape: str, ndim: int, batch: int, device: torch.device) -> Tensor:
    """``value`` as a contiguous int64 tensor on ``device`` after checking it is ``[batch, ...]``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.dim() != ndim or value.shape[0] != batch:
        raise ValueError(f"{name} must have shape {shape}, got {list(value.shape)}")
    if value.dtype != torch.int64 or value.device != device:  # else a no-op, but a dispatched one
        value = value.to(device=device, dtype=torch.int64)
    return value.contiguous()


def coverage_max_sim(tokens: Tensor, indices: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Similarity of every token to its most similar selected token, on the CUDA kernel.

    Args:
        tokens: ``[B, N, D]`` float32/float16/bfloat16 CUDA tensor (copied only if its last stride
            is not 1).
        indices: ``[B, K]`` integer tensor of selected token indices; entries outside
            ``[0, lengths[b])`` are skipped.
        lengths: ``[B]`` integer tensor, valid tokens per image (clamped to ``[0, N]``);
            ``None`` means all ``N``.

    Returns:
        ``float32 [B, N]`` on ``tokens.device``: ``max_s sim(u, s)`` (SPEC §1 similarity, fp32
        math) for ``u < lengths[b]``, ``-inf`` for such ``u`` when image ``b`` has no valid
        selected index, and ``0`` for padded ``u``.

    Raises:
        RuntimeError: ``backend='cuda' is not available: <reason>`` when vtprune._C cannot run
            here, or the CUDA error if the launch fails.
        TypeError / ValueError: bad dtype, shape or device.
    """
    module = _require()
    _check_tokens(tokens, 3, "[B, N, D]")
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()

    B, N, _ = tokens.shape
    device = tokens.device
    indices = _as_index_tensor("indices", indices, f"[B={B}, K]", 2, B, device)
    K = indices.shape[1]
    if lengths is None:
        lengths = torch.full((B,), N, device=device, dtype=torch.int64)
    else:
        lengths = _as_index_tensor("lengths", lengths, f"[B={B}]", 1, B, device)

    out = torch.empty((B, N), device=device, dtype=torch.float32)
    if B == 0 or N == 0:
        return out
    _launch(module.coverage_max_sim, device, *_token_args(tokens), indices.data_ptr(), K, lengths.data_ptr(), out.data_ptr())
    return out


# ----------------------------------------------------------------------------- SCOPE

#: Storage dtypes of the SCOPE similarity S understood by vtprune._C.scope_greedy.
_SIM_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1}
#: Token dtypes whose S is built by vtprune._C.scope_similarity; float32 tokens keep the torch path.
_FUSED_SIM_DTYPES = (torch.float16, torch.bfloat16)


def scope_similarity(tokens: Tensor, storage: torch.dtype | None = None) -> Tensor:
    """``[B, N, N]`` SCOPE similarity of 16-bit ``tokens [B, N, D]`` in one launch (csrc/similarity.cu).

    The contract of :func:`vtprune.similarity.scope_similarity`: the same formula and the same
    storage rule (``storage=None`` is float32 up to ``SCOPE_FP32_MAX_N`` tokens, float16 above), for
    float16/bfloat16 CUDA tokens. Products run on tensor cores in the input dtype with fp32
    accumulation and the norms come from the same tiles, so entries agree with the torch path to a
    few fp32 ulps (tests/test_cuda_similarity.py). Strided rows are read in place; only a last
    stride other than 1 costs a contiguous copy.

    Returns:
        A contiguous ``[B, N, N]`` tensor of dtype ``storage`` on ``tokens.device``.

    Raises:
        RuntimeError: ``backend='cuda' is not available: <reason>``, or the CUDA launch error.
        TypeError: ``tokens`` is not float16/bfloat16 (float32 tokens use the torch path).
        ValueError: wrong rank, device or ``storage``.
    """
    module = _require()
    _check_tokens(tokens, 3, "[B, N, D]")
    if tokens.dtype not in _FUSED_SIM_DTYPES:
        raise TypeError(f"tokens must be float16 or bfloat16 (float32 uses the torch path), got {tokens.dtype}")
    batch, n, _ = tokens.shape
    storage = storage or scope_similarity_dtype(n)
    if storage not in _SIM_CODES:
        raise ValueError(f"storage must be torch.float32 or torch.float16, got {storage}")
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    out = torch.empty(batch, n, n, dtype=storage, device=tokens.device)
    if batch == 0 or n == 0:
        return out
    _launch(module.scope_similarity, tokens.device, *_token_args(tokens), out.data_ptr(), _SIM_CODES[storage])
    return out


def scope_picks(
    tokens: Tensor,
    saliency: Tensor,
    k_per_image: Tensor,
    k_max: int,
    alpha: float,
    combine: str,
    lengths: Tensor | None = None,
    *,
    sorted: bool = False,
    similarity_dtype: torch.dtype | None = None,
    force_global_state: bool = False,
    max_list: int = 0,
    cluster_size: int | None = None,
) -> Tensor:
    """SCOPE greedy picks (SPEC §1) on the CUDA kernel: int64 ``[B, k_max]``, in pick order, or
    ascending with ``sorted`` (the kernel writes them so: no sort launch).

    The similarity S is stored in fp32 for an image of up to 4096 tokens and in fp16 above, decided
    by each image's own length. It is built by :func:`scope_similarity` (one launch) for 16-bit
    tokens and in torch (:func:`vtprune.similarity.scope_similarity`, bitwise the reference) for
    fp32 tokens; then one launch per storage kind runs every greedy step of every image
    (csrc/scope.cu).

    Args:
        tokens: ``[B, N, D]`` float32/float16/bfloat16 CUDA tensor.
        saliency: ``[B, N]`` float tensor on the same device.
        k_per_image: int ``[B]``, picks of image ``b`` (clamped to ``[0, min(lengths[b], k_max)]``);
            entries ``>= k_per_image[b]`` of row ``b`` are left uninitialized.
        k_max: columns of the result.
        alpha, combine: as in SPEC §1 (``combine`` is "mul" or "add").
        lengths: optional int ``[B]`` valid tokens per image (clamped to ``[1, N]``).
        sorted: the first ``k_b`` entries of row ``b`` ascending instead of in pick order.
        similarity_dtype: storage of S for every image (``torch.float32``/``torch.float16``), for
            tests; ``None`` decides per image as above.
        force_global_state, max_list: test knobs of the kernel (per-image state in the global
            workspace even where shared memory suffices; a changed-row list capped at
            ``max_list`` rows, rounded down to whole chunks of 1024). They do not change the
            contract. With ``cluster_size``, ``force_global_state`` streams the column slices
            from global memory instead (``max_list`` must stay 0).
        cluster_size: ``None`` (the default) runs one CTA per image (csrc/scope.cu). An int runs
            the thread-block cluster kernel (csrc/scope_cluster.cu; compute capability >= 9.0,
            fp32 S only, so images of at most 4096 tokens): 2, 4, 8 or 16 CTAs per image, or 0
            to let the launcher choose. Its picks are bit for bit those of the default kernel
            (same formulas and summation order); it is opt-in until a GPU has measured it.

    Raises:
        RuntimeError: ``backend='cuda' is not available: <reason>``, or the CUDA launch error.
        TypeError / ValueError: bad dtype, shape, device or option.
    """
    module = _require()
    _check_tokens(tokens, 3, "[B, N, D]")
    if combine not in ("mul", "add"):
        raise ValueError(f"combine must be 'mul' or 'add', got {combine!r}")
    if similarity_dtype not in (None, *_SIM_CODES):
        raise ValueError(f"similarity_dtype must be None, torch.float32 or torch.float16, got {similarity_dtype}")
    _check_cluster_option(cluster_size, max_list, similarity_dtype)
    batch, n, _ = tokens.shape
    device = tokens.device
    if not isinstance(saliency, Tensor) or tuple(saliency.shape) != (batch, n):
        got = list(saliency.shape) if isinstance(saliency, Tensor) else type(saliency).__name__
        raise ValueError(f"saliency must be a tensor of shape [B={batch}, N={n}], got {got}")
    if saliency.device != device:
        raise ValueError(f"saliency must be on {device} like tokens, got {saliency.device}")
    k_per_image = _as_index_tensor("k_per_image", k_per_image, f"[B={batch}]", 1, batch, device)
    out = torch.empty(batch, k_max, dtype=torch.int64, device=device)
    if batch == 0 or n == 0 or k_max == 0:
        return out
    if lengths is None:
        lengths = _constant_index(batch, n, device)
    else:
        lengths = _as_index_tensor("lengths", lengths, f"[B={batch}]", 1, batch, device)

    plan = scope_storage_groups(n, lengths) if similarity_dtype is None else [(None, n, similarity_dtype)]
    if cluster_size is not None and any(storage != torch.float32 for _, _, storage in plan):
        raise ValueError(
            f"cluster_size={cluster_size}: the cluster kernel takes fp32 similarity only, i.e. images of at most "
            f"{SCOPE_FP32_MAX_N} tokens; this batch has longer ones (fp16 S): use cluster_size=None"
        )
    options = dict(force_global_state=bool(force_global_state), max_list=int(max_list), sorted=bool(sorted))
    if cluster_size is not None:
        options["cluster_size"] = int(cluster_size)
    with _on_device(device):
        for rows, width, storage in plan:
            if rows is None:
                # slicing the full width would dispatch two no-op views
                x, sal = (tokens, saliency) if width == n else (tokens[:, :width], saliency[:, :width])
                _launch_scope(module, x, sal, k_per_image, lengths, out, alpha, combine, storage, options)
            else:
                # the images of the other storage kind run on their own, padded to their own width
                r = rows.to(device)
                part = torch.empty(r.shape[0], k_max, dtype=torch.int64, device=device)
                _launch_scope(module, tokens[r, :width], saliency[r, :width], k_per_image[r], lengths[r], part, alpha, combine, storage, options)
                out[r] = part
    return out


#: Cluster sizes of the cluster kernel (0 = the launcher chooses).
CLUSTER_SIZES = (0, 2, 4, 8, 16)


def _check_cluster_option(cluster_size: object, max_list: int, similarity_dtype: torch.dtype | None) -> None:
    """ValueError unless ``cluster_size`` is None or one of :data:`CLUSTER_SIZES` (and compatible)."""
    if cluster_size is None:
        return
    if isinstance(cluster_size, bool) or not isinstance(cluster_size, int) or cluster_size not in CLUSTER_SIZES:
        raise ValueError(f"cluster_size must be None (one CTA per image), 0 (choose), 2, 4, 8 or 16, got {cluster_size!r}")
    if max_list:
        raise ValueError(f"max_list is a knob of the single-CTA kernel; it must be 0 with cluster_size={cluster_size}, got {max_list}")
    if similarity_dtype == torch.float16:
        raise ValueError(f"cluster_size={cluster_size}: the cluster kernel takes fp32 similarity only, got similarity_dtype=torch.float16")


def scope_cluster_plan(n: int, cluster_size: int = 0, force_global_state: bool = False, device: torch.device | int | None = None) -> tuple[int, bool, int]:
    """The launch plan of the cluster kernel for ``n`` tokens on ``device`` (default: the current
    CUDA device): ``(cluster_size, slices_in_shared_memory, shared_bytes_per_cta)``. For tests and
    benchmarks; raises like :func:`scope_picks`."""
    module = _require()
    _check_cluster_option(cluster_size, 0, None)
    if isinstance(device, int):
        index = device
    elif device is not None and device.index is not None:
        index = device.index
    else:  # the current device (the emulator's device 0 under emulation)
        index = 0 if _emulation is not None else torch.cuda.current_device()
    size, slice_in_smem, smem = module.scope_cluster_plan(index, int(n), int(cluster_size), bool(force_global_state))
    return int(size), bool(slice_in_smem), int(smem)


def _launch_scope(
    module: ModuleType,
    tokens: Tensor,
    saliency: Tensor,
    k_per_image: Tensor,
    lengths: Tensor,
    out: Tensor,
    alpha: float,
    combine: str,
    storage: torch.dtype,
    options: dict,
) -> None:
    """One launch over ``tokens [B, N, D]`` with S stored as ``storage``; fills ``out [B, k_max]``."""
    batch, n, _ = tokens.shape
    device = tokens.device
    if tokens.dtype in _FUSED_SIM_DTYPES:
        sim = scope_similarity(tokens, storage)  # [B, N, N] contiguous
    else:
        sim = _similarity.scope_similarity(tokens, storage)
    w, unit = _kernel_weights(saliency, alpha)
    # Allocated here with torch, not in the launcher, so the op can be captured in a CUDA graph.
    # The cluster kernel keeps all its state in shared memory and needs none.
    clustered = "cluster_size" in options
    workspace = torch.empty(0 if clustered else module.scope_workspace_bytes(batch, n), dtype=torch.uint8, device=device)
    _launch(
        module.scope_greedy_cluster if clustered else module.scope_greedy,
        device,
        sim.data_ptr(),
        _SIM_CODES[sim.dtype],
        w.data_ptr(),
        lengths.data_ptr(),
        k_per_image.data_ptr(),
        batch,
        n,
        out.shape[1],
        combine == "mul",
        workspace.data_ptr() if workspace.numel() else 0,
        workspace.numel(),
        out.data_ptr(),
        # unit weights are never read, so their dtype (even float64) does not matter
        weights_dtype=DTYPE_CODES[torch.float32] if unit else DTYPE_CODES[w.dtype],
        weights_stride=0 if unit else w.stride(0),
        unit_weights=unit,
        **options,
    )


def scope_select(
    tokens: Tensor,
    saliency: Tensor,
    k: int,
    alpha: float = 1.0,
    combine: str = "mul",
    lengths: Tensor | None = None,
    sorted: bool = True,
    **options,
) -> Tensor:
    """SCOPE (SPEC §1) on ``[B, N, D]`` CUDA tokens: int64 ``[B, k]``, ascending or in pick order.

    ``options`` are the test knobs of :func:`scope_picks`.
    """
    _check_tokens(tokens, 3, "[B, N, D]")
    return select_batched(tokens, saliency, k, lengths, sorted, bind_scope_picks(scope_picks, alpha, combine, options))


def scope_select_varlen(
    tokens: Tensor,
    saliency: Tensor,
    cu_seqlens: Tensor,
    k_per_seq: Tensor,
    alpha: float = 1.0,
    combine: str = "mul",
    sorted: bool = True,
    max_seqlen: int | None = None,
    k_uniform: int | None = None,
    total_k: int | None = None,
    **options,
) -> tuple[Tensor, Tensor]:
    """SCOPE on packed CUDA sequences ``tokens [T, D]``, ``cu_seqlens [B+1]``, one ``k`` per sequence.

    Packed and unpacked exactly as the Triton backend does (:func:`vtprune._varlen.select_packed`).
    ``max_seqlen``/``k_uniform``/``total_k``: the output shapes, when known on the host (no device read then).
    Returns ``(indices into T [sum k], cu_k [B+1])``, both int64. ``options`` are the test knobs of
    :func:`scope_picks`.
    """
    _check_tokens(tokens, 2, "[T, D]")
    padded_picks = bind_scope_picks(scope_picks, alpha, combine, options)
    return select_packed(tokens, saliency, cu_seqlens, k_per_seq, sorted, padded_picks, max_seqlen, k_uniform, total_k)


# ----------------------------------------------------------------------------- HoloV

__all__ += ["holov_select", "crop_budgets", "crop_topk"]


def _cuda_float_input(name: str, value: Tensor, ndim: int, shape_doc: str) -> None:
    """Type, rank and device checks shared by the HoloV wrappers (the dtype is converted after)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {shape_doc}, got shape {list(value.shape)}")
    if value.device.type != _kernel_device_type():
        raise ValueError(f"backend='cuda' needs CUDA tensors, {name} is on {value.device}")


def holov_select(
    tokens: Tensor,
    attn: Tensor,
    k: int,
    num_crops: int | None = None,
    alpha: float = 0.09,
    rank_by: str = "attn",
    lengths: Tensor | None = None,
    sorted: bool = True,
) -> Tensor:
    """HoloV selection (SPEC §2) on the CUDA kernels: two launches for the whole batch.

    Args:
        tokens: ``[B, N, D]`` float32/float16/bfloat16 CUDA tensor (copied only if its last stride
            is not 1). The Gram products run in this dtype (tensor cores for 16-bit), accumulated
            in fp32.
        attn: ``[B, N]`` float tensor, converted to float32 (the reference's compute dtype).
        k: tokens to keep per image, ``1 <= k <= N``.
        num_crops: crops per image, or ``None`` for SPEC §2's per-image default.
        alpha: weight of the similarity-variance term.
        rank_by: ``"attn"`` or ``"score"`` (rank inside a crop by ``h``).
        lengths: optional ``[B]`` integer valid-token counts (clamped to ``[0, N]`` in the kernel).
        sorted: ascending indices, or crops in order with descending key inside.

    Returns:
        int64 ``[B, k]`` on ``tokens.device``.

    Raises:
        RuntimeError: ``backend='cuda' is not available: <reason>``, or the CUDA error of a failed
            launch. TypeError / ValueError: bad dtype, shape, device or sizes.
    """
    module = _require()
    _cuda_float_input("tokens", tokens, 3, "[B, N, D]")
    if tokens.dtype not in DTYPE_CODES:
        raise TypeError(f"tokens must be float32, float16 or bfloat16, got {tokens.dtype}")
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    B, N, _ = tokens.shape
    device = tokens.device
    _cuda_float_input("attn", attn, 2, f"[B={B}, N={N}]")
    if tuple(attn.shape) != (B, N):
        raise ValueError(f"attn must have shape [B={B}, N={N}], got {list(attn.shape)}")
    if rank_by not in ("attn", "score"):
        raise ValueError(f"rank_by must be 'attn' or 'score', got {rank_by!r}")
    a32 = (attn if attn.dtype == torch.float32 and attn.device == device else attn.to(device=device, dtype=torch.float32)).contiguous()
    if lengths is not None:
        lengths = _as_index_tensor("lengths", lengths, f"[B={B}]", 1, B, device)
    k = int(k)
    crops = 0 if num_crops is None else int(num_crops)
    out = torch.empty((B, k), device=device, dtype=torch.int64)
    if B == 0:
        return out
    workspace = torch.empty(module.holov_select_workspace_bytes(B, N, k, crops), dtype=torch.uint8, device=device)
    _launch(
        module.holov_select,
        device,
        *_token_args(tokens),
        a32.data_ptr(),
        0 if lengths is None else lengths.data_ptr(),
        k,
        crops,
        float(alpha),
        rank_by == "score",
        bool(sorted),
        workspace.data_ptr(),
        workspace.numel(),
        out.data_ptr(),
    )
    return out


def crop_budgets(weights: Tensor, k: int, capacity: Tensor) -> Tensor:
    """Per-crop budgets summing to ``k`` (SPEC §2 with the capacity rule) on the CUDA kernel.

    Args:
        weights: ``[B, C]`` float CUDA tensor, converted to float32.
        k: the total budget, ``>= 1`` (and at most each row's capacity, checked by the caller).
        capacity: ``[B, C]`` integer tensor, 0 = absent crop.

    Returns:
        int64 ``[B, C]`` on ``weights.device``.
    """
    module = _require()
    _cuda_float_input("weights", weights, 2, "[B, C]")
    B, C = weights.shape
    device = weights.device
    w32 = (weights if weights.dtype == torch.float32 else weights.to(torch.float32)).contiguous()
    cap = _as_index_tensor("capacity", capacity, f"[B={B}, C={C}]", 2, B, device)
    if cap.shape[1] != C:
        raise ValueError(f"capacity must have shape [B={B}, C={C}], got {list(capacity.shape)}")
    out = torch.empty((B, C), device=device, dtype=torch.int64)
    if B == 0 or C == 0:
        return out
    workspace = torch.empty(module.crop_budgets_workspace_bytes(B, C), dtype=torch.uint8, device=device)
    _launch(
        module.crop_budgets, device, w32.data_ptr(), cap.data_ptr(), B, C, int(k), workspace.data_ptr(), workspace.numel(), out.data_ptr()
    )
    return out


def crop_topk(scores: Tensor, crop_sizes: Tensor, budgets: Tensor, k: int, sorted: bool = True) -> Tensor:
    """Top ``budgets[b, c]`` tokens by ``scores`` inside each contiguous crop, on the CUDA kernel.

    Args:
        scores: ``[B, N]`` float CUDA tensor, converted to float32 (NaN ranks last).
        crop_sizes: ``[B, C]`` integer crop sizes from token 0 (summing to at most ``N``).
        budgets: ``[B, C]`` integer, ``0 <= budgets <= crop_sizes``, rows summing to ``k``.
        k: picks per row.
        sorted: ascending indices, or crops in order with descending score inside.

    Returns:
        int64 ``[B, k]`` on ``scores.device``.
    """
    module = _require()
    _cuda_float_input("scores", scores, 2, "[B, N]")
    B, N = scores.shape
    device = scores.device
    s32 = (scores if scores.dtype == torch.float32 else scores.to(torch.float32)).contiguous()
    sizes = _as_index_tensor("crop_sizes", crop_sizes, f"[B={B}, C]", 2, B, device)
    q = _as_index_tensor("budgets", budgets, f"[B={B}, C]", 2, B, device)
    if sizes.shape != q.shape:
        raise ValueError(f"crop_sizes and budgets must have the same shape, got {list(sizes.shape)} and {list(q.shape)}")
    C = sizes.shape[1]
    k = int(k)
    out = torch.empty((B, k), device=device, dtype=torch.int64)
    if B == 0:
        return out
    workspace = torch.empty(module.crop_topk_workspace_bytes(B, C), dtype=torch.uint8, device=device)
    _launch(
        module.crop_topk,
        device,
        s32.data_ptr(),
        B,
        N,
        sizes.data_ptr(),
        q.data_ptr(),
        C,
        k,
        bool(sorted),
        workspace.data_ptr(),
        workspace.numel(),
        out.data_ptr(),
    )
    return out
