"""The C++ CPU engine of HoloV (``holov_select_f32`` in ``vtprune._cpu``) against the torch
engine and the reference.

``torch_backend.holov.holov_select`` runs float32/float16/bfloat16 CPU tokens through the C++
engine when it is built (``VTPRUNE_HOLOV_CPU_ENGINE=auto``), and through its vectorized torch
code otherwise; every selection test here runs with each engine (``engine`` fixture, ``cpp``
skipped only where ``vtprune._cpu`` is not built) and compares with the reference: exact
index equality on float32 inputs without near-ties (so both engines agree with each other).
Where crop weights tie below float32 resolution (constant attention) the C++ engine may hand
the leftover tokens to other tied crops than the reference, and that case is checked as such.
The crop statistics are compared with the reference's within float32 rounding, for every Gram
kernel this CPU runs (AVX-512, AVX2, the baseline ISA).
"""

from __future__ import annotations

import sys

import pytest
import torch

from vtprune import reference
from vtprune.torch_backend import OPS
from vtprune.torch_backend import holov as holov_mod
from vtprune.torch_backend import scope as scope_mod
from conftest import assert_valid_selection

BUILT, REASON = holov_mod.cpu_engine_status()
needs_cpp = pytest.mark.skipif(not BUILT, reason=f"HoloV C++ engine: {REASON}")
ISAS = holov_mod._scope._cpu_module.holov_isas() if BUILT else []


def _no_torch_path(*args, **kwargs):
    raise AssertionError("this input must not reach the torch code of holov_select")


@pytest.fixture(params=["torch", "cpp"])
def engine(request, monkeypatch):
    """Run the test with holov_select forced to one CPU engine."""
    if request.param == "cpp":
        if not BUILT:
            pytest.skip(f"HoloV C++ engine: {REASON}")
        # the torch code computes the crop statistics in _crop_stats: "cpp" must never get there
        monkeypatch.setattr(holov_mod, "_crop_stats", _no_torch_path)
    monkeypatch.setattr(holov_mod, "_ENGINE", request.param)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(b: int, n: int, d: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype)
    attn = torch.rand(b, n, generator=g, dtype=torch.float64).to(dtype)
    return x, attn


def _select(x, attn, k, crops=None, alpha=0.09, rank_by="attn", lengths=None, sorted_=True):
    return OPS["holov_select"](x, attn, k, crops, alpha, rank_by, lengths, sorted_)


def _reference(x, attn, k, crops=None, alpha=0.09, rank_by="attn", lengths=None, sorted_=True):
    return reference.holov_select(x, attn, k, crops, alpha, rank_by, lengths, sorted_)


def _assert_equal_reference(x, attn, k, crops=None, alpha=0.09, lengths=None):
    for rank_by in ("attn", "score"):
        for sorted_ in (True, False):
            got = _select(x, attn, k, crops, alpha, rank_by, lengths, sorted_)
            want = _reference(x, attn, k, crops, alpha, rank_by, lengths, sorted_)
            assert got.dtype == torch.int64 and got.shape == want.shape and got.is_contiguous()
            assert torch.equal(got, want), (rank_by, sorted_, got, want)


# ----------------------------------------------------------------------------- selections

