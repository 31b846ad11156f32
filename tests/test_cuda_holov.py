"""The CUDA HoloV kernels (``backend="cuda"``, csrc/holov.cu) against the reference, SPEC §2.

The kernel tests take the ``cuda_rt`` fixture (tests/cuda_emu/runtime.py): they run on a GPU
("gpu", skipped without one) and on the CUDA emulator ("emu": the same kernel source compiled for
the CPU, every launch run under two thread schedules that must agree bit for bit). CUDA graphs
and torch.compile stay GPU-only. The argument checks of the bindings ``vtprune._C.holov_select`` /
``crop_budgets`` / ``crop_topk`` need no device and run everywhere ``vtprune._C`` is built.

Exactness: on fp32 inputs the budgets and indices must equal the reference's. The kernel's Gram
sums run in another order than the reference's matmul, so its variances and crop scores differ in
the last bits; random inputs put no weight within that distance of a floor boundary and no two
rank keys that close, so the results are equal, not just close. ``crop_budgets`` and ``crop_topk``
read the same fp32 values as the reference, so they are exact for every input dtype, ties
included. fp16/bf16 HoloV is checked by invariants (a valid selection whose per-crop picks are the
crop's top tokens by attention, in the promised order) and by near-agreement with the reference.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune import _cuda
from vtprune.reference import crop_sizes_for, default_num_crops
from conftest import assert_valid_selection, require_c_entry
from cuda_emu.runtime import cuda_rt  # noqa: F401  (fixture)

CUDA_OK, CUDA_REASON = _cuda.status()
needs_gpu = pytest.mark.skipif(not CUDA_OK, reason=f"backend='cuda' is not usable here: {CUDA_REASON}")

SIZES = [1, 7, 97, 577, 2881]


def _data(batch: int, n: int, d: int, seed: int, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, n, d, generator=g)
    # a shared component makes the similarities large and alike, where a one-pass variance cancels
    tokens += 0.5 * torch.randn(1, 1, d, generator=g)
    attn = torch.rand(batch, n, generator=g)
    return tokens.to(device=device, dtype=dtype), attn.to(device=device, dtype=dtype)


def _reference(tokens, attn, k, **kwargs):
    """The reference on CPU copies (fp32 matmuls there are never TF32)."""
    lengths = kwargs.pop("lengths", None)
    lengths = None if lengths is None else lengths.cpu()
    return vtprune.holov_select(tokens.cpu(), attn.cpu(), k, lengths=lengths, backend="reference", **kwargs)


def _cuda_holov(tokens, attn, k, **kwargs):
    return vtprune.holov_select(tokens, attn, k, backend="cuda", **kwargs)


def _skip_large_on_emulator(cuda_rt, n: int) -> None:
    """N = 2881 runs on a GPU only: on the emulator each such case takes 20 s or more, and N = 577
    already has multi-tile crops (one crop of 577 tokens is 10 x 10 Gram tiles) and more crops
    than the finish kernel has threads (577 one-token crops for k = 1)."""
    if cuda_rt.emu and n > 1000:
        pytest.skip("N = 2881 is GPU-only (too slow on the emulator; N = 577 covers the same paths)")


def _crop_sizes(n_valid: int, k: int, num_crops: int | None) -> list[int]:
    return crop_sizes_for(n_valid, num_crops if num_crops is not None else default_num_crops(n_valid, k))


# ----------------------------------------------------------------------------- fp32: exact


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rank_by", ["attn", "score"])
@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "official-order"])
def test_fp32_equals_reference(cuda_rt, n, rank_by, sorted_):
    dev = cuda_rt.device
    _skip_large_on_emulator(cuda_rt, n)
    tokens, attn = _data(2, n, 48, seed=n, device=dev)
    k_values = sorted({1, max(1, n // 8), max(1, n // 2), n})
    crop_values = [None, 1, max(1, n // 5)] if n > 1 else [None]
    for k in k_values:
        for crops in crop_values:
            kwargs = dict(num_crops=crops, rank_by=rank_by, sorted=sorted_)
            got = _cuda_holov(tokens, attn, k, **kwargs)
            assert torch.equal(got.cpu(), _reference(tokens, attn, k, **kwargs)), (n, k, crops)


@pytest.mark.parametrize("n", [7, 13, 33])
def test_every_crop_count(cuda_rt, n):
    """C = 1 .. N, with budgets that overflow their crops (k close to N, one-token crops)."""
    dev = cuda_rt.device
    tokens, attn = _data(2, n, 20, seed=100 + n, device=dev)
    for crops in range(1, n + 1):
        for k in sorted({1, 3, n // 2 + 1, n - 1, n} - {0}):
            for rank_by in ("attn", "score"):
                for sorted_ in (True, False):
                    kwargs = dict(num_crops=crops, rank_by=rank_by, sorted=sorted_)
                    got = _cuda_holov(tokens, attn, k, **kwargs)
                    want = _reference(tokens, attn, k, **kwargs)
                    assert torch.equal(got.cpu(), want), (crops, k, rank_by, sorted_, got, want)


@pytest.mark.parametrize("n", [7, 97, 577, 2881])
def test_lengths_equal_reference_and_images_alone(cuda_rt, n):
    dev = cuda_rt.device
    _skip_large_on_emulator(cuda_rt, n)
    tokens, attn = _data(3, n, 40, seed=200 + n, device=dev)
    lengths = torch.tensor([n, max(1, n - 3), max(1, n // 2)], device=dev)
    k = max(1, int(lengths.min()) // 3)
    for crops in (None, 1, int(lengths.min())):
        for rank_by in ("attn", "score"):
            kwargs = dict(num_crops=crops, rank_by=rank_by, sorted=False)
            got = _cuda_holov(tokens, attn, k, lengths=lengths, **kwargs)
            assert torch.equal(got.cpu(), _reference(tokens, attn, k, lengths=lengths, **kwargs)), (crops, rank_by)
            for b, nb in enumerate(lengths.tolist()):
                alone = _cuda_holov(tokens[b : b + 1, :nb], attn[b : b + 1, :nb], k, **kwargs)
                assert torch.equal(got[b : b + 1], alone), (b, crops, rank_by)


def test_large_dim_fp32_equals_reference(cuda_rt):
    """D = 4096 (the projected features of the paper), N = 576, the default 16 crops of k = 64."""
    dev = cuda_rt.device
    tokens, attn = _data(2, 576, 4096, seed=300, device=dev)
    for rank_by in ("attn", "score"):
        got = _cuda_holov(tokens, attn, 64, rank_by=rank_by)
        assert torch.equal(got.cpu(), _reference(tokens, attn, 64, rank_by=rank_by))


@pytest.mark.parametrize("d", [1, 5, 37, 64, 100])
def test_feature_dims_and_strides(cuda_rt, d):
    """D not a multiple of the 16-byte vector or of a feature chunk, and tokens that are a strided
    view (row stride larger than D): the kernel's unaligned path, exact on fp32."""
    dev = cuda_rt.device
    tokens, attn = _data(2, 97, d + 3, seed=400 + d, device=dev)
    view = tokens[:, :, 1 : d + 1]
    assert view.stride(1) == d + 3
    for crops in (None, 1, 10):
        got = _cuda_holov(view, attn, 30, num_crops=crops, rank_by="score")
        assert torch.equal(got.cpu(), _reference(view.contiguous(), attn, 30, num_crops=crops, rank_by="score"))


