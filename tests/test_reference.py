"""The reference (``backend="reference"``) on small cases computed by hand from SPEC.md.

Every expected number below is derived in the comments; nothing is copied from a run of
the library. The last tests compare the reference with independent float64 computations
written here (attention importance, ALVTS scores, the truncated SVD).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vtprune
from vtprune import reference
from conftest import DEVICE, check_greedy_picks

REF = "reference"
R2 = math.sqrt(0.5)  # 1/sqrt(2) = 0.7071...


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _i(values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


# ----------------------------------------------------------------------------- SCOPE by hand
#
# Four tokens in 2-D: x0 = (1, 0), x1 = (0, 1), x2 = (1, 1), x3 = (-1, 0).
# Cosine similarities (r = 1/sqrt(2) = 0.7071):
#          u=0    u=1    u=2    u=3
#   v=0     1      0      r     -1
#   v=1     0      1      r      0
#   v=2     r      r      1     -r
#   v=3    -1      0     -r      1
# First-step gains (coverage 0), gain(v) = sum_u max(0, sim(u, v)):
#   g0 = 1 + 0 + r = 1.7071, g1 = 0 + 1 + r = 1.7071, g2 = r + r + 1 = 2.4142, g3 = 1.

TOKENS4 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]


def test_scope_hand_mul():
    # saliency (2, 1.2, 1, 3), alpha = 1, combine = "mul": score = gain * saliency.
    # step 1: 1.7071*2 = 3.414, 1.7071*1.2 = 2.049, 2.414*1 = 2.414, 1*3 = 3     -> pick 0
    #   coverage c = max(0, sim(u, 0)) = (1, 0, r, 0)
    # step 2: gain(1) = [u1: 1-0] + [u2: r-r = 0] = 1        -> score 1.2
    #         gain(2) = [u1: r-0] + [u2: 1-r]     = 1        -> score 1
    #         gain(3) = [u3: 1-0]                 = 1        -> score 3       -> pick 3
    #   c = (1, 0, r, 1)
    # step 3: gain(1) = 1 -> 1.2, gain(2) = 1 -> 1.0                             -> pick 1
    # step 4: only token 2 is left                                              -> pick 2
    x, s = _t(TOKENS4), _t([2.0, 1.2, 1.0, 3.0])
    assert vtprune.fused_scope_select(x, s, 4, 1.0, sorted=False, backend=REF).tolist() == [0, 3, 1, 2]
    assert vtprune.fused_scope_select(x, s, 3, 1.0, sorted=False, backend=REF).tolist() == [0, 3, 1]
    assert vtprune.fused_scope_select(x, s, 3, 1.0, backend=REF).tolist() == [0, 1, 3]
    assert vtprune.fused_scope_select(x, s, 1, 1.0, backend=REF).tolist() == [0]
    # alpha = 2 squares the weights: step 1 scores 1.7071*4 = 6.83, 1.7071*1.44 = 2.46, 2.41, 9 -> 3
    #   c = (0, 0, 0, 1); step 2: gain(0) = 1 + r (u3: -1-1 < 0) -> 1.7071*4 = 6.83,
    #   gain(1) = 1 + r -> 2.46, gain(2) = r + r + 1 -> 2.41                        -> pick 0
    assert vtprune.fused_scope_select(x, s, 2, 2.0, sorted=False, backend=REF).tolist() == [3, 0]


def test_scope_hand_alpha0_pure_coverage():
    # alpha = 0: every weight is 1 (0 ** 0 = 1 too), so saliency is ignored.
    # step 1: gains 1.7071, 1.7071, 2.4142, 1                                   -> pick 2
    #   c = max(0, sim(u, 2)) = (r, r, 1, 0)
    # step 2: gain(0) = [u0: 1-r = 0.2929] = 0.2929; gain(1) = [u1: 1-r] = 0.2929;
    #         gain(3) = [u3: 1-0] = 1                                           -> pick 3
    #   c = (r, r, 1, 1)
    # step 3: gain(0) = gain(1) = 0.2929 exactly (mirror images): tie -> lowest -> pick 0
    # step 4: pick 1.
    x = _t(TOKENS4)
    for sal in ([2.0, 1.2, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.1]):
        out = vtprune.fused_scope_select(x, _t(sal), 4, 0.0, sorted=False, backend=REF)
        assert out.tolist() == [2, 3, 0, 1], sal


def test_scope_hand_add():
    # combine = "add": score = gain + saliency, saliency (2, 1.2, 1, 3), alpha = 1.
    # step 1: 1.7071+2 = 3.707, 1.7071+1.2 = 2.907, 2.414+1 = 3.414, 1+3 = 4     -> pick 3
    #   c = max(0, sim(u, 3)) = (0, 0, 0, 1)
    # step 2: gain(0) = 1 + 0 + r = 1.7071 -> 3.707; gain(1) = 1.7071 -> 2.907;
    #         gain(2) = r + r + 1 = 2.414 -> 3.414                               -> pick 0
    #   c = (1, 0, r, 1)
    # step 3: gain(1) = 1 -> 2.2; gain(2) = r + (1 - r) = 1 -> 2.0                -> pick 1
    x, s = _t(TOKENS4), _t([2.0, 1.2, 1.0, 3.0])
    out = vtprune.fused_scope_select(x, s, 4, 1.0, combine="add", sorted=False, backend=REF)
    assert out.tolist() == [3, 0, 1, 2]


def test_scope_hand_negative_and_zero_saliency():
    # Negative saliency counts as 0, so with "mul" token 0's score is 0 while the others are
    # positive: step 1 scores 0, 1.7071*1, 2.414*1, 1*1 -> pick 2; c = (r, r, 1, 0);
    # step 2: gain(1) = 0.2929 -> 0.2929, gain(3) = 1 -> 1, token 0 scores 0 -> pick 3;
    # step 3: gain(1) = 0.2929 > 0 = score(0) -> pick 1; step 4: 0.
    x, s = _t(TOKENS4), _t([-4.0, 1.0, 1.0, 1.0])
    assert vtprune.fused_scope_select(x, s, 4, 1.0, sorted=False, backend=REF).tolist() == [2, 3, 1, 0]
    # All saliency zero with alpha = 1: every score is 0, ties -> lowest index each step.
    s0 = _t([0.0, 0.0, 0.0, 0.0])
    assert vtprune.fused_scope_select(x, s0, 3, 1.0, sorted=False, backend=REF).tolist() == [0, 1, 2]


def test_scope_hand_duplicates_and_batch():
    # Token 1 duplicates token 0. Image 0 = TOKENS4 with a duplicate, uniform saliency:
    # x = (1,0), (1,0), (0,1), (-1,0); sims: s01 = 1, s02 = 0, s03 = -1, s12 = 0, s13 = -1, s23 = 0.
    # step 1: gain(0) = gain(1) = 1 + 1 = 2, gain(2) = 1, gain(3) = 1 -> tie 0/1 -> pick 0
    #   c = (1, 1, 0, 0); step 2: gain(1) = 0, gain(2) = 1, gain(3) = 1 -> tie -> pick 2;
    #   step 3: gain(1) = 0, gain(3) = 1 -> pick 3.
    img0 = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
    x = _t([img0, TOKENS4])
    s = _t([[1.0] * 4, [2.0, 1.2, 1.0, 3.0]])
    out = vtprune.fused_scope_select(x, s, 3, 1.0, sorted=False, backend=REF)
    assert out.tolist() == [[0, 2, 3], [0, 3, 1]]


def test_scope_hand_lengths():
    # Image 1 has only its first 3 tokens valid: x0, x1, x2 of TOKENS4, saliency 1.
    # step 1 (u over 0..2 only): gain(0) = 1 + 0 + r, gain(1) = 0 + 1 + r, gain(2) = 1 + 2r -> pick 2
    # c = (r, r, 1): step 2: gain(0) = gain(1) = 1 - r -> tie -> pick 0.
    # The padding token 3 = (-1, 0) would otherwise not change this, so make it a strong candidate:
    # padding (0.6, 0.8) with saliency 100 would be picked first if it were a candidate.
    x = _t([TOKENS4, TOKENS4[:3] + [[0.6, 0.8]]])
    s = _t([[1.0] * 4, [1.0, 1.0, 1.0, 100.0]])
    out = vtprune.fused_scope_select(x, s, 2, 1.0, lengths=_i([4, 3]), sorted=False, backend=REF)
    # image 0 (all valid, uniform saliency): gains 1.7071, 1.7071, 2.414, 1 -> 2; c = (r, r, 1, 0):
    # gain(0) = 0.2929, gain(1) = 0.2929, gain(3) = 1 -> 3.
    assert out.tolist() == [[2, 3], [2, 0]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_reference_loop_equals_scope_select(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    b, n, d, k = 3, 40 + seed * 7, 12, 15
    x = torch.randn(b, n, d, generator=g).to(DEVICE)
    s = torch.rand(b, n, generator=g).to(DEVICE)
    loop = reference.reference_loop(x, s, k, alpha)
    sel = reference.scope_select(x, s, k, alpha, "mul", None, False)
    assert loop.dtype == torch.int64 and loop.shape == (b, k)
    assert torch.equal(loop, sel)
    # unbatched form of the loop
    assert torch.equal(reference.reference_loop(x[1], s[1], k, alpha), sel[1])
    # and the reference's picks are the greedy's picks, checked in float64
    for i in range(b):
        check_greedy_picks(x[i], s[i], sel[i].tolist(), alpha, "mul")


# ----------------------------------------------------------------------------- HoloV by hand


def test_holov_default_num_crops_and_crop_sizes():
    # min(N, max(1, 1024 N // (576 k))): N = 576: k = 64 -> 16, k = 128 -> 8, k = 192 -> 5.33 -> 5;
    # k = 576 -> 1024 // 576 = 1; N = 6, k = 1 -> min(6, 6144 // 576 = 10) = 6.
    assert reference.default_num_crops(576, 64) == 16
    assert reference.default_num_crops(576, 128) == 8
    assert reference.default_num_crops(576, 192) == 5
    assert reference.default_num_crops(576, 576) == 1
    assert reference.default_num_crops(6, 1) == 6
    # 10 tokens in 3 crops: 10 // 3 = 3, the first 10 % 3 = 1 crop one larger -> 4, 3, 3.
    assert reference.crop_sizes_for(10, 3) == [4, 3, 3]
    assert reference.crop_sizes_for(7, 7) == [1] * 7


def _holov_case():
    # N = 6 in 2 crops of 3, D = 3.
    # Crop 0 = e1, e2, e3 (orthogonal): S = 0 off the diagonal (and 0 on it), so mean = var = 0,
    #   h = a = 1000 * attn, score_0 = mean(a).
    # Crop 1 = e1, e1, e1: f = e1 / (1 + 1e-6), S_ij = s = (1 + 1e-6)^-2 ~ 1 off the diagonal.
    #   Row i: sum_j S_ij = 2s, mean_i = s; var_i = ((0 - s)^2 + 0 + 0) / 2 = s^2 / 2 ~ 0.5.
    #   gamma = mean|a| / (0.5 + 1e-6), h_i = a_i + alpha * gamma * 0.5 ~ a_i + alpha * mean|a|.
    # attn crop 0 = (0.1, 0.2, 0.3) -> a = (100, 200, 300), score_0 = 200.
    # attn crop 1 = (0.05, 0.15, 0.1) -> a = (50, 150, 100), with alpha = 0.5:
    #   score_1 = 100 + 0.5 * 100 = 150.
    x = _t([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0]])
    a = _t([0.1, 0.2, 0.3, 0.05, 0.15, 0.1])
    return x, a


def test_holov_hand_budgets():
    # w = (200, 150) / 350 = (0.571, 0.429). k = 3: q = floor(1.714, 1.286) = (1, 1), the
    # leftover 1 goes to crop 0 (largest w) -> q = (2, 1).
    # Crop 0 keeps its top 2 by attn: token 2 (0.3), token 1 (0.2); crop 1 keeps token 4 (0.15).
    x, a = _holov_case()
    assert vtprune.holov_select(x, a, 3, num_crops=2, alpha=0.5, backend=REF).tolist() == [1, 2, 4]
    assert vtprune.holov_select(x, a, 3, num_crops=2, alpha=0.5, sorted=False, backend=REF).tolist() == [2, 1, 4]
    # k = 4: q = floor(2.286, 1.714) = (2, 1), leftover 1 -> crop 0 -> (3, 1): 0, 1, 2 and 4.
    assert vtprune.holov_select(x, a, 4, num_crops=2, alpha=0.5, backend=REF).tolist() == [0, 1, 2, 4]
    # alpha = 3 makes crop 1 heavier: score_1 = 100 + 3 * 100 = 400, w = (200, 400) / 600 =
    # (0.333, 0.667); k = 4: q = floor(1.333, 2.667) = (1, 2), leftover 1 -> crop 1 -> (1, 3):
    # token 2 from crop 0, tokens 3, 4, 5 from crop 1.
    assert vtprune.holov_select(x, a, 4, num_crops=2, alpha=3.0, backend=REF).tolist() == [2, 3, 4, 5]
    # rank_by = "score": crop 0's h = a, crop 1's h = a + const: same order as attn.
    assert vtprune.holov_select(x, a, 3, num_crops=2, alpha=0.5, rank_by="score", backend=REF).tolist() == [1, 2, 4]


def test_holov_hand_capacity():
    # k = 5 with alpha = 0.5: q = floor(0.571 * 5, 0.429 * 5) = floor(2.857, 2.143) = (2, 2), leftover 1
    # -> crop 0 -> (3, 2), within capacity 3: all of crop 0 and tokens 4 (0.15), 5 (0.1).
    x, a = _holov_case()
    assert vtprune.holov_select(x, a, 5, num_crops=2, alpha=0.5, backend=REF).tolist() == [0, 1, 2, 4, 5]
    # Make crop 0 dominate: attn crop 0 = (1, 2, 3), crop 1 as before -> score_0 = 2000, score_1 = 150,
    # w = (0.930, 0.070); k = 5: q = floor(4.65, 0.35) = (4, 0), leftover 1 -> crop 0 -> (5, 0);
    # capped at 3 -> surplus 2, handed to crop 1 (the only one with room) -> (3, 2).
    a2 = a.clone()
    a2[:3] = _t([1.0, 2.0, 3.0])
    assert vtprune.holov_select(x, a2, 5, num_crops=2, alpha=0.5, backend=REF).tolist() == [0, 1, 2, 4, 5]
    assert vtprune.holov_select(x, a2, 5, num_crops=2, alpha=0.5, sorted=False, backend=REF).tolist() == [2, 1, 0, 4, 5]


def test_holov_hand_rank_by_score():
    # One crop of 3 tokens: e1, e1, e2. S (diag 0): S01 = S10 ~ 1, everything else 0.
    # Row 0: sum = 1, mean = 1/2, var = ((0 - .5)^2 + (1 - .5)^2 + (0 - .5)^2) / 2 = 0.375; row 1 the same;
    # row 2: all 0 -> mean 0, var 0. mean var = 0.25.
    # attn (0.1, 0.09, 0.12) -> a = (100, 90, 120), mean|a| = 103.33, gamma = 103.33 / 0.25 = 413.3.
    # alpha = 1: h = (100 + 413.3 * .375, 90 + 155, 120) = (255, 245, 120).
    x = _t([[1, 0], [1, 0], [0, 1]])
    a = _t([0.1, 0.09, 0.12])
    kw = dict(num_crops=1, alpha=1.0, backend=REF)
    assert vtprune.holov_select(x, a, 1, rank_by="attn", **kw).tolist() == [2]
    assert vtprune.holov_select(x, a, 1, rank_by="score", **kw).tolist() == [0]
    assert vtprune.holov_select(x, a, 2, rank_by="score", sorted=False, **kw).tolist() == [0, 1]
    assert vtprune.holov_select(x, a, 2, rank_by="attn", sorted=False, **kw).tolist() == [2, 0]
    assert vtprune.holov_select(x, a, 2, rank_by="attn", **kw).tolist() == [0, 2]
    # alpha = 0.09 (the default): h = (100 + 37.2 * .375, 90 + 14, 120) = (114, 104, 120) -> 2 first.
    assert vtprune.holov_select(x, a, 1, num_crops=1, rank_by="score", backend=REF).tolist() == [2]


def test_holov_single_token_crops():
    # num_crops = N: every crop has M = 1 token, score_c = mean attn = attn_c.
    # attn (0.1, 0.4, 0.2, 0.3), k = 2: w = attn / 1.0 = (0.1, 0.4, 0.2, 0.3): q = floor(0.2, 0.8, 0.4, 0.6) = 0,
    # leftover 2 -> crops 1 and 3 (largest w) -> tokens 1, 3.
    x = _t([[1, 2], [3, 4], [5, 6], [7, 9]])
    a = _t([0.1, 0.4, 0.2, 0.3])
    assert vtprune.holov_select(x, a, 2, num_crops=4, backend=REF).tolist() == [1, 3]


def test_holov_mixed_single_token_crop():
    # N = 3 in 2 crops: sizes (2, 1). Crop 0 = (1, 0), (0, 1): orthogonal, var = 0, h = a = 1000 * attn.
    # Crop 1 has M = 1: score_1 = mean attn (not scaled by 1000, as in the official code).
    # attn (0.001, 0.001, 0.9): score_0 = 1, score_1 = 0.9, w = (0.526, 0.474); k = 2:
    # q = floor(1.053, 0.947) = (1, 0), the leftover 1 -> crop 0 -> (2, 0): tokens 0, 1.
    x = _t([[1, 0], [0, 1], [5, 5]])
    assert vtprune.holov_select(x, _t([0.001, 0.001, 0.9]), 2, num_crops=2, backend=REF).tolist() == [0, 1]
    # attn (0.0005, 0.0005, 0.9): score_0 = 0.5, w = (0.357, 0.643): q = floor(0.714, 1.286) = (0, 1),
    # leftover 1 -> crop 1 -> 2, capped at 1, surplus 1 -> crop 0: (1, 1); crop 0's tie -> token 0.
    assert vtprune.holov_select(x, _t([0.0005, 0.0005, 0.9]), 2, num_crops=2, backend=REF).tolist() == [0, 2]


# ----------------------------------------------------------------------------- crop_budgets by hand


def _budgets(w, k, cap):
    return vtprune.crop_budgets(_t(w), k, _i(cap), backend=REF).tolist()


def test_crop_budgets_floor_and_remainder():
    # w = (0.5, 0.3, 0.2), k = 7: floor(3.5, 2.1, 1.4) = (3, 2, 1), sum 6, leftover 1 -> crop 0.
    assert _budgets([0.5, 0.3, 0.2], 7, [10, 10, 10]) == [4, 2, 1]
    # w = (0.2, 0.3, 0.5): same numbers, leftover -> crop 2 (largest w).
    assert _budgets([0.2, 0.3, 0.5], 7, [10, 10, 10]) == [1, 2, 4]
    # equal weights 0.25, k = 6: floor(1.5) = 1 each, leftover 2 -> crops 0, 1 (ties: lowest).
    assert _budgets([0.25] * 4, 6, [9] * 4) == [2, 2, 1, 1]
    # exact: w = (0.5, 0.25, 0.25), k = 4 -> (2, 1, 1), no leftover.
    assert _budgets([0.5, 0.25, 0.25], 4, [4, 4, 4]) == [2, 1, 1]
    # batched rows are independent
    got = vtprune.crop_budgets(_t([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]), 7, _i([[10] * 3] * 2), backend=REF)
    assert got.tolist() == [[4, 2, 1], [1, 2, 4]] and got.dtype == torch.int64


def test_crop_budgets_capacity_overflow_cycles():
    # w = (0.7, 0.2, 0.1), k = 10: floor(7, 2, 1) = (7, 2, 1), no leftover. Capacity (3, 4, 10):
    # crop 0 is cut to 3, surplus 4, handed +1 at a time in descending-w order (0, 1, 2),
    # skipping full crops: crop 1 -> 3, crop 2 -> 2, (cycle) crop 1 -> 4, crop 2 -> 3.
    assert _budgets([0.7, 0.2, 0.1], 10, [3, 4, 10]) == [3, 4, 3]
    # Same weights, capacity (1, 1, 10): q = (7, 2, 1) -> capped (1, 1, 1), surplus 6 + 1 = 7,
    # all to crop 2 (the only one with room) -> (1, 1, 8).
    # (fp32 0.7 * 10 = 6.9999999 floors to 6; the leftover 1 then goes to crop 0: still (7, 2, 1).)
    assert _budgets([0.7, 0.2, 0.1], 10, [1, 1, 10]) == [1, 1, 8]
    # k = total capacity: everything is kept.
    assert _budgets([0.1, 0.6, 0.3], 9, [2, 3, 4]) == [2, 3, 4]


def test_crop_budgets_zero_weights():
    # All weights 0: every floor is 0, the 4 leftover go +1 in order 0, 1, 2 (ties: lowest), cycling -> 0.
    assert _budgets([0.0, 0.0, 0.0], 4, [5, 5, 5]) == [2, 1, 1]
    # A single non-zero weight takes everything.
    assert _budgets([0.0, 1.0, 0.0], 2, [5, 5, 5]) == [0, 2, 0]


def test_crop_budgets_nan_weight():
    # NaN weight: floor -> 0 and ordered last. w = (nan, 0.6, 0.4), k = 5: (0, 3, 2), no leftover.
    assert _budgets([math.nan, 0.6, 0.4], 5, [10, 10, 10]) == [0, 3, 2]
    # w = (nan, 0.5, 0.5), k = 3: (0, 1, 1), leftover 1 -> crop 1 (ties lowest; NaN last) -> (0, 2, 1).
    assert _budgets([math.nan, 0.5, 0.5], 3, [5, 5, 5]) == [0, 2, 1]
    # Same with capacity (5, 1, 1): (0, 2, 1) -> crop 1 capped to 1, surplus 1, order (1, 2, 0),
    # crops 1 and 2 full -> crop 0 -> (1, 1, 1).
    assert _budgets([math.nan, 0.5, 0.5], 3, [5, 1, 1]) == [1, 1, 1]


def test_crop_budgets_absent_crops():
    # Capacity 0 = absent: never gets a token. w = (0.5, 0.5), cap (0, 4), k = 3:
    # crop 1: floor(1.5) = 1, leftover 2 -> crop 1 (the only present one) -> (0, 3).
    assert _budgets([0.5, 0.5], 3, [0, 4]) == [0, 3]
    # w = (0.9, 0.1), cap (0, 5), k = 4: floor(0.4) = 0 for crop 1, leftover 4 -> (0, 4).
    assert _budgets([0.9, 0.1], 4, [0, 5]) == [0, 4]
    # Absent crop in the middle with the largest weight: w = (0.2, 0.6, 0.2), cap (3, 0, 3), k = 4:
    # floors (0, -, 0), leftover 4 over crops (0, 2) in order -> 0, 2, 0, 2 -> (2, 0, 2).
    assert _budgets([0.2, 0.6, 0.2], 4, [3, 0, 3]) == [2, 0, 2]


# ----------------------------------------------------------------------------- crop_topk by hand


def test_crop_topk_ties_to_lowest_index():
    # crops (1, 3, 3) and (2, 5, 5), one each: ties at 1/2 -> 1 and at 4/5 -> 4.
    s = _t([1.0, 3.0, 3.0, 2.0, 5.0, 5.0])
    assert vtprune.crop_topk(s, 2, _i([1, 1]), backend=REF).tolist() == [1, 4]
    # all equal: the first q of each crop
    assert vtprune.crop_topk(_t([7.0] * 6), 2, _i([2, 1]), backend=REF).tolist() == [0, 1, 3]


def test_crop_topk_unsorted_order():
    # scores (1, 2, 3 | 9, 5, 7), budgets (2, 2): crop 0 by descending score -> 2, 1; crop 1 -> 3, 5.
    s = _t([1.0, 2.0, 3.0, 9.0, 5.0, 7.0])
    assert vtprune.crop_topk(s, 2, _i([2, 2]), sorted=False, backend=REF).tolist() == [2, 1, 3, 5]
    assert vtprune.crop_topk(s, 2, _i([2, 2]), backend=REF).tolist() == [1, 2, 3, 5]
    # a crop with budget 0 contributes nothing; crops of 7 tokens in 3: sizes (3, 2, 2)
    s7 = _t([0.0, 1.0, 2.0, 6.0, 5.0, 3.0, 4.0])
    assert vtprune.crop_topk(s7, 3, _i([0, 1, 2]), sorted=False, backend=REF).tolist() == [3, 6, 5]


def test_crop_topk_explicit_sizes():
    # crop_sizes (2, 3) over N = 6: token 5 lies in no crop and is never picked.
    s = _t([[0.1, 0.2, 0.3, 0.4, 0.5, 9.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    out = vtprune.crop_topk(s, _i([[2, 3], [2, 3]]), _i([[1, 2], [1, 2]]), backend=REF)
    assert out.tolist() == [[1, 3, 4], [0, 2, 3]]


# ----------------------------------------------------------------------------- coverage by hand


def test_facility_location_orthogonal():
    # e1..e4 and (1, 1, 0, 0): S = {e1, e2} -> max sims (1, 1, 0, 0, r) -> FL = 2 + r.
    x = _t([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]])
    fl = vtprune.facility_location(x, _i([0, 1]), backend=REF)
    assert fl.shape == () and fl.dtype == torch.float32
    assert fl.item() == pytest.approx(2 + R2, rel=1e-6)
    # S = {(1,1,0,0)}: sims (r, r, 0, 0, 1) -> FL = 1 + 2r.
    assert vtprune.facility_location(x, _i([4]), backend=REF).item() == pytest.approx(1 + 2 * R2, rel=1e-6)
    # theta-coverage of S = {4}: >= 0.7 -> tokens 0, 1, 4 -> 3/5; >= 0.75 -> only 4 -> 1/5; >= 0 -> all.
    assert vtprune.theta_coverage(x, _i([4]), 0.7, backend=REF).item() == pytest.approx(0.6)
    assert vtprune.theta_coverage(x, _i([4]), 0.75, backend=REF).item() == pytest.approx(0.2)
    assert vtprune.theta_coverage(x, _i([4]), 0.0, backend=REF).item() == pytest.approx(1.0)
    # Every token selected: FL = N, coverage at theta = 1 is 1 (up to rounding of the self-similarity).
    assert vtprune.facility_location(x, _i([0, 1, 2, 3, 4]), backend=REF).item() == pytest.approx(5.0, rel=1e-6)


def test_facility_location_negative_similarity_and_lengths():
    # (1, 0), (-1, 0), (0, 1) with S = {0}: sims (1, -1, 0) -> FL = 1 (the -1 counts as 0);
    # theta = -1 covers everything; theta = 0.5 covers only token 0 -> 1/3.
    x = _t([[1, 0], [-1, 0], [0, 1]])
    assert vtprune.facility_location(x, _i([0]), backend=REF).item() == pytest.approx(1.0)
    assert vtprune.theta_coverage(x, _i([0]), -1.0, backend=REF).item() == pytest.approx(1.0)
    assert vtprune.theta_coverage(x, _i([0]), 0.5, backend=REF).item() == pytest.approx(1 / 3)
    # Batched with lengths (3, 2): image 1 only counts (1, 0) and (-1, 0); padding (1, 0) is ignored.
    xb = _t([[[1, 0], [-1, 0], [0, 1]], [[1, 0], [-1, 0], [1, 0]]])
    fl = vtprune.facility_location(xb, _i([[2], [0]]), lengths=_i([3, 2]), backend=REF)
    # image 0, S = {(0,1)}: sims (0, 0, 1) -> 1; image 1, S = {(1,0)}: sims (1, -1) -> 1.
    assert fl.tolist() == pytest.approx([1.0, 1.0])
    cov = vtprune.theta_coverage(xb, _i([[2], [0]]), 0.5, lengths=_i([3, 2]), backend=REF)
    # image 0: only token 2 -> 1/3; image 1: only token 0 of 2 valid -> 1/2.
    assert cov.tolist() == pytest.approx([1 / 3, 1 / 2])


def test_facility_location_fp64_stays_fp64():
    x = torch.eye(3, dtype=torch.float64, device=DEVICE)
    fl = vtprune.facility_location(x, _i([0]), backend=REF)
    assert fl.dtype == torch.float64 and fl.item() == 1.0


# ----------------------------------------------------------------------------- attention importance vs dense float64


def np_attention_importance(q, k, groups, num_groups, causal, scale, key_range=None):
    """Dense float64: softmax per head, averaged over heads, mean over each group's queries."""
    q = q.detach().cpu().double().numpy()
    k = k.detach().cpu().double().numpy()
    groups = groups.cpu().numpy()
    b, hq, length, _ = q.shape
    rep = hq // k.shape[1]
    out = np.zeros((b, num_groups, length))
    for bi in range(b):
        attn = np.zeros((length, length))
        for h in range(hq):
            logits = q[bi, h] @ k[bi, h // rep].T * scale
            if causal:
                logits = np.where(np.tril(np.ones((length, length), dtype=bool)), logits, -np.inf)
            logits = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            attn += p / p.sum(axis=1, keepdims=True)
        attn /= hq
        for g in range(num_groups):
            rows = np.nonzero(groups[bi] == g)[0]
            if len(rows):
                out[bi, g] = attn[rows].mean(axis=0)
    if key_range is not None:
        out = out[..., key_range[0] : key_range[1]]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(1, 1), (4, 4), (4, 2), (6, 1)], ids=["1-1", "mha", "gqa", "mqa"])
