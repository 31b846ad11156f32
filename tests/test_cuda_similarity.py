"""The fused CUDA SCOPE similarity (csrc/similarity.cu, ``vtprune._cuda.scope_similarity``) against
float64 and the torch path, and its use by the CUDA SCOPE op for 16-bit tokens.

The kernel tests take the ``cuda_rt`` fixture (tests/cuda_emu/runtime.py): they run on a GPU
("gpu", skipped without one) and on the CUDA emulator ("emu": the same kernel source compiled for
the CPU, where WMMA sums the products of a 16x16x16 step in k order). ``scope_similarity`` is not
one of the runtime's patched entry points, so every direct call here goes through
:func:`_similarity`, which on the emulator runs it under every schedule and requires bit-identical
results (a race or a read of unwritten shared memory changes them).

Tolerance rule (FlashAttention's, the Triton kernel's too: conftest.assert_similarity_like_torch_path):
the kernel's error against the float64 similarity must stay within twice the torch path's error
(``vtprune.similarity.scope_similarity``, the reference's own formula in fp32) on the same inputs,
plus 8 fp32 ulps for entries the torch path happens to get exact; with float16 storage both are
rounded once more, so one fp16 rounding is added.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune import _cuda
from vtprune.similarity import SCOPE_FP32_MAX_N, scope_similarity
from conftest import SCOPE_SIZE_ERRORS, assert_similarity_like_torch_path, assert_similarity_rejects, similarity_tokens
from cuda_emu.runtime import cuda_rt  # noqa: F401  (fixture)


def _similarity(cuda_rt, tokens: torch.Tensor, storage: torch.dtype | None = None) -> torch.Tensor:
    if cuda_rt.emu:
        return cuda_rt.emulator.same_under_schedules(_cuda.scope_similarity, tokens, storage)
    return _cuda.scope_similarity(tokens, storage)


def _check(got: torch.Tensor, x: torch.Tensor, storage: torch.dtype) -> None:
    """``got`` is the similarity of ``x`` stored as ``storage``, within the FlashAttention rule."""
    n = x.shape[1]
    assert got.dtype == storage and got.shape == (x.shape[0], n, n) and got.is_contiguous()
    assert got.device == x.device
    assert_similarity_like_torch_path(got, x, storage)


# (batch, N, D): D = 5/33/130 take the scalar loads with a partial feature chunk (130: three
# chunks), D = 64/192 the 16-byte loads (192: three chunks); N = 65/97 leave a partial tile.
SHAPES = [(1, 1, 5), (3, 7, 33), (1, 97, 130), (2, 65, 64), (2, 97, 192)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("batch", "n", "d"), SHAPES, ids=[f"B{b}-N{n}-D{d}" for b, n, d in SHAPES])
def test_matches_float64_like_the_torch_path(cuda_rt, dtype, batch, n, d):
    x = similarity_tokens(batch, n, d, dtype, cuda_rt.device, seed=n * 7 + d)
    for storage in (torch.float32, torch.float16):
        _check(_similarity(cuda_rt, x, storage), x, storage)


def test_odd_size_577_and_default_storage(cuda_rt):
    x = similarity_tokens(1, 577, 40, torch.bfloat16, cuda_rt.device, seed=577)
    got = _similarity(cuda_rt, x)
    assert got.dtype == torch.float32  # 577 <= SCOPE_FP32_MAX_N
    _check(got, x, torch.float32)


def test_default_storage_above_the_threshold_is_fp16(cuda_rt):
    """The storage rule decides by N alone: above SCOPE_FP32_MAX_N tokens S is fp16 by default."""
    n = SCOPE_FP32_MAX_N + 1
    x = similarity_tokens(1, n, 8, torch.float16, cuda_rt.device, seed=n)
    got = _similarity(cuda_rt, x)
    assert got.dtype == torch.float16
    _check(got, x, torch.float16)


def test_zero_tokens_and_strided_rows(cuda_rt):
    base = similarity_tokens(2, 19, 48, torch.float16, cuda_rt.device, seed=3)
    base[0, 4] = 0
    base[1, :3] = 0
    # every other token and a slice of the features: row stride 96, 16-byte aligned rows
    x = base[:, ::2, :40]
    assert not x.is_contiguous()
    got = _similarity(cuda_rt, x, torch.float32)
    assert (got[0, 2] == 0).all() and (got[0, :, 2] == 0).all()  # token 4 of the base
    assert (got[1, :2] == 0).all() and (got[1, :, :2] == 0).all()
    _check(got, x, torch.float32)
    # rows that start off a 16-byte boundary (feature offset 3): the scalar loads, in place
    y = base[:, 1::2, 3:43]
    _check(_similarity(cuda_rt, y, torch.float16), y, torch.float16)
    # a feature stride other than 1 is made contiguous by the wrapper
    z = base[:, :, ::2]
    assert z.stride(-1) == 2
    _check(_similarity(cuda_rt, z, torch.float32), z, torch.float32)


def test_nan_tokens_propagate_like_the_torch_path(cuda_rt):
    x = similarity_tokens(2, 23, 16, torch.bfloat16, cuda_rt.device, seed=23)
    x[0, 5, 3] = float("nan")
    x[1, 7] = 0  # zero stays exact 0 next to a NaN token of the other image
    got = _similarity(cuda_rt, x, torch.float32).cpu()
    want = scope_similarity(x, torch.float32).cpu()
    assert torch.equal(got.isnan(), want.isnan())
    assert got[0, 5].isnan().all() and got[0, :, 5].isnan().all() and got[1].isfinite().all()


def test_empty_shapes(cuda_rt):
    dev = cuda_rt.device
    assert _similarity(cuda_rt, torch.zeros(0, 5, 8, dtype=torch.float16, device=dev)).shape == (0, 5, 5)
    assert _similarity(cuda_rt, torch.zeros(2, 0, 8, dtype=torch.float16, device=dev)).shape == (2, 0, 0)
    for storage in (torch.float32, torch.float16):
        zero_dim = _similarity(cuda_rt, torch.zeros(2, 3, 0, dtype=torch.bfloat16, device=dev), storage)
        assert zero_dim.shape == (2, 3, 3) and zero_dim.dtype == storage and (zero_dim == 0).all()


def test_rejects_what_it_does_not_handle(cuda_rt):
    assert_similarity_rejects(_cuda.scope_similarity, cuda_rt.device)
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor"):
        _cuda.scope_similarity([[[1.0]]])
    if not cuda_rt.emu:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            _cuda.scope_similarity(torch.zeros(1, 3, 8, dtype=torch.float16))


# ----------------------------------------------------------------------------- in the SCOPE op


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_scope_picks_build_S_with_it_for_16bit_tokens(cuda_rt, monkeypatch, dtype):
    """16-bit tokens get their S from the fused kernel, per storage group and on the group's own
    width; fp32 tokens keep the torch path (bitwise the reference). The picks are then the greedy
    picks of that very S (a float64 model on the values the greedy kernel read), which these
    inputs decide with no near-tie."""
    dev = cuda_rt.device
    g = torch.Generator().manual_seed(41)
    x = torch.randn(2, 33, 24, generator=g).to(device=dev, dtype=dtype)
    sal = torch.rand(2, 33, generator=g).to(dev)
    lens = torch.tensor([33, 20], device=dev)
    seen: list[tuple[tuple[int, ...], torch.dtype, torch.Tensor]] = []
    fused = _cuda.scope_similarity

    def spy(tokens, storage=None):
        out = fused(tokens, storage)
        seen.append((tuple(tokens.shape), storage, out))
        return out

    monkeypatch.setattr(_cuda, "scope_similarity", spy)
    for storage in (None, torch.float16):
        seen.clear()
        k = torch.tensor([9, 9], device=dev)
        got = _cuda.scope_picks(x, sal, k, 9, 1.0, "mul", lens, similarity_dtype=storage)
        if dtype == torch.float32:
            assert seen == []
            continue
        # once per call, or once per schedule on the emulator (whose schedules must agree anyway)
        want = ((2, 33, 24), storage or torch.float32)  # None: the group's storage, fp32 for 33 tokens
        assert seen and all((shape, st) == want for shape, st, _ in seen), [(s, st) for s, st, _ in seen]
        sim = seen[-1][2]
        # the greedy of that S, image by image, by the torch backend's own float64 model
        for b in range(2):
            nb = int(lens[b])
            s = sim[b, :nb, :nb].double().cpu()
            w = sal[b, :nb].double().cpu()
            cover = torch.zeros(nb, dtype=torch.float64)
            taken = []
            for _ in range(9):
                gain = (s - cover[:, None]).clamp_min(0).sum(0) * w
                gain[taken] = -float("inf")
                t = int(gain.argmax())
                top2 = gain.topk(2).values
                assert top2[0] - top2[1] > 1e-4 * top2[0], "a near-tie: pick other inputs"
                taken.append(t)
                cover = torch.maximum(cover, s[:, t])
            assert got[b].tolist() == taken, (b, storage)


def test_fused_select_on_16bit_tokens_covers_like_the_reference(cuda_rt):
    """End to end through ``backend="cuda"`` (N = 97, padded batch): valid picks whose coverage is
    the reference's."""
    dev = cuda_rt.device
    x = similarity_tokens(3, 97, 32, torch.bfloat16, dev, seed=97)
    sal = torch.rand(3, 97, generator=torch.Generator().manual_seed(5)).to(dev)
    lens = torch.tensor([97, 40, 61], device=dev)
    got = vtprune.fused_scope_select(x, sal, 12, 1.0, lengths=lens, backend="cuda")
    want = vtprune.fused_scope_select(x.cpu().float(), sal.cpu(), 12, 1.0, lengths=lens.cpu(), backend="reference")
    for b, row in enumerate(got.tolist()):
        assert len(set(row)) == 12 and all(0 <= v < int(lens[b]) for v in row) and row == sorted(row)
    fl_got = vtprune.facility_location(x.cpu().float(), got.cpu(), lengths=lens.cpu(), backend="reference")
    fl_ref = vtprune.facility_location(x.cpu().float(), want, lengths=lens.cpu(), backend="reference")
    assert torch.all(fl_got >= 0.99 * fl_ref), (fl_got, fl_ref)


