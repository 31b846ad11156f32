"""The CUDA SCOPE kernel (``backend="cuda"``, csrc/scope.cu) against the reference, SPEC §1.

The kernel tests take the ``cuda_rt`` fixture (tests/cuda_emu/runtime.py): they run on a GPU
("gpu", skipped without one) and on the CUDA emulator ("emu": the same kernel source compiled for
the CPU, every launch run under two thread schedules that must agree bit for bit). CUDA graphs
and torch.compile stay GPU-only. The argument checks of the binding ``vtprune._C.scope_greedy``
need no device and run everywhere ``vtprune._C`` is built.

Exactness: on fp32 inputs the picks must equal the reference's, step for step, up to the first
*near-tie* of the reference trajectory: two candidate scores within ``TIE_REL`` (relative) plus the
absolute slack that fp32 sums of ``N`` terms carry (``1e-6 * N`` per unit of weight, as in
``conftest.assert_same_greedy``; the kernel's incremental gains drift by a few ulps of the
*initial* gain, which matters once gains are small). Past a near-tie only greedy validity is
required. The float64 models here update the gains incrementally, so ``k = N = 2881`` stays cheap.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtprune
from vtprune import _cuda
from vtprune.similarity import scope_similarity
from conftest import SCOPE_SIZE_ERRORS, assert_covered_ties_go_to_lowest_index, assert_same_greedy, assert_weights_read_in_kernel, np_cosine, np_weights, require_c_entry
from cuda_emu.runtime import cuda_rt  # noqa: F401  (fixture)

CUDA_OK, CUDA_REASON = _cuda.status()
needs_gpu = pytest.mark.skipif(not CUDA_OK, reason=f"backend='cuda' is not usable here: {CUDA_REASON}")

TIE_REL = 1e-5
NEAR_TIES: list[str] = []  # cases that hit a near-tie, for the summary at the end


def _data(batch: int, n: int, d: int, seed: int, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, n, d, generator=g).to(device=device, dtype=dtype)
    saliency = torch.rand(batch, n, generator=g).to(device=device, dtype=dtype)
    return tokens, saliency


# ----------------------------------------------------------------------------- float64 model


class _Greedy64:
    """SCOPE state in float64 with incremental gains: ``scores()`` then ``take(t)``, step by step."""

    def __init__(self, sim: np.ndarray, w: np.ndarray, combine: str):
        self.sim, self.w, self.mul = sim, w, combine == "mul"
        self.n = sim.shape[0]
        self.cover = np.zeros(self.n)
        self.gain = np.maximum(sim, 0.0).sum(axis=0)
        self.taken = np.zeros(self.n, dtype=bool)

    def scores(self) -> np.ndarray:
        score = self.gain * self.w if self.mul else self.gain + self.w
        return np.where(self.taken, -np.inf, score)

    def take(self, t: int) -> None:
        self.taken[t] = True
        col = self.sim[:, t]
        changed = np.flatnonzero(col > self.cover)
        if changed.size:
            lo, hi = self.cover[changed][:, None], col[changed][:, None]
            # max(0, S - lo) - max(0, S - hi) = clip(S, lo, hi) - lo, row u of S = its terms
            self.gain -= (np.clip(self.sim[changed], lo, hi) - lo).sum(axis=0)
            self.cover[changed] = col[changed]

    def slack(self, a: int, b: int) -> float:
        """Absolute rounding slack of two fp32 scores (see the module docstring)."""
        return 1e-6 * self.n * ((self.w[a] + self.w[b]) if self.mul else 2.0)


def _np_greedy(sim: np.ndarray, w: np.ndarray, k: int, combine: str) -> list[int]:
    """Greedy picks of SPEC §1 on a given float64 similarity (lowest index on exact ties)."""
    state = _Greedy64(sim, w, combine)
    picks = []
    for _ in range(k):
        t = int(np.argmax(state.scores()))
        picks.append(t)
        state.take(t)
    return picks


def _first_near_tie(sim: np.ndarray, w: np.ndarray, picks: list[int], combine: str) -> int:
    """First step of ``picks`` whose best two float64 scores are within the tie band (else len)."""
    state = _Greedy64(sim, w, combine)
    for i, t in enumerate(picks):
        score = state.scores()
        if np.isfinite(score).sum() >= 2:
            b, a = np.argsort(score, kind="stable")[-2:]
            if score[a] - score[b] <= TIE_REL * abs(score[a]) + state.slack(a, b):
                return i
        state.take(t)
    return len(picks)


def _check_valid_from(sim: np.ndarray, w: np.ndarray, picks: list[int], combine: str, start: int) -> None:
    """Every pick from step ``start`` on is within the tie band of the best score (own trajectory)."""
    state = _Greedy64(sim, w, combine)
    for i, t in enumerate(picks):
        if i >= start:
            score = state.scores()
            arg = int(np.argmax(score))
            best = score[arg]
            assert score[t] >= best - (TIE_REL * abs(best) + state.slack(t, arg)), (
                f"step {i}: picked {t} with score {score[t]!r}, best unselected is {arg} with {best!r}"
            )
        state.take(t)


def _check_image(sim: np.ndarray, w: np.ndarray, got: list[int], want: list[int], combine: str, case: str) -> None:
    """``got`` equals ``want`` (pick order) up to the first near-tie of ``want``, valid after it."""
    n = sim.shape[0]
    assert len(set(got)) == len(got) and all(0 <= v < n for v in got), f"{case}: invalid picks {got}"
    if got == want:
        return
    diverge = next(i for i, (p, q) in enumerate(zip(got, want)) if p != q)
    tie = _first_near_tie(sim, w, want, combine)
    assert diverge >= tie, (
        f"{case}: kernel and reference diverge at step {diverge} ({got[diverge]} vs {want[diverge]}) "
        f"with no near-tie before it (first near-tie: step {tie})"
    )
    NEAR_TIES.append(f"{case}: diverged at step {diverge} (near-tie at {tie})")
    _check_valid_from(sim, w, got, combine, diverge)


def _oracle(cuda_rt) -> str:
    """The backend the kernel's picks are compared with: the reference on a GPU; on the emulator,
    whose tensors are on the CPU, the torch backend, which returns the reference's picks exactly in
    fp32 (test_torch_backend.py) and is ~50x faster there than the reference's per-step recomputation."""
    return "torch" if cuda_rt.emu else "reference"


