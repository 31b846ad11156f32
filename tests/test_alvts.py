"""ALVTS (SPEC §3): full-rank scores, SVD start vs the oracle's top-k, calibration, routing.

The synthetic layer: ``D = 64``, 4 heads of 16, ``W_q``/``W_k`` with random singular vectors
and a decaying spectrum ``2.5 * exp(-i / 16)``, rank ``R = 8`` factors. Activations are
anisotropic (Gaussian with covariance spectrum ``exp(-2i / 16)`` in random directions, scaled
to unit mean variance), as LLM hidden states are: the SVD of ``W`` ignores that distribution,
which is what calibration fixes. Sequences: 6 text tokens, 48 visual tokens, 10 text tokens.
Everything is seeded; the thresholds below were measured over 12 seeds (see each test).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import vtprune
from vtprune.alvts import _alvts_scores_differentiable

D, HEADS, HEAD_DIM, RANK = 64, 4, 16, 8
PRE, N, POST = 6, 48, 10
L = PRE + N + POST
K = 12  # top-k of N = 48 visual tokens (r = 0.25)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a busy 2-core machine
    their spin-waits made the calibration test ~10x slower. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _orth(g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]


def _weight(g: torch.Generator) -> torch.Tensor:
    spectrum = 2.5 * torch.exp(-torch.arange(D, dtype=torch.float64) / 16)
    return ((_orth(g) * spectrum) @ _orth(g).T).float()


class _Layer:
    """Random ``W_q``, ``W_k`` and an activation distribution, from one seed."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.w_q, self.w_k = _weight(self.g), _weight(self.g)
        s = torch.exp(-torch.arange(D, dtype=torch.float64) / 16)
        self.mix = (_orth(self.g) * (s * math.sqrt(D / float(s.square().sum())))).T.float()
        self.full = functools.partial(vtprune.full_rank_scores, w_q=self.w_q, w_k=self.w_k, num_heads=HEADS, head_dim=HEAD_DIM)

    def data(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, L, D, generator=self.g) @ self.mix
        mask = torch.zeros(batch, L, dtype=torch.bool)
        mask[:, PRE : PRE + N] = True
        return x, mask

    def svd_selector(self) -> vtprune.LowRankSelector:
        return vtprune.LowRankSelector.from_weights(self.w_q, self.w_k, RANK, head_dim=HEAD_DIM, num_heads=HEADS)


def _topk_overlap(scores: torch.Tensor, oracle: torch.Tensor) -> float:
    """Mean over images of |top-K(scores) & top-K(oracle)| / K."""
    got, want = scores.topk(K, dim=-1).indices, oracle.topk(K, dim=-1).indices
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want)) / (K * scores.shape[0])


# ----------------------------------------------------------------------------- scores


def test_full_rank_scores_is_the_full_rank_selector_and_the_reference():
    layer = _Layer(100)
    x, mask = layer.data(3)
    got = layer.full(x, visual_mask=mask)
    assert got.shape == (3, N)
    full = vtprune.LowRankSelector.from_weights(layer.w_q.double(), layer.w_k.double(), D, head_dim=HEAD_DIM, num_heads=HEADS)
    want = vtprune.alvts_scores(x.double(), full, mask, backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-9)
    # unbatched form, non-causal, and the reference backend
    one = vtprune.full_rank_scores(x[1], layer.w_q, layer.w_k, mask[1], num_heads=HEADS, head_dim=HEAD_DIM, causal=False, backend="reference")
    torch.testing.assert_close(one, layer.full(x, visual_mask=mask, causal=False)[1], rtol=1e-5, atol=1e-10)


