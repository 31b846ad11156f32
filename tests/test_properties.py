"""Randomized properties (Hypothesis) of every op, for every backend usable here.

The SCOPE checks do not trust any backend, the reference included: each pick is verified
against SCOPE scores recomputed from scratch in float64 NumPy (conftest.check_greedy_picks),
allowing near-ties (relative 1e-5). The other ops are compared with the reference and with
independent models written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st

import vtprune
from vtprune import reference
from conftest import (
    DEVICE,
    assert_same_greedy,
    assert_valid_selection,
    backend_params,
    check_fl_greedy_picks,
    check_greedy_picks,
    given_per_backend,
    np_cosine,
    np_facility_location,
)

SCOPE_BACKENDS = backend_params("scope_select")
VARLEN_BACKENDS = backend_params("scope_select_varlen")
HOLOV_BACKENDS = backend_params("holov_select")
BUDGET_BACKENDS = backend_params("crop_budgets")
TOPK_BACKENDS = backend_params("crop_topk")
COVERAGE_BACKENDS = backend_params("coverage_max_sim")
ATTN_BACKENDS = backend_params("attention_importance")

SIZES = [1, 2, 3, 7, 16, 33, 97]  # odd sizes on purpose; 577 and 2881 in the fixed cases below
ALPHAS = [0.0, 0.5, 1.0, 2.0, 3.7]
seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------- data


def make_tokens(seed, b, n, d, kind="gauss", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g)
    if kind == "clustered":  # a few directions, like patches of the same object
        c = max(1, n // 8)
        centers = torch.randn(b, c, d, generator=g)
        assign = torch.randint(0, c, (b, n), generator=g)
        x = centers.gather(1, assign[..., None].expand(-1, -1, d)) + 0.3 * x
    elif kind == "degenerate":  # zero rows, exact duplicates, wildly different norms
        if n > 1:
            rows = torch.randint(0, n, (b, max(1, n // 4)), generator=g)
            x.scatter_(1, rows[..., None].expand(-1, -1, d), 0.0)
            src = torch.randint(0, n, (b, max(1, n // 4)), generator=g)
            dst = torch.randint(0, n, (b, max(1, n // 4)), generator=g)
            x.scatter_(1, dst[..., None].expand(-1, -1, d), x.gather(1, src[..., None].expand(-1, -1, d)))
        x = x * torch.exp(4 * torch.randn(b, n, 1, generator=g))
    return x.to(device=DEVICE, dtype=dtype)


def make_saliency(seed, b, n, kind="uniform", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "uniform":
        s = torch.rand(b, n, generator=g)
    elif kind == "sparse":  # many exact zeros
        s = torch.rand(b, n, generator=g) * (torch.rand(b, n, generator=g) > 0.5)
    elif kind == "signed":  # negatives count as 0
        s = torch.randn(b, n, generator=g)
    else:  # "peaky": CLS attention-like, summed over 16 heads
        s = torch.softmax(3 * torch.randn(b, 16, n, generator=g), dim=-1).sum(dim=1)
    return s.to(device=DEVICE, dtype=dtype)


@st.composite
def scope_case(draw, sizes=SIZES, max_b=3, max_d=24, max_k=24, token_kinds=("gauss", "clustered", "degenerate")):
    n = draw(st.sampled_from(sizes))
    return dict(
        seed=draw(seeds),
        b=draw(st.integers(1, max_b)),
        n=n,
        d=draw(st.integers(1, max_d)),
        k=draw(st.integers(1, min(n, max_k))),
        alpha=draw(st.sampled_from(ALPHAS)),
        combine=draw(st.sampled_from(["mul", "add"])),
        tokens=draw(st.sampled_from(token_kinds)),
        saliency=draw(st.sampled_from(["uniform", "sparse", "signed", "peaky"])),
    )


def _inputs(case, dtype=torch.float32):
    x = make_tokens(case["seed"], case["b"], case["n"], case["d"], case["tokens"], dtype)
    s = make_saliency(case["seed"], case["b"], case["n"], case["saliency"], dtype)
    return x, s


# ----------------------------------------------------------------------------- SCOPE


@pytest.mark.parametrize("backend", SCOPE_BACKENDS)
@given_per_backend(case=scope_case())
def test_scope_each_pick_maximizes_score(backend, case):
    x, s = _inputs(case)
    k, alpha, combine = case["k"], case["alpha"], case["combine"]
    picks = vtprune.fused_scope_select(x, s, k, alpha, combine=combine, sorted=False, backend=backend)
    assert picks.device == x.device
    assert_valid_selection(picks, k, case["n"])
    for b in range(case["b"]):
        check_greedy_picks(x[b], s[b], picks[b].tolist(), alpha, combine)
    ordered = vtprune.fused_scope_select(x, s, k, alpha, combine=combine, backend=backend)
    assert torch.equal(ordered, picks.sort(dim=-1).values)


@pytest.mark.parametrize("backend", SCOPE_BACKENDS)
@given_per_backend(case=scope_case(token_kinds=("gauss", "clustered")), data=st.data())
def test_scope_greedy_prefix(backend, case, data):
    x, s = _inputs(case)
    k = case["k"]
    k2 = data.draw(st.integers(1, k), label="k'")
    kw = dict(combine=case["combine"], sorted=False, backend=backend)
    full = vtprune.fused_scope_select(x, s, k, case["alpha"], **kw)
    part = vtprune.fused_scope_select(x, s, k2, case["alpha"], **kw)
    assert torch.equal(full[:, :k2], part)


@pytest.mark.parametrize("backend", SCOPE_BACKENDS)
@given_per_backend(case=scope_case(sizes=[1, 2, 7, 16, 33, 60], max_k=12))
def test_scope_alpha0_is_facility_location_greedy(backend, case):
    x, s = _inputs(case)
    picks = vtprune.fused_scope_select(x, s, case["k"], 0.0, sorted=False, backend=backend)
    for b in range(case["b"]):
        check_fl_greedy_picks(x[b], picks[b].tolist())
    # the saliency plays no part at alpha = 0 with "mul"
    other_s = make_saliency(case["seed"] + 99, case["b"], case["n"], "signed")
    other = vtprune.fused_scope_select(x, other_s, case["k"], 0.0, sorted=False, backend=backend)
    assert torch.equal(picks, other)


@pytest.mark.parametrize("backend", SCOPE_BACKENDS)
@given_per_backend(case=scope_case(token_kinds=("gauss", "clustered"), max_b=4), data=st.data())
def test_scope_padded_batch_equals_each_image_alone(backend, case, data):
    x, s = _inputs(case)
    n, k = case["n"], case["k"]
    lengths = data.draw(st.lists(st.integers(k, n), min_size=case["b"], max_size=case["b"]), label="lengths")
    # garbage in the padding: huge tokens and saliency that would win if they were counted
    g = torch.Generator().manual_seed(case["seed"] + 7)
    for b, nb in enumerate(lengths):
        x[b, nb:] = 100 * torch.randn(n - nb, case["d"], generator=g).to(DEVICE)
        s[b, nb:] = 1e6
    lens = torch.tensor(lengths, dtype=data.draw(st.sampled_from([torch.int32, torch.int64])), device=DEVICE)
    out = vtprune.fused_scope_select(x, s, k, case["alpha"], combine=case["combine"], lengths=lens, sorted=False, backend=backend)
    assert_valid_selection(out, k, lengths)
    for b, nb in enumerate(lengths):
        alone = vtprune.fused_scope_select(x[b, :nb], s[b, :nb], k, case["alpha"], combine=case["combine"], sorted=False, backend=backend)
        assert_same_greedy(out[b], alone, x[b, :nb], s[b, :nb], case["alpha"], case["combine"])


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
@given_per_backend(
    seed=seeds,
    seqlens=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    d=st.integers(1, 16),
    alpha=st.sampled_from(ALPHAS),
    combine=st.sampled_from(["mul", "add"]),
    cu_dtype=st.sampled_from([torch.int32, torch.int64]),
    data=st.data(),
)
def test_varlen_equals_per_sequence_calls(backend, seed, seqlens, d, alpha, combine, cu_dtype, data):
    total = sum(seqlens)
    x = make_tokens(seed, 1, total, d)[0]
    s = make_saliency(seed, 1, total)[0]
    cu = torch.tensor([0] + np.cumsum(seqlens).tolist(), dtype=cu_dtype, device=DEVICE)
    if data.draw(st.booleans(), label="per-sequence k"):
        ks = [data.draw(st.integers(1, n), label=f"k{b}") for b, n in enumerate(seqlens)]
        k_arg = torch.tensor(ks, dtype=data.draw(st.sampled_from([torch.int32, torch.int64])), device=DEVICE)
    else:
        k_arg = data.draw(st.integers(1, min(seqlens)), label="k")
        ks = [k_arg] * len(seqlens)
    # the FlashAttention-style bound on the lengths: absent, exact, or loose
    max_seqlen = data.draw(st.sampled_from([None, max(seqlens), max(seqlens) + 3]), label="max_seqlen")
    hint = {"max_seqlen": max_seqlen}
    if data.draw(st.booleans(), label="total_k"):  # the output length, given
        hint["total_k"] = sum(ks)
    idx, cu_k = vtprune.scope_select_varlen(x, s, cu, k_arg, alpha, combine=combine, sorted=False, backend=backend, **hint)
    assert idx.dtype == torch.int64 and idx.shape == (sum(ks),)
    assert cu_k.dtype == cu_dtype and cu_k.tolist() == [0] + np.cumsum(ks).tolist()
    one = backend if backend in [p.values[0] for p in SCOPE_BACKENDS] else "reference"
    for b, n in enumerate(seqlens):
        start = int(cu[b])
        got = idx[int(cu_k[b]) : int(cu_k[b + 1])]
        assert ((got >= start) & (got < start + n)).all()
        want = vtprune.fused_scope_select(x[start : start + n], s[start : start + n], ks[b], alpha, combine=combine, sorted=False, backend=one)
        assert_same_greedy(got - start, want, x[start : start + n], s[start : start + n], alpha, combine)
    # sorted=True: the same picks, ascending inside each sequence
    idx_s, cu_k_s = vtprune.scope_select_varlen(x, s, cu, k_arg, alpha, combine=combine, sorted=True, backend=backend, **hint)
    assert torch.equal(cu_k_s, cu_k)
    for b in range(len(seqlens)):
        lo, hi = int(cu_k[b]), int(cu_k[b + 1])
        assert torch.equal(idx_s[lo:hi], idx[lo:hi].sort().values)


@pytest.mark.parametrize("backend", SCOPE_BACKENDS)
@pytest.mark.parametrize(
    "n,d,k,b",
    [(1, 4, 1, 2), (7, 3, 7, 3), (97, 8, 40, 2), (577, 16, 32, 2), (577, 1024, 8, 1), (2881, 8, 6, 1)],
    ids=["1", "7-all", "97", "577", "577-D1024", "2881"],
)
def test_scope_large_vs_reference(backend, n, d, k, b):
    x = make_tokens(n + d, b, n, d, "clustered")
    s = make_saliency(n, b, n, "peaky")
    got = vtprune.fused_scope_select(x, s, k, 1.0, sorted=False, backend=backend)
    assert_valid_selection(got, k, n)
    for i in range(b):
        check_greedy_picks(x[i], s[i], got[i].tolist(), 1.0, "mul")
    if backend != "reference":
        want = vtprune.fused_scope_select(x, s, k, 1.0, sorted=False, backend="reference")
        for i in range(b):  # equal picks, except after a near-tie
            assert_same_greedy(got[i], want[i], x[i], s[i], 1.0, "mul")


@pytest.mark.parametrize("backend", SCOPE_BACKENDS)
@pytest.mark.parametrize("n", [7, 97, 577])
def test_scope_fp64_matches_greedy(backend, n):
    # fp64 tokens are accepted on the PyTorch backends (not on triton/cuda: see test_validation)
    if backend in ("triton", "cuda"):
        pytest.skip("kernel backends take 16/32-bit floats only (tested in test_validation)")
    x = make_tokens(n, 1, n, 6, "clustered", torch.float64)
    s = make_saliency(n, 1, n, "uniform", torch.float64)
    got = vtprune.fused_scope_select(x, s, min(n, 10), 0.5, sorted=False, backend=backend)
    check_greedy_picks(x[0], s[0], got[0].tolist(), 0.5, "mul", rel=1e-9)


@pytest.mark.parametrize("backend", SCOPE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@given_per_backend(max_examples=12, case=scope_case(sizes=[1, 7, 33, 97], token_kinds=("gauss", "clustered")))
def test_scope_low_precision(backend, dtype, case):
    x, s = _inputs(case, dtype)
    assert x.dtype == dtype
    k, alpha, combine = case["k"], case["alpha"], case["combine"]
    got = vtprune.fused_scope_select(x, s, k, alpha, combine=combine, backend=backend)
    assert_valid_selection(got, k, case["n"])
    assert (got.diff(dim=-1) > 0).all()
    # the fp32 reference on the same (rounded) values; compare the coverage each selection reaches
    want = vtprune.fused_scope_select(x.float(), s.float(), k, alpha, combine=combine, backend="reference")
    for b in range(case["b"]):
        sim = np_cosine(x[b].float())
        fl_got, fl_want = np_facility_location(sim, got[b].tolist()), np_facility_location(sim, want[b].tolist())
        assert fl_got == pytest.approx(fl_want, rel=0.02)


# ----------------------------------------------------------------------------- HoloV


def np_crop_scores(x, a, sizes, alpha):
    """score_c and h of SPEC §2 in float64."""
    x = x.detach().cpu().double().numpy()
    a = 1000.0 * a.detach().cpu().double().numpy()
    scores, hs, start = [], [], 0
    for m in sizes:
        xc, ac = x[start : start + m], a[start : start + m]
        start += m
        if m <= 1:
            scores.append(ac.mean() / 1000.0)
            hs.append(ac)
            continue
        f = xc / (np.linalg.norm(xc, axis=1, keepdims=True) + 1e-6)
        sm = f @ f.T
        np.fill_diagonal(sm, 0.0)
        mean = sm.sum(axis=1) / (m - 1)
        var = ((sm - mean[:, None]) ** 2).sum(axis=1) / (m - 1)
        gamma = np.abs(ac).mean() / (np.abs(var).mean() + 1e-6)
        h = ac + alpha * gamma * var
        scores.append(h.mean())
        hs.append(h)
    return np.array(scores), np.concatenate(hs)


def model_budgets(w, k, cap):
    """SPEC §2 budgets, written from the text: floor, leftover by weight, capacity surplus, cycling."""
    c_all = range(len(w))
    present = [c for c in c_all if cap[c] > 0]
    q = [0] * len(w)
    for c in present:
        q[c] = 0 if math.isnan(w[c]) else max(0, math.floor(w[c] * k))
    rank = sorted(present, key=lambda c: (math.isnan(w[c]), -w[c] if not math.isnan(w[c]) else 0.0, c))
    left = k - sum(q)
    i = 0
    while left > 0:
        q[rank[i % len(rank)]] += 1
        left -= 1
        i += 1
    surplus = 0
    for c in present:
        surplus += max(0, q[c] - cap[c])
        q[c] = min(q[c], cap[c])
    while surplus > 0:
        for c in rank:
            if surplus and q[c] < cap[c]:
                q[c] += 1
                surplus -= 1
    return q


def _crop_of(index, sizes):
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


@pytest.mark.parametrize("backend", HOLOV_BACKENDS)
@given_per_backend(
    seed=seeds,
    b=st.integers(1, 3),
    n=st.sampled_from([1, 2, 7, 16, 33, 97]),
    d=st.integers(1, 24),
    data=st.data(),
    alpha=st.sampled_from([0.0, 0.09, 1.0]),
    rank_by=st.sampled_from(["attn", "score"]),
    kind=st.sampled_from(["uniform", "peaky", "sparse"]),
)
def test_holov_budgets_and_selection(backend, seed, b, n, d, data, alpha, rank_by, kind):
    k = data.draw(st.integers(1, n), label="k")
    num_crops = data.draw(st.one_of(st.none(), st.integers(1, n)), label="num_crops")
    x = make_tokens(seed, b, n, d, "clustered")
    a = make_saliency(seed, b, n, kind)
    out = vtprune.holov_select(x, a, k, num_crops=num_crops, alpha=alpha, rank_by=rank_by, sorted=False, backend=backend)
    assert_valid_selection(out, k, n)
    srt = vtprune.holov_select(x, a, k, num_crops=num_crops, alpha=alpha, rank_by=rank_by, backend=backend)
    assert torch.equal(srt, out.sort(dim=-1).values)
    c_count = num_crops if num_crops is not None else min(n, max(1, (1024 * n) // (576 * k)))
    sizes = [n // c_count + (1 if c < n % c_count else 0) for c in range(c_count)]
    for i in range(b):
        score, h = np_crop_scores(x[i], a[i], sizes, alpha)
        w = score / (score.sum() + 1e-6)
        want_q = model_budgets(w.tolist(), k, sizes)
        picks = out[i].tolist()
        crops = [_crop_of(p, sizes) for p in picks]
        counts = [crops.count(c) for c in range(c_count)]
        assert sum(counts) == k and all(cnt <= m for cnt, m in zip(counts, sizes))
        assert counts == want_q, (counts, want_q, w.tolist())
        # the official order: crops ascending; inside a crop, descending key, ties to the lowest index
        assert crops == sorted(crops)
        key = a[i].detach().cpu().double().numpy() if rank_by == "attn" else h
        start = 0
        for c, m in enumerate(sizes):
            chosen = [p for p in picks if start <= p < start + m]
            if rank_by == "attn":  # exact: the keys are the input values
                order = sorted(range(start, start + m), key=lambda j: (-key[j], j))
                assert chosen == order[: counts[c]], (c, chosen, order)
            else:  # computed keys: the chosen ones are the top ones up to rounding
                rest = [j for j in range(start, start + m) if j not in chosen]
                if chosen and rest:
                    lo, hi = min(key[chosen]), max(key[rest])
                    assert lo >= hi - 1e-4 * max(1.0, abs(hi)), (c, lo, hi)
            start += m


@pytest.mark.parametrize("backend", HOLOV_BACKENDS)
@given_per_backend(seed=seeds, b=st.integers(1, 4), n=st.sampled_from([2, 7, 16, 33, 97]), d=st.integers(1, 16), data=st.data())
def test_holov_padded_batch_equals_each_image_alone(backend, seed, b, n, d, data):
    k = data.draw(st.integers(1, n), label="k")
    num_crops = data.draw(st.one_of(st.none(), st.integers(1, k)), label="num_crops")
    lengths = data.draw(st.lists(st.integers(max(k, num_crops or 1), n), min_size=b, max_size=b), label="lengths")
    x = make_tokens(seed, b, n, d, "clustered")
    a = make_saliency(seed, b, n, "peaky")
    for i, nb in enumerate(lengths):
        x[i, nb:] = 50.0
        a[i, nb:] = 1e3
    rank_by = data.draw(st.sampled_from(["attn", "score"]), label="rank_by")
    lens = torch.tensor(lengths, device=DEVICE)
    out = vtprune.holov_select(x, a, k, num_crops=num_crops, rank_by=rank_by, lengths=lens, sorted=False, backend=backend)
    assert_valid_selection(out, k, lengths)
    for i, nb in enumerate(lengths):
        alone = vtprune.holov_select(x[i, :nb], a[i, :nb], k, num_crops=num_crops, rank_by=rank_by, sorted=False, backend=backend)
        assert torch.equal(out[i], alone), (i, nb)


@pytest.mark.parametrize("backend", HOLOV_BACKENDS)
@pytest.mark.parametrize("n,d,k", [(577, 64, 64), (577, 16, 192), (97, 4096, 10)], ids=["577-64", "577-192", "97-D4096"])
def test_holov_large_vs_reference(backend, n, d, k):
    x = make_tokens(n * d, 2, n, d, "clustered")
    a = make_saliency(n, 2, n, "peaky")
    got = vtprune.holov_select(x, a, k, backend=backend)
    assert_valid_selection(got, k, n)
    want = vtprune.holov_select(x, a, k, backend="reference")
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", HOLOV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@given_per_backend(max_examples=12, seed=seeds, n=st.sampled_from([1, 7, 33, 97]), d=st.integers(1, 32), data=st.data())
def test_holov_low_precision(backend, dtype, seed, n, d, data):
    k = data.draw(st.integers(1, n), label="k")
    x = make_tokens(seed, 2, n, d, "clustered", dtype)
    a = make_saliency(seed, 2, n, "peaky", dtype)
    got = vtprune.holov_select(x, a, k, backend=backend)
    assert_valid_selection(got, k, n)
    want = vtprune.holov_select(x.float(), a.float(), k, backend="reference")
    for b in range(2):
        sim = np_cosine(x[b].float())
        fl_got, fl_want = np_facility_location(sim, got[b].tolist()), np_facility_location(sim, want[b].tolist())
        assert fl_got == pytest.approx(fl_want, rel=0.02)


# ----------------------------------------------------------------------------- crop_budgets / crop_topk


@st.composite
def budget_case(draw):
    c = draw(st.integers(1, 12))
    b = draw(st.integers(1, 3))
    rows_w, rows_cap = [], []
    for _ in range(b):
        cap = draw(st.lists(st.integers(0, 9), min_size=c, max_size=c))
        if sum(cap) == 0:
            cap[draw(st.integers(0, c - 1))] = draw(st.integers(1, 9))
        kind = draw(st.sampled_from(["normalized", "raw", "zeros", "nan", "ties"]))
        w = draw(st.lists(st.floats(0, 1, width=32), min_size=c, max_size=c))
        if kind == "normalized":
            total = sum(w) + 1e-6
            w = [v / total for v in w]
        elif kind == "zeros":
            w = [0.0] * c
        elif kind == "nan":
            w = [math.nan if i % 3 == 0 else v / (sum(w) + c) for i, v in enumerate(w)]
        elif kind == "ties":
            w = [1.0 / c] * c
        else:  # raw weights are taken as given; keep their sum <= 1 (SPEC: normalized scores)
            w = [v / max(1.0, sum(w) + 1e-3) for v in w]
        rows_w.append(w)
        rows_cap.append(cap)
    k = draw(st.integers(1, min(sum(r) for r in rows_cap)))
    return rows_w, rows_cap, k


@pytest.mark.parametrize("backend", BUDGET_BACKENDS)
@given_per_backend(case=budget_case())
def test_crop_budgets(backend, case):
    rows_w, rows_cap, k = case
    w = torch.tensor(rows_w, dtype=torch.float32, device=DEVICE)
    cap = torch.tensor(rows_cap, dtype=torch.int64, device=DEVICE)
    got = vtprune.crop_budgets(w, k, cap, backend=backend)
    assert got.dtype == torch.int64 and got.shape == w.shape
    assert (got.sum(dim=-1) == k).all()
    assert ((got >= 0) & (got <= cap)).all()
    want = [model_budgets(row, k, c) for row, c in zip(w.tolist(), rows_cap)]
    assert got.tolist() == want
    # int32 capacity and the unbatched form give the same
    assert torch.equal(vtprune.crop_budgets(w[0], k, cap[0].int(), backend=backend), got[0])


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@given_per_backend(seed=seeds, b=st.integers(1, 3), n=st.sampled_from([1, 2, 7, 16, 33, 97, 577]), data=st.data())
def test_crop_topk(backend, seed, b, n, data):
    g = torch.Generator().manual_seed(seed)
    if data.draw(st.booleans(), label="integer scores (ties)"):
        s = torch.randint(0, 4, (b, n), generator=g).float()
    else:
        s = torch.randn(b, n, generator=g)
    if data.draw(st.booleans(), label="some NaN"):
        s[torch.rand(b, n, generator=g) < 0.2] = math.nan
    s = s.to(DEVICE)
    c = data.draw(st.integers(1, n), label="C")
    sizes = [n // c + (1 if i < n % c else 0) for i in range(c)]
    q = [[data.draw(st.integers(0, m)) for m in sizes] for _ in range(b)]
    assume(sum(q[0]) > 0)
    k = sum(q[0])
    # make every row sum to k: move budget within row r until it matches
    for r in q[1:]:
        while sum(r) > k:
            r[next(i for i, v in enumerate(r) if v > 0)] -= 1
        while sum(r) < k:
            r[next(i for i, v in enumerate(r) if v < sizes[i])] += 1
    budgets = torch.tensor(q, dtype=torch.int64, device=DEVICE)
    sorted_ = data.draw(st.booleans(), label="sorted")
    got = vtprune.crop_topk(s, c, budgets, sorted=sorted_, backend=backend)
    assert got.shape == (b, k) and got.dtype == torch.int64
    # model: per crop, stable order by descending score, NaN last
    keys = s.cpu().double().numpy()
    for i in range(b):
        want, start = [], 0
        for m, qc in zip(sizes, q[i]):
            order = sorted(range(start, start + m), key=lambda j: (math.isnan(keys[i, j]), -keys[i, j] if not math.isnan(keys[i, j]) else 0, j))
            want += order[:qc]
            start += m
        assert got[i].tolist() == (sorted(want) if sorted_ else want)
    # explicit sizes tensor (int32) gives the same
    sizes_t = torch.tensor([sizes] * b, dtype=torch.int32, device=DEVICE)
    assert torch.equal(vtprune.crop_topk(s, sizes_t, budgets, k=k, sorted=sorted_, backend=backend), got)


# ----------------------------------------------------------------------------- coverage metrics


@pytest.mark.parametrize("backend", COVERAGE_BACKENDS)
@given_per_backend(
    seed=seeds,
    b=st.integers(1, 3),
    n=st.sampled_from([1, 2, 7, 33, 97, 577]),
    d=st.integers(1, 40),
    data=st.data(),
    kind=st.sampled_from(["gauss", "clustered", "degenerate"]),
)
def test_coverage_vs_float64(backend, seed, b, n, d, data, kind):
    x = make_tokens(seed, b, n, d, kind)
    kk = data.draw(st.integers(1, min(n, 20)), label="K")
    use_lengths = data.draw(st.booleans(), label="lengths")
    lengths = [data.draw(st.integers(1, n)) for _ in range(b)] if use_lengths else [n] * b
    g = torch.Generator().manual_seed(seed + 3)
    idx = torch.stack([torch.randint(0, nb, (kk,), generator=g) for nb in lengths]).to(DEVICE)  # repeats allowed
    lens = torch.tensor(lengths, device=DEVICE) if use_lengths else None
    theta = data.draw(st.sampled_from([-1.0, 0.0, 0.3, 0.9]), label="theta")
    fl = vtprune.facility_location(x, idx, lengths=lens, backend=backend)
    cov = vtprune.theta_coverage(x, idx, theta, lengths=lens, backend=backend)
    assert fl.shape == (b,) and fl.dtype == torch.float32
    for i, nb in enumerate(lengths):
        sim = np_cosine(x[i, :nb])
        want_fl = np_facility_location(sim, idx[i].tolist())
        assert fl[i].item() == pytest.approx(want_fl, rel=1e-5, abs=1e-5 * nb)
        best = sim[:, idx[i].tolist()].max(axis=1)
        # theta-coverage: count tokens clearly on either side of theta; borderline ones may go either way
        lo = (best >= theta + 1e-5).sum() / nb
        hi = (best >= theta - 1e-5).sum() / nb
        assert lo - 1e-6 <= cov[i].item() <= hi + 1e-6


# ----------------------------------------------------------------------------- attention importance


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@given_per_backend(
    seed=seeds,
    b=st.integers(1, 2),
    kv=st.sampled_from([1, 2]),
    rep=st.sampled_from([1, 2, 3]),
    length=st.integers(1, 70),
    d=st.sampled_from([1, 4, 16, 64]),
    causal=st.booleans(),
    num_groups=st.integers(1, 3),
    data=st.data(),
)
def test_attention_importance_vs_reference(backend, seed, b, kv, rep, length, d, causal, num_groups, data):
    g = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(b, kv * rep, length, d, generator=g)).to(DEVICE)
    k = torch.randn(b, kv, length, d, generator=g).to(DEVICE)
    groups = torch.randint(-1, num_groups, (b, length), generator=g).to(DEVICE)
    start = data.draw(st.integers(0, length - 1), label="key start")
    end = data.draw(st.integers(start + 1, length), label="key end")
    got = vtprune.attention_importance(q, k, groups, num_groups=num_groups, causal=causal, key_range=(start, end), backend=backend)
    want = reference.attention_importance(q, k, groups, num_groups, causal, d**-0.5, start, end)
    assert got.shape == (b, num_groups, end - start) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # column sums of a group's mean attention are 1 over all keys (each row is a distribution)
    full = vtprune.attention_importance(q, k, groups, num_groups=num_groups, causal=causal, backend=backend)
    for i in range(b):
        for gi in range(num_groups):
            expect = 1.0 if bool((groups[i] == gi).any()) else 0.0
            assert full[i, gi].sum().item() == pytest.approx(expect, abs=1e-4)
