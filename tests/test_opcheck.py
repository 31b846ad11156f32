"""The ``torch.ops.vtprune`` custom ops are well-formed, and the public API traces under torch.compile.

* ``torch.library.opcheck`` (schema, autograd registration, fake tensor, AOT dispatch) on
  every custom op, with every backend usable here that implements it (the backend name is
  the op's last argument).
* ``torch.compile(fullgraph=True)`` of small functions calling the public wrappers, equal
  to eager.
"""

from __future__ import annotations

import time

import pytest
import torch

import vtprune
from vtprune import _dispatch
from conftest import BACKEND_IMPORT_ERRORS, DEVICE, backends_to_test

I64 = dict(dtype=torch.int64, device=DEVICE)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=_g(seed)).to(DEVICE)


def _rand(*shape, seed=1):
    return torch.rand(shape, generator=_g(seed)).to(DEVICE)


# One or more sample argument tuples per op, without the trailing backend argument.
def _samples():
    x, s = _randn(2, 9, 5), _rand(2, 9)
    return {
        "scope_select": [
            (x, s, 3, 1.0, "mul", None, True),
            (x, s, 4, 0.5, "add", torch.tensor([9, 6], **I64), False),
        ],
        "scope_select_varlen": [
            (_randn(13, 4), _rand(13), torch.tensor([0, 4, 13], **I64), torch.tensor([2, 5], **I64), 1.0, "mul", True),
            (_randn(13, 4), _rand(13), torch.tensor([0, 4, 13], **I64), torch.tensor([3, 3], **I64), 0.5, "add", False),
            (_randn(13, 4), _rand(13), torch.tensor([0, 4, 13], **I64), torch.tensor([4, 2], **I64), 1.0, "mul", False),
        ],
        "holov_select": [
            (x, s, 4, None, 0.09, "attn", None, True),
            (x, s, 3, 2, 1.0, "score", torch.tensor([9, 7], **I64), False),
        ],
        "crop_budgets": [
            (torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], device=DEVICE), 5, torch.tensor([[3, 3, 3], [2, 0, 9]], **I64)),
        ],
        "crop_topk": [
            (s, torch.tensor([[3, 3, 3], [4, 3, 2]], **I64), torch.tensor([[1, 2, 0], [2, 0, 1]], **I64), 3, True),
            (s, torch.tensor([[5, 4], [5, 4]], **I64), torch.tensor([[2, 2], [1, 3]], **I64), 4, False),
        ],
        "coverage_max_sim": [
            (x, torch.tensor([[0, 3], [8, 1]], **I64), torch.tensor([9, 9], **I64)),
            (x, torch.tensor([[0, 3], [2, 1]], **I64), torch.tensor([9, 4], **I64)),
        ],
        "attention_importance": [
            (_randn(2, 4, 7, 3), _randn(2, 2, 7, 3, seed=5), torch.tensor([[0, 0, 1, 1, 1, -1, 0]] * 2, **I64), 2, True, 0.5, 0, 7),
            (_randn(1, 2, 6, 4), _randn(1, 2, 6, 4, seed=6), torch.tensor([[1, 1, 0, 0, 2, 2]], **I64), 3, False, 0.5, 2, 5),
        ],
    }


SAMPLES = _samples()

#: Keyword arguments after the backend, per (op, sample index): the varlen shape hints.
SAMPLE_KWARGS = {
    ("scope_select_varlen", 1): {"max_seqlen": 11, "k_uniform": 3},
    ("scope_select_varlen", 2): {"max_seqlen": 9, "total_k": 6},
}


def _registered_ops() -> set[str]:
    names = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("vtprune::")}
    return names


def test_every_custom_op_has_samples():
    assert _registered_ops() == set(SAMPLES)


def test_backend_modules_import():
    """A backend that says it is usable here must import and list its ops (nothing skipped silently)."""
    for name in ("reference", "torch", "triton", "cuda"):
        st = _dispatch.status(name)  # must not raise
        if st.usable:
            ops = _dispatch._ops(name)
            assert isinstance(ops, dict) and set(ops) <= set(SAMPLES), (name, sorted(ops))
    assert not BACKEND_IMPORT_ERRORS, BACKEND_IMPORT_ERRORS
    # the reference and torch backends implement everything
    for name in ("reference", "torch"):
        assert set(_dispatch._ops(name)) == set(SAMPLES), name


def _opcheck_params():
    params = []
    for op, samples in SAMPLES.items():
        for backend in backends_to_test(op):
            for i in range(len(samples)):
                marks = KNOWN_OPCHECK_BUGS.get((op, backend, i), ())
                params.append(pytest.param(op, backend, i, id=f"{op}-{backend}-{i}", marks=marks))
    return params


KNOWN_OPCHECK_BUGS: dict = {}


@pytest.mark.parametrize("op,backend,i", _opcheck_params())
def test_opcheck(op, backend, i):
    args = SAMPLES[op][i] + (backend,)
    packet = getattr(torch.ops.vtprune, op)
    torch.library.opcheck(packet.default, args, SAMPLE_KWARGS.get((op, i), {}))


# ----------------------------------------------------------------------------- torch.compile


def _compile_cases():
    cases = []
    for backend in backends_to_test("scope_select"):
        cases.append(pytest.param("scope", backend, id=f"scope-{backend}"))
        cases.append(pytest.param("scope_lengths", backend, id=f"scope_lengths-{backend}"))
    for backend in backends_to_test("holov_select"):
        cases.append(pytest.param("holov", backend, id=f"holov-{backend}"))
    for backend in backends_to_test("coverage_max_sim"):
        cases.append(pytest.param("facility", backend, id=f"facility-{backend}"))
    return cases


