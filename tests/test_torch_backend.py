"""The optimized PyTorch backend (``vtprune.torch_backend``) against the reference.

Every entry of ``OPS`` is called with the internal signature (validated, batched inputs) on
fresh random inputs with a fixed seed per case, and compared with the matching function of
``vtprune.reference``: exact index equality in fp32/fp64, invariants (and, for SCOPE, a
coverage objective close to the reference's) in fp16/bf16. Shapes are odd on purpose
(N = 1, 7, 97, 577 and one 2881 for SCOPE), and the whole file stays well under a minute
on 2 CPU cores.

The CPU greedy loop of SCOPE has two engines, the C++ ``vtprune._cpu`` and the NumPy one it
falls back to without a compiler; every SCOPE test that reaches that loop runs with each
(``engine`` fixture), the ``cpp`` case skipped only where ``vtprune._cpu`` is not built.
"""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune import reference
from vtprune.torch_backend import OPS
from vtprune.torch_backend import attention as attention_mod
from vtprune.torch_backend import coverage as coverage_mod
from vtprune.torch_backend import holov as holov_mod
from vtprune.torch_backend import scope as scope_mod
from conftest import (
    assert_same_greedy,
    assert_valid_selection,
    check_greedy_picks,
    random_budget_case,
    random_crop_topk_case,
)

OP_NAMES = (
    "scope_select",
    "scope_select_varlen",
    "holov_select",
    "crop_budgets",
    "crop_topk",
    "coverage_max_sim",
    "attention_importance",
)
LOW = (torch.float16, torch.bfloat16)
CPU_ENGINE_BUILT, CPU_ENGINE_REASON = scope_mod.cpu_engine_status()


class _NoNumpyEngine:
    def __init__(self, *args, **kwargs):
        raise AssertionError("engine='cpp' must not fall back to the NumPy engine")


@pytest.fixture(params=["numpy", "cpp"])
def engine(request, monkeypatch):
    """Run the test with the CPU greedy loop forced to one engine."""
    if request.param == "cpp":
        if not CPU_ENGINE_BUILT:
            pytest.skip(f"vtprune._cpu: {CPU_ENGINE_REASON}")
        monkeypatch.setattr(scope_mod, "_CpuGreedy", _NoNumpyEngine)
    monkeypatch.setattr(scope_mod, "_ENGINE", request.param)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(b: int, n: int, d: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype)
    sal = torch.rand(b, n, generator=g, dtype=torch.float64).to(dtype)
    return x, sal


def test_ops_table_is_complete():
    assert set(OPS) == set(OP_NAMES)
    assert set(reference.OPS) >= set(OPS)


def test_outputs_are_contiguous():
    # the custom ops' fake implementations promise fresh contiguous outputs (torch.compile)
    x, sal = _tokens(2, 11, 4, seed=1)
    sizes = torch.tensor([[4, 4, 3], [5, 5, 1]])
    budgets = torch.tensor([[1, 1, 1], [2, 0, 1]])
    q = torch.randn(1, 2, 6, 4)
    outs = [
        OPS["scope_select"](x, sal, 3, 1.0, "mul", None, False),
        OPS["holov_select"](x, sal, 3, None, 0.09, "attn", None, False),
        OPS["crop_budgets"](torch.rand(2, 3), 3, sizes),
        OPS["crop_topk"](sal, sizes, budgets, 3, False),
        OPS["coverage_max_sim"](x, torch.tensor([[0, 1], [2, 3]]), torch.tensor([11, 8])),
        OPS["attention_importance"](q, q, torch.zeros(1, 6, dtype=torch.int64), 1, True, 0.5, 2, 5),
        *OPS["scope_select_varlen"](x[0], sal[0], torch.tensor([0, 5, 11]), torch.tensor([2, 3]), 1.0, "mul", False),
    ]
    assert all(o.is_contiguous() for o in outs)


# ----------------------------------------------------------------------------- SCOPE


