"""Bad input raises a clear error naming the argument (SPEC §4), and edge inputs behave.

Errors are raised by the wrappers before any backend runs, so most of these tests use
``backend="reference"`` and pass whatever fast backends exist. The behaviour tests at the
end (non-contiguous inputs, B = 0, zero vectors, NaN/Inf) run for every backend usable here.
"""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune import _dispatch
from conftest import DEVICE, OTHER_DEVICE, assert_valid_selection, backend_params, check_greedy_picks

REF = "reference"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tok(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=_gen(seed)).to(device=DEVICE, dtype=dtype)


def _sal(*shape, seed=1, dtype=torch.float32):
    return torch.rand(shape, generator=_gen(seed)).to(device=DEVICE, dtype=dtype)


def scope(tokens=None, saliency=None, k=2, **kw):
    tokens = _tok(2, 6, 4) if tokens is None else tokens
    saliency = _sal(2, 6) if saliency is None else saliency
    kw.setdefault("backend", REF)
    return vtprune.fused_scope_select(tokens, saliency, k, **kw)


def holov(tokens=None, attn=None, k=2, **kw):
    tokens = _tok(2, 6, 4) if tokens is None else tokens
    attn = _sal(2, 6) if attn is None else attn
    kw.setdefault("backend", REF)
    return vtprune.holov_select(tokens, attn, k, **kw)


def varlen(tokens=None, saliency=None, cu=None, k=2, **kw):
    tokens = _tok(7, 4) if tokens is None else tokens
    saliency = _sal(7) if saliency is None else saliency
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE) if cu is None else cu
    kw.setdefault("backend", REF)
    return vtprune.scope_select_varlen(tokens, saliency, cu, k, **kw)


