"""Structural guards of the host overhead of the GPU paths (no timing: timed tests are flaky).

A call on CUDA tensors is timed from the host's first instruction to the last kernel's end, so
every torch op the host dispatches (~5-10 us of CPU each on a CUDA tensor) and every host<->device
sync counts as latency (``benchmarks/host_overhead.py`` measures both). These tests pin down:

* how many torch ops one ``fused_scope_select`` call dispatches on the ``cuda`` path (the CUDA
  emulator hook with launchers that do nothing) and on the ``triton`` path (kernels replaced by
  launchers that do nothing), counted at top level with ``torch.profiler``; the bounds below are
  the counts when they were set, so adding an op fails here until the bound is raised on purpose;
* that no public op's GPU path dispatches a sync (``item``, ``tolist``, ``bool(tensor)``,
  ``nonzero``, a tensor from a Python list, ...);
* the machinery that keeps the path short: the direct call in plain eager mode and when it
  must not be taken, the cached backend resolution, the cached constant tensors, the
  ``alpha = 1`` saliency weights, and where value checks read tensors.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune import _cuda, _dispatch, _validation, ops
from vtprune.bench import host_stubs
from vtprune.bench.host_stubs import top_level_ops
from vtprune.similarity import saliency_weights

triton = pytest.importorskip("triton", reason="triton is not installed")

#: Ops a GPU path must not dispatch: device->host reads (``int(t)``/``float(t)`` -> item,
#: ``bool(t)`` -> is_nonzero, ``t.tolist()`` -> resolve_conj/resolve_neg then a copy), ``nonzero``
#: (a sync for its output size), ``torch.tensor(list)`` (lift_fresh: a pageable host-to-device
#: copy on the GPU), ``equal``/``allclose`` (host bools), and copies (``_to_copy``/``copy_``: with
#: float32 inputs and int64 index tensors nothing needs converting, so any copy is a stray
#: host-to-device transfer or a wasted launch).
SYNC_OR_COPY = {
    "item", "_local_scalar_dense", "is_nonzero", "nonzero", "resolve_conj", "resolve_neg",
    "lift_fresh", "equal", "allclose", "_to_copy", "copy_", "masked_select", "unique",
}

#: Top-level torch ops of one fused_scope_select(x [1, N, D] fp32, s, k) call, kernels stubbed.
#: cuda (8): the similarity of fp32 tokens in torch (vtprune.similarity.scope_similarity: to,
#:   linalg_vector_norm, clamp_min, div, transpose, bmm = 6), the output and the workspace (2
#:   empty). The kernels read the weights from the saliency itself (alpha = 1) and write sorted
#:   output themselves, so neither a weights op nor a sort.
#: triton (11): the same 6 + output empty, and the scratch rows: one zeros, one unbind and two
#:   dtype views.
#: ``lengths`` given on the host adds its value check (tolist: resolve_conj, resolve_neg), which a
#: CUDA ``lengths`` skips (see test_value_checks_skip_device_tensors).
SCOPE_OPS_BOUND = {"cuda": 8, "triton": 11}
#: scope_select_varlen(tokens [64, 16], s, cu int32 [3], 8, max_seqlen=32): the same similarity
#: and picks (8 cuda, 11 triton), plus the packing around them (15): cu to int64, the
#: k fill, cu_k (arange), the starts (slice, unsqueeze), the lengths (diff, clamp to the bound),
#: the padded gather (arange, add, clamp, two index), the packed indices (add, reshape) and cu_k
#: back to int32.
VARLEN_OPS_BOUND = {"cuda": 23, "triton": 26}
LENGTHS_CHECK_OPS = 2


# ----------------------------------------------------------------------------- stubs


@pytest.fixture(params=["cuda", "triton"])
def stubbed(request, monkeypatch):
    """The backend name, with its kernel launches replaced by no-ops for the test."""
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with host_stubs.stubbed(request.param):
        yield request.param


def _scope_inputs(n: int = 32, d: int = 16, batch: int = 1):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, n, d, generator=g), torch.rand(batch, n, generator=g)


@pytest.fixture
def device_side_values():
    """Value checks decide as they would for index tensors on the GPU: only with check_values."""
    with host_stubs.device_side_values():
        yield


# ----------------------------------------------------------------------------- op counts


def test_scope_ops_per_call(stubbed):
    x, s = _scope_inputs()
    names = top_level_ops(lambda: vtprune.fused_scope_select(x, s, 8, backend=stubbed))
    assert len(names) <= SCOPE_OPS_BOUND[stubbed], names
    assert not SYNC_OR_COPY & set(names), names


def test_scope_ops_per_call_with_lengths(stubbed):
    x, s = _scope_inputs(batch=2)
    lengths = torch.tensor([32, 20])
    names = top_level_ops(lambda: vtprune.fused_scope_select(x, s, 8, lengths=lengths, backend=stubbed))
    assert len(names) <= SCOPE_OPS_BOUND[stubbed] + LENGTHS_CHECK_OPS, names


def test_varlen_ops_per_call(stubbed, device_side_values):
    x, s = _scope_inputs(batch=2)
    packed, sal_packed = x.reshape(64, 16), s.reshape(64)
    cu = torch.tensor([0, 32, 64], dtype=torch.int32)
    call = lambda: vtprune.scope_select_varlen(packed, sal_packed, cu, 8, max_seqlen=32, backend=stubbed)  # noqa: E731
    names = top_level_ops(call)
    assert len(names) <= VARLEN_OPS_BOUND[stubbed], names


def test_op_count_sees_an_added_op(stubbed, monkeypatch):
    """The count is sensitive: one more op in the path (here in the saliency weights) shows up,
    and the bound is then exceeded."""
    x, s = _scope_inputs()
    call = lambda: vtprune.fused_scope_select(x, s, 8, backend=stubbed)  # noqa: E731
    before = top_level_ops(call)
    real = _dispatch.kernel_weights

    def one_op_more(saliency, alpha):
        w, unit = real(saliency, alpha)
        return w.clone(), unit

    monkeypatch.setattr(_cuda, "_kernel_weights", one_op_more)
    import vtprune.triton_kernels.scope as tscope

    monkeypatch.setattr(tscope, "kernel_weights", one_op_more)
    after = top_level_ops(call)
    assert len(after) == len(before) + 1, (before, after)
    if len(before) == SCOPE_OPS_BOUND[stubbed]:
        assert len(after) > SCOPE_OPS_BOUND[stubbed]


def _gpu_path_calls(backend: str):
    g = torch.Generator().manual_seed(1)
    x, s = _scope_inputs(batch=2)
    lengths = torch.tensor([32, 20])
    w = torch.rand(2, 4, generator=g)
    cap = torch.full((2, 4), 8)
    sizes = torch.full((2, 4), 8)
    q = torch.full((2, 4), 2)
    packed, sal_packed = x.reshape(64, 16), s.reshape(64)
    cu = torch.tensor([0, 32, 64], dtype=torch.int32)
    ks = torch.tensor([8, 5])
    calls = {
        "fused_scope_select": lambda: vtprune.fused_scope_select(x, s, 8, backend=backend),
        "scope_select_varlen+max_seqlen": lambda: vtprune.scope_select_varlen(packed, sal_packed, cu, 8, max_seqlen=32, backend=backend),
        "scope_select_varlen+k tensor+max_seqlen+total_k": lambda: vtprune.scope_select_varlen(
            packed, sal_packed, cu, ks, max_seqlen=32, total_k=13, backend=backend
        ),
        "fused_scope_select+lengths": lambda: vtprune.fused_scope_select(x, s, 8, lengths=lengths, backend=backend),
        "holov_select": lambda: vtprune.holov_select(x, s, 8, backend=backend),
        "holov_select+lengths": lambda: vtprune.holov_select(x, s, 8, lengths=lengths, num_crops=2, backend=backend),
        "crop_budgets": lambda: vtprune.crop_budgets(w, 8, cap, backend=backend),
        "crop_topk": lambda: vtprune.crop_topk(s, sizes, q, k=8, backend=backend),
    }
    if backend == "triton":
        qa = torch.randn(2, 2, 16, 8, generator=g)
        groups = torch.zeros(2, 16, dtype=torch.int64)
        calls["attention_importance"] = lambda: vtprune.attention_importance(qa, qa, groups, num_groups=1, backend=backend)
    return calls


def test_no_sync_on_gpu_paths(stubbed, device_side_values):
    """With index tensors treated as device-resident, no public op's GPU path syncs or copies.
    (``scope_select_varlen`` syncs only when it is not told its output shapes: see below.)"""
    for name, call in _gpu_path_calls(stubbed).items():
        names = top_level_ops(call)
        assert not SYNC_OR_COPY & set(names), (name, names)


def test_varlen_syncs_once_without_its_shapes(stubbed, device_side_values):
    """Without max_seqlen (or with per-sequence budgets and no total_k), the padded batch's size is
    read from the device in one ``tolist`` of three values; the sync check above would see it."""
    x, s = _scope_inputs(batch=2)
    packed, sal_packed = x.reshape(64, 16), s.reshape(64)
    cu = torch.tensor([0, 32, 64], dtype=torch.int32)
    ks = torch.tensor([8, 5])
    for kw in ({"k": 8}, {"k": ks, "max_seqlen": 32}, {"k": ks, "total_k": 13}):
        k = kw.pop("k")
        names = top_level_ops(lambda: vtprune.scope_select_varlen(packed, sal_packed, cu, k, backend=stubbed, **kw))
        assert names.count("resolve_conj") == 1 and names.count("resolve_neg") == 1, names


def test_value_checks_skip_device_tensors():
    """Index tensors are read (for value checks) on the CPU, or anywhere with check_values."""
    cpu = torch.zeros(3, dtype=torch.int64)
    meta = torch.empty(3, dtype=torch.int64, device="meta")  # stands in for a GPU tensor
    assert _validation.read_values(cpu, False)
    assert not _validation.read_values(meta, False)
    assert _validation.read_values(meta, True)


def test_value_checks_still_raise_with_check_values(device_side_values):
    """Treated as device-resident, bad lengths pass unchecked by default (the kernels clamp) and
    raise the named error with check_values=True; the PyTorch backends, which do not clamp,
    always check."""
    x, s = _scope_inputs(batch=2)
    bad = torch.tensor([32, 0])
    with host_stubs.stubbed("cuda"):
        vtprune.fused_scope_select(x, s, 4, lengths=bad, backend="cuda")
        with pytest.raises(ValueError, match="lengths must lie in"):
            vtprune.fused_scope_select(x, s, 4, lengths=bad, backend="cuda", check_values=True)
    with pytest.raises(ValueError, match="lengths must lie in"):
        vtprune.fused_scope_select(x, s, 4, lengths=bad, backend="torch")


# ----------------------------------------------------------------------------- direct call


def _spy_custom_op(monkeypatch) -> list:
    entered = []
    real = ops._scope_select_op

    def spy(*args, **kwargs):
        entered.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "_scope_select_op", spy)
    return entered


def test_eager_call_skips_the_custom_op_with_the_same_result(monkeypatch):
    x, s = _scope_inputs(n=40, batch=3)
    via_op = torch.ops.vtprune.scope_select(x, s, 6, 1.0, "mul", None, True, "torch")
    entered = _spy_custom_op(monkeypatch)
    direct = vtprune.fused_scope_select(x, s, 6, backend="torch")
    assert not entered
    assert torch.equal(direct, via_op)


def test_custom_op_taken_when_something_could_observe_it(monkeypatch):
    """Dispatch modes, the profiler and tracked float inputs all see the op by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, s = _scope_inputs()
    entered = _spy_custom_op(monkeypatch)
    with Record() as mode:
        vtprune.fused_scope_select(x, s, 4, backend="torch")
    assert entered and any("vtprune.scope_select" in n for n in mode.names)
    entered.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        vtprune.fused_scope_select(x, s, 4, backend="torch")
    assert entered
    entered.clear()
    vtprune.fused_scope_select(x.requires_grad_(), s, 4, backend="torch")
    assert entered
    entered.clear()
    with torch.no_grad():
        vtprune.fused_scope_select(x, s, 4, backend="torch")
    assert not entered