def test_differentiable_scores_match_alvts_scores_and_reach_every_factor():
    layer = _Layer(101)
    x, mask = layer.data(2)
    sel = layer.svd_selector()
    for causal in (True, False):
        got = _alvts_scores_differentiable(x, sel, mask, causal)
        torch.testing.assert_close(got.detach(), vtprune.alvts_scores(x, sel, mask, causal=causal, backend="reference"), rtol=1e-5, atol=1e-10)
    got.square().sum().backward()
    for name, p in sel.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_padding_is_neither_query_nor_key():
    """With ``attention_mask``, a row padded on the left or on the right (padding filled with
    large junk) scores exactly as the row alone; an unpadded row beside it is unaffected."""
    layer = _Layer(103)
    x, mask = layer.data(2)
    sel = layer.svd_selector()
    g = torch.Generator().manual_seed(5)
    pad = 5
    junk = 10 * torch.randn(1, pad, D, generator=g)
    other = torch.randn(1, L + pad, D, generator=g) @ layer.mix  # the unpadded row of the batch
    other_mask = torch.zeros(1, L + pad, dtype=torch.bool)
    other_mask[:, 2 : 2 + N] = True
    no, yes = torch.zeros(1, pad, dtype=torch.long), torch.ones(1, L, dtype=torch.long)
    for backend in ("reference", "torch"):
        alone = vtprune.alvts_scores(x[:1], sel, mask[:1], backend=backend)
        want_other = vtprune.alvts_scores(other, sel, other_mask, backend=backend)
        for left in (True, False):
            row = torch.cat([junk, x[:1]] if left else [x[:1], junk], dim=1)
            row_mask = torch.cat([no.bool(), mask[:1]] if left else [mask[:1], no.bool()], dim=1)
            am = torch.cat([no, yes] if left else [yes, no], dim=1)
            got = vtprune.alvts_scores(
                torch.cat([row, other]), sel, torch.cat([row_mask, other_mask]),
                attention_mask=torch.cat([am, torch.ones_like(am)]), backend=backend,
            )
            torch.testing.assert_close(got[0], alone[0], rtol=1e-5, atol=1e-9, msg=lambda m: f"{backend} left={left}: {m}")
            torch.testing.assert_close(got[1], want_other[0], rtol=1e-5, atol=1e-9)
            counted = vtprune.alvts_scores(row[0], sel, row_mask[0], backend=backend)  # unbatched, padding counted
            assert not torch.allclose(counted, alone[0], rtol=1e-3), "the junk must matter without the mask"
        torch.testing.assert_close(  # no padding: the same as no mask, causal or not
            vtprune.alvts_scores(x, sel, mask, attention_mask=torch.ones(2, L), causal=False, backend=backend),
            vtprune.alvts_scores(x, sel, mask, causal=False, backend=backend),
        )
    am = torch.ones(2, L, dtype=torch.long)
    am[0, PRE] = 0
    with pytest.raises(ValueError, match="marks a padding position"):
        vtprune.alvts_scores(x, sel, mask, attention_mask=am)
    am[0, PRE] = 1
    am[0, 0] = 0
    with pytest.raises(ValueError, match="needs causal=True"):
        vtprune.alvts_scores(x, sel, mask, attention_mask=am, causal=False)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, %d\)" % L):
        vtprune.alvts_scores(x, sel, mask, attention_mask=am[:, 1:])


@pytest.mark.parametrize("causal", [False, True])
def test_svd_factors_find_most_of_the_oracle_top_k(causal):
    # Rank 8 of 64 with the spectrum above keeps the logits' dominant directions, so the SVD
    # selector's top-12 of 48 shares most tokens with the full-rank oracle's. Measured over 24
    # runs (12 seeds x 2 data draws, 32 images each): non-causal 0.61-0.76 (random rank-8
    # factors of another layer 0.33-0.44, chance K/N = 0.25); causal 0.82-0.90, but there the
    # causal mask's positional prior (early tokens are seen by more queries) already gives random
    # factors 0.74-0.84. So there the SVD must beat the best of four random factor pairs on the
    # same data (seeds 0 / 1 / 2: 0.862 / 0.857 / 0.875 against at most 0.779 / 0.799 / 0.846).
    layer = _Layer(0)
    x, mask = layer.data(32)
    oracle = layer.full(x, visual_mask=mask, causal=causal)
    svd = _topk_overlap(vtprune.alvts_scores(x, layer.svd_selector(), mask, causal=causal), oracle)

    def random_overlap() -> float:
        other = vtprune.LowRankSelector.from_weights(_weight(layer.g), _weight(layer.g), RANK, head_dim=HEAD_DIM, num_heads=HEADS)
        return _topk_overlap(vtprune.alvts_scores(x, other, mask, causal=causal), oracle)

    rand = random_overlap()
    if causal:
        best_random = max([rand] + [random_overlap() for _ in range(3)])
        assert svd >= 0.75 and svd >= best_random + 0.04, (svd, best_random)
    else:
        assert svd >= 0.55, (svd, rand)
        assert svd >= rand + 0.15, (svd, rand)


# ----------------------------------------------------------------------------- calibration