def _check_batch(tokens, saliency, got, want, alpha, combine, lengths, case: str) -> None:
    """``got``/``want``: ``[B, k]`` picks in pick order of the same fp32 inputs."""
    for b in range(got.shape[0]):
        nb = tokens.shape[1] if lengths is None else int(lengths[b])
        sim = np_cosine(tokens[b, :nb].float().cpu())
        w = np_weights(saliency[b, :nb].float().cpu(), alpha)
        _check_image(sim, w, got[b].tolist(), want[b].tolist(), combine, f"{case} image {b}")


# ----------------------------------------------------------------------------- exactness (fp32)

# (B, N, D, k, lengths or None, id)
SHAPES = [
    (1, 1, 8, 1, None, "N1"),
    (3, 7, 8, 3, [7, 3, 5], "N7-k3-lengths"),
    (2, 7, 8, 7, None, "N7-kN"),
    (3, 97, 16, 1, [97, 40, 61], "N97-k1-lengths"),
    (3, 97, 16, 25, [97, 40, 61], "N97-k25-lengths"),
    (1, 97, 16, 97, None, "N97-kN"),
    (2, 577, 32, 64, [577, 301], "N577-k64-lengths"),
    (1, 577, 32, 577, None, "N577-kN"),
    (2, 2881, 64, 128, [2881, 1500], "N2881-k128-lengths"),
    (1, 2881, 16, 2881, None, "N2881-kN"),
]
FULL_GRID = [(c, a) for c in ("mul", "add") for a in (0.0, 1.0, 2.5)]
LARGE_GRID = [("mul", 1.0), ("mul", 0.0), ("add", 2.5)]
CASES = [
    pytest.param(batch, n, d, k, lengths, combine, alpha, id=f"{name}-{combine}-a{alpha}")
    for batch, n, d, k, lengths, name in SHAPES
    for combine, alpha in (LARGE_GRID if k > 100 else FULL_GRID)
]


@pytest.mark.parametrize("batch,n,d,k,lengths,combine,alpha", CASES)
def test_matches_reference_fp32(cuda_rt, batch, n, d, k, lengths, combine, alpha):
    dev = cuda_rt.device
    if cuda_rt.emu and k > 1024:
        pytest.skip("thousands of greedy steps take minutes on the emulator (GPU only); there N577-kN runs "
                    "every step and N2881-k128 the multi-chunk paths")
    tokens, saliency = _data(batch, n, d, seed=n * 31 + k, device=dev)
    lens = None if lengths is None else torch.tensor(lengths, device=dev)
    kw = dict(combine=combine, lengths=lens, sorted=False)
    got = vtprune.fused_scope_select(tokens, saliency, k, alpha, backend="cuda", **kw)
    want = vtprune.fused_scope_select(tokens, saliency, k, alpha, backend=_oracle(cuda_rt), **kw)
    assert got.dtype == torch.int64 and got.shape == (batch, k) and got.device == tokens.device
    _check_batch(tokens, saliency, got.cpu(), want.cpu(), alpha, combine, lengths, f"N={n} k={k} {combine} a={alpha}")
    # sorted=True is the ascending form of the same selection
    asc = vtprune.fused_scope_select(tokens, saliency, k, alpha, backend="cuda", **{**kw, "sorted": True})
    assert torch.equal(asc, got.sort(dim=1).values)


@pytest.mark.parametrize("combine", ["mul", "add"])
def test_prefix_unbatched_and_sorted(cuda_rt, combine):
    dev = cuda_rt.device
    tokens, saliency = _data(2, 50, 16, seed=5, device=dev)
    lens = torch.tensor([50, 33], device=dev)
    kw = dict(combine=combine, lengths=lens, backend="cuda")
    picks = vtprune.fused_scope_select(tokens, saliency, 12, 1.0, sorted=False, **kw)
    want = vtprune.fused_scope_select(tokens, saliency, 12, 1.0, combine=combine, lengths=lens, sorted=False, backend="reference")
    _check_batch(tokens, saliency, picks.cpu(), want.cpu(), 1.0, combine, [50, 33], f"prefix {combine}")
    # the greedy prefix property: the first k' picks are the k'-selection, bit for bit (the
    # kernel's arithmetic for a step does not depend on k)
    five = vtprune.fused_scope_select(tokens, saliency, 5, 1.0, sorted=False, **kw)
    assert torch.equal(five, picks[:, :5])
    # alone (unbatched, unpadded) vs padded in a batch: S may round differently, so near-ties may differ
    one = vtprune.fused_scope_select(tokens[1, :33], saliency[1, :33], 12, 1.0, combine=combine, sorted=False, backend="cuda")
    assert one.shape == (12,)
    assert_same_greedy(one.cpu(), picks[1].cpu(), tokens[1, :33].cpu(), saliency[1, :33].cpu(), 1.0, combine)


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "pick-order"])
@pytest.mark.parametrize("per_seq_k", [True, False], ids=["k-tensor", "k-int"])
def test_varlen_matches_reference(cuda_rt, per_seq_k, sorted_):
    dev = cuda_rt.device
    seqlens = [40, 7, 97, 1, 23, 577]
    g = torch.Generator().manual_seed(11)
    tokens = torch.randn(sum(seqlens), 16, generator=g).to(dev)
    saliency = torch.rand(sum(seqlens), generator=g).to(dev)
    cu = torch.tensor([0] + list(np.cumsum(seqlens)), dtype=torch.int32, device=dev)
    ks = [10, 7, 30, 1, 4, 64] if per_seq_k else [1] * len(seqlens)
    k = torch.tensor(ks, device=dev) if per_seq_k else 1
    for combine, alpha in (("mul", 1.0), ("add", 2.5)):
        idx, cu_k = vtprune.scope_select_varlen(tokens, saliency, cu, k, alpha, combine=combine, sorted=sorted_, backend="cuda")
        ref_idx, ref_cu_k = vtprune.scope_select_varlen(tokens, saliency, cu, k, alpha, combine=combine, sorted=sorted_, backend=_oracle(cuda_rt))
        assert idx.dtype == torch.int64 and idx.device == tokens.device
        assert cu_k.dtype == cu.dtype and torch.equal(cu_k.cpu(), ref_cu_k.cpu())
        idx, ref_idx, bounds = idx.cpu(), ref_idx.cpu(), cu.cpu().tolist()
        for b, kb in enumerate(ks):
            start, end = bounds[b], bounds[b + 1]
            got = idx[int(cu_k[b]) : int(cu_k[b + 1])] - start
            want = ref_idx[int(cu_k[b]) : int(cu_k[b + 1])] - start
            assert got.numel() == kb
            if sorted_:
                assert torch.all(got[1:] > got[:-1]), got
            sim = np_cosine(tokens[start:end].cpu())
            w = np_weights(saliency[start:end].cpu(), alpha)
            if got.tolist() != want.tolist():
                # only a near-tie may make them differ: compare the pick orders
                order, _ = vtprune.scope_select_varlen(tokens, saliency, cu, k, alpha, combine=combine, sorted=False, backend="cuda")
                ref_order, _ = vtprune.scope_select_varlen(tokens, saliency, cu, k, alpha, combine=combine, sorted=False, backend=_oracle(cuda_rt))
                seg = slice(int(cu_k[b]), int(cu_k[b + 1]))
                _check_image(sim, w, (order.cpu()[seg] - start).tolist(), (ref_order.cpu()[seg] - start).tolist(), combine, f"varlen seq {b}")