def test_ties_and_alpha_zero(cuda_rt):
    """Tied attention (a quarter grid) ranks by index; alpha = 0 ranks by 1000 attn alone."""
    dev = cuda_rt.device
    tokens, _ = _data(2, 97, 24, seed=500, device=dev)
    attn = (torch.randint(0, 4, (2, 97), generator=torch.Generator().manual_seed(5)) / 4.0 + 0.25).to(dev)
    for alpha in (0.0, 0.09):
        for rank_by in ("attn", "score"):
            for sorted_ in (True, False):
                kwargs = dict(num_crops=6, alpha=alpha, rank_by=rank_by, sorted=sorted_)
                got = _cuda_holov(tokens, attn, 40, **kwargs)
                assert torch.equal(got.cpu(), _reference(tokens, attn, 40, **kwargs)), kwargs


# ----------------------------------------------------------------------------- fp16 / bf16: invariants


def _check_invariants(got: torch.Tensor, attn: torch.Tensor, k: int, lengths: list[int], num_crops, sorted_: bool):
    """A valid selection; with rank_by="attn", each crop's picks are its top tokens by attention
    (ties to the lowest index) and come in the promised order."""
    assert_valid_selection(got.cpu(), k, lengths)
    a = attn.float().cpu()
    for b, row in enumerate(got.cpu().tolist()):
        sizes = _crop_sizes(lengths[b], k, num_crops)
        starts = [sum(sizes[:c]) for c in range(len(sizes))]
        crop_of = [c for c, m in enumerate(sizes) for _ in range(m)]
        if sorted_:
            assert row == sorted(row), row
        else:
            assert [crop_of[i] for i in row] == sorted(crop_of[i] for i in row), row  # crops in order
        for c, (s0, m) in enumerate(zip(starts, sizes)):
            picked = [i for i in row if crop_of[i] == c]
            assert len(picked) <= m
            order = sorted(range(s0, s0 + m), key=lambda i: (-float(a[b, i]), i))
            assert sorted(picked) == sorted(order[: len(picked)]), (b, c)
            if not sorted_:
                assert picked == order[: len(picked)], (b, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n", [1, 7, 97, 577, 2881])
def test_16bit_invariants_and_agreement(cuda_rt, dtype, n):
    dev = cuda_rt.device
    _skip_large_on_emulator(cuda_rt, n)
    tokens, attn = _data(2, n, 72, seed=600 + n, dtype=dtype, device=dev)
    lengths = torch.tensor([n, max(1, n - 5)], device=dev)
    limits = lengths.tolist()
    k = max(1, min(limits) // 4)
    agree = total = 0
    for crops in (None, 1, max(1, min(limits) // 7)):
        for sorted_ in (True, False):
            got = _cuda_holov(tokens, attn, k, num_crops=crops, lengths=lengths, sorted=sorted_)
            _check_invariants(got, attn, k, limits, crops, sorted_)
            want = _reference(tokens, attn, k, num_crops=crops, lengths=lengths, sorted=sorted_)
            for g_row, w_row in zip(got.cpu().tolist(), want.tolist()):
                agree += len(set(g_row) & set(w_row))
                total += k
        got = _cuda_holov(tokens, attn, k, num_crops=crops, lengths=lengths, rank_by="score")
        assert_valid_selection(got.cpu(), k, limits)
    # Same 16-bit values, fp32 math in both: only the summation order differs.
    assert agree >= 0.9 * total, (agree, total)


def test_bf16_d4096_n576(cuda_rt):
    dev = cuda_rt.device
    tokens, attn = _data(2, 576, 4096, seed=700, dtype=torch.bfloat16, device=dev)
    for sorted_ in (True, False):
        got = _cuda_holov(tokens, attn, 64, sorted=sorted_)
        _check_invariants(got, attn, 64, [576, 576], None, sorted_)
        want = _reference(tokens, attn, 64, sorted=sorted_)
        agree = sum(len(set(g) & set(w)) for g, w in zip(got.cpu().tolist(), want.tolist()))
        assert agree >= 0.9 * 2 * 64, agree
    got = _cuda_holov(tokens, attn, 64, rank_by="score")
    assert_valid_selection(got.cpu(), 64, 576)


# ----------------------------------------------------------------------------- crop_budgets / crop_topk alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_crop_budgets_equals_reference(cuda_rt, dtype):
    dev = cuda_rt.device
    g = torch.Generator().manual_seed(800)
    for trial in range(60):
        c = int(torch.randint(1, 40, (1,), generator=g))
        w = torch.rand(4, c, generator=g)
        if trial % 3 == 0:
            w = w / w.sum(dim=1, keepdim=True)  # HoloV's weights
        if trial % 4 == 1:
            w[0, ::3] = float("nan")
            w[1, 1::4] = -0.3
            w[2, ::2] = 0.0
        cap = torch.randint(0, 6, (4, c), generator=g)
        cap[:, 0] += 1  # every row has some room
        k = int(torch.randint(1, int(cap.sum(dim=1).min()) + 1, (1,), generator=g))
        w = w.to(dtype)
        got = vtprune.crop_budgets(w.to(dev), k, cap.to(dev), backend="cuda")
        want = vtprune.crop_budgets(w, k, cap, backend="reference")
        assert torch.equal(got.cpu(), want), (trial, w, cap, k)
        assert bool((got.sum(dim=1) == k).all()) and bool((got <= cap.to(dev)).all())


@pytest.mark.parametrize("n", [1, 7, 97, 577])
def test_crop_budgets_every_crop_count(cuda_rt, n):
    dev = cuda_rt.device
    g = torch.Generator().manual_seed(900 + n)
    for c in (range(1, n + 1) if n <= 97 else (1, 2, 33, 576, 577)):
        cap = torch.tensor([crop_sizes_for(n, c), crop_sizes_for(n, c)])
        w = torch.rand(2, c, generator=g)
        w = w / w.sum(dim=1, keepdim=True)
        w[1] = w[1] ** 4 / (w[1] ** 4).sum()  # skewed: the big crops overflow
        for k in sorted({1, max(1, n // 3), n}):
            got = vtprune.crop_budgets(w.to(dev), k, cap.to(dev), backend="cuda")
            assert torch.equal(got.cpu(), vtprune.crop_budgets(w, k, cap, backend="reference")), (c, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n", [1, 7, 97, 577, 2881])
def test_crop_topk_equals_reference(cuda_rt, dtype, n):
    dev = cuda_rt.device
    g = torch.Generator().manual_seed(1000 + n)
    for trial in range(6):
        c = int(torch.randint(1, min(n, 40) + 1, (1,), generator=g))
        # sizes with empty crops, summing to at most N (the tail belongs to no crop)
        cut = torch.sort(torch.randint(0, n + 1, (3, c - 1), generator=g), dim=1).values
        total = torch.randint(max(1, n // 2), n + 1, (3, 1), generator=g)
        edges = torch.cat([torch.zeros(3, 1, dtype=torch.int64), torch.minimum(cut, total), total], dim=1)
        sizes = edges.diff(dim=1)
        budgets = torch.floor(torch.rand(3, c, generator=g) * (sizes + 1)).long().clamp(max=sizes)
        k = max(1, min(int(budgets.sum(dim=1).max()), int(sizes.sum(dim=1).min())))
        # move every row to the same k, staying inside [0, size] per crop
        for b in range(3):
            need = k - int(budgets[b].sum())
            for cc in range(c):
                step = min(need, int(sizes[b, cc] - budgets[b, cc])) if need > 0 else -min(-need, int(budgets[b, cc]))
                budgets[b, cc] += step
                need -= step
            assert need == 0
        scores = torch.rand(3, n, generator=g)
        if trial % 2:
            scores = torch.round(scores * 4) / 4  # many ties
            scores[:, ::7] = float("nan")
            scores[:, 3::11] = float("-inf")
        scores = scores.to(dtype)
        for sorted_ in (True, False):
            got = vtprune.crop_topk(scores.to(dev), sizes.to(dev), budgets.to(dev), k=k, sorted=sorted_, backend="cuda")
            want = vtprune.crop_topk(scores, sizes, budgets, k=k, sorted=sorted_, backend="reference")
            assert torch.equal(got.cpu(), want), (trial, sorted_)


# ----------------------------------------------------------------------------- graphs and compile


@needs_gpu
@pytest.mark.parametrize("n", [97, 2881])
def test_cuda_graph_capture_and_replay(n):
    static_x, static_a = _data(2, n, 64, seed=1100, dtype=torch.bfloat16, device="cuda")
    lengths = torch.tensor([n, n - 7], device="cuda")

    def run():
        # the public op (no lengths: its eager check would read them on the host) and the
        # wrapper with device lengths
        return (
            vtprune.holov_select(static_x, static_a, 16, rank_by="score", sorted=False, backend="cuda"),
            _cuda.holov_select(static_x, static_a, 16, None, 0.09, "attn", lengths, True),
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    for seed in (1101, 1102):
        x, a = _data(2, n, 64, seed=seed, dtype=torch.bfloat16, device="cuda")
        static_x.copy_(x)
        static_a.copy_(a)
        graph.replay()
        torch.cuda.synchronize()
        want = run()
        assert torch.equal(static_out[0], want[0]) and torch.equal(static_out[1], want[1])


@needs_gpu
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def fn(x, a, lengths):
        idx = vtprune.holov_select(x, a, 12, lengths=lengths, rank_by="score", backend="cuda")
        return idx, vtprune.gather_tokens(x, idx) * 2

    compiled = torch.compile(fn, fullgraph=True)
    lengths = torch.tensor([97, 90], device="cuda")
    for seed in (1200, 1201):  # new values, same shapes: no stale results
        x, a = _data(2, 97, 32, seed=seed, device="cuda")
        got, want = compiled(x, a, lengths), fn(x, a, lengths)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fp64_is_refused_by_the_cuda_backend(cuda_rt):
    dev = cuda_rt.device
    tokens, attn = _data(1, 7, 4, seed=1300, device=dev)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        _cuda_holov(tokens.double(), attn, 2)


# ----------------------------------------------------------------------------- no GPU needed


def test_cuda_backend_registers_holov_ops():
    from vtprune import cuda_backend

    assert cuda_backend.OPS["holov_select"] is _cuda.holov_select
    assert cuda_backend.OPS["crop_budgets"] is _cuda.crop_budgets
    assert cuda_backend.OPS["crop_topk"] is _cuda.crop_topk


@pytest.mark.skipif(CUDA_OK, reason="checks the GPU-less behaviour; the CUDA backend is usable here")
def test_wrappers_without_gpu_name_the_reason():
    tokens, attn = _data(1, 7, 4, seed=1, device="cpu")
    for call in (
        lambda: _cuda.holov_select(tokens, attn, 2),
        lambda: _cuda.crop_budgets(attn, 2, torch.ones(1, 7, dtype=torch.int64)),
        lambda: _cuda.crop_topk(attn, torch.tensor([[7]]), torch.tensor([[2]]), 2),
    ):
        with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: ") as info:
            call()
        assert CUDA_REASON in str(info.value)


def _holov_binding():
    """vtprune._C with the HoloV entry points; skip only where _C cannot have been built."""
    return require_c_entry("holov_select", "csrc/holov.cu")


def test_binding_workspace_sizes():
    c_module = _holov_binding()
    one = c_module.holov_select_workspace_bytes(1, 577, 64, 0)
    assert one >= 577 * 4 and c_module.holov_select_workspace_bytes(3, 577, 64, 0) > one
    assert c_module.holov_select_workspace_bytes(1, 577, 64, 577) > one  # room for 577 crops
    assert c_module.crop_budgets_workspace_bytes(2, 16) >= 2 * 2 * 16 * 4
    assert c_module.crop_topk_workspace_bytes(2, 16) >= 4 * 2 * 16 * 4
    assert c_module.crop_topk_workspace_bytes(0, 0) > 0  # never 0: the buffer gets a real address
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= N = 7, got 8"):
        c_module.holov_select_workspace_bytes(1, 7, 8, 0)
    with pytest.raises(ValueError, match="num_crops must satisfy"):
        c_module.holov_select_workspace_bytes(1, 7, 2, 8)
    with pytest.raises(ValueError, match="B must be >= 0"):
        c_module.crop_budgets_workspace_bytes(-1, 4)
    with pytest.raises(ValueError, match=r"C must be in \[0, 2\^31 - 1\]"):
        c_module.crop_topk_workspace_bytes(1, 2**31)
    with pytest.raises(ValueError, match="overflows"):
        c_module.holov_select_workspace_bytes(2**60, 2**20, 1, 0)


def _holov_args(c_module) -> dict:
    return dict(
        tokens_ptr=16, dtype=1, B=1, N=7, D=4, stride_b=28, stride_n=4, attn_ptr=16, lengths_ptr=0, k=2,
        num_crops=0, alpha=0.09, rank_by_score=False, sorted=True, workspace_ptr=16,
        workspace_bytes=c_module.holov_select_workspace_bytes(1, 7, 2, 0), out_ptr=16, stream=0,
    )


def _budgets_args(c_module) -> dict:
    return dict(
        weights_ptr=16, capacity_ptr=16, B=1, C=4, k=2, workspace_ptr=16,
        workspace_bytes=c_module.crop_budgets_workspace_bytes(1, 4), out_ptr=16, stream=0,
    )


def _topk_args(c_module) -> dict:
    return dict(
        scores_ptr=16, B=1, N=7, crop_sizes_ptr=16, budgets_ptr=16, C=3, k=2, sorted=True, workspace_ptr=16,
        workspace_bytes=c_module.crop_topk_workspace_bytes(1, 3), out_ptr=16, stream=0,
    )


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(dtype=3), r"dtype must be 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 3"),
        (dict(B=-1), "B must be >= 0"),
        (dict(N=-1), r"N must be in \[0, 2\^31 - 1\], got -1"),
        (dict(N=2**31), r"N must be in \[0, 2\^31 - 1\]"),
        (dict(k=0), "k must satisfy 1 <= k <= N = 7, got 0"),
        (dict(k=8), "k must satisfy 1 <= k <= N = 7, got 8"),
        (dict(num_crops=-1), "num_crops must satisfy"),
        (dict(num_crops=8), "num_crops must satisfy"),
        (dict(D=-1), "D must be >= 0"),
        (dict(stride_n=-4), "stride_n must be >= 0"),
        (dict(alpha=float("nan")), "alpha must be finite"),
        (dict(tokens_ptr=0), "tokens_ptr is null"),
        (dict(attn_ptr=0), "attn_ptr is null"),
        (dict(out_ptr=0), "out_ptr is null"),
        (dict(workspace_ptr=0), "workspace_ptr is null"),
        (dict(workspace_bytes=100), r"workspace_bytes must be >= holov_select_workspace_bytes\(B, N, k, num_crops\)"),
    ],
)
def test_holov_binding_rejects_bad_arguments(override, message):
    c_module = _holov_binding()
    with pytest.raises(ValueError, match=message):
        c_module.holov_select(**{**_holov_args(c_module), **override})


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(B=-1), "B must be >= 0"),
        (dict(C=-1), r"C must be in \[0, 2\^31 - 1\]"),
        (dict(k=0), "k must be >= 1, got 0"),
        (dict(weights_ptr=0), "weights_ptr is null"),
        (dict(capacity_ptr=0), "capacity_ptr is null"),
        (dict(out_ptr=0), "out_ptr is null"),
        (dict(workspace_ptr=0), "workspace_ptr is null"),
        (dict(workspace_bytes=1), r"workspace_bytes must be >= crop_budgets_workspace_bytes\(B, C\)"),
    ],
)
def test_crop_budgets_binding_rejects_bad_arguments(override, message):
    c_module = _holov_binding()
    with pytest.raises(ValueError, match=message):
        c_module.crop_budgets(**{**_budgets_args(c_module), **override})


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(B=-1), "B must be >= 0"),
        (dict(N=2**31), r"N must be in \[0, 2\^31 - 1\]"),
        (dict(C=-2), r"C must be in \[0, 2\^31 - 1\]"),
        (dict(k=0), r"k must be in \[1, 2\^31 - 1\], got 0"),
        (dict(k=2**31), r"k must be in \[1, 2\^31 - 1\]"),
        (dict(scores_ptr=0), "scores_ptr is null"),
        (dict(crop_sizes_ptr=0), "crop_sizes_ptr is null"),
        (dict(budgets_ptr=0), "budgets_ptr is null"),
        (dict(out_ptr=0), "out_ptr is null"),
        (dict(workspace_ptr=0), "workspace_ptr is null"),
        (dict(workspace_bytes=1), r"workspace_bytes must be >= crop_topk_workspace_bytes\(B, C\)"),
    ],
)
def test_crop_topk_binding_rejects_bad_arguments(override, message):
    c_module = _holov_binding()
    with pytest.raises(ValueError, match=message):
        c_module.crop_topk(**{**_topk_args(c_module), **override})


def test_bindings_empty_batches_and_foreign_pointers():
    c_module = _holov_binding()
    # B = 0: nothing to do, no pointer is needed and no CUDA call is made (works without a GPU)
    c_module.holov_select(**{**_holov_args(c_module), "B": 0, "tokens_ptr": 0, "attn_ptr": 0, "workspace_ptr": 0,
                             "workspace_bytes": 0, "out_ptr": 0})
    c_module.crop_budgets(**{**_budgets_args(c_module), "B": 0, "weights_ptr": 0, "capacity_ptr": 0,
                             "workspace_ptr": 0, "workspace_bytes": 0, "out_ptr": 0})
    c_module.crop_topk(**{**_topk_args(c_module), "B": 0, "scores_ptr": 0, "crop_sizes_ptr": 0, "budgets_ptr": 0,
                          "workspace_ptr": 0, "workspace_bytes": 0, "out_ptr": 0})
    # Addresses that are not device memory: an error from CUDA, never a crash. Without a GPU this
    # is the driver/device error; with one, the host address is refused before any launch.
    for call, args in (
        (c_module.holov_select, _holov_args(c_module)),
        (c_module.crop_budgets, _budgets_args(c_module)),
        (c_module.crop_topk, _topk_args(c_module)),
    ):
        with pytest.raises(RuntimeError, match="CUDA launch failed"):
            call(**args)