def test_calibration_lowers_held_out_mse_below_the_svd_start():
    # 60 Adam steps (lr 5e-3) on 32 sequences: the held-out relative MSE falls to 0.30-0.65 of
    # the SVD start over 12 seeds (raw MSE 0.30-0.64), and the causal top-12 overlap with the
    # oracle rises (0.83-0.90 -> 0.88-0.91). Asserted: >= 10% lower, overlap not worse.
    layer = _Layer(0)
    x, mask = layer.data(32)
    xh, mh = layer.data(32)
    sel = layer.svd_selector()
    start = [p.detach().clone() for p in sel.parameters()]
    oracle = layer.full(xh, visual_mask=mh)
    before = _topk_overlap(vtprune.alvts_scores(xh, sel, mh), oracle)
    w_q = layer.w_q.clone().requires_grad_(True)  # the frozen LVLM: must get no gradient

    def full_scores(hidden, *, visual_mask):
        assert not torch.is_grad_enabled()
        return vtprune.full_rank_scores(hidden, w_q, layer.w_k, visual_mask, num_heads=HEADS, head_dim=HEAD_DIM)

    res = vtprune.calibrate_lowrank(sel, full_scores, x, steps=60, lr=5e-3, visual_mask=mask, held_out=xh, held_out_mask=mh)
    assert len(res["loss"]) == 60 and all(math.isfinite(v) for v in res["loss"])
    assert res["held_out_after"] <= 0.9 * res["held_out_before"], res
    assert res["held_out_mse_after"] <= 0.9 * res["held_out_mse_before"], res
    assert res["train_after"] < res["train_before"]
    assert res["loss"][-1] < res["loss"][0]
    assert w_q.grad is None
    assert any(not torch.equal(p, q) for p, q in zip(sel.parameters(), start))
    after = _topk_overlap(vtprune.alvts_scores(xh, sel, mh), oracle)
    assert after >= before, (before, after)
    # the reported held-out numbers are what the selector now gives
    rel = ((vtprune.alvts_scores(xh, sel, mh).detach() - oracle).square().mean(-1) / oracle.square().mean(-1)).mean()
    assert float(rel) == pytest.approx(res["held_out_after"], rel=1e-4)


def test_calibration_lists_of_batches_and_zero_steps():
    layer = _Layer(5)
    (x1, m1), (x2, _) = layer.data(4), layer.data(3)
    x2 = x2[:, 2:]  # a shorter sequence: 4 text tokens, 48 visual, 10 text
    m2 = torch.zeros(3, L - 2, dtype=torch.bool)
    m2[:, PRE - 2 : PRE - 2 + N] = True
    sel = layer.svd_selector()
    start = [p.detach().clone() for p in sel.parameters()]
    res = vtprune.calibrate_lowrank(sel, layer.full, [x1, x2], steps=0, visual_mask=[m1, m2])
    assert res["loss"] == [] and res["held_out_before"] is None and res["held_out_after"] is None
    assert res["train_before"] == res["train_after"] > 0
    assert all(torch.equal(p, q) for p, q in zip(sel.parameters(), start))
    # an [L] mask is shared by every row; steps cycle over the batches
    res = vtprune.calibrate_lowrank(sel, layer.full, [x1, x1[:2]], steps=3, lr=1e-3, visual_mask=m1[0])
    assert len(res["loss"]) == 3


def test_calibration_bad_inputs():
    layer = _Layer(6)
    x, mask = layer.data(2)
    sel = layer.svd_selector()
    with pytest.raises(TypeError, match="selector"):
        vtprune.calibrate_lowrank(torch.nn.Linear(2, 2), layer.full, x, visual_mask=mask)
    with pytest.raises(TypeError, match="full_scores_fn"):
        vtprune.calibrate_lowrank(sel, None, x, visual_mask=mask)
    with pytest.raises(ValueError, match="steps"):
        vtprune.calibrate_lowrank(sel, layer.full, x, steps=-1, visual_mask=mask)
    with pytest.raises(TypeError, match="steps"):
        vtprune.calibrate_lowrank(sel, layer.full, x, steps=2.5, visual_mask=mask)
    with pytest.raises(ValueError, match="lr"):
        vtprune.calibrate_lowrank(sel, layer.full, x, lr=0.0, visual_mask=mask)
    with pytest.raises(TypeError, match="activations"):
        vtprune.calibrate_lowrank(sel, layer.full, [], visual_mask=mask)
    with pytest.raises(TypeError, match="activations"):
        vtprune.calibrate_lowrank(sel, layer.full, x.long(), visual_mask=mask)
    with pytest.raises(ValueError, match="visual_mask"):
        vtprune.calibrate_lowrank(sel, layer.full, x, visual_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="visual_mask"):
        vtprune.calibrate_lowrank(sel, layer.full, [x, x], visual_mask=[mask])
    with pytest.raises(ValueError, match="held_out_mask"):
        vtprune.calibrate_lowrank(sel, layer.full, x, visual_mask=mask, held_out=x[:1, :10])
    with pytest.raises(ValueError, match="full_scores_fn"):
        vtprune.calibrate_lowrank(sel, lambda h, visual_mask: h[..., 0], x, visual_mask=mask)


