"""The fused Triton SCOPE similarity (triton_kernels/similarity.py) against float64 and the torch path.

Tolerance rule (as FlashAttention states it): the kernel's error against the float64 similarity
must stay within twice the error of the torch path (``vtprune.similarity.scope_similarity``, the
reference's own formula in fp32) on the same inputs, plus a few fp32 ulps for entries the torch
path happens to get exact. With float16 storage both are rounded once more, so the bound is the
torch path's error plus one fp16 rounding.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (
    assert_similarity_like_torch_path,
    assert_similarity_rejects,
    kernel_devices,
    similarity_tokens,
    triton_kernel_module,
)

sim_k = triton_kernel_module("similarity")
DEVICES = kernel_devices(sim_k)


def _check(x: torch.Tensor, storage: torch.dtype) -> None:
    got = sim_k.scope_similarity(x, storage)
    assert got.dtype == storage and got.shape == (x.shape[0], x.shape[1], x.shape[1]) and got.is_contiguous()
    assert_similarity_like_torch_path(got, x, storage)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("batch", "n", "d"), [(1, 1, 5), (3, 7, 33), (1, 97, 130), (2, 65, 64)])
def test_matches_float64_like_the_torch_path(device, dtype, batch, n, d):
    x = similarity_tokens(batch, n, d, dtype, device, seed=n * 7 + d)
    for storage in (torch.float32, torch.float16):
        _check(x, storage)


@pytest.mark.parametrize("device", DEVICES)
def test_odd_size_577_and_default_storage(device):
    x = similarity_tokens(1, 577, 40, torch.bfloat16, device, seed=577)
    got = sim_k.scope_similarity(x)
    assert got.dtype == torch.float32  # 577 <= SCOPE_FP32_MAX_N
    _check(x, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens_and_strided_rows(device):
    base = similarity_tokens(2, 19, 48, torch.float16, device, seed=3)
    base[0, 4] = 0
    base[1, :3] = 0
    x = base[:, ::2, :40]  # every other token, a slice of the features: row stride 96, not 40
    assert not x.is_contiguous()
    got = sim_k.scope_similarity(x, torch.float32)
    assert (got[0, 2] == 0).all() and (got[0, :, 2] == 0).all()  # token 4 of the base
    assert (got[1, :2] == 0).all() and (got[1, :, :2] == 0).all()
    _check(x, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    assert sim_k.scope_similarity(torch.zeros(0, 5, 8, dtype=torch.float16, device=device)).shape == (0, 5, 5)
    assert sim_k.scope_similarity(torch.zeros(2, 0, 8, dtype=torch.float16, device=device)).shape == (2, 0, 0)
    zero_dim = sim_k.scope_similarity(torch.zeros(2, 3, 0, dtype=torch.bfloat16, device=device))
    assert zero_dim.shape == (2, 3, 3) and (zero_dim == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_what_it_does_not_handle(device):
    assert_similarity_rejects(sim_k.scope_similarity, device)