def _ints(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("fn", [scope, holov], ids=["scope", "holov"])
@pytest.mark.parametrize("shape", [(6,), (1, 2, 6, 4), ()], ids=["1d", "4d", "0d"])
def test_tokens_wrong_rank(fn, shape):
    with pytest.raises(ValueError, match="tokens"):
        fn(tokens=_tok(*shape))


def test_tokens_no_features():
    with pytest.raises(ValueError, match="tokens"):
        scope(tokens=torch.empty(2, 6, 0, device=DEVICE))


@pytest.mark.parametrize(
    "fn,name", [(scope, "saliency"), (holov, "attn")], ids=["scope", "holov"]
)
@pytest.mark.parametrize("shape", [(6,), (2, 6, 1), (12,)], ids=["1d", "3d", "flat"])
def test_saliency_wrong_rank(fn, name, shape):
    key = "saliency" if fn is scope else "attn"
    with pytest.raises(ValueError, match=name):
        fn(**{key: _sal(*shape)})


def test_unbatched_saliency_wrong_rank():
    with pytest.raises(ValueError, match="saliency"):
        scope(tokens=_tok(6, 4), saliency=_sal(1, 6))


@pytest.mark.parametrize("fn,key", [(scope, "saliency"), (holov, "attn")], ids=["scope", "holov"])
@pytest.mark.parametrize("shape", [(3, 6), (1, 6), (2, 5), (2, 7)], ids=["B+1", "B-1", "N-1", "N+1"])
def test_batch_or_length_mismatch(fn, key, shape):
    with pytest.raises(ValueError, match=key):
        fn(**{key: _sal(*shape)})


def test_unbatched_length_mismatch():
    with pytest.raises(ValueError, match="saliency"):
        scope(tokens=_tok(6, 4), saliency=_sal(5))


# ----------------------------------------------------------------------------- k, alpha, choices


@pytest.mark.parametrize("fn", [scope, holov], ids=["scope", "holov"])
@pytest.mark.parametrize("k", [2.0, True, torch.tensor(2), "2", None], ids=["float", "bool", "tensor", "str", "none"])
def test_k_not_an_int(fn, k):
    with pytest.raises(TypeError, match="k"):
        fn(k=k)


@pytest.mark.parametrize("fn", [scope, holov], ids=["scope", "holov"])
@pytest.mark.parametrize("k", [0, -1, 7, 100], ids=["0", "neg", "N+1", "big"])
def test_k_out_of_range(fn, k):
    with pytest.raises(ValueError, match="k"):
        fn(k=k)


def test_k_numpy_int_is_accepted():
    np = pytest.importorskip("numpy")
    out = scope(k=np.int64(3))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("fn", [scope, holov], ids=["scope", "holov"])
def test_k_above_some_length(fn):
    with pytest.raises(ValueError, match="k"):
        fn(k=4, lengths=_ints([6, 3]))


@pytest.mark.parametrize("fn", [scope, holov, varlen], ids=["scope", "holov", "varlen"])
@pytest.mark.parametrize("alpha", [-0.5, -1e-9, math.nan, math.inf, -math.inf], ids=["neg", "tiny-neg", "nan", "inf", "-inf"])
def test_alpha_bad_value(fn, alpha):
    with pytest.raises(ValueError, match="alpha"):
        fn(alpha=alpha)


@pytest.mark.parametrize("alpha", ["1", torch.tensor(1.0), True, None], ids=["str", "tensor", "bool", "none"])
def test_alpha_bad_type(alpha):
    with pytest.raises(TypeError, match="alpha"):
        scope(alpha=alpha)


@pytest.mark.parametrize("fn", [scope, varlen], ids=["scope", "varlen"])
@pytest.mark.parametrize("combine", ["sum", "MUL", "", None])
def test_unknown_combine(fn, combine):
    with pytest.raises(ValueError, match="combine"):
        fn(combine=combine)


@pytest.mark.parametrize("rank_by", ["h", "ATTN", None])
def test_unknown_rank_by(rank_by):
    with pytest.raises(ValueError, match="rank_by"):
        holov(rank_by=rank_by)


UNKNOWN_BACKEND_CALLS = {
    "scope": lambda b: scope(backend=b),
    "varlen": lambda b: varlen(backend=b),
    "holov": lambda b: holov(backend=b),
    "crop_budgets": lambda b: vtprune.crop_budgets(_sal(2, 3), 2, _ints([[2, 2, 2]] * 2), backend=b),
    "crop_topk": lambda b: vtprune.crop_topk(_sal(2, 6), 2, _ints([[1, 1]] * 2), backend=b),
    "facility_location": lambda b: vtprune.facility_location(_tok(2, 6, 4), _ints([[0], [1]]), backend=b),
    "theta_coverage": lambda b: vtprune.theta_coverage(_tok(2, 6, 4), _ints([[0], [1]]), 0.5, backend=b),
    "attention_importance": lambda b: vtprune.attention_importance(
        _tok(1, 2, 5, 4), _tok(1, 2, 5, 4, seed=3), _ints([[0, 0, 1, 1, 1]]), backend=b
    ),
    "lowrank_factorize": lambda b: vtprune.lowrank_factorize(_tok(5, 4), 2, backend=b),
    "gather_tokens": lambda b: vtprune.gather_tokens(_tok(2, 6, 4), _ints([[0], [1]]), backend=b),
}


@pytest.mark.parametrize("call", list(UNKNOWN_BACKEND_CALLS.values()), ids=list(UNKNOWN_BACKEND_CALLS))
@pytest.mark.parametrize("backend", ["gpu", "Torch", "", None])
def test_unknown_backend(call, backend):
    with pytest.raises(ValueError, match="backend"):
        call(backend)


# ----------------------------------------------------------------------------- dtypes and devices


@pytest.mark.parametrize("fn", [scope, holov], ids=["scope", "holov"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_tokens_bad_dtype(fn, dtype):
    with pytest.raises(TypeError, match="tokens"):
        fn(tokens=torch.ones(2, 6, 4, device=DEVICE).to(dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_saliency_bad_dtype(dtype):
    with pytest.raises(TypeError, match="saliency"):
        scope(saliency=torch.ones(2, 6, device=DEVICE).to(dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_varlen_tokens_bad_dtype(dtype):
    with pytest.raises(TypeError, match="tokens"):
        varlen(tokens=torch.ones(7, 4, device=DEVICE).to(dtype))


def test_tokens_not_a_tensor():
    with pytest.raises(TypeError, match="tokens"):
        scope(tokens=[[0.0, 1.0]] * 6)


@pytest.mark.parametrize("fn,key", [(scope, "saliency"), (holov, "attn")], ids=["scope", "holov"])
def test_saliency_on_other_device(fn, key):
    with pytest.raises(ValueError, match=key):
        fn(**{key: torch.rand(2, 6, device=OTHER_DEVICE)})


def test_varlen_saliency_on_other_device():
    with pytest.raises(ValueError, match="saliency"):
        varlen(saliency=torch.rand(7, device=OTHER_DEVICE))


def test_facility_indices_on_other_device():
    with pytest.raises(ValueError, match="indices"):
        vtprune.facility_location(_tok(2, 6, 4), torch.zeros(2, 1, dtype=torch.int64, device=OTHER_DEVICE), backend=REF)


def test_attention_importance_k_on_other_device():
    q = _tok(1, 2, 5, 4)
    with pytest.raises(ValueError, match="k must be on the same device"):
        vtprune.attention_importance(q, torch.rand(1, 2, 5, 4, device=OTHER_DEVICE), _ints([[0] * 5]), backend=REF)


# ----------------------------------------------------------------------------- lengths, cu_seqlens, per-sequence k


@pytest.mark.parametrize("fn", [scope, holov], ids=["scope", "holov"])
@pytest.mark.parametrize("lengths", [[6], [6, 6, 6], [[6, 6]], [[6], [6]]], ids=["B-1", "B+1", "2d-row", "2d-col"])
def test_lengths_wrong_shape(fn, lengths):
    with pytest.raises(ValueError, match="lengths"):
        fn(lengths=_ints(lengths))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int16, torch.uint8])
def test_lengths_wrong_dtype(dtype):
    with pytest.raises(TypeError, match="lengths"):
        scope(lengths=torch.tensor([6, 5], device=DEVICE).to(dtype))


def test_lengths_not_a_tensor():
    with pytest.raises(TypeError, match="lengths"):
        scope(lengths=[6, 5])


@pytest.mark.parametrize("fn", [scope, holov], ids=["scope", "holov"])
@pytest.mark.parametrize("lengths", [[0, 6], [6, 7], [-1, 6], [6, 100]], ids=["0", "N+1", "neg", "big"])
def test_lengths_out_of_range(fn, lengths):
    with pytest.raises(ValueError, match="lengths"):
        fn(k=1, lengths=_ints(lengths))


@pytest.mark.parametrize(
    "cu",
    [[0, 3, 3, 7], [0, 5, 3, 7], [0, 3, 6], [0, 3, 8], [1, 3, 7], [-1, 3, 7], [0]],
    ids=["flat", "decreasing", "short-end", "long-end", "start-1", "start-neg", "only-0"],
)
def test_cu_seqlens_bad_values(cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen(cu=_ints(cu, torch.int32), k=1)


def test_cu_seqlens_bad_dtype_and_shape():
    with pytest.raises(TypeError, match="cu_seqlens"):
        varlen(cu=torch.tensor([0.0, 3.0, 7.0], device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen(cu=_ints([[0, 3, 7]]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen(cu=_ints([]))


def test_varlen_shapes():
    with pytest.raises(ValueError, match="tokens"):
        varlen(tokens=_tok(1, 7, 4))
    with pytest.raises(ValueError, match="saliency"):
        varlen(saliency=_sal(1, 7))
    with pytest.raises(ValueError, match="saliency"):
        varlen(saliency=_sal(6))


@pytest.mark.parametrize("k", [[1, 5], [0, 1], [4, 1], [-1, 2]], ids=["over-2nd", "zero", "over-1st", "neg"])
def test_varlen_per_seq_k_out_of_range(k):
    # sequences of 3 and 4 tokens
    with pytest.raises(ValueError, match="k"):
        varlen(k=_ints(k))


@pytest.mark.parametrize("k", [0, 4, -2], ids=["zero", "over-shortest", "neg"])
def test_varlen_int_k_out_of_range(k):
    with pytest.raises(ValueError, match="k"):
        varlen(k=k)


@pytest.mark.parametrize(
    "max_seqlen,error,match",
    [(3, ValueError, "longest sequence"), (0, ValueError, ">= 1"), (-4, ValueError, ">= 1"), (4.0, TypeError, "int"),
     (True, TypeError, "int"), (_ints([4]), TypeError, "int")],
    ids=["below-longest", "zero", "neg", "float", "bool", "tensor"],
)
def test_varlen_bad_max_seqlen(max_seqlen, error, match):
    # sequences of 3 and 4 tokens: the bound must be an int >= 4
    with pytest.raises(error, match=f"max_seqlen.*{match}"):
        varlen(k=1, max_seqlen=max_seqlen)


@pytest.mark.parametrize(
    "k,total_k,error,match",
    [(1, 3, ValueError, "sum\\(k\\) = 2; got 3"), (_ints([2, 3]), 4, ValueError, "sum\\(k\\) = 5; got 4"),
     (_ints([2, 3]), -1, ValueError, ">= 0"), (1, 2.0, TypeError, "int"), (1, True, TypeError, "int")],
    ids=["int-k", "k-tensor", "neg", "float", "bool"],
)
def test_varlen_bad_total_k(k, total_k, error, match):
    # two sequences (3 and 4 tokens)
    with pytest.raises(error, match=f"total_k.*{match}"):
        varlen(k=k, total_k=total_k)


@pytest.mark.parametrize("backend", backend_params("scope_select_varlen"))
def test_varlen_wrong_total_k_unchecked_stays_in_bounds(backend):
    """Where the budgets are not read (GPU tensors, no check_values), a total_k other than sum(k)
    is not caught; the output then has total_k indices, wrong but each inside the sequence it is
    listed under (never an index a later gather would read out of bounds)."""
    if backend in ("torch", "reference"):
        pytest.skip("these always read the budgets (tested above)")
    from vtprune.bench.host_stubs import device_side_values

    x, s = _tok(12, 4), _sal(12)
    cu, ks = _ints([0, 3, 12], torch.int32), _ints([2, 4])
    for total in (4, 6, 9):
        with device_side_values():
            idx, cu_k = vtprune.scope_select_varlen(x, s, cu, ks, max_seqlen=9, total_k=total, sorted=False, backend=backend)
        assert idx.shape == (total,) and cu_k.tolist() == [0, 2, 6]
        assert bool(((idx >= 0) & (idx < 12)).all()), idx
        assert all(0 <= v < 3 for v in idx[:2].tolist()) and all(3 <= v < 12 for v in idx[2:].tolist()), idx
        if total == 6:
            want, _ = vtprune.scope_select_varlen(x, s, cu, ks, sorted=False, backend=backend)
            assert torch.equal(idx, want)


@pytest.mark.parametrize("backend", backend_params("scope_select_varlen"))
def test_varlen_max_seqlen_below_longest_checked_or_cut(backend):
    """A bound below the longest sequence is an error wherever the offsets are read; on the GPU
    path that reads nothing, the longer sequence is cut to its first max_seqlen tokens and no
    index leaves it."""
    x, s = _tok(12, 4), _sal(12)
    cu = _ints([0, 3, 12], torch.int32)
    with pytest.raises(ValueError, match="max_seqlen"):
        vtprune.scope_select_varlen(x, s, cu, 2, max_seqlen=5, backend=backend, check_values=True)
    if backend in ("torch", "reference"):
        return  # these always read the offsets (they do not clamp)
    from vtprune.bench.host_stubs import device_side_values

    with device_side_values():
        idx, cu_k = vtprune.scope_select_varlen(x, s, cu, 2, max_seqlen=5, sorted=False, backend=backend)
    assert cu_k.tolist() == [0, 2, 4]
    a, b = idx[:2].tolist(), idx[2:].tolist()
    assert len(set(a)) == 2 and all(0 <= v < 3 for v in a)
    assert len(set(b)) == 2 and all(3 <= v < 8 for v in b)
    check_greedy_picks(x[:3], s[:3], a, 1.0, "mul")
    check_greedy_picks(x[3:8], s[3:8], [v - 3 for v in b], 1.0, "mul")


def test_varlen_k_tensor_bad_shape_and_dtype():
    with pytest.raises(ValueError, match="k"):
        varlen(k=_ints([1, 1, 1]))
    with pytest.raises(TypeError, match="k"):
        varlen(k=torch.tensor([1.0, 1.0], device=DEVICE))
    with pytest.raises(TypeError, match="k"):
        varlen(k=1.0)


@pytest.mark.parametrize("num_crops", [0, -1, 7])
def test_num_crops_out_of_range(num_crops):
    with pytest.raises(ValueError, match="num_crops"):
        holov(num_crops=num_crops)


@pytest.mark.parametrize("num_crops", [2.0, True, torch.tensor(2)], ids=["float", "bool", "tensor"])
def test_num_crops_not_int(num_crops):
    with pytest.raises(TypeError, match="num_crops"):
        holov(num_crops=num_crops)


def test_num_crops_above_a_length():
    with pytest.raises(ValueError, match="num_crops"):
        holov(k=1, num_crops=4, lengths=_ints([6, 3]))


# ----------------------------------------------------------------------------- backends


@pytest.fixture
def fresh_status():
    """Clear the backend-status cache before and after (tests below change what it would say)."""
    _dispatch._status_cached.cache_clear()
    yield
    _dispatch._status_cached.cache_clear()


def test_cuda_backend_on_cpu_tensors(monkeypatch, fresh_status):
    # Pretend the CUDA module is usable: the device check must still refuse CPU tensors.
    monkeypatch.setattr(_dispatch, "_cuda_status", lambda: _dispatch.BackendStatus(True, "pretend"))
    x = torch.randn(2, 6, 4)
    s = torch.rand(2, 6)
    with pytest.raises(RuntimeError, match="cuda.*CUDA tensors"):
        vtprune.fused_scope_select(x, s, 2, backend="cuda")
    with pytest.raises(RuntimeError, match="cuda.*CUDA tensors"):
        vtprune.facility_location(x, torch.zeros(2, 1, dtype=torch.int64), backend="cuda")


def test_cuda_backend_on_cpu_tensors_real_status():
    """Without pretending: on this machine, cuda on CPU tensors is a RuntimeError naming cuda."""
    with pytest.raises(RuntimeError, match="cuda"):
        vtprune.fused_scope_select(torch.randn(2, 6, 4), torch.rand(2, 6), 2, backend="cuda")


def test_cuda_backend_unusable_says_why(monkeypatch, fresh_status):
    why = "vtprune._C was not built (pretend reason 1234)"
    monkeypatch.setattr(_dispatch, "_cuda_status", lambda: _dispatch.BackendStatus(False, why))
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: .*pretend reason 1234"):
        scope(tokens=_tok(2, 6, 4), backend="cuda")
    with pytest.raises(RuntimeError, match="pretend reason 1234"):
        vtprune.facility_location(_tok(2, 6, 4), _ints([[0], [1]]), backend="cuda")
    assert vtprune.backends()["cuda"].usable is False
    assert vtprune.backends()["cuda"].reason == why


def test_backends_report_every_backend():
    st = vtprune.backends()
    assert set(st) == {"reference", "torch", "triton", "cuda"}
    assert st["reference"].usable and st["torch"].usable
    for s in st.values():
        assert isinstance(s.reason, str) and s.reason
        assert bool(s) == s.usable


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only: with a GPU, triton takes CUDA tensors")
def test_triton_on_cpu_without_interpreter(monkeypatch, fresh_status):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _dispatch._status_cached.cache_clear()
    x = torch.randn(2, 6, 4)
    try:
        import triton  # noqa: F401

        why = "triton.*TRITON_INTERPRET"  # the message must say how to run on the CPU
    except ImportError:
        why = "triton.*not installed"
    with pytest.raises(RuntimeError, match=why):
        vtprune.facility_location(x, torch.zeros(2, 1, dtype=torch.int64), backend="triton")
    with pytest.raises(RuntimeError, match=why):
        vtprune.fused_scope_select(x, torch.rand(2, 6), 2, backend="triton")


def test_triton_on_cpu_tensors_with_gpu_present(monkeypatch, fresh_status):
    """With the interpreter off and triton usable, CPU tensors are refused (pretend a GPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_dispatch, "_triton_status", lambda: _dispatch.BackendStatus(True, "pretend GPU"))
    with pytest.raises(RuntimeError, match="triton.*CUDA tensors"):
        vtprune.facility_location(torch.randn(2, 6, 4), torch.zeros(2, 1, dtype=torch.int64), backend="triton")


def _kernel_backend_fp64_cases():
    cases = []
    for name in ("triton", "cuda"):
        try:
            usable = _dispatch.status(name).usable and _dispatch._device_ok(name, DEVICE) is None
        except Exception:
            usable = False
        cases.append(
            pytest.param(name, id=name, marks=pytest.mark.skipif(not usable, reason=f"{name} cannot take {DEVICE} tensors here"))
        )
    return cases


@pytest.mark.parametrize("backend", _kernel_backend_fp64_cases())
def test_fp64_with_kernel_backends(backend):
    x = _tok(2, 6, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        vtprune.facility_location(x, _ints([[0], [1]]), backend=backend)
    with pytest.raises(TypeError, match=backend):
        vtprune.fused_scope_select(x, _sal(2, 6, dtype=torch.float64), 2, backend=backend)


def test_fp64_kernel_backend_refused_pretend(monkeypatch, fresh_status):
    """The dtype rule holds independently of the machine: pretend both kernel backends run here."""
    monkeypatch.setattr(_dispatch, "_triton_status", lambda: _dispatch.BackendStatus(True, "pretend"))
    monkeypatch.setattr(_dispatch, "_cuda_status", lambda: _dispatch.BackendStatus(True, "pretend"))
    monkeypatch.setattr(_dispatch, "_device_ok", _pretend_device_ok(_dispatch._device_ok))
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    for backend in ("triton", "cuda"):
        with pytest.raises(TypeError, match=f"backend='{backend}'.*float64"):
            vtprune.facility_location(x, torch.zeros(2, 1, dtype=torch.int64), backend=backend)


def _pretend_device_ok(real):
    """_device_ok that treats every device as a CUDA device (only the dtype rule remains)."""

    def device_ok(backend, device, dtype=None):
        return real(backend, torch.device("cuda"), dtype)

    return device_ok


# ----------------------------------------------------------------------------- HoloV building blocks


def test_crop_budgets_errors():
    w = _sal(2, 3)
    cap = _ints([[2, 2, 2], [3, 1, 0]])
    with pytest.raises(ValueError, match="k"):
        vtprune.crop_budgets(w, 5, cap, backend=REF)  # row 1 holds only 4
    with pytest.raises(ValueError, match="k"):
        vtprune.crop_budgets(w, 0, cap, backend=REF)
    with pytest.raises(TypeError, match="k"):
        vtprune.crop_budgets(w, 2.0, cap, backend=REF)
    with pytest.raises(ValueError, match="capacity"):
        vtprune.crop_budgets(w, 2, _ints([[2, -1, 2], [3, 1, 0]]), backend=REF)
    with pytest.raises(ValueError, match="capacity"):
        vtprune.crop_budgets(w, 2, _ints([[2, 2], [3, 1]]), backend=REF)
    with pytest.raises(ValueError, match="capacity"):
        vtprune.crop_budgets(w, 2, _ints([2, 2, 2]), backend=REF)
    with pytest.raises(TypeError, match="capacity"):
        vtprune.crop_budgets(w, 2, cap.float(), backend=REF)
    with pytest.raises(TypeError, match="weights"):
        vtprune.crop_budgets(cap, 2, cap, backend=REF)
    with pytest.raises(ValueError, match="weights"):
        vtprune.crop_budgets(_sal(1, 2, 3), 2, cap, backend=REF)


@pytest.mark.parametrize("backend", backend_params("crop_budgets"))
@pytest.mark.parametrize(
    "weights,k,cap", [([1.0, 1.0], 2, [5, 5]), ([0.9, 0.9, 0.9], 3, [1, 1, 1])], ids=["returns-4", "runtime-error"]
)
def test_crop_budgets_weights_summing_above_one(weights, k, cap, backend):
    """Either refuse (ValueError naming weights) or return budgets that sum to k within capacity."""
    try:
        out = vtprune.crop_budgets(torch.tensor(weights, device=DEVICE), k, _ints(cap), backend=backend)
    except ValueError as exc:
        assert "weights" in str(exc)
        return
    assert int(out.sum()) == k, out.tolist()
    assert (out <= _ints(cap)).all()


def test_crop_topk_errors():
    s = _sal(2, 6)
    with pytest.raises(ValueError, match="budgets"):
        vtprune.crop_topk(s, 2, _ints([[4, 0], [2, 2]]), backend=REF)  # crop size 3
    with pytest.raises(ValueError, match="budgets"):
        vtprune.crop_topk(s, 2, _ints([[-1, 3], [1, 1]]), k=2, backend=REF)
    with pytest.raises(ValueError, match="budgets"):
        vtprune.crop_topk(s, 2, _ints([[1, 1], [2, 1]]), backend=REF)  # rows sum to 2 and 3
    with pytest.raises(ValueError, match="budgets"):
        vtprune.crop_topk(s, 2, _ints([[1, 1], [1, 1]]), k=3, backend=REF)  # rows sum to 2, not k
    with pytest.raises(ValueError, match="crop_sizes"):
        vtprune.crop_topk(s, 7, _ints([[1] * 7] * 2), backend=REF)
    with pytest.raises(ValueError, match="crop_sizes"):
        vtprune.crop_topk(s, _ints([[4, 4], [3, 3]]), _ints([[1, 1], [1, 1]]), backend=REF)  # 8 > N
    with pytest.raises(ValueError, match="crop_sizes"):
        vtprune.crop_topk(s, _ints([[3, 3, 0], [3, 3, 0]]), _ints([[1, 1], [1, 1]]), backend=REF)
    with pytest.raises(TypeError, match="budgets"):
        vtprune.crop_topk(s, 2, torch.ones(2, 2, device=DEVICE), backend=REF)
    with pytest.raises(TypeError, match="scores"):
        vtprune.crop_topk(_ints([[1] * 6] * 2), 2, _ints([[1, 1], [1, 1]]), backend=REF)


def test_facility_location_indices_out_of_range():
    x = _tok(2, 6, 4)
    for bad in ([[0, 6], [1, 2]], [[0, 1], [-1, 2]], [[0, 100], [1, 2]]):
        with pytest.raises(ValueError, match="indices"):
            vtprune.facility_location(x, _ints(bad), backend=REF)
    with pytest.raises(ValueError, match="indices"):  # valid for N but not below lengths[1] = 3
        vtprune.facility_location(x, _ints([[0, 1], [1, 4]]), lengths=_ints([6, 3]), backend=REF)
    with pytest.raises(TypeError, match="indices"):
        vtprune.facility_location(x, torch.zeros(2, 1, device=DEVICE), backend=REF)
    with pytest.raises(ValueError, match="indices"):
        vtprune.facility_location(x, _ints([0, 1]), backend=REF)  # [K] for batched tokens
    with pytest.raises(ValueError, match="indices"):
        vtprune.facility_location(x, _ints([[0], [1], [2]]), backend=REF)  # B mismatch
    with pytest.raises(ValueError, match="theta"):
        vtprune.theta_coverage(x, _ints([[0], [1]]), 1.5, backend=REF)


def test_gather_tokens_indices_out_of_range():
    with pytest.raises(ValueError, match="indices"):
        vtprune.gather_tokens(_tok(2, 6, 4), _ints([[0], [6]]), backend=REF)


# ----------------------------------------------------------------------------- ALVTS


def _qk(hq=4, hk=2, length=5, d=3, b=1):
    return _tok(b, hq, length, d, seed=5), _tok(b, hk, length, d, seed=6)


def test_attention_importance_errors():
    q, k = _qk()
    groups = _ints([[0, 0, 1, 1, -1]])
    attn = vtprune.attention_importance
    with pytest.raises(ValueError, match="heads"):
        attn(q, _tok(1, 3, 5, 3), groups, backend=REF)  # 4 query heads, 3 kv heads
    with pytest.raises(ValueError, match="k must have shape"):
        attn(q, _tok(1, 2, 6, 3), groups, backend=REF)
    with pytest.raises(ValueError, match="k must have shape"):
        attn(q, _tok(1, 2, 5, 4), groups, backend=REF)
    with pytest.raises(ValueError, match="k must have shape"):
        attn(q, _tok(2, 2, 5, 3), groups, backend=REF)
    with pytest.raises(ValueError, match="q must have shape"):
        attn(q[0], k[0], groups, backend=REF)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        attn(q, k.double(), groups, backend=REF)
    with pytest.raises(ValueError, match="query_groups"):
        attn(q, k, _ints([[0, 0, 1, 1]]), backend=REF)
    with pytest.raises(ValueError, match="query_groups"):
        attn(q, k, groups.float(), backend=REF)
    with pytest.raises(ValueError, match="query_groups"):
        attn(q, k, _ints([[0, 0, 1, 2, 0]]), num_groups=2, backend=REF)
    with pytest.raises(ValueError, match="query_groups"):
        attn(q, k, _ints([[0, -2, 1, 1, 0]]), num_groups=2, backend=REF)
    with pytest.raises(ValueError, match="num_groups"):
        attn(q, k, groups, num_groups=0, backend=REF)
    for key_range in [(3, 3), (-1, 2), (0, 6), (4, 2)]:
        with pytest.raises(ValueError, match="key_range"):
            attn(q, k, groups, key_range=key_range, backend=REF)
    with pytest.raises(TypeError, match="key_range"):
        attn(q, k, groups, key_range=(0.0, 2), backend=REF)


@pytest.mark.parametrize("rank", [0, -1, 5])
def test_lowrank_factorize_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        vtprune.lowrank_factorize(_tok(6, 4), rank, backend=REF)


def test_lowrank_factorize_bad_inputs():
    with pytest.raises(TypeError, match="rank"):
        vtprune.lowrank_factorize(_tok(6, 4), 2.0)
    with pytest.raises(ValueError, match="weight"):
        vtprune.lowrank_factorize(_tok(2, 6, 4), 2)
    with pytest.raises(TypeError, match="weight"):
        vtprune.lowrank_factorize(_ints([[1, 2], [3, 4]]), 1)


def _selector(d=8, rank=4, head_dim=4):
    w_q, w_k = _tok(8, d, seed=11), _tok(8, d, seed=12)
    return vtprune.LowRankSelector.from_weights(w_q, w_k, rank, head_dim=head_dim)


def test_alvts_visual_mask_errors():
    sel = _selector()
    x = _tok(2, 6, 8)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="visual_mask"):
        vtprune.alvts_scores(x, sel, mask, backend=REF)  # 3 and 2 visual tokens
    with pytest.raises(ValueError, match="visual_mask"):
        vtprune.alvts_scores(x, sel, torch.zeros(2, 6, dtype=torch.bool, device=DEVICE), backend=REF)
    with pytest.raises(ValueError, match="visual_mask"):
        vtprune.alvts_scores(x, sel, mask[:, :5], backend=REF)
    with pytest.raises(TypeError, match="visual_mask"):
        vtprune.alvts_scores(x, sel, mask.long(), backend=REF)
    with pytest.raises(TypeError, match="hidden"):
        vtprune.alvts_scores(x.long(), sel, mask, backend=REF)


# ----------------------------------------------------------------------------- behaviour on edge inputs, every backend


@pytest.mark.parametrize("backend", backend_params("scope_select"))
@pytest.mark.parametrize("sorted_", [True, False])
def test_scope_noncontiguous(backend, sorted_):
    base = _tok(3, 16, 40, seed=21)  # [B, D, N]
    x = base.transpose(1, 2)  # [B, N, D], non-contiguous
    s = _sal(40, 3, seed=22).T  # [B, N], non-contiguous
    assert not x.is_contiguous() and not s.is_contiguous()
    got = vtprune.fused_scope_select(x, s, 9, 0.7, sorted=sorted_, backend=backend)
    want = vtprune.fused_scope_select(x.contiguous(), s.contiguous(), 9, 0.7, sorted=sorted_, backend=backend)
    assert torch.equal(got, want)
    # a strided slice of a bigger tensor, too
    big = _tok(3, 80, 32, seed=23)
    x2 = big[:, ::2, ::2]
    got = vtprune.fused_scope_select(x2, s, 5, backend=backend)
    want = vtprune.fused_scope_select(x2.contiguous(), s.contiguous(), 5, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", backend_params("holov_select"))
def test_holov_noncontiguous(backend):
    x = _tok(2, 8, 36, seed=24).transpose(1, 2)
    a = _sal(36, 2, seed=25).T
    got = vtprune.holov_select(x, a, 6, num_crops=4, backend=backend)
    want = vtprune.holov_select(x.contiguous(), a.contiguous(), 6, num_crops=4, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", backend_params("scope_select_varlen"))
def test_varlen_noncontiguous(backend):
    x = _tok(8, 20, seed=26).T
    s = _sal(20, 2, seed=27)[:, 1]
    cu = _ints([0, 7, 20], torch.int32)
    got = vtprune.scope_select_varlen(x, s, cu, 3, backend=backend)
    want = vtprune.scope_select_varlen(x.contiguous(), s.contiguous(), cu, 3, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", backend_params("coverage_max_sim"))
def test_facility_location_noncontiguous(backend):
    x = _tok(2, 8, 30, seed=28).transpose(1, 2)
    idx = _ints([[0, 5, 9, 29], [3, 1, 2, 4]])
    idx_nc = _ints([[0, 3], [5, 1], [9, 2], [29, 4]]).T
    assert not idx_nc.is_contiguous()
    got = vtprune.facility_location(x, idx_nc, backend=backend)
    want = vtprune.facility_location(x.contiguous(), idx, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params("crop_topk"))
def test_crop_topk_noncontiguous(backend):
    s = _sal(12, 2, seed=29).T
    q = _ints([[1, 2], [2, 0], [0, 1]]).T  # [2, 3] non-contiguous
    got = vtprune.crop_topk(s, 3, q, backend=backend)
    want = vtprune.crop_topk(s.contiguous(), 3, q.contiguous(), backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", backend_params("crop_budgets"))
def test_crop_budgets_noncontiguous(backend):
    w = _sal(4, 2, seed=30)
    w = (w / w.sum(dim=0, keepdim=True)).T  # rows of normalized weights
    cap = _ints([[3, 3], [3, 3], [3, 3], [3, 0]]).T
    got = vtprune.crop_budgets(w, 5, cap, backend=backend)
    want = vtprune.crop_budgets(w.contiguous(), 5, cap.contiguous(), backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", backend_params("attention_importance"))
def test_attention_importance_noncontiguous(backend):
    q = _tok(1, 7, 4, 3, seed=31).permute(0, 2, 1, 3)  # [1, 4, 7, 3]
    k = _tok(1, 7, 2, 3, seed=32).permute(0, 2, 1, 3)
    g = _ints([[0, 0, 1, 1, 1, 0, -1]])
    got = vtprune.attention_importance(q, k, g, backend=backend)
    want = vtprune.attention_importance(q.contiguous(), k.contiguous(), g, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params("scope_select"))
def test_scope_empty_batch(backend):
    out = vtprune.fused_scope_select(_tok(0, 6, 4), _sal(0, 6), 3, backend=backend)
    assert out.shape == (0, 3) and out.dtype == torch.int64 and out.device == DEVICE


@pytest.mark.parametrize("backend", backend_params("holov_select"))
def test_holov_empty_batch(backend):
    out = vtprune.holov_select(_tok(0, 6, 4), _sal(0, 6), 3, backend=backend)
    assert out.shape == (0, 3) and out.dtype == torch.int64


@pytest.mark.parametrize("backend", backend_params("crop_topk"))
def test_crop_ops_empty_batch(backend):
    out = vtprune.crop_topk(_sal(0, 6), 2, torch.zeros(0, 2, dtype=torch.int64, device=DEVICE), k=2, backend=backend)
    assert out.shape == (0, 2) and out.dtype == torch.int64
    out = vtprune.crop_budgets(_sal(0, 3), 2, torch.zeros(0, 3, dtype=torch.int64, device=DEVICE), backend=backend)
    assert out.shape == (0, 3) and out.dtype == torch.int64


def test_varlen_empty_batch():
    idx, cu_k = vtprune.scope_select_varlen(_tok(0, 4), _sal(0), _ints([0], torch.int32), 1, backend=REF)
    assert idx.shape == (0,) and idx.dtype == torch.int64
    assert cu_k.tolist() == [0] and cu_k.dtype == torch.int32


@pytest.mark.parametrize("backend", backend_params("scope_select"))
def test_scope_zero_vectors(backend):
    x = _tok(2, 12, 5, seed=40)
    x[0, 0] = 0  # a zero token in image 0
    x[0, 7] = 0
    x[1] = 0  # image 1: every token zero
    s = _sal(2, 12, seed=41) + 0.1
    picks = vtprune.fused_scope_select(x, s, 5, 1.0, sorted=False, backend=backend)
    assert_valid_selection(picks, 5, 12)
    # With eps, a zero token has similarity 0 with everything: image 0 is the ordinary greedy
    # (a NaN similarity would make every gain NaN and give picks 0, 1, 2, 3, 4).
    check_greedy_picks(x[0], s[0], picks[0].tolist(), 1.0, "mul")
    # Image 1: every gain is 0, so every score is 0 and ties go to the lowest index.
    assert picks[1].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("backend", backend_params("coverage_max_sim"))
def test_facility_location_zero_vectors(backend):
    x = torch.zeros(1, 4, 3, device=DEVICE)
    x[0, 1] = torch.tensor([3.0, 4.0, 0.0])
    x[0, 2] = torch.tensor([6.0, 8.0, 0.0])
    # S = {0 (zero), 1}: token 0 has max(sim) = max(0, 0) = 0; tokens 1, 2 have 1; token 3 (zero) 0.
    fl = vtprune.facility_location(x, _ints([[0, 1]]), backend=backend)
    assert torch.isfinite(fl).all()
    torch.testing.assert_close(fl.cpu(), torch.tensor([2.0]), rtol=1e-5, atol=1e-5)
    # S = {3} (zero only): everything has similarity 0 -> 0; theta = 0 covers all of them.
    fl = vtprune.facility_location(x, _ints([[3]]), backend=backend)
    torch.testing.assert_close(fl.cpu(), torch.tensor([0.0]))
    cov = vtprune.theta_coverage(x, _ints([[3]]), 0.0, backend=backend)
    torch.testing.assert_close(cov.cpu(), torch.tensor([1.0]))


@pytest.mark.parametrize("backend", backend_params("holov_select"))
def test_holov_zero_vectors(backend):
    # Crop 0 (tokens 0-3) all zero with attn 0.2 each, crop 1 random with attn 0.01 each.
    # Crop 0: S = 0, var = 0, h = a = 200, score_0 = 200. Crop 1: a = 10, score_1 ~ 10 + 0.09 * 10
    # = 10.9. w_0 = 200 / 210.9 = 0.948: q_0 = floor(3.79) = 3, q_1 = 0, the leftover 1 goes to
    # crop 0 -> q = (4, 0): tokens 0..3. A NaN score_0 would put crop 0 last and pick from crop 1.
    x = torch.zeros(8, 6, device=DEVICE)
    x[4:] = _tok(4, 6, seed=42)
    a = torch.tensor([0.2] * 4 + [0.01] * 4, device=DEVICE)
    out = vtprune.holov_select(x, a, 4, num_crops=2, backend=backend)
    assert out.tolist() == [0, 1, 2, 3]
    out = vtprune.holov_select(torch.zeros(2, 8, 6, device=DEVICE), torch.ones(2, 8, device=DEVICE), 3, backend=backend)
    assert_valid_selection(out, 3, 8)


NONFINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_check_values_raises(bad):
    x, s = _tok(2, 6, 4), _sal(2, 6)
    xb, sb = x.clone(), s.clone()
    xb[1, 2, 0] = bad
    sb[0, 3] = bad
    with pytest.raises(ValueError, match="tokens"):
        vtprune.fused_scope_select(xb, s, 2, check_values=True, backend=REF)
    with pytest.raises(ValueError, match="saliency"):
        vtprune.fused_scope_select(x, sb, 2, check_values=True, backend=REF)
    with pytest.raises(ValueError, match="tokens"):
        vtprune.holov_select(xb, s, 2, check_values=True, backend=REF)
    with pytest.raises(ValueError, match="attn"):
        vtprune.holov_select(x, sb, 2, check_values=True, backend=REF)
    cu = _ints([0, 6, 12], torch.int32)
    with pytest.raises(ValueError, match="tokens"):
        vtprune.scope_select_varlen(xb.reshape(12, 4), s.reshape(12), cu, 2, check_values=True, backend=REF)
    with pytest.raises(ValueError, match="saliency"):
        vtprune.scope_select_varlen(x.reshape(12, 4), sb.reshape(12), cu, 2, check_values=True, backend=REF)


def _nonfinite_inputs(bad, seed=50):
    x, s = _tok(2, 10, 4, seed=seed), _sal(2, 10, seed=seed + 1)
    x[0, 3, 1] = bad  # one entry of a token
    x[1, :, 0] = bad  # a whole feature of every token of image 1
    s[0, 5] = bad
    s[1, 0] = bad
    return x, s


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", backend_params("scope_select"))
@pytest.mark.parametrize("sorted_", [True, False])
def test_scope_nonfinite_without_check(backend, bad, sorted_):
    x, s = _nonfinite_inputs(bad)
    first = vtprune.fused_scope_select(x, s, 6, sorted=sorted_, backend=backend)
    assert_valid_selection(first, 6, 10)
    second = vtprune.fused_scope_select(x, s, 6, sorted=sorted_, backend=backend)
    assert torch.equal(first, second)
    if sorted_:
        assert (first.diff(dim=-1) > 0).all()
    lens = _ints([7, 10])
    out = vtprune.fused_scope_select(x, s, 6, lengths=lens, sorted=sorted_, backend=backend)
    assert_valid_selection(out, 6, [7, 10])


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", backend_params("holov_select"))
@pytest.mark.parametrize("rank_by", ["attn", "score"])
def test_holov_nonfinite_without_check(backend, bad, rank_by):
    x, s = _nonfinite_inputs(bad)
    first = vtprune.holov_select(x, s, 6, num_crops=3, rank_by=rank_by, backend=backend)
    assert_valid_selection(first, 6, 10)
    assert torch.equal(first, vtprune.holov_select(x, s, 6, num_crops=3, rank_by=rank_by, backend=backend))
    out = vtprune.holov_select(x, s, 4, rank_by=rank_by, sorted=False, lengths=_ints([5, 10]), backend=backend)
    assert_valid_selection(out, 4, [5, 10])


@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", backend_params("scope_select_varlen"))
def test_varlen_nonfinite_without_check(backend, bad):
    x, s = _nonfinite_inputs(bad)
    cu = _ints([0, 4, 20], torch.int32)
    idx, cu_k = vtprune.scope_select_varlen(x.reshape(20, 4), s.reshape(20), cu, _ints([3, 7]), backend=backend)
    assert cu_k.tolist() == [0, 3, 10]
    a, b = idx[:3].tolist(), idx[3:].tolist()
    assert len(set(a)) == 3 and all(0 <= v < 4 for v in a)
    assert len(set(b)) == 7 and all(4 <= v < 20 for v in b)
    again, _ = vtprune.scope_select_varlen(x.reshape(20, 4), s.reshape(20), cu, _ints([3, 7]), backend=backend)
    assert torch.equal(idx, again)


@pytest.mark.parametrize("backend", backend_params("crop_topk"))
def test_crop_topk_nan_scores(backend):
    s = torch.tensor([[math.nan, 1.0, math.nan, 0.5, math.nan, math.nan]], device=DEVICE)
    out = vtprune.crop_topk(s, 2, _ints([[2, 3]]), backend=backend)
    # crop 0 = (nan, 1, nan): 1 first, then the NaNs rank last with the lowest index -> {1, 0};
    # crop 1 = (0.5, nan, nan): all three.
    assert out.tolist() == [[0, 1, 3, 4, 5]]