def test_direct_predicate():
    x = torch.zeros(2, 3)
    assert ops._direct(x, None)
    assert not ops._direct(torch.empty(2, device="meta"))
    assert not ops._direct(torch.nn.Parameter(torch.zeros(2)))  # a subclass
    with torch.no_grad():
        assert ops._direct(torch.zeros(2, requires_grad=True))
    assert not ops._direct(torch.zeros(2, requires_grad=True))


# ----------------------------------------------------------------------------- caches


def test_resolve_is_cached_and_reads_the_table(monkeypatch):
    cpu = torch.device("cpu")
    name, impl = _dispatch.resolve("crop_budgets", "torch", cpu, torch.float32)
    assert name == "torch"
    table = _dispatch._ops("torch")
    marker = lambda *args: None  # noqa: E731
    monkeypatch.setitem(table, "crop_budgets", marker)
    assert _dispatch.resolve("crop_budgets", "torch", cpu, torch.float32) == ("torch", marker)


def test_resolve_cache_follows_status_changes(monkeypatch):
    """A pretended status must not outlive its test: clearing the status cache clears resolutions."""
    cpu = torch.device("cpu")
    _dispatch._status_cached.cache_clear()
    monkeypatch.setattr(_dispatch, "_cuda_status", lambda: _dispatch.BackendStatus(False, "pretend 4321"))
    try:
        with pytest.raises(RuntimeError, match="pretend 4321"):
            _dispatch.resolve("scope_select", "cuda", cpu, torch.float32)
        _dispatch.resolve("scope_select", "torch", cpu, torch.float32)
        assert _dispatch._RESOLVED
    finally:
        _dispatch._status_cached.cache_clear()
    assert not _dispatch._RESOLVED