# ----------------------------------------------------------------------------- the binding


def _binding(cuda_rt):
    """The module whose ``scope_similarity`` binding is checked: module.cpp compiled unchanged, in
    the emulator (the GPU run checks vtprune._C itself)."""
    if cuda_rt.emu:
        return cuda_rt.emulator.module
    return _cuda._require()


def _good_args() -> dict:
    return dict(tokens_ptr=16, dtype=1, B=1, N=4, D=8, stride_b=32, stride_n=8, out_ptr=16, out_dtype=0, stream=0)


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(dtype=0), r"dtype must be 1 \(float16\) or 2 \(bfloat16\) \(float32 tokens use the torch path\), got 0"),
        (dict(dtype=3), "dtype must be 1"),
        (dict(out_dtype=2), r"out_dtype must be 0 \(float32\) or 1 \(float16\), got 2"),
        *SCOPE_SIZE_ERRORS,
        (dict(D=-1), "D must be >= 0"),
        (dict(stride_b=-1), "stride_b must be >= 0"),
        (dict(stride_n=-8), "stride_n must be >= 0"),
        (dict(out_ptr=0), "out_ptr is null"),
        (dict(tokens_ptr=0), "tokens_ptr is null"),
    ],
)
def test_binding_rejects_bad_arguments(cuda_rt, override, message):
    module = _binding(cuda_rt)
    with pytest.raises(ValueError, match=message):
        module.scope_similarity(**{**_good_args(), **override})


def test_binding_empty_problems_need_no_pointers(cuda_rt):
    module = _binding(cuda_rt)
    for empty in (dict(B=0), dict(N=0)):
        module.scope_similarity(**{**_good_args(), "tokens_ptr": 0, "out_ptr": 0, **empty})
    # D = 0 reads no token: a null tokens pointer is fine, the output is still written
    out = torch.full((1, 4, 4), float("nan"), device=cuda_rt.device)
    module.scope_similarity(**{**_good_args(), "tokens_ptr": 0, "D": 0, "out_ptr": out.data_ptr()})
    if not cuda_rt.emu:
        torch.cuda.synchronize()
    assert (out == 0).all()