def test_full_rank_scores_bad_inputs():
    layer = _Layer(7)
    x, mask = layer.data(2)
    kw = dict(num_heads=HEADS, head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="w_q"):
        vtprune.full_rank_scores(x, layer.w_q[:, :10], layer.w_k, mask, **kw)
    with pytest.raises(ValueError, match="w_k"):
        vtprune.full_rank_scores(x, layer.w_q, layer.w_k, mask, num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        vtprune.full_rank_scores(x, layer.w_q, layer.w_k, mask, num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=3)
    with pytest.raises(TypeError, match="head_dim"):
        vtprune.full_rank_scores(x, layer.w_q, layer.w_k, mask, num_heads=HEADS, head_dim=16.0)
    with pytest.raises(TypeError, match="visual_mask"):
        vtprune.full_rank_scores(x, layer.w_q, layer.w_k, mask.long(), **kw)
    with pytest.raises(ValueError, match="backend"):
        vtprune.full_rank_scores(x, layer.w_q, layer.w_k, mask, backend="nope", **kw)


def test_selector_and_attention_importance_bad_shapes():
    g = torch.Generator().manual_seed(8)
    u_q, u_k, v = torch.randn(32, 4, generator=g), torch.randn(16, 4, generator=g), torch.randn(4, 24, generator=g)
    # one rank-R head (num_heads=None) needs U_q^T U_k: grouped-query weights (Dq != Dk) need num_heads
    with pytest.raises(ValueError, match="num_heads"):
        vtprune.LowRankSelector(u_q, v, u_k, v, head_dim=8)
    vtprune.LowRankSelector(u_q, v, u_k, v, head_dim=8, num_heads=4, num_kv_heads=2)  # the GQA form is fine
    q = torch.randn(1, 2, 4, 8, generator=g)
    groups = torch.zeros(1, 4, dtype=torch.long)
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match="last dim"):
            vtprune.attention_importance(q[..., :0], q[..., :0], groups, backend=backend)
        with pytest.raises(ValueError, match="key_range"):
            vtprune.attention_importance(q, q, groups, key_range=(1,), backend=backend)
        with pytest.raises(ValueError, match="key_range"):
            vtprune.attention_importance(q, q, groups, key_range=5, backend=backend)
        with pytest.raises(ValueError, match="heads"):
            vtprune.attention_importance(q[:, :0], q[:, :1], groups, backend=backend)  # Hq = 0 gave NaN


# ----------------------------------------------------------------------------- routing