def test_storage_and_list_paths_agree(cuda_rt):
    """State in the global workspace gives the same bits; a small list only regroups the sums."""
    dev = cuda_rt.device
    tokens, saliency = _data(2, 2881, 32, seed=21, device=dev)
    lens = torch.tensor([2881, 2000], device=dev)
    args = (tokens, saliency, 96, 1.0, "mul", lens, False)
    base = _cuda.scope_select(*args)
    glob = _cuda.scope_select(*args, force_global_state=True)
    assert torch.equal(glob, base)
    # max_list=1024 applies the list after every chunk of 1024 rows (several times per step here)
    small = _cuda.scope_select(*args, max_list=1024)
    small_glob = _cuda.scope_select(*args, max_list=1024, force_global_state=True)
    assert torch.equal(small_glob, small)
    for b in range(2):
        nb = int(lens[b])
        sim = np_cosine(tokens[b, :nb].cpu())
        w = np_weights(saliency[b, :nb].cpu(), 1.0)
        _check_image(sim, w, small[b].tolist(), base[b].tolist(), "mul", f"max_list=1024 image {b}")
    if cuda_rt.emu:
        # Emulated devices with less opt-in shared memory than H100's take the launcher's other
        # plans for N = 2881 (state 26 KB, full list 37 KB, tile buffers 17 KB): 64 KiB keeps the
        # state in shared memory with the 1024-row list, 48 KiB moves it to the workspace, and 16 KiB
        # fits no plan, which the launcher must report instead of launching.
        with cuda_rt.emulator.smem_optin(65536):
            assert torch.equal(_cuda.scope_select(*args), small)
            assert torch.equal(_cuda.scope_select(*args, force_global_state=True), base)
        with cuda_rt.emulator.smem_optin(49152):
            assert torch.equal(_cuda.scope_select(*args), small)
        with cuda_rt.emulator.smem_optin(16384), pytest.raises(RuntimeError, match="cudaErrorInvalidConfiguration"):
            _cuda.scope_select(*args)


@pytest.mark.parametrize("force_global_state", [False, True], ids=["smem-state", "global-state"])
@pytest.mark.parametrize("n", [7, 97, 577])
def test_fp16_similarity_kernel_is_the_greedy_of_the_rounded_S(cuda_rt, n, force_global_state):
    """The fp16-S instantiation at sizes where the reference can check it: the picks are the exact
    greedy picks of the fp16-rounded similarity (the kernel upcasts every entry exactly)."""
    dev = cuda_rt.device
    tokens, saliency = _data(2, n, 16, seed=n + 3, device=dev)
    lens = torch.tensor([n, max(1, n - 5)], device=dev)
    k = max(1, n - 6)
    for combine, alpha in (("mul", 1.0), ("add", 0.5)):
        got = _cuda.scope_select(
            tokens, saliency, k, alpha, combine, lens, False, similarity_dtype=torch.float16, force_global_state=force_global_state
        ).cpu()
        for b in range(2):
            nb = int(lens[b])
            sim16 = scope_similarity(tokens[b : b + 1, :nb], torch.float16)[0].double().cpu().numpy()
            w = np_weights(saliency[b, :nb].cpu(), alpha)
            want = _np_greedy(sim16, w, k, combine)
            _check_image(sim16, w, got[b].tolist(), want, combine, f"fp16 S N={n} {combine} image {b}")


@pytest.mark.parametrize("lengths", [[4099, 4097], [4099, 1000]], ids=["both-fp16", "mixed-storage"])
def test_large_n_fp16_path(cuda_rt, lengths):
    """N > 4096: S in fp16 (a mixed batch runs its short image on fp32 S): valid picks, and the
    coverage objective of the reference's selection."""
    dev = cuda_rt.device
    n, k = 4099, 16
    tokens, saliency = _data(2, n, 8, seed=7, device=dev)
    lens = torch.tensor(lengths, device=dev)
    got = vtprune.fused_scope_select(tokens, saliency, k, 1.0, lengths=lens, sorted=False, backend="cuda")
    want = vtprune.fused_scope_select(tokens, saliency, k, 1.0, lengths=lens, sorted=False, backend=_oracle(cuda_rt))
    for b, nb in enumerate(lengths):
        row = got[b].tolist()
        assert len(set(row)) == k and all(0 <= v < nb for v in row), row
    fl_got = vtprune.facility_location(tokens, got, lengths=lens, backend="reference")
    fl_ref = vtprune.facility_location(tokens, want, lengths=lens, backend="reference")
    assert torch.all(fl_got >= 0.995 * fl_ref), (fl_got, fl_ref)
    if lengths[1] <= 4096:  # the short image ran on fp32 S: exact up to near-ties
        sim = np_cosine(tokens[1, : lengths[1]].cpu())
        w = np_weights(saliency[1, : lengths[1]].cpu(), 1.0)
        _check_image(sim, w, got[1].tolist(), want[1].tolist(), "mul", "mixed batch, fp32 image")