SCOPE_CASES = [
    # (n, d, k, alpha, combine)
    (1, 8, 1, 1.0, "mul"),
    (7, 16, 7, 1.0, "mul"),
    (7, 16, 3, 0.5, "add"),
    (97, 64, 20, 1.0, "mul"),
    (97, 64, 33, 2.0, "add"),
    (577, 256, 64, 1.0, "mul"),
    (577, 128, 90, 0.7, "add"),
]


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "pick_order"])
@pytest.mark.parametrize("case", SCOPE_CASES, ids=lambda c: f"n{c[0]}-k{c[2]}-{c[4]}-a{c[3]}")
def test_scope_equals_reference_fp32(case, sorted_, engine):
    n, d, k, alpha, combine = case
    x, sal = _tokens(2, n, d, seed=n * 31 + k)
    got = OPS["scope_select"](x, sal, k, alpha, combine, None, sorted_)
    want = reference.scope_select(x, sal, k, alpha, combine, None, sorted_)
    assert got.dtype == torch.int64 and got.shape == (2, k)
    assert torch.equal(got, want)


def test_scope_equals_reference_large(engine):
    # the size the incremental update is for (LLaVA-NeXT-like N); one image keeps the reference's
    # dense k x N^2 loop affordable
    x, sal = _tokens(1, 2881, 192, seed=2881)
    got = OPS["scope_select"](x, sal, 48, 1.0, "mul", None, False)
    want = reference.scope_select(x, sal, 48, 1.0, "mul", None, False)
    assert torch.equal(got, want)


def test_scope_fp64_equals_reference(engine):
    x, sal = _tokens(2, 211, 48, seed=5, dtype=torch.float64)
    for combine in ("mul", "add"):
        got = OPS["scope_select"](x, sal, 40, 1.0, combine, None, False)
        assert torch.equal(got, reference.scope_select(x, sal, 40, 1.0, combine, None, False))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_scope_low_precision(dtype, engine):
    n, k = 577, 64
    x, sal = _tokens(2, n, 128, seed=11, dtype=dtype)
    got = OPS["scope_select"](x, sal, k, 1.0, "mul", None, True)
    want = reference.scope_select(x, sal, k, 1.0, "mul", None, True)
    assert_valid_selection(got, k, n)
    ours = reference.facility_location_from_max_sim(reference.coverage_max_sim(x, got, None))
    theirs = reference.facility_location_from_max_sim(reference.coverage_max_sim(x, want, None))
    assert torch.allclose(ours, theirs, rtol=1e-3), (ours, theirs)


def test_scope_pure_coverage_is_a_greedy_run(engine):
    # alpha = 0 on few tokens has exact ties (two tokens covering only each other have equal
    # gains): equal up to a tie, and the pick must be valid greedy either way
    x, sal = _tokens(3, 31, 16, seed=3)
    for combine in ("mul", "add"):
        got = OPS["scope_select"](x, sal, 20, 0.0, combine, None, False)
        want = reference.scope_select(x, sal, 20, 0.0, combine, None, False)
        for b in range(3):
            assert_same_greedy(got[b], want[b], x[b], sal[b], 0.0, combine)
            check_greedy_picks(x[b], sal[b], got[b], 0.0, combine)


@pytest.mark.parametrize("combine", ["mul", "add"])
def test_scope_batch_with_lengths_equals_each_image_alone(combine, engine):
    lens = [97, 50, 13, 97]
    x, sal = _tokens(4, 97, 40, seed=17)
    x[2, 13:] = float("nan")  # padding may hold anything
    lengths = torch.tensor(lens)
    k = 12
    got = OPS["scope_select"](x, sal, k, 1.0, combine, lengths, False)
    want = reference.scope_select(x, sal, k, 1.0, combine, lengths, False)
    assert torch.equal(got, want)
    for b, n in enumerate(lens):
        alone = OPS["scope_select"](x[b : b + 1, :n], sal[b : b + 1, :n], k, 1.0, combine, None, False)
        assert torch.equal(got[b], alone[0])


@pytest.mark.parametrize("batch", [1, 3], ids=["single", "batched"])
def test_scope_chunked_update_equals_reference(batch, monkeypatch, engine):
    # a few rows per chunk, so every step's update runs over several chunks
    monkeypatch.setattr(scope_mod, "_CHUNK_ELEMS", 97 * 5)
    x, sal = _tokens(batch, 97, 32, seed=19)
    lengths = torch.tensor([97, 61, 90][:batch])
    got = OPS["scope_select"](x, sal, 30, 1.0, "mul", lengths, False)
    assert torch.equal(got, reference.scope_select(x, sal, 30, 1.0, "mul", lengths, False))


