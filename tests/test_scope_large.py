"""SCOPE on large images (issue 3): the similarity stored in float16 above 4096 tokens.

Rule under test (docs/semantics.md): an image of more than ``SCOPE_FP32_MAX_N`` tokens is selected
on ``S`` computed in fp32 and rounded once to fp16; every other image keeps the fp32 ``S``. The
rule looks at the image's own length only, so padding next to a longer image changes nothing.

What is checked, and how:

* ``scope_similarity``: the fp16 storage is the fp32 product rounded once, built in row blocks
  (no fp32 ``[N, N]`` product exists, checked by watching ``torch.bmm``).
* Triton kernel, fp16 storage forced on sizes the interpreter can run (N = 97, 577): the picks
  are the float64 greedy picks *of the rounded S*, step for step up to the first near-tie of that
  trajectory, greedy-valid after it; their facility location (exact similarity) is within
  ``FL_REL`` of the reference's (which selects on the fp32 S).
* Torch backend at N = 4200 on the CPU (both CPU engines and the dense loop): the same greedy
  check on the rounded S, and the CPU engines really receive rounded values.
* The per-image rule in mixed batches (threshold lowered to 64 so the interpreter can run it):
  each image's picks equal its picks alone, and the storage groups are the expected ones.
* On a GPU only: N = 16384, D = 1280, k = 1024 for both backends, peak extra memory measured.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtprune
from vtprune import reference, similarity
from vtprune._verify import check_scope_picks
from vtprune.similarity import SCOPE_FP32_MAX_N, scope_similarity, scope_similarity_dtype, scope_storage_groups
from vtprune.torch_backend import scope as torch_scope
from conftest import assert_valid_selection, kernel_devices, np_cosine, np_weights, triton_kernel_module

triton_scope = triton_kernel_module("scope")
DEVICES = kernel_devices(triton_scope)
HAS_GPU = torch.cuda.is_available()
CPU_ENGINE_BUILT, CPU_ENGINE_REASON = torch_scope.cpu_engine_status()

#: Two float64 scores closer than this (relative) are a near-tie: fp32 gains may order them either way.
TIE_REL = 1e-5
#: Facility location of the fp16-storage picks, relative to the reference's (exact similarity).
#: fp16 rounding moves a similarity by at most 2**-12, so the picks part from the fp32 ones only
#: at near-ties; measured at N = 4200 to 8192, k = N / 8, the objective moved by at most 2.2e-4.
FL_REL = 1e-3


def _data(batch: int, n: int, d: int, seed: int, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, n, d, generator=g).to(device=device, dtype=dtype)
    saliency = torch.rand(batch, n, generator=g).to(device=device, dtype=dtype)
    return tokens, saliency


def _rounded_sim(x: torch.Tensor) -> np.ndarray:
    """float64 copy of the fp16 similarity the fast backends select on, for one image ``[N, D]``."""
    return scope_similarity(x[None].float().cpu(), torch.float16)[0].double().numpy()


class _Greedy64:
    """SCOPE state on a float64 similarity: gains kept exactly enough (float64, updated by the
    identity ``max(0, S - c_old) - max(0, S - c_new) = min(max(S - c_old, 0), c_new - c_old)``)
    that the check costs ``|changed| x N`` per step instead of ``N x N``."""

    def __init__(self, sim: np.ndarray, w: np.ndarray, combine: str):
        self.sim, self.w, self.mul = sim, w, combine == "mul"
        self.cover = np.zeros(sim.shape[0])
        self.gain = np.maximum(sim, 0.0).sum(axis=0)
        self.taken = np.zeros(sim.shape[0], dtype=bool)

    def scores(self) -> np.ndarray:
        score = self.gain * self.w if self.mul else self.gain + self.w
        return np.where(self.taken, -np.inf, score)

    def take(self, t: int) -> None:
        col = self.sim[:, t]
        changed = np.flatnonzero(col > self.cover)
        lo, hi = self.cover[changed], col[changed]
        delta = np.minimum(np.maximum(self.sim[changed] - lo[:, None], 0.0), (hi - lo)[:, None])
        self.gain -= delta.sum(axis=0)
        self.cover[changed] = hi
        self.taken[t] = True


def _greedy64(sim: np.ndarray, w: np.ndarray, k: int, combine: str) -> tuple[list[int], int]:
    """float64 greedy picks on ``sim`` and the first step whose best two scores nearly tie."""
    state = _Greedy64(sim, w, combine)
    picks, tie = [], k
    for i in range(k):
        score = state.scores()
        top2 = np.partition(score, -2)[-2:] if score.size >= 2 else score
        if tie == k and sim.shape[0] - i >= 2 and abs(top2[1] - top2[0]) <= TIE_REL * max(abs(top2).max(), 1e-30):
            tie = i
        t = int(score.argmax())
        picks.append(t)
        state.take(t)
    return picks, tie


def _assert_greedy_on(sim: np.ndarray, w: np.ndarray, picks, combine: str, case: str) -> None:
    """``picks`` (pick order) are the float64 greedy picks of ``sim`` up to its first near-tie,
    and from there on each pick is within ``TIE_REL`` (plus fp32 slack) of the best score."""
    picks = [int(p) for p in picks]
    want, tie = _greedy64(sim, w, len(picks), combine)
    if picks == want:
        return
    diverge = next(i for i, (p, q) in enumerate(zip(picks, want)) if p != q)
    assert diverge >= tie, f"{case}: diverges from the float64 greedy on the rounded S at step {diverge} " \
        f"({picks[diverge]} vs {want[diverge]}) with no near-tie before (first near-tie: step {tie})"
    n = sim.shape[0]
    assert len(set(picks)) == len(picks) and all(0 <= p < n for p in picks), picks
    state = _Greedy64(sim, w, combine)
    for i, t in enumerate(picks):
        score = state.scores()
        best = float(score.max())
        # fp32 gains carry up to ~1e-7 absolute error per summed term; a "mul" score scales it by w
        slack = 1e-6 * n * ((w[t] + w[int(score.argmax())]) if combine == "mul" else 2.0)
        assert score[t] >= best - (TIE_REL * abs(best) + slack), f"{case}: step {i} picked {t} ({score[t]!r}), best {best!r}"
        state.take(t)


def _fl(sim: np.ndarray, picks) -> float:
    return float(np.maximum(sim[:, list(picks)].max(axis=1), 0.0).sum())


# ----------------------------------------------------------------------------- the storage rule


def test_storage_rule_is_by_length():
    assert SCOPE_FP32_MAX_N == 4096
    assert scope_similarity_dtype(1) == torch.float32
    assert scope_similarity_dtype(4096) == torch.float32
    assert scope_similarity_dtype(4097) == torch.float16
    assert scope_similarity_dtype(16384) == torch.float16
    x = torch.randn(1, 4097, 4)
    assert scope_similarity(x).dtype == torch.float16
    assert scope_similarity(x[:, :4096]).dtype == torch.float32
    with pytest.raises(ValueError, match="storage"):
        scope_similarity(x[:, :8], torch.bfloat16)


def test_storage_groups_follow_each_images_own_length():
    # no lengths, or a width that fits fp32: one group, and lengths are never read
    assert scope_storage_groups(4096, torch.tensor([1, 4096])) == [(None, 4096, torch.float32)]
    assert scope_storage_groups(5000, None) == [(None, 5000, torch.float16)]
    # all short: fp32, padded only to the longest of them
    assert scope_storage_groups(9000, torch.tensor([100, 4096, 0])) == [(None, 4096, torch.float32)]
    groups = scope_storage_groups(9000, torch.tensor([5000, 300, 9000, 4097, 4096]))
    assert [(g[0].tolist(), g[1], g[2]) for g in groups] == [
        ([1, 4], 4096, torch.float32),
        ([0, 2, 3], 9000, torch.float16),
    ]
    # lengths beyond the width are clamped, as the kernels clamp them
    assert scope_storage_groups(5000, torch.tensor([7000, 6000])) == [(None, 5000, torch.float16)]


def test_scope_similarity_fp16_is_fp32_rounded_once():
    x, _ = _data(2, 97, 16, seed=1)
    full = scope_similarity(x, torch.float32)
    # one row block: the very same fp32 product, rounded once
    assert torch.equal(scope_similarity(x, torch.float16, row_chunk=97), full.half())
    # several blocks: each the fp32 product of its rows, rounded once
    got = scope_similarity(x, torch.float16, row_chunk=10)
    assert got.dtype == torch.float16 and got.shape == (2, 97, 97) and got.is_contiguous()
    xn = similarity.normalize_rows(x)
    for r0 in range(0, 97, 10):
        block = torch.bmm(xn[:, r0 : r0 + 10], xn.transpose(1, 2))
        assert torch.equal(got[:, r0 : r0 + 10], block.half()), r0
    # and within half an fp16 ulp (2**-11 relative) of the exact similarity
    exact = torch.from_numpy(np.stack([np_cosine(x[b]) for b in range(2)]))
    assert bool(((got.double() - exact).abs() <= 2.0**-11 * exact.abs() + 1e-6).all())


def test_scope_similarity_fp16_never_builds_an_fp32_square(monkeypatch):
    """Every fp32 product is one row block; the ``[N, N]`` result exists only in fp16."""
    n, chunk = 4097, 1024
    products = []
    bmm = torch.bmm

    def spy(a, b, *args, **kwargs):
        out = bmm(a, b, *args, **kwargs)
        products.append((tuple(out.shape), out.dtype))
        return out

    monkeypatch.setattr(torch, "bmm", spy)
    x = torch.randn(1, n, 8)
    s = scope_similarity(x, row_chunk=chunk)
    assert s.dtype == torch.float16 and s.shape == (1, n, n)
    assert [shape[1] for shape, _ in products] == [1024, 1024, 1024, 1024, 1]
    assert all(shape[2] == n and dtype == torch.float32 for shape, dtype in products)


# ----------------------------------------------------------------------------- Triton, fp16 forced

TRITON_CASES = [
    pytest.param(3, 97, 16, 25, [97, 40, 61], "mul", 1.0, id="N97-lengths-mul"),
    pytest.param(3, 97, 16, 25, [97, 40, 61], "add", 2.5, id="N97-lengths-add"),
    pytest.param(2, 97, 16, 30, None, "mul", 0.0, id="N97-coverage"),
    pytest.param(1, 577, 32, 32, None, "mul", 1.0, id="N577-mul"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,n,d,k,lengths,combine,alpha", TRITON_CASES)
def test_triton_fp16_storage_is_greedy_on_the_rounded_similarity(batch, n, d, k, lengths, combine, alpha, device):
    tokens, saliency = _data(batch, n, d, seed=n + k, device=device)
    lens = None if lengths is None else torch.tensor(lengths, device=device)
    ks = torch.full((batch,), k, dtype=torch.int64, device=device)
    got = triton_scope.scope_picks(tokens, saliency, ks, k, alpha, combine, lens, similarity_dtype=torch.float16)
    want = reference.scope_select(tokens.cpu(), saliency.cpu(), k, alpha, combine, None if lens is None else lens.cpu(), False)
    limits = lengths or n
    assert_valid_selection(got.cpu(), k, limits)
    for b in range(batch):
        nb = n if lengths is None else lengths[b]
        x, s = tokens[b, :nb].cpu(), saliency[b, :nb].cpu()
        w = np_weights(s, alpha)
        _assert_greedy_on(_rounded_sim(x), w, got[b].tolist(), combine, f"image {b}")
        exact = np_cosine(x)
        fl_got, fl_ref = _fl(exact, got[b].tolist()), _fl(exact, want[b].tolist())
        assert fl_got >= (1.0 - FL_REL) * fl_ref, (b, fl_got, fl_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_fp16_storage_matches_the_torch_dense_loop(device):
    """Both backends read the same rounded S, so their picks agree up to near-ties."""
    tokens, saliency = _data(2, 97, 16, seed=17, device=device)
    lens = torch.tensor([97, 70], device=device)
    ks = torch.full((2,), 30, dtype=torch.int64, device=device)
    got = triton_scope.scope_picks(tokens, saliency, ks, 30, 1.0, "add", lens, similarity_dtype=torch.float16)
    dense = torch_scope.scope_picks(tokens, saliency, 30, 1.0, "add", lens, dense=True, similarity_dtype=torch.float16)
    for b, nb in enumerate([97, 70]):
        if got[b].tolist() != dense[b].tolist():
            sim, w = _rounded_sim(tokens[b, :nb]), np_weights(saliency[b, :nb], 1.0)
            _assert_greedy_on(sim, w, got[b].tolist(), "add", f"triton image {b}")
            _assert_greedy_on(sim, w, dense[b].tolist(), "add", f"dense image {b}")


def test_triton_rejects_other_storage():
    tokens, saliency = _data(1, 7, 4, seed=0)
    ks = torch.ones(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="similarity_dtype"):
        triton_scope.scope_picks(tokens, saliency, ks, 1, 1.0, "mul", similarity_dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- per-image storage in mixed batches


class _StorageSpy:
    """Wraps ``scope_similarity`` in a module and records ``(images, width, storage)`` per call."""

    def __init__(self, module, monkeypatch):
        self.calls: list[tuple[int, int, torch.dtype]] = []
        inner = module.scope_similarity

        def spy(tokens, storage=None, row_chunk=1024):
            out = inner(tokens, storage, row_chunk)
            self.calls.append((tokens.shape[0], tokens.shape[1], out.dtype))
            return out

        monkeypatch.setattr(module, "scope_similarity", spy)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_mixed_batch_uses_each_images_storage(device, monkeypatch):
    """Threshold lowered to 32: image 0 (50 tokens) is fp16, images 1 and 2 stay fp32."""
    monkeypatch.setattr(similarity, "SCOPE_FP32_MAX_N", 32)
    spy = _StorageSpy(triton_scope, monkeypatch)
    tokens, saliency = _data(3, 50, 16, seed=23, device=device)
    lengths = [50, 20, 31]
    lens = torch.tensor(lengths, device=device)
    got = vtprune.fused_scope_select(tokens, saliency, 12, 1.0, lengths=lens, sorted=False, backend="triton")
    assert spy.calls == [(2, 31, torch.float32), (1, 50, torch.float16)]
    for b, nb in enumerate(lengths):
        alone = vtprune.fused_scope_select(tokens[b, :nb], saliency[b, :nb], 12, 1.0, sorted=False, backend="triton")
        # equal, or (image 1: its group is padded to 31 tokens, and a GPU's GEMM may round that S
        # differently from the 20-token one) equal up to a near-tie
        check_scope_picks(got[b].tolist(), alone.tolist(), tokens[b, :nb].cpu(), saliency[b, :nb].cpu(), 1.0, "mul")
    assert spy.calls[-3:] == [(1, 50, torch.float16), (1, 20, torch.float32), (1, 31, torch.float32)]
    # packed sequences: the same groups, the same picks
    cu = torch.tensor([0, 50, 70, 101], dtype=torch.int32, device=device)
    flat_t = torch.cat([tokens[b, :nb] for b, nb in enumerate(lengths)])
    flat_s = torch.cat([saliency[b, :nb] for b, nb in enumerate(lengths)])
    idx, _ = vtprune.scope_select_varlen(flat_t, flat_s, cu, 12, 1.0, sorted=False, backend="triton")
    assert spy.calls[-2:] == [(2, 31, torch.float32), (1, 50, torch.float16)]
    assert torch.equal(idx.view(3, 12) - cu[:-1, None].long(), got)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "cpu-engine"])
def test_torch_mixed_batch_uses_each_images_storage(dense, monkeypatch):
    monkeypatch.setattr(similarity, "SCOPE_FP32_MAX_N", 64)
    tokens, saliency = _data(3, 97, 16, seed=29)
    lengths = [97, 40, 61]
    lens = torch.tensor(lengths)
    got = torch_scope.scope_picks(tokens, saliency, 20, 1.0, "mul", lens, dense=dense)
    for b, nb in enumerate(lengths):
        alone = torch_scope.scope_picks(tokens[b : b + 1, :nb], saliency[b : b + 1, :nb], 20, 1.0, "mul", None, dense=dense)
        assert torch.equal(got[b], alone[0]), b
        forced = torch.float16 if nb > 64 else torch.float32
        again = torch_scope.scope_picks(
            tokens[b : b + 1, :nb], saliency[b : b + 1, :nb], 20, 1.0, "mul", None, dense=dense, similarity_dtype=forced
        )
        assert torch.equal(alone, again), b
    if dense:
        spy = _StorageSpy(torch_scope, monkeypatch)
        torch_scope.scope_picks(tokens, saliency, 5, 1.0, "mul", lens, dense=True)
        assert spy.calls == [(1, 97, torch.float16)]  # the fp32 group is built by _symmetric_similarity


# ----------------------------------------------------------------------------- torch backend above 4096 tokens (CPU)

N_LARGE = 4200


@pytest.fixture(scope="module")
def large_image():
    tokens, saliency = _data(1, N_LARGE, 32, seed=41)
    return tokens, saliency, _rounded_sim(tokens[0])


def _engines():
    cpp = pytest.mark.skipif(not CPU_ENGINE_BUILT, reason=f"vtprune._cpu: {CPU_ENGINE_REASON}")
    return [pytest.param("numpy", id="numpy"), pytest.param("cpp", id="cpp", marks=cpp)]


@pytest.mark.parametrize("engine", _engines())
def test_torch_cpu_engines_select_on_the_rounded_similarity(engine, large_image, monkeypatch):
    tokens, saliency, sim = large_image
    monkeypatch.setattr(torch_scope, "_ENGINE", engine)
    seen = []
    greedy = torch_scope._cpp_greedy

    def watch(s, *args):
        seen.append(bool(torch.equal(s, s.half().float())))
        return greedy(s, *args)

    monkeypatch.setattr(torch_scope, "_cpp_greedy", watch)
    k = 16
    got = vtprune.fused_scope_select(tokens, saliency, k, 1.0, sorted=False, backend="torch")
    assert seen == [True], "the CPU engines must receive fp16-rounded similarities above 4096 tokens"
    assert_valid_selection(got, k, N_LARGE)
    _assert_greedy_on(sim, np_weights(saliency[0], 1.0), got[0].tolist(), "mul", engine)


def test_cpu_rounding_follows_each_images_length(monkeypatch):
    monkeypatch.setattr(similarity, "SCOPE_FP32_MAX_N", 16)
    s = torch.rand(3, 20, 20, dtype=torch.float32) + 1e-3  # fp16 rounding changes almost every entry
    before = s.clone()
    torch_scope._round_to_half_(s, torch.tensor([20, 16, 17]), None)
    for b, rounded in enumerate([True, False, True]):
        assert torch.equal(s[b], before[b].half().float()) if rounded else torch.equal(s[b], before[b]), b
    assert not torch.equal(before[1], before[1].half().float())
    s = before.clone()
    torch_scope._round_to_half_(s, None, torch.float32)  # forced fp32: untouched
    assert torch.equal(s, before)
    monkeypatch.setattr(torch_scope, "_CHUNK_ELEMS", 20 * 3)  # three rows at a time
    torch_scope._round_to_half_(s, None, None)
    assert torch.equal(s, before.half().float())


def test_torch_dense_loop_above_4096_tokens(large_image):
    tokens, saliency, sim = large_image
    k = 10  # the dense loop costs a full N x N pass per step on the CPU
    got = torch_scope.scope_picks(tokens, saliency, k, 1.0, "add", None, dense=True)
    assert_valid_selection(got, k, N_LARGE)
    _assert_greedy_on(sim, np_weights(saliency[0], 1.0), got[0].tolist(), "add", "dense")


def test_dense_gains_upcast_in_row_blocks(monkeypatch):
    """The blocked fp32 pass over an fp16 S gives the gains of the rounded values."""
    g = torch.Generator().manual_seed(5)
    s = (torch.rand(2, 53, 53, generator=g) * 2 - 1).half()
    cover = torch.rand(2, 53, generator=g) * 0.5
    want = (s.double() - cover.double()[:, :, None]).clamp_min(0).sum(dim=1)
    monkeypatch.setattr(torch_scope, "_DENSE_BLOCK_ELEMS", 2 * 53 * 4)  # 4 rows per block
    got = torch_scope._dense_gains(s, cover)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


def test_torch_backend_fp64_keeps_fp64(monkeypatch):
    monkeypatch.setattr(similarity, "SCOPE_FP32_MAX_N", 16)
    tokens, saliency = _data(1, 40, 8, seed=3, dtype=torch.float64)
    for dense in (True, False):
        got = torch_scope.scope_picks(tokens, saliency, 12, 1.0, "mul", None, dense=dense)
        assert torch.equal(got, reference.scope_select(tokens, saliency, 12, 1.0, "mul", None, False)), dense


# ----------------------------------------------------------------------------- GPU: N = 16384

GPU_ONLY = pytest.mark.skipif(not HAS_GPU, reason="N = 16384 needs a CUDA device (memory is measured with torch.cuda)")
#: Extra bytes allowed per N * D element: the fp32 normalized tokens (4) and the fp32 row block of
#: the similarity (4 * 1024 * N, i.e. 3.2 at D = 1280), the dense loop's 64 MiB block, with margin.
BYTES_PER_ND = 16


@GPU_ONLY
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_16384_tokens_on_gpu(backend):
    n, d, k = 16384, 1280, 1024
    tokens, saliency = _data(1, n, d, seed=7, device="cuda", dtype=torch.float16)
    # warm-up: kernel compilation and cuBLAS's workspace are not the op's memory
    vtprune.fused_scope_select(tokens[:, :64], saliency[:, :64], 4, 1.0, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = vtprune.fused_scope_select(tokens, saliency, k, 1.0, sorted=False, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    bound = 2 * n * n + BYTES_PER_ND * n * d
    assert extra <= bound, f"peak extra memory {extra / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    row = got[0].tolist()
    assert len(set(row)) == k and all(0 <= v < n for v in row)
    # the first picks are the greedy picks of the rounded S (checked in float64 on the GPU)
    sim = scope_similarity(tokens).double()[0]
    w = saliency[0].double()
    cover = torch.zeros(n, dtype=torch.float64, device="cuda")
    taken = torch.zeros(n, dtype=torch.bool, device="cuda")
    for i, t in enumerate(row[:16]):
        score = (sim - cover[:, None]).clamp_min(0).sum(dim=0) * w
        score[taken] = -float("inf")
        best = float(score.max())
        assert float(score[t]) >= best - (TIE_REL * abs(best) + 1e-6 * n * 2 * float(w.max())), (i, t)
        taken[t] = True
        cover = torch.maximum(cover, sim[:, t])


@GPU_ONLY
def test_scope_similarity_fp16_peak_memory_on_gpu():
    n, d = 8192, 1280
    x = torch.randn(1, n, d, device="cuda", dtype=torch.float16)
    scope_similarity(x[:, :64])  # warm-up: cuBLAS allocates its workspace on first use
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    s = scope_similarity(x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert s.dtype == torch.float16
    # result + normalized fp32 tokens + one fp32 [1024, N] block, + 8 MiB of allocator slack
    assert extra <= 2 * n * n + 4 * n * d + 4 * 1024 * n + (8 << 20), extra