# ----------------------------------------------------------------------------- other inputs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(cuda_rt, dtype):
    dev = cuda_rt.device
    batch, n, k = 3, 577, 40
    tokens, saliency = _data(batch, n, 32, seed=3, device=dev)
    lens = torch.tensor([577, 97, 300], device=dev)
    for combine in ("mul", "add"):
        got = vtprune.fused_scope_select(tokens.to(dtype), saliency.to(dtype), k, 1.0, combine=combine, lengths=lens, backend="cuda")
        ref = vtprune.fused_scope_select(tokens, saliency, k, 1.0, combine=combine, lengths=lens, backend=_oracle(cuda_rt))
        assert got.dtype == torch.int64 and got.shape == (batch, k)
        for b in range(batch):
            row = got[b].tolist()
            assert len(set(row)) == k and all(0 <= v < int(lens[b]) for v in row), row
            assert row == sorted(row)
        fl_got = vtprune.facility_location(tokens, got, lengths=lens, backend="reference")
        fl_ref = vtprune.facility_location(tokens, ref, lengths=lens, backend="reference")
        assert torch.all(fl_got >= 0.98 * fl_ref), (combine, fl_got, fl_ref)


def test_nan_inputs_give_valid_deterministic_picks(cuda_rt):
    dev = cuda_rt.device
    tokens, saliency = _data(3, 40, 8, seed=9, device=dev)
    tokens[0, 3] = float("nan")
    tokens[1, :, 2] = float("inf")  # every token of image 1 normalizes to NaN
    saliency[2, 5:9] = float("nan")
    saliency[0, 7] = float("inf")
    lens = torch.tensor([40, 40, 30], device=dev)
    for combine in ("mul", "add"):
        kw = dict(combine=combine, lengths=lens, sorted=False, backend="cuda")
        first = vtprune.fused_scope_select(tokens, saliency, 12, 1.0, **kw)
        again = vtprune.fused_scope_select(tokens, saliency, 12, 1.0, **kw)
        assert torch.equal(first, again)
        for b, row in enumerate(first.tolist()):
            assert len(set(row)) == 12 and all(0 <= v < int(lens[b]) for v in row), (b, row)
    # all scores NaN: the lowest unselected index each step (SPEC §1)
    nan_sal = torch.full((1, 40), float("nan"), device=dev)
    picks = vtprune.fused_scope_select(tokens[2:], nan_sal, 6, 1.0, sorted=False, backend="cuda")
    assert picks.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_zero_vectors_and_exact_ties(cuda_rt):
    dev = cuda_rt.device
    # Zero tokens: similarity 0 with everything, gain exactly 0, no NaN.
    tokens, saliency = _data(2, 30, 8, seed=4, device=dev)
    tokens[0, ::3] = 0.0
    tokens[1] = 0.0  # an image of zero vectors: every score ties, lowest index first
    for combine in ("mul", "add"):
        got = vtprune.fused_scope_select(tokens, saliency, 15, 1.0, combine=combine, sorted=False, backend="cuda")
        want = vtprune.fused_scope_select(tokens, saliency, 15, 1.0, combine=combine, sorted=False, backend="reference")
        assert torch.equal(got.cpu(), want.cpu()), (combine, got, want)
    zero_sal = torch.zeros(2, 30, device=dev)
    got = vtprune.fused_scope_select(tokens, zero_sal, 15, 1.0, sorted=False, backend="cuda")
    assert got[1].tolist() == list(range(15))


@pytest.mark.parametrize(
    "knobs",
    [{}, dict(force_global_state=True), dict(cluster_size=2), dict(cluster_size=4, force_global_state=True)],
    ids=["smem-state", "global-state", "cluster-2", "cluster-4-streamed"],
)
def test_fully_covered_tokens_tie_at_zero(cuda_rt, knobs):
    """Duplicates of picked tokens have gain exactly 0: lowest index first, not rounding residue."""
    assert_covered_ties_go_to_lowest_index(
        lambda x, s, k: _cuda.scope_select(x, s, k, 1.0, "mul", None, False, **knobs), cuda_rt.device
    )


@pytest.mark.parametrize("n", [53, 1100, 2881])
def test_ties_across_threads_and_tiles(cuda_rt, n):
    """Every similarity exactly 1: all gains tie (then are all 0); equal scores go to the lowest
    index across threads, warps and column tiles (n > 1024: several candidates per thread)."""
    dev = cuda_rt.device
    tokens = torch.zeros(2, n, 8, device=dev)
    tokens[:, :, 0] = 1.0
    saliency = torch.ones(2, n, device=dev)
    saliency[1, n - 13] = 2.0  # image 1: that token first, then the rest by index
    picks = vtprune.fused_scope_select(tokens, saliency, 20, 1.0, sorted=False, backend="cuda")
    assert picks[0].tolist() == list(range(20))
    assert picks[1].tolist() == [n - 13] + list(range(19))


def test_padding_contents_are_ignored(cuda_rt):
    dev = cuda_rt.device
    tokens, saliency = _data(2, 64, 8, seed=6, device=dev)
    lens = torch.tensor([64, 20], device=dev)
    base = vtprune.fused_scope_select(tokens, saliency, 10, 1.0, lengths=lens, sorted=False, backend="cuda")
    tokens[1, 20:] = float("nan")
    saliency[1, 20:] = 1e30
    dirty = vtprune.fused_scope_select(tokens, saliency, 10, 1.0, lengths=lens, sorted=False, backend="cuda")
    assert torch.equal(base, dirty)


def test_many_images_and_out_of_range_k(cuda_rt):
    """More images than SMs (the grid-stride loop), and per-image k beyond the length is clamped."""
    dev = cuda_rt.device
    tokens, saliency = _data(300, 33, 8, seed=12, device=dev)
    lens = torch.randint(1, 34, (300,), generator=torch.Generator().manual_seed(1)).to(dev)
    got = vtprune.fused_scope_select(tokens, saliency, 1, 1.0, lengths=lens, backend="cuda")
    want = vtprune.fused_scope_select(tokens, saliency, 1, 1.0, lengths=lens, backend="reference")
    assert torch.equal(got, want)  # one pick: the argmax of the initial scores, no drift
    ks = torch.tensor([50, 0, -3], device=dev)
    out = _cuda.scope_picks(tokens[:3], saliency[:3], ks, 40, 1.0, "mul", lens[:3])
    nb = int(lens[0])
    row = out[0, : min(nb, 40)].tolist()
    assert sorted(row) == sorted(set(row)) and all(0 <= v < nb for v in row), row