class _RopeAttention:
    """A causal self-attention block with RoPE from ``position_ids`` and a residual: it depends
    on the tokens' order (the causal mask over the sequence it is given) and on their positions."""

    def __init__(self, dim: int = 32, heads: int = 2, seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.heads, self.hd = heads, dim // heads
        self.w = [torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim) for _ in range(4)]
        self.calls = 0

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        half = self.hd // 2
        freq = 1.0 / (10.0 ** (torch.arange(half, dtype=torch.float64) / half))
        ang = pos[:, None, :, None].double() * freq  # [B, 1, L, half]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)

    def __call__(self, x: torch.Tensor, *, position_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        b, n, d = x.shape
        q, k, v = ((x @ w).view(b, n, self.heads, self.hd).transpose(1, 2) for w in self.w[:3])
        q, k = self._rope(q, position_ids), self._rope(k, position_ids)
        logits = q @ k.mT / math.sqrt(self.hd)
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return x + out @ self.w[3]


def _route_inputs(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 20, 32, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, 20, dtype=torch.bool)
    mask[0, 3:13] = True  # 10 visual tokens per row, at different places
    mask[1, 5:15] = True
    mask[2, 0:10] = True
    return g, x, mask


def test_route_layer_keep_all_equals_the_layer_on_everything():
    _, x, mask = _route_inputs()
    layer = _RopeAttention()
    keep = torch.stack([torch.nonzero(row).flatten().flip(0) for row in mask])  # any order
    pos = torch.arange(20).expand(3, 20)
    full = layer(x, position_ids=pos)
    torch.testing.assert_close(vtprune.route_layer(x, keep, layer, visual_mask=mask), full, rtol=0, atol=0)
    # the layer really depends on the order and on the positions, so the check above can fail
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(layer(x[:, perm], position_ids=pos[:, perm])[:, perm.argsort()], full)
    assert not torch.allclose(layer(x, position_ids=pos.flip(-1)), full)
    # explicit position ids ([L] shared, or [B, L]) reach the layer
    shifted = torch.arange(20) * 3 + 7
    torch.testing.assert_close(
        vtprune.route_layer(x, keep, layer, visual_mask=mask, position_ids=shifted), layer(x, position_ids=shifted.expand(3, 20))
    )


def test_route_layer_subset():
    g, x, mask = _route_inputs()
    layer = _RopeAttention()
    vis = [torch.nonzero(row).flatten() for row in mask]
    keep = torch.stack([v[torch.randperm(10, generator=g)[:4]] for v in vis])  # 4 of 10, unsorted
    pos = torch.stack([torch.arange(20) + 100 * b for b in range(3)])  # per-row position ids
    x.requires_grad_(True)
    got = vtprune.route_layer(x, keep, layer, visual_mask=mask, position_ids=pos)
    assert layer.calls == 1 and got.shape == x.shape
    for b in range(3):
        routed = ~mask[b]
        routed[keep[b]] = True
        assert int(routed.sum()) == 10 + 4
        # pruned visual tokens pass unchanged
        torch.testing.assert_close(got[b, ~routed], x[b, ~routed], rtol=0, atol=0)
        # routed ones: the layer on the sub-sequence, in original order, with their own position ids
        want = layer(x[b : b + 1, routed], position_ids=pos[b : b + 1, routed])[0]
        torch.testing.assert_close(got[b, routed], want)
        # and that differs from running the layer on everything (the routing matters)
        assert not torch.allclose(got[b, routed], layer(x[b : b + 1], position_ids=pos[b : b + 1])[0, routed])
    got.sum().backward()  # differentiable through the gather and the scatter
    assert x.grad is not None and bool((x.grad != 0).any())
    # unbatched form
    torch.testing.assert_close(vtprune.route_layer(x[1], keep[1], layer, visual_mask=mask[1], position_ids=pos[1]), got[1])
    # k = 0: only the text tokens go through
    none = vtprune.route_layer(x, keep[:, :0], layer, visual_mask=mask)
    torch.testing.assert_close(none[mask], x[mask], rtol=0, atol=0)
    torch.testing.assert_close(none[0, ~mask[0]], layer(x[:1, ~mask[0]], position_ids=torch.nonzero(~mask[0]).T)[0])
    # a layer returning a tuple (Hugging Face style) works too
    tup = vtprune.route_layer(x, keep, lambda h, position_ids: (layer(h, position_ids=position_ids), None), visual_mask=mask, position_ids=pos)
    torch.testing.assert_close(tup, got)


def test_route_layer_bad_inputs():
    _, x, mask = _route_inputs()
    layer = _RopeAttention()
    keep = torch.stack([torch.nonzero(row).flatten()[:4] for row in mask])
    cases = [
        ((x.long(), keep, layer), {}, TypeError, "hidden"),
        ((x, keep.float(), layer), {}, TypeError, "keep_idx"),
        ((x, keep[0], layer), {}, ValueError, "keep_idx"),
        ((x, keep[:2], layer), {}, ValueError, "keep_idx"),
        ((x, keep + 100, layer), {}, ValueError, "keep_idx"),
        ((x, torch.full_like(keep, 19), layer), {}, ValueError, "keep_idx"),  # 19 is a text token in every row
        ((x, torch.cat([keep[:, :1], keep[:, :3]], 1), layer), {}, ValueError, "keep_idx"),  # a repeat
        ((x, keep, "layer"), {}, TypeError, "layer_fn"),
        ((x, keep, lambda h, position_ids: h[:, :-1]), {}, ValueError, "layer_fn"),
        ((x, keep, layer), {"visual_mask": mask.long()}, TypeError, "visual_mask"),
        ((x, keep, layer), {"visual_mask": mask[:, :-1]}, ValueError, "visual_mask"),
        ((x, keep, layer), {"position_ids": torch.arange(19)}, ValueError, "position_ids"),
        ((x, keep, layer), {"position_ids": torch.arange(20.0)}, TypeError, "position_ids"),
    ]
    for args, kw, err, name in cases:
        kw = {"visual_mask": mask, **kw}
        with pytest.raises(err, match=name):
            vtprune.route_layer(*args, **kw)
    # an empty batch: nothing to route (N is unknown without rows), the empty input comes back
    empty = vtprune.route_layer(x[:0], keep[:0], layer, visual_mask=mask[:0])
    assert empty.shape == (0, 20, 32) and empty.dtype == x.dtype
    uneven = mask.clone()
    uneven[0, 13] = True  # 11 visual tokens in row 0, 10 elsewhere
    with pytest.raises(ValueError, match="visual_mask"):
        vtprune.route_layer(x, keep, layer, visual_mask=uneven)
