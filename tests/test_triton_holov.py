"""The Triton HoloV kernels (``backend="triton"``) against the reference, SPEC §2.

Without a GPU the kernels run on CPU tensors through the Triton interpreter (slow, so shapes stay
small there: D <= 64 except one D = 4096 case, N <= 577); with a GPU the same tests run on CUDA
tensors, the CPU variants are skipped, and a few large cases run on the GPU only.

Exactness: on fp32 inputs with continuous random values (no near-ties between crop weights,
floors or keys) budgets and indices must equal the reference's exactly. The kernel computes the
similarity statistics in another order than the reference (Gram tiles, merged row statistics),
so only a tie within a few fp32 ulps could tell them apart; fp16/bf16 inputs are checked by
invariants and by per-crop counts on inputs whose budgets are shown to be stable.
"""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune import reference
from vtprune.similarity import holov_normalize
from conftest import assert_valid_selection, kernel_devices, random_budget_case, random_crop_topk_case, triton_kernel_module

holov_k = triton_kernel_module("holov")
DEVICES = kernel_devices(holov_k)
SMALL_BLOCKS = dict(block_m=16, block_d=16, block_c=16, block_t=16)  # every multi-tile path


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(batch: int, n: int, d: int, seed: int, device, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(batch, n, d, generator=g)
    a = torch.rand(batch, n, generator=g)
    return x.to(device=device, dtype=dtype), a.to(device=device, dtype=dtype)


def _both(x, a, k, crops, rank_by, lengths=None, sorted_=True, alpha=0.09, **blocks):
    got = holov_k.holov_select(x, a, k, crops, alpha, rank_by, lengths, sorted_, **blocks)
    want = reference.holov_select(x, a, k, crops, alpha, rank_by, lengths, sorted_)
    return got, want


def _crop_weights(x, a, k, crops, alpha=0.09):
    """The reference's crop sizes and weights ``w_c`` of one image (fp32, as it computes them)."""
    n = x.shape[0]
    sizes = reference.crop_sizes_for(n, crops if crops is not None else reference.default_num_crops(n, k))
    scores, start = [], 0
    for m in sizes:
        score, _ = reference._crop_stats(x[start : start + m].float(), a[start : start + m].float(), alpha)
        scores.append(score)
        start += m
    s = torch.stack(scores)
    return sizes, (s / (s.sum() + 1e-6)).tolist()


def _counts(picks, sizes):
    ends = torch.tensor(sizes).cumsum(0).tolist()
    crop = [next(c for c, e in enumerate(ends) if p < e) for p in picks]
    return [crop.count(c) for c in range(len(sizes))]


# ----------------------------------------------------------------------------- holov_select, fp32

# (n, d, k, num_crops, tile sizes)
HOLOV_CASES = [
    (1, 16, 1, None, {}),
    (7, 16, 3, None, {}),
    (97, 32, 10, None, {}),
    (97, 64, 40, 6, SMALL_BLOCKS),
    (577, 32, 64, None, {}),
    (289, 24, 150, 3, dict(block_m=32, block_t=32)),
    (33, 4096, 8, None, {}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(len(HOLOV_CASES)), ids=lambda i: "n{}-d{}-k{}-C{}".format(*HOLOV_CASES[i][:4]))
def test_holov_equals_reference_fp32(device, i):
    n, d, k, crops, blocks = HOLOV_CASES[i]
    x, a = _data(2, n, d, seed=n + 7 * k, device=device)
    # both keys and both orders, spread over the cases (each call is slow in the interpreter)
    combos = [("attn", True), ("score", False)] if i % 2 == 0 else [("attn", False), ("score", True)]
    for rank_by, sorted_ in combos:
        got, want = _both(x, a, k, crops, rank_by, sorted_=sorted_, **blocks)
        assert got.dtype == torch.int64 and got.shape == (2, k)
        assert torch.equal(got.cpu(), want.cpu()), (rank_by, sorted_, got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [7, 13])
def test_holov_every_crop_count(device, n):
    """Every crop count from 1 (one crop of N tokens) to N (one-token crops), budgets that fill
    whole crops (k close to N) included."""
    x, a = _data(2, n, 16, seed=100 + n, device=device)
    for crops in range(1, n + 1):
        k = (3 * crops) % n + 1 if crops % 3 else n - 1
        rank_by = "score" if crops % 2 else "attn"
        got, want = _both(x, a, k, crops, rank_by, sorted_=crops % 4 < 2)
        assert torch.equal(got.cpu(), want.cpu()), (crops, k, rank_by, got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_holov_overflowing_budgets(device):
    """Skewed attention: the hot crop's floor exceeds its size, and the cut goes round the other
    crops; also k = N (every crop full)."""
    n, crops = 97, 6
    x, a = _data(2, n, 16, seed=5, device=device)
    a[0, :17] += 4.0  # crop 0 of image 0 is hot
    a[1, -16:] += 4.0  # the last crop of image 1
    for k in (80, n):
        for b in range(2):  # the path under test must actually be taken
            sizes, w = _crop_weights(x[b].cpu(), a[b].cpu(), k, crops)
            assert any(math.floor(wc * k) > m for wc, m in zip(w, sizes)), (k, b, w)
        for rank_by, sorted_ in (("attn", False), ("score", True)):
            got, want = _both(x, a, k, crops, rank_by, sorted_=sorted_, block_c=16, block_t=16)
            assert torch.equal(got.cpu(), want.cpu()), (k, rank_by, got, want)
            if k == n:
                assert got.cpu().sort(dim=1).values.tolist() == [list(range(n))] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_holov_lengths(device):
    """A padded batch equals the reference, and each image run alone; padding (NaN here) is never read."""
    lens = [97, 60, 13, 40]
    x, a = _data(4, 97, 24, seed=61, device=device)
    x[2, 13:] = float("nan")
    a[2, 13:] = float("nan")
    lengths = torch.tensor(lens, device=device)
    for crops, rank_by, sorted_ in ((None, "score", False), (5, "attn", True)):
        got, want = _both(x, a, 12, crops, rank_by, lengths, sorted_)
        assert torch.equal(got.cpu(), want.cpu()), (crops, rank_by, got, want)
    for b, n in enumerate(lens):  # the last configuration, image by image
        alone = holov_k.holov_select(x[b : b + 1, :n], a[b : b + 1, :n], 12, 5, 0.09, "attn", None, True)
        assert torch.equal(got[b], alone[0]), b


@pytest.mark.parametrize("device", DEVICES)
def test_holov_degenerate_inputs(device):
    """Zero attention (all weights 0: the leftover cycles, keys all tie) and a NaN token (its crop's
    score is NaN, so every weight is NaN) give exactly the reference's picks; constant attention
    (crop weights equal up to rounding) still gives k distinct valid indices."""
    n, k = 50, 20
    x, a = _data(2, n, 16, seed=67, device=device)
    zero = torch.zeros_like(a)
    nan_tok = x.clone()
    nan_tok[1, 7, 3] = float("nan")
    for tokens, attn in ((x, zero), (nan_tok, a)):
        for rank_by in ("attn", "score"):
            got, want = _both(tokens, attn, k, None, rank_by, sorted_=False)
            assert torch.equal(got.cpu(), want.cpu()), (rank_by, got, want)
    got = holov_k.holov_select(x, torch.ones_like(a), k, None, 0.09, "score", None, True)
    assert_valid_selection(got.cpu(), k, n)
    assert torch.equal(got, got.sort(dim=1).values)


@pytest.mark.parametrize("device", DEVICES)
def test_holov_alpha_and_public_op(device):
    """alpha = 0 (h = a: ranking by score is ranking by attention), and the dispatched public op
    (alpha 5: the variance term dominates h)."""
    x, a = _data(2, 40, 16, seed=71, device=device)
    got, want = _both(x, a, 9, 4, "score", alpha=0.0)
    assert torch.equal(got.cpu(), want.cpu())
    kw = dict(num_crops=4, alpha=5.0, rank_by="score")
    got = vtprune.holov_select(x, a, 9, backend="triton", **kw)
    assert torch.equal(got.cpu(), vtprune.holov_select(x, a, 9, backend="reference", **kw).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_crop_variance_matches_float64(device):
    """Similar tokens (similarities near 0.9, variance ~1e-2): the merged two-pass row statistics
    stay within 1e-5 of float64 (a one-pass E[S^2] - mean^2 is ~1e-4 off here)."""
    g = _gen(3)
    n, d, crops = 97, 64, 2
    x = (torch.randn(1, 1, d, generator=g) + 0.3 * torch.randn(1, n, d, generator=g)).to(device)
    var = holov_k.crop_variance(x, 10, crops, None, block_m=16, block_d=16)[0].cpu().double()
    xd = x[0].cpu().double()
    start = 0
    for m in reference.crop_sizes_for(n, crops):
        f = holov_normalize(xd[start : start + m])
        s = f @ f.T
        s.fill_diagonal_(0)
        mean = s.sum(1) / (m - 1)
        want = ((s - mean[:, None]) ** 2).sum(1) / (m - 1)
        assert float(mean.mean()) > 0.8  # the regime where the one-pass formula cancels
        torch.testing.assert_close(var[start : start + m], want, rtol=1e-5, atol=0)
        start += m


# ----------------------------------------------------------------------------- fp16 / bf16


def _stable_budgets(sizes, w, k, trials: int = 8, rel: float = 1e-4):
    """The reference's budgets, if perturbing every weight by up to ``rel`` never changes them."""
    base = reference._budgets_one(w, k, sizes)
    g = _gen(0)
    for _ in range(trials):
        noise = (torch.rand(len(w), generator=g) * 2 - 1) * rel
        if reference._budgets_one([wc * (1 + float(e)) for wc, e in zip(w, noise)], k, sizes) != base:
            return None
    return base


def _check_low_precision(x, a, k, crops):
    n = x.shape[1]
    for rank_by in ("attn", "score"):
        got = holov_k.holov_select(x, a, k, crops, 0.09, rank_by, None, True).cpu()
        assert_valid_selection(got, k, n)
        assert torch.equal(got, got.sort(dim=1).values)
        for b in range(x.shape[0]):
            sizes, w = _crop_weights(x[b].cpu(), a[b].cpu(), k, crops)
            want = _stable_budgets(sizes, w, k)
            assert want is not None, f"image {b}: budgets within 1e-4 of a flip; pick another seed"
            assert _counts(got[b].tolist(), sizes) == want, (rank_by, b)
            if rank_by == "attn":  # same budgets and the same (exact) keys: the same picks
                ref = reference.holov_select(x[b : b + 1].float(), a[b : b + 1].float(), k, crops, 0.09, "attn", None, True)
                assert torch.equal(got[b], ref[0].cpu()), b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_holov_low_precision(device, dtype):
    x, a = _data(2, 97, 32, seed=11, device=device, dtype=dtype)
    _check_low_precision(x, a, 24, None)


# ----------------------------------------------------------------------------- crop_budgets


@pytest.mark.parametrize("device", DEVICES)
def test_crop_budgets_equals_reference(device):
    g = _gen(71)
    for trial in range(21):
        w, k, cap = random_budget_case(g, trial % 7)
        got = holov_k.crop_budgets(w.to(device), k, cap.to(device)).cpu()
        want = reference.crop_budgets(w, k, cap)
        assert got.dtype == torch.int64
        assert torch.equal(got, want), (trial, w, k, cap, got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_crop_budgets_many_crops(device):
    """70 crops over 5 tiles of 16: places and seats counted across tiles; the cut of a few hot
    crops leaves a rest that does not fill a round."""
    g = _gen(5)
    w = torch.rand(2, 70, generator=g)
    w[:, [3, 40, 57]] += 10.0
    w = w / (w.sum(1, keepdim=True) + 1e-6)
    w[1, 20:30] = float("nan")
    cap = torch.randint(1, 4, (2, 70), generator=g)
    cap[0, 10:20] = 0  # absent crops
    for k in (61, int(cap.sum(1).min())):
        got = holov_k.crop_budgets(w.to(device), k, cap.to(device), block_c=16).cpu()
        assert torch.equal(got, reference.crop_budgets(w, k, cap)), k


@pytest.mark.parametrize("device", DEVICES)
def test_crop_budgets_hand_cases(device):
    w = torch.tensor([[0.97, 0.01, 0.02, 0.0]], device=device)
    cap = torch.tensor([[2, 9, 9, 9]], device=device)
    assert holov_k.crop_budgets(w, 10, cap).tolist() == [[2, 3, 3, 2]]
    cap = torch.tensor([[3, 0, 2, 4]], device=device, dtype=torch.int32)
    assert holov_k.crop_budgets(torch.tensor([[0.1, 0.5, 0.2, 0.2]], device=device), 9, cap).tolist() == [[3, 0, 2, 4]]
    w = torch.tensor([[0.3, 0.3, 0.4]])
    for dt in (torch.float16, torch.bfloat16):
        cap = torch.tensor([[5, 5, 5]])
        got = vtprune.crop_budgets(w.to(device, dt), 7, cap.to(device), backend="triton")
        assert torch.equal(got.cpu(), reference.crop_budgets(w.to(dt), 7, cap))


# ----------------------------------------------------------------------------- crop_topk


@pytest.mark.parametrize("device", DEVICES)
def test_crop_topk_equals_reference(device):
    g = _gen(73)
    trials = 0
    while trials < 16:
        case = random_crop_topk_case(g)
        if case is None:
            continue
        scores, sizes, budgets, k = case
        trials += 1
        sorted_ = trials % 2 == 0
        got = holov_k.crop_topk(scores.to(device), sizes.to(device), budgets.to(device), k, sorted_).cpu()
        want = reference.crop_topk(scores, sizes, budgets, k, sorted_)
        assert torch.equal(got, want), (trials, scores, sizes, budgets, got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_crop_topk_tiles_and_dtypes(device):
    """Many crops over several token tiles (block 16), continuous and 16-bit scores."""
    g = _gen(79)
    n = 97
    sizes = torch.tensor([[5] * 19 + [2], [0, 50, 0, 30] + [1] * 16])
    budgets = torch.tensor([[2] * 19 + [1], [0, 21, 0, 10] + [0] * 8 + [1] * 8])
    scores = torch.randn(2, n, generator=g)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        s = scores.to(dt)
        for sorted_ in (True, False):
            got = holov_k.crop_topk(s.to(device), sizes.to(device), budgets.to(device), 39, sorted_, block_c=16, block_t=16)
            assert torch.equal(got.cpu(), reference.crop_topk(s, sizes, budgets, 39, sorted_)), (dt, sorted_)
    got = vtprune.crop_topk(scores.to(device), 7, torch.full((2, 7), 3, device=device), backend="triton")
    assert torch.equal(got.cpu(), vtprune.crop_topk(scores, 7, torch.full((2, 7), 3), backend="reference"))


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_errors(device):
    x, a = _data(1, 9, 4, seed=0, device=device)
    with pytest.raises(TypeError, match="tokens"):
        holov_k.holov_select(x.double(), a, 3)
    with pytest.raises(ValueError, match="attn"):
        holov_k.holov_select(x, a[:, :5], 3)
    with pytest.raises(ValueError, match="k must"):
        holov_k.holov_select(x, a, 10)
    with pytest.raises(ValueError, match="rank_by"):
        holov_k.holov_select(x, a, 3, rank_by="h")
    with pytest.raises(ValueError, match="block_m"):
        holov_k.holov_select(x, a, 3, block_m=24)
    with pytest.raises(ValueError, match="capacity"):
        holov_k.crop_budgets(a[:, :3], 2, torch.ones(2, 3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="budgets"):
        holov_k.crop_topk(a, torch.tensor([[9]], device=device), torch.tensor([[2.0]], device=device), 2)


# ----------------------------------------------------------------------------- GPU-only sizes

CUDA = [pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_holov_gpu_paper_sizes_low_precision(device, dtype):
    """The paper's setting: N = 576 projected features of D = 4096, k = 64 (16 crops)."""
    x, a = _data(2, 576, 4096, seed=13, device=device, dtype=dtype)
    _check_low_precision(x, a, 64, None)


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize(
    "n,d,k,crops", [(576, 4096, 64, None), (2881, 64, 64, None), (2881, 64, 2000, 1), (577, 64, 100, 577)]
)
def test_holov_gpu_large_fp32(device, n, d, k, crops):
    x, a = _data(2, n, d, seed=n + k, device=device)
    for rank_by, sorted_ in (("attn", True), ("score", False)):
        got, want = _both(x, a, k, crops, rank_by, sorted_=sorted_)
        assert torch.equal(got.cpu(), want.cpu()), (rank_by, sorted_)


@pytest.mark.parametrize("device", CUDA)
def test_crop_budgets_gpu_crop_per_token(device):
    g = _gen(9)
    w = torch.rand(2, 2881, generator=g)
    w = w / (w.sum(1, keepdim=True) + 1e-6)
    cap = torch.ones(2, 2881, dtype=torch.int64)
    for k in (64, 2881):
        got = holov_k.crop_budgets(w.to(device), k, cap.to(device)).cpu()
        assert torch.equal(got, reference.crop_budgets(w, k, cap)), k