# ----------------------------------------------------------------------------- cluster kernel (sm_90)
#
# csrc/scope_cluster.cu runs an image on a thread-block cluster, each CTA owning a slice of S's
# columns. It adds every column sum with the same formulas, in the same order (eight row groups,
# rows in ascending order inside a group, the groups' partial sums added in group order, the
# whole list of changed rows applied once per step) as the single-CTA kernel, and it reduces the
# picks with the same total order (score, then lower index). So its gains are bit for bit those
# of csrc/scope.cu and its picks must be EQUAL to that kernel's, near-ties included; the
# comparison with the reference then only has to hold up to near-ties, as above.
# On the emulator a cluster of 16 CTAs is 8192 fibers, so the big cases use small clusters.

# (B, N, D, k, lengths, combine, cluster sizes, id)
CLUSTER_SHAPES = [
    (1, 1, 8, 1, None, "mul", [0, 2, 4, 8, 16], "N1"),
    (3, 7, 8, 3, [7, 3, 5], "mul", [2, 16], "N7-k3-lengths"),
    (3, 7, 8, 3, [7, 3, 5], "add", [4, 8], "N7-k3-lengths"),
    (2, 7, 8, 7, None, "add", [0, 4], "N7-kN"),
    (3, 97, 16, 25, [97, 40, 61], "mul", [0, 2, 8], "N97-k25-lengths"),
    (3, 97, 16, 25, [97, 40, 61], "add", [4], "N97-k25-lengths"),
    (1, 97, 16, 10, None, "add", [16], "N97-k10"),
    (1, 97, 16, 97, None, "mul", [4], "N97-kN"),
    (2, 577, 32, 64, [577, 301], "mul", [0], "N577-k64-lengths"),
    (2, 577, 32, 64, [577, 301], "add", [2], "N577-k64-lengths"),
    (1, 577, 32, 577, None, "add", [2], "N577-kN"),
    (2, 2881, 64, 128, [2881, 1500], "mul", [0, 8], "N2881-k128-lengths"),
    (1, 2881, 16, 2881, None, "add", [0], "N2881-kN"),
]
CLUSTER_CASES = [
    pytest.param(batch, n, d, k, lengths, combine, size, id=f"{name}-{combine}-C{size}")
    for batch, n, d, k, lengths, combine, sizes, name in CLUSTER_SHAPES
    for size in sizes
]


def _needs_clusters(cuda_rt) -> None:
    """Skip the "gpu" runtime on a GPU without thread-block clusters (the emulator is an sm_90)."""
    if not cuda_rt.emu and torch.cuda.get_device_capability(cuda_rt.device)[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0 (refusal: test_cluster_refused_below_compute_capability_9)")


def _cluster_vs_single(tokens, saliency, k, combine, lengths, size, **knobs):
    """(cluster picks, single-CTA picks), pick order, for the same inputs."""
    args = (tokens, saliency, k, 1.0, combine, lengths, False)
    return _cuda.scope_select(*args, cluster_size=size, **knobs), _cuda.scope_select(*args)


@pytest.mark.parametrize("batch,n,d,k,lengths,combine,size", CLUSTER_CASES)
def test_cluster_kernel_matches_reference_and_single_cta(cuda_rt, batch, n, d, k, lengths, combine, size):
    _needs_clusters(cuda_rt)
    dev = cuda_rt.device
    if cuda_rt.emu and n > 1000:
        pytest.skip("N = 2881 on a cluster takes minutes on the emulator (GPU only)")
    tokens, saliency = _data(batch, n, d, seed=n * 7 + k, device=dev)
    lens = None if lengths is None else torch.tensor(lengths, device=dev)
    got, single = _cluster_vs_single(tokens, saliency, k, combine, lens, size)
    assert got.dtype == torch.int64 and got.shape == (batch, k) and got.device == tokens.device
    assert torch.equal(got, single)  # same arithmetic in the same order (see above)
    # sorted: every CTA writes its own slice's picks, after the picks left of it
    ascending = _cuda.scope_select(tokens, saliency, k, 1.0, combine, lens, True, cluster_size=size)
    assert torch.equal(ascending, single.sort(dim=1).values)
    want = vtprune.fused_scope_select(tokens, saliency, k, 1.0, combine=combine, lengths=lens, sorted=False, backend=_oracle(cuda_rt))
    _check_batch(tokens, saliency, got.cpu(), want.cpu(), 1.0, combine, lengths, f"cluster C={size} N={n} k={k} {combine}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cluster_size", [None, 2], ids=["single-cta", "cluster-2"])
def test_weights_read_from_the_saliency(cuda_rt, dtype, cluster_size):
    if cluster_size is not None:
        _needs_clusters(cuda_rt)

    def select(tokens, saliency, k, alpha, combine):
        return _cuda.scope_select(tokens, saliency, k, alpha, combine, None, False, cluster_size=cluster_size)

    assert_weights_read_in_kernel(select, cuda_rt.device, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(7, 7), (97, 16)])
def test_cluster_kernel_on_16bit_tokens(cuda_rt, dtype, n, k):
    # 16-bit tokens reach the cluster kernel through the fused similarity (fp32 S), the same S the
    # single-CTA kernel reads, so the picks must be the same, and a valid selection.
    _needs_clusters(cuda_rt)
    tokens, saliency = _data(2, n, 24, seed=n + k, device=cuda_rt.device, dtype=dtype)
    got, single = _cluster_vs_single(tokens, saliency, k, "mul", None, 0)
    assert got.shape == (2, k) and got.dtype == torch.int64
    assert torch.equal(got, single)
    for row in got.cpu().tolist():
        assert len(set(row)) == k and all(0 <= i < n for i in row)


