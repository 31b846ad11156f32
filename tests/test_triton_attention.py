"""The Triton attention-importance kernel (``backend="triton"``) against the reference, SPEC §3.

Without a GPU the kernel runs on CPU tensors through the Triton interpreter (shapes stay small);
with a GPU the same tests run on CUDA tensors and the CPU variants are skipped.

Accuracy rule (FlashAttention's): on the same dtype-rounded inputs, the kernel's largest error
against the float64 reference must be at most twice the largest error of PyTorch's materialized
computation at the same precision (the reference in float32, which is also what it does for
16-bit inputs) plus a small absolute floor.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune import reference
from conftest import kernel_devices, triton_kernel_module

triton_attention = triton_kernel_module("attention")
HAS_GPU = torch.cuda.is_available()

INTERPRETED = triton_attention._is_interpreted()
attention_importance = triton_attention.attention_importance

DEVICES = kernel_devices(triton_attention)
DTYPES = [pytest.param(t, id=str(t).removeprefix("torch.")) for t in (torch.float32, torch.float16, torch.bfloat16)]
# Slack on top of twice PyTorch's own error, relative to the largest output. fp32 errors here are
# 1e-9 to 2e-8 against outputs of 1e-3 to 1: a TF32-level error (1e-4 relative) still fails, while
# a GPU's approximate exp (a few ulps) passes.
FLOOR_REL = 1e-6


def _data(batch, hq, hk, length, d, groups, dtype, device, seed, spread=1.0):
    """Inputs in ``dtype`` plus groups in [-1, G-1): the last group stays empty."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, hq, length, d, generator=g) * spread).to(dtype).to(device)
    k = (torch.randn(batch, hk, length, d, generator=g) * spread).to(dtype).to(device)
    qg = torch.randint(-1, max(groups - 1, 1), (batch, length), generator=g)
    if groups == 1:
        qg = qg.clamp_max(0)
    return q, k, qg.to(device)


def _check(got, q, k, qg, groups, causal, scale, start, end):
    """FlashAttention's rule against the float64 reference on the same (rounded) inputs."""
    assert got.dtype == torch.float32 and got.shape == (q.shape[0], groups, end - start)
    args = (qg.cpu(), groups, causal, scale, start, end)
    want = reference.attention_importance(q.cpu().double(), k.cpu().double(), *args)
    torch_fp32 = reference.attention_importance(q.cpu().float(), k.cpu().float(), *args)
    torch_err = (torch_fp32.double() - want).abs().max().item()
    err = (got.cpu().double() - want).abs().max().item()
    floor = FLOOR_REL * max(want.abs().max().item(), 1e-30)
    assert err <= 2 * torch_err + floor, f"error {err:.3g} vs PyTorch fp32 {torch_err:.3g} (+ {floor:.3g})"
    return want


# (B, Hq, Hk, L, d, G)
SHAPES = [
    (1, 4, 2, 1, 16, 2),
    (2, 4, 2, 7, 3, 3),
    (1, 4, 2, 97, 24, 2),
    (1, 2, 1, 300, 64, 3),
    (1, 2, 2, 641, 32, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s[3]}-hq{s[1]}-hk{s[2]}-d{s[4]}")
def test_matches_reference(shape, causal, dtype, device):
    batch, hq, hk, length, d, groups = shape
    q, k, qg = _data(batch, hq, hk, length, d, groups, dtype, device, seed=length * 7 + d)
    scale = d**-0.5
    got = attention_importance(q, k, qg, groups, causal, scale, 0, length)
    _check(got, q, k, qg, groups, causal, scale, 0, length)
    assert bool((got[:, groups - 1] == 0).all()), "a group without queries must give exact zeros"
    # every query's attention row sums to 1, so each present group's means sum to 1 over all keys
    for b in range(batch):
        for gi in range(groups):
            if bool((qg[b] == gi).any()):
                assert abs(got[b, gi].double().sum().item() - 1.0) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("key_range", [(0, 1), (5, 90), (40, 97), (96, 97)], ids=lambda r: f"keys{r[0]}-{r[1]}")
def test_key_range(key_range, causal, device):
    q, k, qg = _data(2, 4, 2, 97, 16, 3, torch.float32, device, seed=11)
    start, end = key_range
    got = attention_importance(q, k, qg, 3, causal, 0.3, start, end)
    _check(got, q, k, qg, 3, causal, 0.3, start, end)
    full = attention_importance(q, k, qg, 3, causal, 0.3, 0, 97)
    torch.testing.assert_close(got, full[..., start:end], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("blocks", [(16, 16), (16, 64), (64, 16)], ids=lambda b: f"m{b[0]}-n{b[1]}")
def test_small_blocks_unaligned(blocks, causal, device):
    """Many query/key blocks, block edges not aligned with L or the key range."""
    q, k, qg = _data(1, 2, 1, 83, 8, 2, torch.float16, device, seed=5)
    got = attention_importance(q, k, qg, 2, causal, 0.35, 13, 70, block_m=blocks[0], block_n=blocks[1])
    _check(got, q, k, qg, 2, causal, 0.35, 13, 70)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 100, 256], ids=lambda d: f"d{d}")