def test_attention_importance_vs_dense(causal, heads):
    hq, hk = heads
    g = torch.Generator().manual_seed(hq * 10 + hk + causal)
    b, length, d = 2, 9, 5
    q = (2 * torch.randn(b, hq, length, d, generator=g)).to(DEVICE)
    k = torch.randn(b, hk, length, d, generator=g).to(DEVICE)
    groups = _i([[0, 0, 1, 1, 1, 1, 0, 2, -1], [1, 1, 1, 0, 0, 2, 2, 2, 2]])
    got = vtprune.attention_importance(q, k, groups, num_groups=3, causal=causal, backend=REF)
    want = np_attention_importance(q, k, groups, 3, causal, d**-0.5)
    assert got.shape == (b, 3, length) and got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-6)
    # default num_groups = max id + 1 = 3, explicit scale, key_range
    got = vtprune.attention_importance(q, k, groups, causal=causal, scale=0.3, key_range=(2, 7), backend=REF)
    want = np_attention_importance(q, k, groups, 3, causal, 0.3, (2, 7))
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-6)


def test_attention_importance_empty_group_and_hand_case():
    # One head, L = 3, d = 1, q = k = 0: every logit is 0, so causal attention row j is uniform
    # over keys 0..j: row 0 = (1, 0, 0), row 1 = (1/2, 1/2, 0), row 2 = (1/3, 1/3, 1/3).
    # Groups (0, 1, 1), num_groups = 3: group 0 = row 0; group 1 = mean of rows 1, 2 =
    # (5/12, 5/12, 1/6); group 2 has no query -> zeros.
    q = torch.zeros(1, 1, 3, 1, device=DEVICE)
    got = vtprune.attention_importance(q, q, _i([[0, 1, 1]]), num_groups=3, backend=REF)
    want = [[[1, 0, 0], [5 / 12, 5 / 12, 1 / 6], [0, 0, 0]]]
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-6, atol=1e-7)
    # Non-causal: every row uniform (1/3 each); query 1 excluded with -1.
    got = vtprune.attention_importance(q, q, _i([[0, -1, 0]]), num_groups=2, causal=False, backend=REF)
    np.testing.assert_allclose(got.cpu().numpy(), [[[1 / 3] * 3, [0, 0, 0]]], rtol=1e-6, atol=1e-7)
    # fp64 in, fp64 out
    got = vtprune.attention_importance(q.double(), q.double(), _i([[0, 1, 1]]), backend=REF)
    assert got.dtype == torch.float64