@pytest.mark.parametrize("size", [2, 4, 8, 16])
def test_cluster_slices_in_shared_and_global_memory(cuda_rt, size):
    """Every size with the column slices in shared memory, and streamed from global memory
    (force_global_state): both plans are taken (checked), and both give the single-CTA picks."""
    _needs_clusters(cuda_rt)
    dev = cuda_rt.device
    n, k = (97, 12) if size == 16 else (97, 30)
    tokens, saliency = _data(2, n, 16, seed=size, device=dev)
    lens = torch.tensor([n, 58], device=dev)
    assert _cuda.scope_cluster_plan(n, size)[:2] == (size, True)
    assert _cuda.scope_cluster_plan(n, size, force_global_state=True)[:2] == (size, False)
    single = _cuda.scope_select(tokens, saliency, k, 1.0, "mul", lens, False)
    for force in (False, True):
        got = _cuda.scope_select(tokens, saliency, k, 1.0, "mul", lens, False, cluster_size=size, force_global_state=force)
        assert torch.equal(got, single), (size, force)


def test_cluster_plans(cuda_rt):
    """The automatic size: the smallest cluster whose slices fit in shared memory (N = 576 on the
    emulated H100: 8 CTAs of 576 x 72 fp32 columns, the design point of docs/performance.md), else
    the largest cluster that can run, streaming. On a real GPU the occupancy query may rule out a
    size, so only the plan's shape is checked there."""
    _needs_clusters(cuda_rt)
    if cuda_rt.emu:
        assert _cuda.scope_cluster_plan(576)[:2] == (8, True)
        assert _cuda.scope_cluster_plan(97)[:2] == (2, True)
        assert _cuda.scope_cluster_plan(2881)[:2] == (16, False)
        assert _cuda.scope_cluster_plan(577, 2)[:2] == (2, False)  # 577 x 289 x 4 B: does not fit
    for n in (1, 7, 97, 577, 4096):
        size, _, smem = _cuda.scope_cluster_plan(n)
        assert size in (2, 4, 8, 16) and smem > 0


def test_cluster_on_devices_with_less_shared_memory(cuda_rt):
    """Emulated devices with less opt-in shared memory take the other plans, with the same picks;
    when not even the streaming layout fits, the launcher reports it instead of launching."""
    if not cuda_rt.emu:
        pytest.skip("emulated devices only")
    dev = cuda_rt.device
    tokens, saliency = _data(2, 97, 16, seed=4, device=dev)
    lens = torch.tensor([97, 60], device=dev)
    single = _cuda.scope_select(tokens, saliency, 20, 1.0, "add", lens, False)
    with cuda_rt.emulator.smem_optin(32768) as device:
        auto = _cuda.scope_cluster_plan(97, device=device)
        assert auto[1] and auto[0] > 2 and auto[2] <= 32768  # the 2-CTA slices (~19 KB each) no longer fit
        assert _cuda.scope_cluster_plan(97, 2, device=device)[:2] == (2, False)
        for size in (0, 2):
            assert torch.equal(_cuda.scope_select(tokens, saliency, 20, 1.0, "add", lens, False, cluster_size=size), single)
    tokens, saliency = _data(1, 577, 16, seed=4, device=dev)
    with cuda_rt.emulator.smem_optin(16384) as device:
        with pytest.raises(RuntimeError, match="cudaErrorInvalidConfiguration"):
            _cuda.scope_cluster_plan(577, device=device)
        with pytest.raises(RuntimeError, match="cudaErrorInvalidConfiguration"):
            _cuda.scope_select(tokens, saliency, 3, 1.0, "mul", None, False, cluster_size=0)


def test_cluster_per_image_k_and_clamped_lengths(cuda_rt):
    """Per-image k (0, beyond the length, negative) and lengths outside [1, N] are clamped as by
    the single-CTA kernel; entries past an image's k stay untouched (compared as such)."""
    _needs_clusters(cuda_rt)
    dev = cuda_rt.device
    tokens, saliency = _data(5, 61, 16, seed=9, device=dev)
    lens = torch.tensor([61, 10, 0, 500, 33], device=dev)  # 0 -> 1, 500 -> 61
    ks = torch.tensor([17, 0, 4, 61, -2], device=dev)
    for size, combine in ((4, "mul"), (2, "add")):
        got = _cuda.scope_picks(tokens, saliency, ks, 40, 1.0, combine, lens, cluster_size=size)
        want = _cuda.scope_picks(tokens, saliency, ks, 40, 1.0, combine, lens)
        ascending = _cuda.scope_picks(tokens, saliency, ks, 40, 1.0, combine, lens, sorted=True, cluster_size=size)
        for b, kb in enumerate([17, 0, 1, 40, 0]):
            assert torch.equal(got[b, :kb], want[b, :kb]), (size, b)
            assert torch.equal(ascending[b, :kb], want[b, :kb].sort().values), (size, b)
        assert got[2, 0].item() == 0  # a length-1 image has one token to pick
        nb = min(int(lens[3]), 61)
        row = got[3, :40].tolist()
        assert len(set(row)) == 40 and all(0 <= v < nb for v in row)


def test_cluster_varlen_matches_single_cta(cuda_rt):
    _needs_clusters(cuda_rt)
    dev = cuda_rt.device
    seqlens = [40, 7, 97, 1, 23]
    g = torch.Generator().manual_seed(17)
    tokens = torch.randn(sum(seqlens), 16, generator=g).to(dev)
    saliency = torch.rand(sum(seqlens), generator=g).to(dev)
    cu = torch.tensor([0] + list(np.cumsum(seqlens)), dtype=torch.int32, device=dev)
    ks = torch.tensor([10, 7, 30, 1, 4], device=dev)
    for sorted_ in (False, True):
        got = _cuda.scope_select_varlen(tokens, saliency, cu, ks, 1.0, "mul", sorted_, cluster_size=2)
        want = _cuda.scope_select_varlen(tokens, saliency, cu, ks, 1.0, "mul", sorted_)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), sorted_


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(cluster_size=3), "cluster_size must be None"),
        (dict(cluster_size=1), "cluster_size must be None"),
        (dict(cluster_size=32), "cluster_size must be None"),
        (dict(cluster_size=-1), "cluster_size must be None"),
        (dict(cluster_size=True), "cluster_size must be None"),
        (dict(cluster_size=2.0), "cluster_size must be None"),
        (dict(cluster_size=2, max_list=1024), "max_list is a knob of the single-CTA kernel"),
        (dict(cluster_size=0, similarity_dtype=torch.float16), "fp32 similarity only"),
    ],
)
def test_cluster_option_is_validated(cuda_rt, options, message):
    tokens, saliency = _data(1, 7, 8, seed=1, device=cuda_rt.device)
    with pytest.raises(ValueError, match=message):
        _cuda.scope_select(tokens, saliency, 2, 1.0, "mul", None, False, **options)
    if set(options) == {"cluster_size"}:
        with pytest.raises(ValueError, match=message):
            _cuda.scope_cluster_plan(7, options["cluster_size"])