def _fn(kind, backend):
    if kind == "scope":

        def fn(x, s):
            idx = vtprune.fused_scope_select(x, s, 5, 0.8, backend=backend)
            return idx, vtprune.gather_tokens(x, idx)

    elif kind == "scope_lengths":

        def fn(x, s):
            lens = torch.tensor([12, 7], device=x.device)
            idx = vtprune.fused_scope_select(x, s, 4, combine="add", lengths=lens, sorted=False, backend=backend)
            return idx, vtprune.gather_tokens(x, idx) * 2

    elif kind == "holov":

        def fn(x, s):
            idx = vtprune.holov_select(x, s, 5, num_crops=3, backend=backend)
            return idx, vtprune.gather_tokens(x, idx)

    else:

        def fn(x, s):
            idx = torch.topk(s, 4, dim=-1).indices
            return vtprune.facility_location(x, idx, backend=backend), vtprune.gather_tokens(x, idx)

    return fn


def _assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,backend", _compile_cases())
def test_compile_fullgraph_aot_eager(kind, backend):
    torch._dynamo.reset()
    x, s = _randn(2, 12, 6, seed=10), _rand(2, 12, seed=11)
    fn = _fn(kind, backend)
    eager = fn(x, s)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(compiled(x, s), eager)
    # new values, same shapes: no stale results
    x2, s2 = _randn(2, 12, 6, seed=12), _rand(2, 12, seed=13)
    _assert_same(compiled(x2, s2), fn(x2, s2))


def _unbatched_fn(x, s):
    idx = vtprune.fused_scope_select(x, s, 3)
    return idx, vtprune.gather_tokens(x, idx), vtprune.facility_location(x, idx), vtprune.holov_select(x, s, 3)


def test_compile_fullgraph_unbatched_automatic_dynamic():
    """Unbatched inputs; new N on each call (dynamo recompiles with dynamic shapes after the first)."""
    torch._dynamo.reset()
    compiled = torch.compile(_unbatched_fn, fullgraph=True, backend="aot_eager")
    for n in (9, 17, 30):
        x, s = _randn(n, 4, seed=n), _rand(n, seed=n + 1)
        _assert_same(compiled(x, s), _unbatched_fn(x, s))


def test_compile_fullgraph_dynamic_true():
    """A symbolic alpha (dynamic=True) must not break the graph in the checks."""
    torch._dynamo.reset()
    compiled = torch.compile(_unbatched_fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (9, 17):
        x, s = _randn(n, 4, seed=n), _rand(n, seed=n + 1)
        _assert_same(compiled(x, s), _unbatched_fn(x, s))


def test_compile_fullgraph_varlen():
    """scope_select_varlen has a data-dependent output size (sum of k): it must still trace."""
    torch._dynamo.reset()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    ks = torch.tensor([2, 4], dtype=torch.int64, device=DEVICE)

    def fn(x, s):
        idx, cu_k = vtprune.scope_select_varlen(x, s, cu, ks)
        return idx, cu_k, x[idx]

    x, s = _randn(12, 4, seed=20), _rand(12, seed=21)
    eager = fn(x, s)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(compiled(x, s), eager)


def test_compile_fullgraph_varlen_static_size():
    """With one k for every sequence the output size B * k is static: the traced graph carries it
    (no unbacked size), and max_seqlen passes through."""
    torch._dynamo.reset()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    sizes = []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "scope_select_varlen" in str(node.target):
                sizes.append(tuple(node.meta["example_value"][0].shape))
        return gm

    def fn(x, s):
        idx, cu_k = vtprune.scope_select_varlen(x, s, cu, 3, max_seqlen=7)
        return idx, cu_k, x[idx]

    x, s = _randn(12, 4, seed=22), _rand(12, seed=23)
    eager = fn(x, s)
    _assert_same(torch.compile(fn, fullgraph=True, backend=record)(x, s), eager)
    assert sizes == [(6,)]
    # per-sequence budgets with their sum given: static too
    torch._dynamo.reset()
    sizes.clear()
    ks = torch.tensor([2, 5], device=DEVICE)

    def fn_k(x, s):
        idx, cu_k = vtprune.scope_select_varlen(x, s, cu, ks, max_seqlen=7, total_k=7)
        return idx, cu_k, x[idx]

    _assert_same(torch.compile(fn_k, fullgraph=True, backend=record)(x, s), fn_k(x, s))
    assert sizes == [(7,)]


def test_compile_inductor_scope():
    """The default (inductor) backend, once, on fused_scope_select + gather_tokens."""
    torch._dynamo.reset()

    def fn(x, s):
        idx = vtprune.fused_scope_select(x, s, 4)
        return idx, vtprune.gather_tokens(x, idx) + 1

    x, s = _randn(2, 10, 8, seed=30), _rand(2, 10, seed=31)
    start = time.perf_counter()
    compiled = torch.compile(fn, fullgraph=True)
    _assert_same(compiled(x, s), fn(x, s))
    elapsed = time.perf_counter() - start
    # not a benchmark: only a guard that the suite stays usable on a 2-core CI machine
    assert elapsed < 120, f"inductor compile took {elapsed:.0f} s"