# ----------------------------------------------------------------------------- low-rank factors


def _matrix(m, n, seed, dtype=torch.float64):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6)])
def test_lowrank_full_rank_is_exact(shape):
    w = _matrix(*shape, seed=sum(shape))
    r = min(shape)
    u, v = vtprune.lowrank_factorize(w, r, backend=REF)
    assert u.shape == (shape[0], r) and v.shape == (r, shape[1])
    torch.testing.assert_close(u @ v, w, rtol=1e-10, atol=1e-10)
    # fp32 too
    u32, v32 = vtprune.lowrank_factorize(w.float(), r)
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32 @ v32, w.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_lowrank_truncation_error_and_balance(rank):
    # Build W with known singular values 10, 5, 3, 2, 1 (orthonormal factors from a QR).
    sv = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64, device=DEVICE)
    qa, _ = torch.linalg.qr(_matrix(7, 5, seed=1))
    qb, _ = torch.linalg.qr(_matrix(6, 5, seed=2))
    w = qa @ torch.diag(sv) @ qb.T  # [7, 6], rank 5
    u, v = vtprune.lowrank_factorize(w, rank, backend=REF)
    err = w - u @ v
    # Frobenius error^2 = sum of the dropped singular values squared; spectral error = s_{R+1}.
    assert torch.linalg.matrix_norm(err).item() ** 2 == pytest.approx(float((sv[rank:] ** 2).sum()), rel=1e-9)
    assert torch.linalg.matrix_norm(err, ord=2).item() == pytest.approx(float(sv[rank]), rel=1e-9)
    # The split is balanced: U^T U = V V^T = diag(s_1..s_R) (orthonormal singular vectors).
    torch.testing.assert_close(u.T @ u, torch.diag(sv[:rank]), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(v @ v.T, torch.diag(sv[:rank]), rtol=1e-9, atol=1e-9)
    # Eckart-Young: no other rank-R matrix is closer; try random ones and the projection of W
    # onto random R-dim subspaces.
    best = torch.linalg.matrix_norm(err).item()
    for seed in range(20):
        p = torch.linalg.qr(_matrix(6, rank, seed=100 + seed))[0]
        other = w @ p @ p.T
        assert torch.linalg.matrix_norm(w - other).item() >= best - 1e-9
        other = _matrix(7, rank, seed=200 + seed) @ _matrix(rank, 6, seed=300 + seed)
        assert torch.linalg.matrix_norm(w - other).item() >= best - 1e-9


# ----------------------------------------------------------------------------- ALVTS scores vs the SPEC §3 formula


def _softmax_rows(z, causal):
    length = z.shape[-1]
    if causal:
        z = np.where(np.tril(np.ones((length, length), dtype=bool)), z, -np.inf)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _np_alvts(attn, mask):
    """S(i) = mean_{visual j} A[j, i] * mean_{text j} A[j, i], for the visual i, in order."""
    vis = np.nonzero(mask)[0]
    txt = np.nonzero(~mask)[0]
    return attn[vis][:, vis].mean(axis=0) * attn[txt][:, vis].mean(axis=0)


MASKS = [
    [0, 0, 1, 1, 1, 1, 0, 0, 0],  # text, image, text
    [0, 1, 1, 1, 1, 0, 0, 0, 0],
]


@pytest.mark.parametrize("causal", [True, False])
def test_alvts_scores_single_head(causal):
    d, dq, rank, head_dim = 6, 8, 3, 4
    w_q, w_k = _matrix(dq, d, seed=7), _matrix(dq, d, seed=8)
    sel = vtprune.LowRankSelector.from_weights(w_q, w_k, rank, head_dim=head_dim)
    x = _matrix(2 * 9, d, seed=9).view(2, 9, d)
    mask = torch.tensor(MASKS, dtype=torch.bool, device=DEVICE)
    got = vtprune.alvts_scores(x, sel, mask, causal=causal, backend=REF)
    assert got.shape == (2, 4)
    # SPEC §3, straight from the formula with our own truncated SVD:
    # P_q = X V_q^T, P_k = X V_k^T, logits = P_q (U_q^T U_k) P_k^T / sqrt(d_head).
    for b in range(2):
        xb = x[b].cpu().numpy()
        uq_full, sq, vq_full = np.linalg.svd(w_q.cpu().numpy(), full_matrices=False)
        uk_full, sk, vk_full = np.linalg.svd(w_k.cpu().numpy(), full_matrices=False)
        u_q, v_q = uq_full[:, :rank] * np.sqrt(sq[:rank]), np.sqrt(sq[:rank])[:, None] * vq_full[:rank]
        u_k, v_k = uk_full[:, :rank] * np.sqrt(sk[:rank]), np.sqrt(sk[:rank])[:, None] * vk_full[:rank]
        p_q, p_k = xb @ v_q.T, xb @ v_k.T
        logits = p_q @ (u_q.T @ u_k) @ p_k.T / math.sqrt(head_dim)
        want = _np_alvts(_softmax_rows(logits, causal), np.array(MASKS[b], dtype=bool))
        np.testing.assert_allclose(got[b].detach().cpu().numpy(), want, rtol=1e-8, atol=1e-12)
    # unbatched form
    got1 = vtprune.alvts_scores(x[1], sel, mask[1], causal=causal, backend=REF)
    torch.testing.assert_close(got1, got[1])


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_alvts_scores_multi_head_full_rank_is_exact_attention(kv_heads):
    # With full rank, U V = W exactly, so the multi-head low-rank scores are the exact scores of
    # the layer: per head h, q_h = X W_q[h]^T, k_h = X W_k[h // rep]^T, A = mean_h softmax(q_h k_h^T / sqrt(d)).
    heads, head_dim, d = 2, 3, 6
    w_q = _matrix(heads * head_dim, d, seed=17)
    w_k = _matrix(kv_heads * head_dim, d, seed=18)
    x = _matrix(2 * 9, d, seed=19).view(2, 9, d)
    mask = torch.tensor(MASKS, dtype=torch.bool, device=DEVICE)
    rank_q, rank_k = min(w_q.shape), min(w_k.shape)
    u_q, v_q = vtprune.lowrank_factorize(w_q, rank_q)
    u_k, v_k = vtprune.lowrank_factorize(w_k, rank_k)
    if rank_q != rank_k:  # V_q and V_k must share R: pad the smaller factor pair with zeros
        r = max(rank_q, rank_k)
        pad = lambda u, v: (torch.cat([u, u.new_zeros(u.shape[0], r - u.shape[1])], 1), torch.cat([v, v.new_zeros(r - v.shape[0], v.shape[1])], 0))  # noqa: E731
        u_q, v_q = pad(u_q, v_q)
        u_k, v_k = pad(u_k, v_k)
    sel = vtprune.LowRankSelector(u_q, v_q, u_k, v_k, head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads)
    got = vtprune.alvts_scores(x, sel, mask, backend=REF)
    rep = heads // kv_heads
    for b in range(2):
        xb = x[b].cpu().numpy()
        q = xb @ w_q.cpu().numpy().T
        k = xb @ w_k.cpu().numpy().T
        attn = np.zeros((9, 9))
        for h in range(heads):
            qh = q[:, h * head_dim : (h + 1) * head_dim]
            kh = k[:, (h // rep) * head_dim : (h // rep + 1) * head_dim]
            attn += _softmax_rows(qh @ kh.T / math.sqrt(head_dim), True) / heads
        want = _np_alvts(attn, np.array(MASKS[b], dtype=bool))
        np.testing.assert_allclose(got[b].detach().cpu().numpy(), want, rtol=1e-8, atol=1e-12)


def test_alvts_scores_multi_head_low_rank():
    # Rank R < full: per-head blocks of U (rows h*d .. (h+1)*d) with the shared V, averaged over heads.
    heads, head_dim, d, rank = 2, 4, 10, 3
    w_q, w_k = _matrix(heads * head_dim, d, seed=27), _matrix(heads * head_dim, d, seed=28)
    sel = vtprune.LowRankSelector.from_weights(w_q, w_k, rank, head_dim=head_dim, num_heads=heads)
    x = _matrix(9, d, seed=29)
    mask = torch.tensor(MASKS[0], dtype=torch.bool, device=DEVICE)
    got = vtprune.alvts_scores(x, sel, mask, causal=False, backend=REF)
    u_q, v_q = (t.detach().cpu().numpy() for t in (sel.u_q, sel.v_q))
    u_k, v_k = (t.detach().cpu().numpy() for t in (sel.u_k, sel.v_k))
    xb = x.cpu().numpy()
    p_q, p_k = xb @ v_q.T, xb @ v_k.T
    attn = np.zeros((9, 9))
    for h in range(heads):
        blk = slice(h * head_dim, (h + 1) * head_dim)
        logits = p_q @ u_q[blk].T @ u_k[blk] @ p_k.T / math.sqrt(head_dim)
        attn += _softmax_rows(logits, False) / heads
    want = _np_alvts(attn, np.array(MASKS[0], dtype=bool))
    np.testing.assert_allclose(got.detach().cpu().numpy(), want, rtol=1e-8, atol=1e-12)