def test_scope_varlen_equals_per_sequence_calls(engine):
    g = _gen(23)
    seqlens = [50, 1, 79, 70, 3]
    ks = [10, 1, 33, 5, 3]
    total = sum(seqlens)
    x = torch.randn(total, 24, generator=g)
    sal = torch.rand(total, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0).tolist()))
    k_per_seq = torch.tensor(ks)
    for sorted_ in (True, False):
        idx, cu_k = OPS["scope_select_varlen"](x, sal, cu, k_per_seq, 1.0, "mul", sorted_)
        ref_idx, ref_cu_k = reference.scope_select_varlen(x, sal, cu, k_per_seq, 1.0, "mul", sorted_)
        assert idx.dtype == torch.int64 and cu_k.dtype == torch.int64
        assert torch.equal(idx, ref_idx) and torch.equal(cu_k, ref_cu_k)
        for b, (n, kb) in enumerate(zip(seqlens, ks)):
            s0 = int(cu[b])
            alone = OPS["scope_select"](x[None, s0 : s0 + n], sal[None, s0 : s0 + n], kb, 1.0, "mul", None, sorted_)
            assert torch.equal(idx[int(cu_k[b]) : int(cu_k[b + 1])], alone[0] + s0)


def test_scope_pick_order_has_the_prefix_property(engine):
    x, sal = _tokens(2, 300, 32, seed=29)
    full = OPS["scope_select"](x, sal, 60, 1.0, "mul", None, False)
    for kk in (1, 17, 59):
        assert torch.equal(OPS["scope_select"](x, sal, kk, 1.0, "mul", None, False), full[:, :kk])


def _degenerate_inputs():
    g = _gen(31)
    x = torch.randn(2, 60, 16, generator=g)
    x[:, 10:30] = x[:, 5:6]  # duplicates: exactly tied gains
    x[:, 40:50] = 0  # zero tokens: gain exactly 0 forever
    sal = torch.rand(2, 60, generator=g)
    return x, sal


@pytest.mark.parametrize("batch", [1, 2], ids=["single", "batched"])
@pytest.mark.parametrize("combine", ["mul", "add"])
@pytest.mark.parametrize("saliency", ["ones", "zeros", "rand", "negative"])
def test_scope_degenerate_ties_break_like_the_reference(saliency, combine, batch, engine):
    x, sal = _degenerate_inputs()
    x, sal = x[:batch], sal[:batch]
    sal = {"ones": torch.ones_like(sal), "zeros": torch.zeros_like(sal), "rand": sal, "negative": -sal}[saliency]
    for alpha in (0.0, 1.0):
        got = OPS["scope_select"](x, sal, 55, alpha, combine, None, False)
        want = reference.scope_select(x, sal, 55, alpha, combine, None, False)
        assert_valid_selection(got, 55, 60)
        assert torch.equal(got, want), (alpha, got, want)


@pytest.mark.parametrize("batch", [1, 3], ids=["single", "batched"])
def test_scope_non_finite_inputs(batch, engine):
    g = _gen(37)
    x = torch.randn(batch, 60, 16, generator=g)
    sal = torch.rand(batch, 60, generator=g)
    sal[:, 3] = float("nan")
    sal[:, 9] = float("inf")
    got = OPS["scope_select"](x, sal, 12, 1.0, "mul", None, False)
    assert torch.equal(got, reference.scope_select(x, sal, 12, 1.0, "mul", None, False))
    x[:, 7, 3] = float("nan")  # a NaN token makes every gain NaN: the lowest indices, in order
    got = OPS["scope_select"](x, sal, 12, 1.0, "mul", None, False)
    assert torch.equal(got, reference.scope_select(x, sal, 12, 1.0, "mul", None, False))
    assert_valid_selection(got, 12, 60)


@pytest.mark.parametrize("combine", ["mul", "add"])
def test_scope_dense_loop_equals_reference(combine):
    # the sync-free loop that runs on CUDA tensors, exercised here on the CPU
    x, sal = _tokens(3, 120, 48, seed=41)
    lengths = torch.tensor([120, 77, 31])
    got = scope_mod.scope_picks(x, sal, 20, 1.0, combine, lengths, dense=True)
    assert torch.equal(got, reference.scope_select(x, sal, 20, 1.0, combine, lengths, False))
    xd, sd = _degenerate_inputs()
    got = scope_mod.scope_picks(xd, torch.ones_like(sd), 55, 0.0, combine, None, dense=True)
    assert torch.equal(got, reference.scope_select(xd, torch.ones_like(sd), 55, 0.0, combine, None, False))