def test_cluster_refuses_fp16_storage(cuda_rt):
    """Images above 4096 tokens get fp16 S, which the cluster kernel does not take: a clear error
    before any work, not a silent fallback to the other kernel."""
    tokens, saliency = _data(2, 4099, 4, seed=2, device=cuda_rt.device)
    with pytest.raises(ValueError, match="at most 4096 tokens"):
        _cuda.scope_select(tokens, saliency, 3, 1.0, "mul", torch.tensor([4099, 100], device=cuda_rt.device), False, cluster_size=0)


def test_cluster_refused_below_compute_capability_9(cuda_rt):
    """An emulated A100 (8.0): RuntimeError naming compute capability 9.0, from the launcher."""
    if not cuda_rt.emu:
        major, _ = torch.cuda.get_device_capability()
        if major >= 9:
            pytest.skip("this GPU has clusters; the refusal is checked on an emulated 8.0 device")
        tokens, saliency = _data(1, 7, 8, seed=1, device=cuda_rt.device)
        with pytest.raises(RuntimeError, match="compute capability 9.0"):
            _cuda.scope_select(tokens, saliency, 2, 1.0, "mul", None, False, cluster_size=0)
        return
    tokens, saliency = _data(1, 7, 8, seed=1, device=cuda_rt.device)
    with cuda_rt.emulator.device(166912, (8, 0)) as device:
        with pytest.raises(RuntimeError, match="compute capability 9.0"):
            _cuda.scope_select(tokens, saliency, 2, 1.0, "mul", None, False, cluster_size=0)
        with pytest.raises(RuntimeError, match="compute capability 9.0"):
            _cuda.scope_cluster_plan(7, device=device)
        # the single-CTA kernel still runs there
        assert _cuda.scope_select(tokens, saliency, 2, 1.0, "mul", None, False).shape == (1, 2)


@needs_gpu
def test_cluster_cuda_graph_capture_and_replay():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0")
    static_x, static_s = _data(2, 577, 16, seed=1, device="cuda")
    args = (10, 1.0, "mul", None, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _cuda.scope_select(static_x, static_s, *args, cluster_size=0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _cuda.scope_select(static_x, static_s, *args, cluster_size=0)
    for seed in (2, 3):
        x, s = _data(2, 577, 16, seed=seed, device="cuda")
        static_x.copy_(x)
        static_s.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, _cuda.scope_select(x, s, *args))


# ----------------------------------------------------------------------------- graphs and compile


@needs_gpu
@pytest.mark.parametrize("n", [97, 2881], ids=["N97", "N2881-optin-smem"])
def test_cuda_graph_capture_and_replay(n):
    static_x, static_s = _data(2, n, 16, seed=1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        for _ in range(2):
            vtprune.fused_scope_select(static_x, static_s, 10, sorted=False, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = vtprune.fused_scope_select(static_x, static_s, 10, sorted=False, backend="cuda")
    for seed in (2, 3):
        x, s = _data(2, n, 16, seed=seed, device="cuda")
        static_x.copy_(x)
        static_s.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, vtprune.fused_scope_select(x, s, 10, sorted=False, backend="cuda"))


@needs_gpu
@pytest.mark.parametrize("per_seq_k", [False, True], ids=["k-int", "k-tensor+total_k"])
def test_varlen_cuda_graph_with_max_seqlen(per_seq_k):
    """With max_seqlen, and an int k (or per-sequence budgets with total_k), the varlen op reads
    nothing from the device, so it captures; cu_seqlens (and so the lengths) and the budgets may
    change between replays, within the bound and the total."""
    static_x, static_s = _data(1, 300, 16, seed=4, device="cuda")
    static_x, static_s = static_x[0], static_s[0]
    static_cu = torch.tensor([0, 97, 300], dtype=torch.int32, device="cuda")
    static_k = torch.tensor([5, 13], device="cuda") if per_seq_k else 9
    kw = dict(sorted=True, backend="cuda", max_seqlen=250, **({"total_k": 18} if per_seq_k else {}))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            vtprune.scope_select_varlen(static_x, static_s, static_cu, static_k, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_idx, static_cu_k = vtprune.scope_select_varlen(static_x, static_s, static_cu, static_k, **kw)
    for seed, split, ks in ((5, 50, [11, 7]), (6, 211, [9, 9])):
        x, s = _data(1, 300, 16, seed=seed, device="cuda")
        cu = torch.tensor([0, split, 300], dtype=torch.int32, device="cuda")
        static_x.copy_(x[0])
        static_s.copy_(s[0])
        static_cu.copy_(cu)
        k = torch.tensor(ks, device="cuda") if per_seq_k else 9
        if per_seq_k:
            static_k.copy_(k)
        graph.replay()
        torch.cuda.synchronize()
        # the same padded width outside the graph: cuBLAS may round another width's S differently
        want, want_cu_k = vtprune.scope_select_varlen(x[0], s[0], cu, k, **kw)
        assert torch.equal(static_idx, want) and torch.equal(static_cu_k, want_cu_k)


@needs_gpu
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def fn(x, s):
        idx = vtprune.fused_scope_select(x, s, 6, 0.5, backend="cuda")
        return idx, vtprune.gather_tokens(x, idx) * 2

    x, s = _data(2, 97, 16, seed=30, device="cuda")
    compiled = torch.compile(fn, fullgraph=True)
    for seed in (30, 31):  # new values, same shapes: no stale results
        x, s = _data(2, 97, 16, seed=seed, device="cuda")
        got, want = compiled(x, s), fn(x, s)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- no GPU needed


def test_cuda_backend_registers_scope_ops():
    from vtprune import cuda_backend

    assert cuda_backend.OPS["scope_select"] is _cuda.scope_select
    assert cuda_backend.OPS["scope_select_varlen"] is _cuda.scope_select_varlen


def _scope_binding():
    """vtprune._C with the SCOPE entry points; skip only where _C cannot have been built."""
    return require_c_entry("scope_greedy", "csrc/scope.cu")


def _good_args(c_module) -> dict:
    return dict(
        sim_ptr=16, sim_dtype=0, weights_ptr=16, lengths_ptr=16, k_per_image_ptr=16, B=1, N=4, k_max=2, mul=True,
        workspace_ptr=16, workspace_bytes=c_module.scope_workspace_bytes(1, 4), out_ptr=16, stream=0,
    )


def test_binding_workspace_size():
    c_module = _scope_binding()
    assert c_module.scope_workspace_bytes(3, 577) == 13 * 3 * 577  # gain, coverage, open counts, flags
    assert c_module.scope_workspace_bytes(0, 577) == 0 and c_module.scope_workspace_bytes(3, 0) == 0
    with pytest.raises(ValueError, match="N must be >= 0"):
        c_module.scope_workspace_bytes(1, -1)
    with pytest.raises(ValueError, match="overflows"):
        c_module.scope_workspace_bytes(2**40, 2**12)


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(sim_dtype=2), r"sim_dtype must be 0 \(float32\) or 1 \(float16\), got 2"),
        (dict(sim_dtype=-1), "sim_dtype"),
        *SCOPE_SIZE_ERRORS,
        (dict(k_max=-3), "k_max must be >= 0"),
        (dict(workspace_bytes=-1), "workspace_bytes must be >= 0"),
        (dict(workspace_bytes=51), r"workspace_bytes must be >= scope_workspace_bytes\(B, N\) = 52, got 51"),
        (dict(max_list=-1), "max_list must be >= 0"),
        (dict(sim_ptr=0), "sim_ptr is null"),
        (dict(weights_ptr=0), "weights_ptr is null"),
        (dict(weights_ptr=0, weights_dtype=2), "weights_ptr is null"),
        (dict(weights_dtype=3), r"weights_dtype must be 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 3"),
        (dict(weights_dtype=-1, unit_weights=True), "weights_dtype must be 0"),
        (dict(weights_stride=-2), r"weights_stride must be >= 0 \(or -1 for N\), got -2"),
        (dict(lengths_ptr=0), "lengths_ptr is null"),
        (dict(k_per_image_ptr=0), "k_per_image_ptr is null"),
        (dict(workspace_ptr=0), "workspace_ptr is null"),
        (dict(out_ptr=0), "out_ptr is null"),
    ],
)
def test_binding_rejects_bad_arguments(override, message):
    c_module = _scope_binding()
    with pytest.raises(ValueError, match=message):
        c_module.scope_greedy(**{**_good_args(c_module), **override})