def test_head_dims(d, device):
    """Head dims from 1 to 256 (masked to the next power of 2); one head = the low-rank form."""
    q, k, qg = _data(1, 1, 1, 45, d, 2, torch.float32, device, seed=d)
    got = attention_importance(q, k, qg, 2, True, d**-0.5, 0, 45)
    _check(got, q, k, qg, 2, True, d**-0.5, 0, 45)


@pytest.mark.parametrize("device", DEVICES)
def test_many_groups(device):
    """G = 11 > 8 groups: two group chunks on the third grid axis; groups 9 and 10 empty."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 50, 8, generator=g).to(device)
    k = torch.randn(2, 1, 50, 8, generator=g).to(device)
    qg = torch.randint(-1, 9, (2, 50), generator=g).to(device)
    got = attention_importance(q, k, qg, 11, False, 0.4, 3, 47)
    _check(got, q, k, qg, 11, False, 0.4, 3, 47)
    assert bool((got[:, 9:] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_queries(device):
    q, k, _ = _data(1, 2, 2, 20, 8, 2, torch.float32, device, seed=9)
    none = torch.full((1, 20), -1, dtype=torch.int64, device=device)
    assert bool((attention_importance(q, k, none, 2, True, 0.5, 0, 20) == 0).all())
    # a query left out changes nothing: replacing its q row leaves the result bitwise equal
    qg = torch.tensor([[0, 1] * 10], device=device)
    qg[0, 3] = -1
    base = attention_importance(q, k, qg, 2, False, 0.5, 0, 20)
    q2 = q.clone()
    q2[:, :, 3] = 1e3
    assert torch.equal(attention_importance(q2, k, qg, 2, False, 0.5, 0, 20), base)
    _check(base, q, k, qg, 2, False, 0.5, 0, 20)


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_and_determinism(device):
    """Peaked softmax (logits ~ +-100): the online max keeps exp in range; reruns are bitwise equal."""
    q, k, qg = _data(1, 4, 2, 61, 16, 2, torch.bfloat16, device, seed=21, spread=3.0)
    got = attention_importance(q, k, qg, 2, True, 1.0, 0, 61)
    assert bool(torch.isfinite(got).all())
    _check(got, q, k, qg, 2, True, 1.0, 0, 61)
    assert torch.equal(got, attention_importance(q, k, qg, 2, True, 1.0, 0, 61))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api(dtype, device):
    """``vtprune.attention_importance(..., backend="triton")``, also with non-contiguous q/k."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 33, 4, 16, generator=g).to(dtype).to(device).permute(0, 2, 1, 3)  # [2, 4, 33, 16]
    k = torch.randn(2, 33, 2, 16, generator=g).to(dtype).to(device).permute(0, 2, 1, 3)
    qg = torch.randint(-1, 2, (2, 33), generator=g).to(device)
    got = vtprune.attention_importance(q, k, qg, num_groups=3, key_range=(4, 30), backend="triton")
    assert got.device == q.device
    _check(got, q, k, qg, 3, True, 16**-0.5, 4, 30)
    want = vtprune.attention_importance(q, k, qg.int(), num_groups=3, key_range=(4, 30), backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    contiguous = vtprune.attention_importance(q.contiguous(), k.contiguous(), qg, num_groups=3, key_range=(4, 30), backend="triton")
    torch.testing.assert_close(got, contiguous, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_shapes(device):
    q = torch.randn(0, 2, 5, 4, device=device)
    out = attention_importance(q, q, torch.zeros(0, 5, dtype=torch.int64, device=device), 2, True, 0.5, 0, 5)
    assert out.shape == (0, 2, 5) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="head dims up to 256"):
        x = torch.randn(1, 1, 3, 257, device=device)
        attention_importance(x, x, torch.zeros(1, 3, dtype=torch.int64, device=device), 1, True, 0.1, 0, 3)
    with pytest.raises(TypeError, match="dtype"):
        x = torch.randn(1, 1, 3, 4, device=device, dtype=torch.float64)
        attention_importance(x, x, torch.zeros(1, 3, dtype=torch.int64, device=device), 1, True, 0.1, 0, 3)