def test_scope_blocked_similarity_is_exact_and_symmetric():
    x = torch.nn.functional.normalize(torch.randn(2, 700, 64, generator=_gen(43)), dim=-1)
    s = scope_mod._symmetric_similarity(x)
    assert torch.equal(s, s.mT)
    assert torch.allclose(s, x @ x.mT, atol=1e-6)


def _engine_case(g: torch.Generator, trial: int):
    """Random batched SCOPE inputs: gaussian, clustered or duplicated tokens, padding, both combines."""
    batch = int(torch.randint(1, 4, (1,), generator=g))
    n = int(torch.randint(1, 200, (1,), generator=g))
    d = int(torch.randint(2, 40, (1,), generator=g))
    kind = trial % 3
    if kind == 0:
        x = torch.randn(batch, n, d, generator=g)
    elif kind == 1:  # a few tight clusters: many near-equal gains, many fully covered tokens
        centers = torch.randn(batch, 4, d, generator=g)
        x = centers[:, torch.randint(0, 4, (n,), generator=g)] + 0.05 * torch.randn(batch, n, d, generator=g)
    else:  # exact duplicates and zero tokens
        x = torch.randn(batch, n, d, generator=g)
        x[:, n // 3 : n // 2] = x[:, : max(1, n // 6)].repeat(1, 3, 1)[:, : n // 2 - n // 3]
        x[:, -max(1, n // 8) :] = 0
    sal = torch.rand(batch, n, generator=g)
    if trial % 4 == 3:
        sal = torch.ones_like(sal)
    lengths = torch.randint(1, n + 1, (batch,), generator=g) if trial % 2 else None
    k = int(torch.randint(1, (n if lengths is None else int(lengths.min())) + 1, (1,), generator=g))
    alpha = (0.0, 0.5, 1.0, 2.0)[trial % 4]
    combine = ("mul", "add")[(trial // 2) % 2]
    return x, sal, k, alpha, combine, lengths


@pytest.mark.skipif(not CPU_ENGINE_BUILT, reason=f"vtprune._cpu: {CPU_ENGINE_REASON}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_scope_cpu_engines_agree_with_each_other_and_the_reference(dtype, monkeypatch):
    g = _gen(97)
    exact = 0
    for trial in range(40):
        x, sal, k, alpha, combine, lengths = _engine_case(g, trial)
        x = x.to(dtype)
        picks = {}
        for eng in ("numpy", "cpp"):
            monkeypatch.setattr(scope_mod, "_ENGINE", eng)
            picks[eng] = scope_mod.scope_picks(x, sal, k, alpha, combine, lengths)
        want = reference.scope_select(x, sal, k, alpha, combine, lengths, False)
        # late picks (k up to n) at small D are full of mathematical near-ties, which the
        # engines and the reference may round apart: equal, or apart only after a near-tie
        for b in range(x.shape[0]):
            nb = x.shape[1] if lengths is None else int(lengths[b])
            assert_valid_selection(picks["cpp"][b : b + 1], k, nb)
            args = (x[b, :nb], sal[b, :nb], alpha, combine)
            assert_same_greedy(picks["cpp"][b], want[b], *args)
            assert_same_greedy(picks["cpp"][b], picks["numpy"][b], *args)
        exact += bool(torch.equal(picks["cpp"], want))
    assert exact >= 20, exact  # most cases have no near-tie at all


@pytest.mark.skipif(not CPU_ENGINE_BUILT, reason=f"vtprune._cpu: {CPU_ENGINE_REASON}")
def test_scope_auto_engine_is_the_cpp_one(monkeypatch):
    # "auto" takes vtprune._cpu for float32 and float64 similarities when it is built
    monkeypatch.setattr(scope_mod, "_ENGINE", "auto")
    monkeypatch.setattr(scope_mod, "_CpuGreedy", _NoNumpyEngine)
    for dtype in (torch.float32, torch.float64, torch.float16):
        x, sal = _tokens(2, 50, 16, seed=101, dtype=dtype)
        got = OPS["scope_select"](x, sal, 10, 1.0, "mul", None, False)
        assert_valid_selection(got, 10, 50)


@pytest.mark.skipif(not CPU_ENGINE_BUILT, reason=f"vtprune._cpu: {CPU_ENGINE_REASON}")
def test_scope_cpp_engine_threads_over_images(monkeypatch):
    # several images on several threads give each image's own picks; k past a short image's
    # length only pads its tail (callers drop those picks)
    monkeypatch.setattr(scope_mod, "_ENGINE", "cpp")
    x, sal = _tokens(5, 80, 24, seed=103)
    lengths = torch.tensor([80, 3, 57, 80, 20])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    got = scope_mod.scope_picks(x, sal, 10, 1.0, "mul", lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = scope_mod.scope_picks(x[b : b + 1, :n], sal[b : b + 1, :n], min(10, n), 1.0, "mul", None)
        assert torch.equal(got[b, : min(10, n)], alone[0])
        assert bool((got[b, n:] == 0).all())


@pytest.mark.skipif(not CPU_ENGINE_BUILT, reason=f"vtprune._cpu: {CPU_ENGINE_REASON}")
def test_cpu_engine_rejects_bad_arguments_without_touching_memory():
    cpu = scope_mod._cpu_module
    for fn in (cpu.scope_greedy_f32, cpu.scope_greedy_f64):
        with pytest.raises(ValueError, match="N must be >= 0"):
            fn(16, 16, 0, 1, -1, 1, True, 1e-6, 16)
        with pytest.raises(ValueError, match="out_ptr"):
            fn(16, 16, 0, 1, 1, 1, True, 1e-6, 0)
        with pytest.raises(ValueError, match="s_ptr"):
            fn(0, 16, 0, 1, 1, 1, True, 1e-6, 16)
        fn(0, 0, 0, 0, 5, 3, True, 1e-6, 0)  # nothing to do: no pointer is read


def test_scope_cpp_engine_forced_without_module_raises(monkeypatch):
    monkeypatch.setattr(scope_mod, "_ENGINE", "cpp")
    monkeypatch.setattr(scope_mod, "_cpu_module", None)
    monkeypatch.setattr(scope_mod, "_cpu_import_error", "not built (test)")
    x, sal = _tokens(1, 10, 4, seed=107)
    with pytest.raises(RuntimeError, match="not built"):
        OPS["scope_select"](x, sal, 3, 1.0, "mul", None, False)
    monkeypatch.setattr(scope_mod, "_ENGINE", "auto")  # auto falls back to the NumPy engine
    assert torch.equal(
        OPS["scope_select"](x, sal, 3, 1.0, "mul", None, False), reference.scope_select(x, sal, 3, 1.0, "mul", None, False)
    )


# ----------------------------------------------------------------------------- HoloV


HOLOV_CASES = [
    # (n, d, k, num_crops)
    (1, 8, 1, None),
    (7, 16, 3, None),
    (7, 16, 5, 7),
    (97, 32, 10, None),
    (97, 32, 40, 6),
    (577, 64, 64, None),
    (576, 64, 64, None),
    (576, 64, 192, None),
    (577, 48, 100, 577),
]


@pytest.mark.parametrize("rank_by", ["attn", "score"])
@pytest.mark.parametrize("case", HOLOV_CASES, ids=lambda c: f"n{c[0]}-k{c[2]}-C{c[3]}")
def test_holov_equals_reference_fp32(case, rank_by):
    n, d, k, crops = case
    x, attn = _tokens(2, n, d, seed=n + 7 * k)
    for sorted_ in (True, False):
        got = OPS["holov_select"](x, attn, k, crops, 0.09, rank_by, None, sorted_)
        want = reference.holov_select(x, attn, k, crops, 0.09, rank_by, None, sorted_)
        assert got.dtype == torch.int64 and got.shape == (2, k)
        assert torch.equal(got, want)


def test_holov_fp64_and_alpha():
    x, attn = _tokens(2, 97, 32, seed=53, dtype=torch.float64)
    for alpha in (0.0, 0.09, 5.0):
        got = OPS["holov_select"](x, attn, 30, None, alpha, "score", None, False)
        assert torch.equal(got, reference.holov_select(x, attn, 30, None, alpha, "score", None, False))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_holov_low_precision(dtype):
    x, attn = _tokens(2, 577, 64, seed=59, dtype=dtype)
    got = OPS["holov_select"](x, attn, 64, None, 0.09, "attn", None, True)
    assert_valid_selection(got, 64, 577)
    assert torch.equal(got, got.sort(dim=1).values)


@pytest.mark.parametrize("rank_by", ["attn", "score"])
def test_holov_batch_with_lengths_equals_each_image_alone(rank_by):
    lens = [97, 60, 13, 40]
    x, attn = _tokens(4, 97, 24, seed=61)
    x[2, 13:] = float("nan")
    lengths = torch.tensor(lens)
    for crops in (None, 5):
        got = OPS["holov_select"](x, attn, 12, crops, 0.09, rank_by, lengths, False)
        want = reference.holov_select(x, attn, 12, crops, 0.09, rank_by, lengths, False)
        assert torch.equal(got, want)
        for b, n in enumerate(lens):
            alone = OPS["holov_select"](x[b : b + 1, :n], attn[b : b + 1, :n], 12, crops, 0.09, rank_by, None, False)
            assert torch.equal(got[b], alone[0])


def test_holov_degenerate_attention(monkeypatch):
    # Constant attention makes every crop score tie below fp32 resolution; only the torch engine
    # repeats the reference's fp32 steps, so it alone must match it exactly here (the C++
    # engine's tie-aware check is tests/test_holov_cpu.py::test_degenerate_attention).
    monkeypatch.setattr(holov_mod, "_ENGINE", "torch")
    x, attn = _tokens(2, 100, 16, seed=67)
    for a in (torch.zeros_like(attn), torch.ones_like(attn), attn.round(decimals=1)):
        for rank_by in ("attn", "score"):
            got = OPS["holov_select"](x, a, 25, None, 0.09, rank_by, None, False)
            assert torch.equal(got, reference.holov_select(x, a, 25, None, 0.09, rank_by, None, False))
            assert_valid_selection(got, 25, 100)


# ----------------------------------------------------------------------------- crop_budgets


def test_crop_budgets_adversarial_equals_reference():
    g = _gen(71)
    for trial in range(600):
        w, k, cap = random_budget_case(g, trial % 6)
        got = OPS["crop_budgets"](w, k, cap)
        want = reference.crop_budgets(w, k, cap)
        assert got.dtype == torch.int64
        assert torch.equal(got, want), (trial, w, k, cap, got, want)
        assert bool((got.sum(1) == k).all()) and bool((got <= cap).all()) and bool((got >= 0).all())


def test_crop_budgets_hand_cases():
    # everything on crop 0 of capacity 2: the surplus goes +1 per crop in weight order, cycling
    w = torch.tensor([[0.97, 0.01, 0.02, 0.0]])
    cap = torch.tensor([[2, 9, 9, 9]])
    assert OPS["crop_budgets"](w, 10, cap).tolist() == [[2, 3, 3, 2]]
    # k equal to the total capacity fills every crop; an absent crop (capacity 0) gets nothing
    cap = torch.tensor([[3, 0, 2, 4]])
    assert OPS["crop_budgets"](torch.tensor([[0.1, 0.5, 0.2, 0.2]]), 9, cap).tolist() == [[3, 0, 2, 4]]
    # fp16 / bf16 / fp64 weights go through the compute dtype like the reference
    w = torch.tensor([[0.3, 0.3, 0.4]])
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        cap = torch.tensor([[5, 5, 5]])
        assert torch.equal(OPS["crop_budgets"](w.to(dt), 7, cap), reference.crop_budgets(w.to(dt), 7, cap))


# ----------------------------------------------------------------------------- crop_topk


def test_crop_topk_equals_reference():
    g = _gen(73)
    for trial in range(60):
        case = random_crop_topk_case(g)
        if case is None:
            continue
        scores, sizes, budgets, k = case
        for sorted_ in (True, False):
            got = OPS["crop_topk"](scores, sizes, budgets, k, sorted_)
            want = reference.crop_topk(scores, sizes, budgets, k, sorted_)
            assert torch.equal(got, want), (trial, scores, sizes, budgets, got, want)


def test_crop_topk_low_precision():
    g = _gen(79)
    scores = torch.rand(2, 97, generator=g)
    sizes = torch.tensor([[20, 30, 47], [0, 50, 47]])
    budgets = torch.tensor([[5, 5, 5], [0, 10, 5]])
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        got = OPS["crop_topk"](scores.to(dt), sizes, budgets, 15, True)
        assert torch.equal(got, reference.crop_topk(scores.to(dt), sizes, budgets, 15, True))


# ----------------------------------------------------------------------------- coverage_max_sim


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW], ids=str)
def test_coverage_max_sim_equals_reference(dtype, monkeypatch):
    g = _gen(83)
    x = torch.randn(3, 97, 32, generator=g).to(dtype)
    x[0, 5] = 0  # a zero token: similarity 0 with everything
    lengths = torch.tensor([97, 50, 7])
    idx = torch.stack([torch.randperm(int(n), generator=g)[:6] for n in lengths])
    idx[0, 0] = 5
    want = reference.coverage_max_sim(x, idx, lengths)
    monkeypatch.setattr(coverage_mod, "_BLOCK_ELEMS", 3 * 6 * 10)  # several row chunks
    got = OPS["coverage_max_sim"](x, idx, lengths)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(got, want, atol=1e-6 if dtype != torch.float64 else 1e-12)
    assert bool((got[1, 50:] == 0).all()) and bool((got[2, 7:] == 0).all())


# ----------------------------------------------------------------------------- attention_importance


ATTN_CASES = [
    # (hq, hk, L, d, G, key range)
    (4, 2, 37, 16, 3, (5, 30)),
    (2, 2, 23, 8, 2, (0, 23)),
    (3, 1, 41, 16, 4, (20, 41)),
    (6, 3, 9, 4, 5, (0, 1)),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "chunked"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"hq{c[0]}-hk{c[1]}-L{c[2]}")
def test_attention_importance_equals_reference(case, causal, chunked, monkeypatch):
    hq, hk, length, d, groups, (start, end) = case
    g = _gen(hq * 100 + length)
    q = torch.randn(2, hq, length, d, generator=g)
    k = torch.randn(2, hk, length, d, generator=g)
    qg = torch.randint(-1, groups - 1, (2, length), generator=g)  # group G-1 stays empty
    if chunked:
        monkeypatch.setattr(attention_mod, "_CHUNK_ELEMS", 2 * hq * length * 4)  # 4 queries a chunk
    scale = d**-0.5
    got = OPS["attention_importance"](q, k, qg, groups, causal, scale, start, end)
    want = reference.attention_importance(q, k, qg, groups, causal, scale, start, end)
    assert got.shape == (2, groups, end - start) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert bool((got[:, groups - 1] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=str)
def test_attention_importance_dtypes(dtype):
    g = _gen(89)
    q = torch.randn(1, 4, 30, 8, generator=g).to(dtype)
    k = torch.randn(1, 2, 30, 8, generator=g).to(dtype)
    qg = torch.randint(-1, 2, (1, 30), generator=g)
    got = OPS["attention_importance"](q, k, qg, 2, True, 0.3, 10, 30)
    want = reference.attention_importance(q, k, qg, 2, True, 0.3, 10, 30)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(got, want, atol=1e-12 if dtype == torch.float64 else 1e-6)
    # every query's row sums to 1 over all keys, so the group means over all keys sum to 1
    full = OPS["attention_importance"](q, k, qg, 2, True, 0.3, 0, 30)
    present = torch.tensor([bool((qg == gi).any()) for gi in range(2)])
    row_sums = full.sum(-1)[0, present].double()
    assert torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5)


def test_attention_importance_no_queries_at_all():
    q = torch.randn(1, 2, 5, 4)
    got = OPS["attention_importance"](q, q, torch.full((1, 5), -1), 2, True, 0.5, 0, 5)
    assert torch.equal(got, torch.zeros(1, 2, 5))
    assert not math.isnan(float(got.sum()))


def test_attention_importance_default_groups_when_every_query_is_ignored():
    """Ids all -1: the default G is at least 1 (one group of zeros), not an error."""
    q = torch.randn(2, 2, 5, 4)
    for backend in ("reference", "torch"):
        got = vtprune.attention_importance(q, q, torch.full((2, 5), -1), backend=backend)
        assert torch.equal(got, torch.zeros(2, 1, 5)), backend