def test_binding_empty_problems_and_foreign_pointers():
    c_module = _scope_binding()
    nulls = dict(sim_ptr=0, weights_ptr=0, lengths_ptr=0, k_per_image_ptr=0, workspace_ptr=0, workspace_bytes=0, out_ptr=0)
    for empty in (dict(B=0), dict(N=0), dict(k_max=0)):
        # nothing to do: no pointer is needed and no CUDA call is made (works without a GPU)
        c_module.scope_greedy(**{**_good_args(c_module), **nulls, **empty})
    # Addresses that are not device memory: an error from CUDA, never a crash. Without a GPU this
    # is the driver/device error; with one, the host address is refused before any launch.
    with pytest.raises(RuntimeError, match="CUDA"):
        c_module.scope_greedy(**_good_args(c_module))
    # unit weights (alpha = 0) read no weights: a null weights_ptr passes the checks
    with pytest.raises(RuntimeError, match="CUDA"):
        c_module.scope_greedy(**{**_good_args(c_module), "weights_ptr": 0, "unit_weights": True})


def _cluster_binding():
    return require_c_entry("scope_greedy_cluster", "csrc/scope_cluster.cu")


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(sim_dtype=1), r"sim_dtype must be 0 \(float32\) for the cluster kernel, got 1"),
        (dict(N=4097), "N must be <= 4096 for the cluster kernel"),
        (dict(B=-1), "B must be >= 0"),
        (dict(k_max=-1), "k_max must be >= 0"),
        (dict(max_list=1024), "max_list must be 0 for the cluster kernel"),
        (dict(cluster_size=3), r"cluster_size must be 0 \(choose\), 2, 4, 8 or 16, got 3"),
        (dict(cluster_size=32), "cluster_size must be 0"),
        (dict(sim_ptr=0), "sim_ptr is null"),
        (dict(out_ptr=0), "out_ptr is null"),
        (dict(weights_ptr=0), "weights_ptr is null"),
        (dict(weights_dtype=5), "weights_dtype must be 0"),
        (dict(weights_stride=-7), "weights_stride must be >= 0"),
    ],
)
def test_cluster_binding_rejects_bad_arguments(override, message):
    c_module = _cluster_binding()
    args = {**_good_args(c_module), "cluster_size": 0}
    with pytest.raises(ValueError, match=message):
        c_module.scope_greedy_cluster(**{**args, **override})


def test_cluster_binding_empty_problems_and_plan_arguments():
    c_module = _cluster_binding()
    assert c_module.scope_cluster_max_n() == 4096
    nulls = dict(sim_ptr=0, weights_ptr=0, lengths_ptr=0, k_per_image_ptr=0, workspace_ptr=0, workspace_bytes=0, out_ptr=0)
    for empty in (dict(B=0), dict(N=0), dict(k_max=0)):
        c_module.scope_greedy_cluster(**{**_good_args(c_module), **nulls, **empty})  # no CUDA call
    for bad, message in ((dict(N=0), "N must be in"), (dict(N=4097), "N must be in"), (dict(cluster_size=5), "cluster_size")):
        with pytest.raises(ValueError, match=message):
            c_module.scope_cluster_plan(**{**dict(device=0, N=7, cluster_size=0), **bad})


def test_near_tie_summary():
    """Not a check: prints which cases above hit a near-tie (run with -s to see it)."""
    print(f"\n{len(NEAR_TIES)} image(s) diverged from the reference after a near-tie:")
    for line in NEAR_TIES:
        print("  " + line)