CASES = [
    # (b, n, d, k, num_crops): odd N, D off every lane width, default and explicit crop counts
    (2, 1, 8, 1, None),
    (2, 7, 16, 3, None),
    (1, 7, 5, 7, 7),
    (3, 97, 33, 10, None),
    (2, 97, 17, 40, 6),
    (1, 97, 1, 20, 3),
    (2, 577, 64, 64, None),
    (2, 576, 40, 64, None),
    (1, 576, 24, 192, None),
    (1, 577, 48, 100, 577),
    (1, 577, 20, 150, 1),  # one crop of 577: cut into bands over the threads
    (1, 2881, 16, 160, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-n{c[1]}-d{c[2]}-k{c[3]}-C{c[4]}")
def test_equals_reference_fp32(case, engine):
    b, n, d, k, crops = case
    x, attn = _case(b, n, d, seed=n + 3 * d + 7 * k)
    _assert_equal_reference(x, attn, k, crops)


def test_every_crop_count_small_n(engine):
    n = 13
    x, attn = _case(2, n, 9, seed=5)
    for crops in range(1, n + 1):
        for k in (1, 4, crops, n):
            if k > n:
                continue
            _assert_equal_reference(x, attn, k, crops)


@pytest.mark.parametrize("alpha", [0.0, 0.09, 5.0])
def test_alpha(alpha, engine):
    x, attn = _case(2, 97, 32, seed=11)
    _assert_equal_reference(x, attn, 30, None, alpha)


@pytest.mark.parametrize("crops", [None, 5])
def test_batch_with_lengths_equals_each_image_alone(crops, engine):
    lens = [97, 60, 13, 40, 97]
    x, attn = _case(5, 97, 24, seed=13)
    x[2, 13:] = float("nan")  # padding is never read
    attn[3, 40:] = float("inf")
    lengths = torch.tensor(lens)
    _assert_equal_reference(x, attn, 12, crops, lengths=lengths)
    got = _select(x, attn, 12, crops, rank_by="score", lengths=lengths, sorted_=False)
    for b, n in enumerate(lens):
        alone = _select(x[b : b + 1, :n], attn[b : b + 1, :n], 12, crops, rank_by="score", sorted_=False)
        assert torch.equal(got[b], alone[0])


@needs_cpp
@pytest.mark.parametrize("torch_omp", [True, False], ids=["torch-openmp-team", "own-threads"])
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_thread_count_does_not_change_anything(threads, torch_omp, monkeypatch):
    # images, crops and bands of crops are spread over the threads; every dot product is
    # summed in the same order wherever it runs, so the results are bitwise the same. D is
    # large so that the engine does use the threads (it keeps small work on one).
    monkeypatch.setattr(holov_mod, "_ENGINE", "cpp")
    monkeypatch.setattr(holov_mod, "_USE_TORCH_OMP", torch_omp)
    x, attn = _case(4, 301, 1024, seed=17)
    lengths = torch.tensor([301, 290, 7, 150])
    for k, crops in ((30, None), (60, 1), (5, 3)):
        for rank_by in ("attn", "score"):
            monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
            want = _select(x, attn, k, crops, rank_by=rank_by, lengths=lengths, sorted_=False)
            stats1 = holov_mod.cpp_crop_stats(x, attn, k, crops, 0.09, lengths)
            monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
            got = _select(x, attn, k, crops, rank_by=rank_by, lengths=lengths, sorted_=False)
            assert torch.equal(got, want)
            for s1, s2 in zip(stats1, holov_mod.cpp_crop_stats(x, attn, k, crops, 0.09, lengths)):
                assert torch.equal(s1, s2)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="torch does not run its CPU ops on OpenMP here",
)
def test_finds_the_openmp_runtime_of_torch():
    # the engine's threads join torch's OpenMP team (see _torch_omp_parallel): on Linux with an
    # OpenMP build of torch its runtime must be found, or the engine silently competes with it
    assert holov_mod._find_omp_parallel() != 0


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
def test_every_gram_kernel_equals_reference(isa, monkeypatch):
    monkeypatch.setattr(holov_mod, "_ENGINE", "cpp")
    monkeypatch.setattr(holov_mod, "_ISA", isa)
    for b, n, d, k, crops in ((2, 97, 33, 10, None), (1, 577, 67, 64, None), (2, 31, 7, 9, 4), (1, 200, 35, 50, 1)):
        x, attn = _case(b, n, d, seed=19 + n + d)
        _assert_equal_reference(x, attn, k, crops)


# ----------------------------------------------------------------------------- statistics


def _reference_stats(x, attn, k, crops, alpha):
    """Crop scores [B, N] (column c = crop c) and h [B, N] from reference._crop_stats."""
    batch, n = x.shape[:2]
    score = torch.zeros(batch, n)
    h = torch.zeros(batch, n)
    for b in range(batch):
        sizes = reference.crop_sizes_for(n, crops or reference.default_num_crops(n, k))
        start = 0
        for c, m in enumerate(sizes):
            s, hc = reference._crop_stats(x[b, start : start + m], attn[b, start : start + m], alpha)
            score[b, c] = s
            h[b, start : start + m] = hc
            start += m
    return score, h


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("alpha", [0.09, 50.0])  # 50: the variance term dominates h
def test_crop_statistics_within_fp32_rounding(isa, alpha):
    for b, n, d, k, crops in ((2, 577, 64, 64, None), (1, 97, 33, 10, None), (1, 301, 4096, 64, None), (2, 9, 3, 2, 9)):
        x, attn = _case(b, n, d, seed=23 + d)
        score, h = holov_mod.cpp_crop_stats(x, attn, k, crops, alpha, isa=isa)
        want_score, want_h = _reference_stats(x, attn, k, crops, alpha)
        torch.testing.assert_close(score, want_score, rtol=2e-6, atol=0)
        torch.testing.assert_close(h, want_h, rtol=2e-6, atol=0)


@needs_cpp
def test_crop_statistics_pad_with_zeros():
    x, attn = _case(2, 20, 8, seed=29)
    x[1, 11:] = float("nan")
    score, h = holov_mod.cpp_crop_stats(x, attn, 3, 4, 0.09, lengths=torch.tensor([20, 11]))
    want_score, want_h = _reference_stats(x[1:, :11], attn[1:, :11], 3, 4, 0.09)
    torch.testing.assert_close(score[1, :11], want_score[0], rtol=2e-6, atol=0)
    torch.testing.assert_close(h[1, :11], want_h[0], rtol=2e-6, atol=0)
    assert bool((score[:, 4:] == 0).all()) and bool((h[1, 11:] == 0).all())


# ----------------------------------------------------------------------------- odd values


def test_nan_and_inf_attention(engine):
    # SPEC §4 / docs/semantics.md: NaN keys rank last; NaN crop weights count as 0 and go last
    x, attn = _case(3, 97, 16, seed=31)
    attn[0, 5] = float("nan")  # one NaN: its crop's h and score are NaN
    attn[1, :] = float("nan")  # every weight NaN: the budgets cycle over the crops by index
    attn[2, 40:50] = float("inf")
    for k in (10, 40):
        _assert_equal_reference(x, attn, k)
        assert_valid_selection(_select(x, attn, k), k, 97)


def _assert_equal_reference_up_to_weight_ties(x, attn, k, crops=None, alpha=0.09, rel=1e-6):
    """As the reference, except that crops whose weights are within ``rel`` of each other
    (a few float32 ulps: which of them gets the leftover token is rounding noise) may share
    their budgets differently; inside each crop the picks must still be the reference's."""
    batch, n = x.shape[:2]
    for rank_by in ("attn", "score"):
        for sorted_ in (True, False):
            got = _select(x, attn, k, crops, alpha, rank_by, None, sorted_)
            assert_valid_selection(got, k, n)
            sizes = reference.crop_sizes_for(n, crops or reference.default_num_crops(n, k))
            for b in range(batch):
                scores, keys, start = [], [], 0
                for m in sizes:
                    s, h = reference._crop_stats(x[b, start : start + m], attn[b, start : start + m], alpha)
                    scores.append(s)
                    keys.append(h if rank_by == "score" else attn[b, start : start + m])
                    start += m
                score = torch.stack(scores)
                w = score / (score.sum() + 1e-6)
                want_q = reference._budgets_one(w.tolist(), k, sizes)
                bounds = torch.tensor([0, *sizes]).cumsum(0)
                got_q = [int(((got[b] >= lo) & (got[b] < hi)).sum()) for lo, hi in zip(bounds[:-1], bounds[1:])]
                moved = [c for c in range(len(sizes)) if got_q[c] != want_q[c]]
                if moved:
                    wm = w[moved]
                    assert float(wm.max() - wm.min()) <= rel * float(w.abs().max()), (moved, w.tolist())
                key = torch.cat(keys)
                key = torch.where(torch.isnan(key), torch.full_like(key, float("-inf")), key)
                assert torch.equal(got[b], reference._topk_in_crops(key, sizes, got_q, sorted_))


def test_degenerate_attention(engine):
    x, attn = _case(2, 100, 16, seed=37)
    for a in (torch.zeros_like(attn), attn.round(decimals=1)):
        _assert_equal_reference(x, a, 25)
    # constant attention: every crop score is 1000 + 90 / (1 + 1e-6 / mean|var|), the crops
    # differ below float32 resolution, and the order of their weights (who gets the leftover
    # of the floors) is the rounding of each implementation. The torch engine repeats the
    # reference's float32 steps and matches it; the C++ engine may break those near-ties apart.
    ones = torch.ones_like(attn)
    if engine == "torch":
        _assert_equal_reference(x, ones, 25)
    else:
        _assert_equal_reference_up_to_weight_ties(x, ones, 25)


def test_non_finite_zero_and_huge_tokens(engine):
    # Inf/NaN entries make their rows of S NaN; a token whose squared norm overflows float32
    # normalizes to 0 in the reference (x / inf), and the C++ engine recomputes such a crop
    # from its normalized copy to do the same; zero tokens have similarity 0 with everything
    x, attn = _case(4, 60, 24, seed=41)
    x[0, 3, 7] = float("inf")
    x[1, 20] = float("nan")
    x[2, 10:14] = 0.0
    x[3, 30:33] = 1e30  # |x|^2 overflows
    for k in (6, 20):
        got = _select(x, attn, k)
        assert_valid_selection(got, k, 60)
    if engine == "cpp":
        # the torch code takes x x^T of the raw tokens and so differs on the overflowing crop
        _assert_equal_reference(x, attn, 20)
        for i in range(3):
            _assert_equal_reference(x[i : i + 1], attn[i : i + 1], 6)


def test_duplicate_tokens_and_attention(engine):
    # exact ties everywhere: equal crops, equal tokens, equal attention
    x = torch.randn(1, 8, 16, generator=_gen(43)).repeat(1, 12, 1)
    attn = torch.rand(1, 8, generator=_gen(44)).repeat(1, 12)
    _assert_equal_reference(x, attn, 24, 6)
    _assert_equal_reference(x, torch.full_like(attn, 0.5), 24, 12)


# ----------------------------------------------------------------------------- dtypes, dispatch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_equals_reference_on_the_same_values(dtype, engine):
    x, attn = _case(2, 97, 32, seed=47, dtype=dtype)
    got = _select(x, attn, 20, rank_by="score")
    assert torch.equal(got, _reference(x, attn, 20, rank_by="score"))
    assert torch.equal(got, _reference(x.float(), attn.float(), 20, rank_by="score"))


@needs_cpp
def test_fp64_stays_on_the_torch_path(monkeypatch):
    monkeypatch.setattr(holov_mod, "_ENGINE", "cpp")

    class _NoCpp:
        def __getattr__(self, name):
            raise AssertionError(f"float64 must not reach vtprune._cpu ({name})")

    monkeypatch.setattr(holov_mod._scope, "_cpu_module", _NoCpp())
    monkeypatch.setattr(holov_mod, "cpu_engine_status", lambda: (True, "ok"))
    x, attn = _case(2, 97, 32, seed=53, dtype=torch.float64)
    _assert_equal_reference(x, attn, 30)


@needs_cpp
def test_auto_engine_is_the_cpp_one(monkeypatch):
    monkeypatch.setattr(holov_mod, "_ENGINE", "auto")
    monkeypatch.setattr(holov_mod, "_crop_stats", _no_torch_path)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, attn = _case(2, 50, 16, seed=59, dtype=dtype)
        assert_valid_selection(_select(x, attn, 10), 10, 50)


def test_cpp_engine_forced_without_module_raises(monkeypatch):
    monkeypatch.setattr(holov_mod, "_ENGINE", "cpp")
    monkeypatch.setattr(scope_mod, "_cpu_module", None)
    monkeypatch.setattr(scope_mod, "_cpu_import_error", "not built (test)")
    x, attn = _case(1, 10, 4, seed=61)
    with pytest.raises(RuntimeError, match="not built"):
        _select(x, attn, 3)
    monkeypatch.setattr(holov_mod, "_ENGINE", "auto")  # auto falls back to the torch code
    assert torch.equal(_select(x, attn, 3), _reference(x, attn, 3))


def test_unknown_engine_name_raises(monkeypatch):
    monkeypatch.setattr(holov_mod, "_ENGINE", "fast")
    x, attn = _case(1, 10, 4, seed=67)
    with pytest.raises(ValueError, match="VTPRUNE_HOLOV_CPU_ENGINE"):
        _select(x, attn, 3)


# ----------------------------------------------------------------------------- raw bindings


@needs_cpp
def test_binding_rejects_bad_arguments_without_touching_memory():
    fn = holov_mod._scope._cpu_module.holov_select_f32
    # x, attn, lengths, B, N, D, k, num_crops, alpha, by_score, sorted, out
    with pytest.raises(ValueError, match="N must be >= 0"):
        fn(16, 16, 0, 1, -1, 4, 1, 0, 0.09, False, True, 16)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fn(16, 16, 0, 1, 4, 4, 0, 0, 0.09, False, True, 16)
    with pytest.raises(ValueError, match="num_crops"):
        fn(16, 16, 0, 1, 4, 4, 1, -2, 0.09, False, True, 16)
    with pytest.raises(ValueError, match="out_ptr"):
        fn(16, 16, 0, 1, 4, 4, 1, 0, 0.09, False, True, 0)
    with pytest.raises(ValueError, match="x_ptr"):
        fn(0, 16, 0, 1, 4, 4, 1, 0, 0.09, False, True, 16)
    with pytest.raises(ValueError, match="attn_ptr"):
        fn(16, 0, 0, 1, 4, 4, 1, 0, 0.09, False, True, 16)
    with pytest.raises(ValueError, match="isa must be"):
        fn(16, 16, 0, 1, 4, 4, 1, 0, 0.09, False, True, 16, 1, "sse9")
    fn(0, 0, 0, 0, 4, 4, 3, 0, 0.09, False, True, 0)  # no image: no pointer is read
    stats = holov_mod._scope._cpu_module.holov_crop_stats_f32
    with pytest.raises(ValueError, match="h_ptr"):
        stats(16, 16, 0, 1, 4, 4, 1, 0, 0.09, 16, 4, 0)


@needs_cpp
def test_binding_pads_when_k_exceeds_the_valid_tokens():
    # reachable only without the Python checks (torch.compile): no read past lengths[b], and
    # the slots that no valid token can fill are 0
    x, attn = _case(2, 10, 4, seed=71)
    lengths = torch.tensor([3, 0])
    out = torch.full((2, 5), -1, dtype=torch.int64)
    holov_mod._scope._cpu_module.holov_select_f32(
        x.data_ptr(), attn.data_ptr(), lengths.data_ptr(), 2, 10, 4, 5, 0, 0.09, False, True, out.data_ptr()
    )
    assert sorted(out[0, :3].tolist()) == [0, 1, 2] and out[0, 3:].tolist() == [0, 0]
    assert out[1].tolist() == [0] * 5