def test_errors_are_not_cached():
    """A backend that cannot run raises afresh each time, with its reason of the moment."""
    for _ in range(2):
        with pytest.raises(RuntimeError, match="cuda"):
            _dispatch.resolve("scope_select", "cuda", torch.device("cpu"), torch.float32)
    assert not [key for key in _dispatch._RESOLVED if key[:3] == ("scope_select", "cuda", "cpu") and not key[4]]


@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.5])
def test_kernel_weights_need_no_op_for_alpha_1_and_0(alpha):
    """alpha = 1: the saliency itself (the kernels read max(s, 0)); alpha = 0: unit weights; any
    other alpha: the fp32 weights, whose max(., 0) is themselves. A strided row stride is fine,
    a strided last dim is not (the kernels read each row contiguously)."""
    s = torch.rand(2, 9, dtype=torch.bfloat16) - 0.5
    for sal in (s, torch.rand(2, 12, dtype=torch.bfloat16)[:, :9]):
        names = top_level_ops(lambda: _dispatch.kernel_weights(sal, alpha))
        w, unit = _dispatch.kernel_weights(sal, alpha)
        assert unit == (alpha == 0.0)
        if alpha in (0.0, 1.0):
            assert w is sal and names == []
        else:
            assert torch.equal(w, _dispatch.saliency_weights_f32(sal, alpha)) and w.stride(-1) == 1
    w, unit = _dispatch.kernel_weights(s.t().contiguous().t(), 1.0)
    assert not unit and w.dtype == torch.float32 and w.stride(-1) == 1


def test_constant_index():
    a = _dispatch.constant_index(3, 7, torch.device("cpu"))
    assert a.dtype == torch.int64 and a.tolist() == [7, 7, 7]
    assert _dispatch.constant_index(3, 7, torch.device("cpu")) is a
    assert _dispatch.constant_index(3, 8, torch.device("cpu")) is not a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.5, 2.0])
def test_saliency_weights_f32_bitwise(dtype, alpha):
    special = [float("nan"), -0.0, 0.0, -1.0, float("inf"), -float("inf"), 1e-40, 3.5, 1e38]
    s = torch.tensor(special).repeat(3, 1).to(dtype)
    for sal in (s, s.t().contiguous().t()):  # also a strided [B, N]
        got = _dispatch.saliency_weights_f32(sal, alpha)
        want = saliency_weights(sal, alpha).float().contiguous()
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
