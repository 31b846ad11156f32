"""coverage_max_sim kernels (Triton and CUDA) against a float64 torch oracle of SPEC §1.

Without a GPU the Triton kernel runs on CPU tensors through the Triton interpreter, which is slow,
so shapes stay small; the CUDA kernel then runs on the CUDA emulator (``cuda-emu``: csrc/coverage.cu
compiled for the CPU, tests/cuda_emu), and on a GPU (``cuda``) where there is one.
"""

from __future__ import annotations

import torch

import pytest

from vtprune import _cuda
from conftest import triton_kernel_module
from cuda_emu.runtime import emulating, emulator_or_skip

triton_coverage = triton_kernel_module("coverage")
HAS_GPU = torch.cuda.is_available()

DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
EPS = 1e-6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}

CUDA_OK, CUDA_REASON = _cuda.status()


def _run_triton(tokens, indices, lengths):
    return triton_coverage.coverage_max_sim(tokens, indices, lengths)


def _run_cuda(tokens, indices, lengths):
    return _cuda.coverage_max_sim(tokens, indices, lengths)


def _run_cuda_emu(tokens, indices, lengths):
    """The CUDA kernel on the emulator (CPU tensors, two schedules that must agree), result on the
    inputs' device."""
    with emulating(emulator_or_skip()):
        got = _cuda.coverage_max_sim(tokens.cpu(), indices.cpu(), lengths.cpu())
    return got.to(tokens.device)


CUDA_GPU = pytest.param(
    _run_cuda,
    id="cuda",
    marks=pytest.mark.skipif(not CUDA_OK, reason=f"CUDA backend unavailable: {CUDA_REASON}"),
)
BACKENDS = [pytest.param(_run_triton, id="triton"), CUDA_GPU, pytest.param(_run_cuda_emu, id="cuda-emu")]


def oracle(tokens: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """SPEC §1 in float64, one image at a time, straight from the definition."""
    x = tokens.detach().cpu().double()
    B, N, _ = x.shape
    xn = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(EPS)
    out = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        n_valid = min(max(int(lengths[b]), 0), N)
        sel = [int(s) for s in indices[b].tolist() if 0 <= int(s) < n_valid]
        if n_valid == 0:
            continue
        if not sel:
            out[b, :n_valid] = float("-inf")
            continue
        out[b, :n_valid] = (xn[b, :n_valid] @ xn[b, sel].T).max(dim=1).values
    return out


def make_case(B: int, N: int, D: int, K: int, dtype: torch.dtype, seed: int):
    """Random tokens with a few zero vectors, some images shorter than N, K valid indices each."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, N, D, generator=g)
    # Zero tokens, selected or not: they must give similarity 0, never NaN.
    tokens[:, torch.randint(0, N, (max(1, N // 10),), generator=g)] = 0.0
    lengths = torch.full((B,), N, dtype=torch.int64)
    if B > 1:
        lengths[1] = max(1, N // 2)
    if B > 2:
        lengths[2] = max(1, N - 3)
    rows = []
    for b in range(B):
        n_valid = int(lengths[b])
        if K <= n_valid:
            rows.append(torch.randperm(n_valid, generator=g)[:K])
        else:  # more picks than tokens: repeats are allowed by the contract
            rows.append(torch.randint(0, n_valid, (K,), generator=g))
    indices = torch.stack(rows)
    return tokens.to(dtype), indices, lengths


def check(run, tokens, indices, lengths, atol):
    got = run(tokens.to(DEVICE), indices.to(DEVICE), lengths.to(DEVICE))
    B, N, _ = tokens.shape
    assert got.dtype == torch.float32
    assert tuple(got.shape) == (B, N)
    assert got.device.type == DEVICE.type
    got = got.cpu()
    assert not torch.isnan(got).any()
    # The oracle sees the already-rounded fp16/bf16 values, so only accumulation error remains.
    torch.testing.assert_close(got.double(), oracle(tokens, indices, lengths), atol=atol, rtol=0)
    for b in range(B):  # padded positions are exactly 0
        assert torch.all(got[b, min(max(int(lengths[b]), 0), N) :] == 0)
    return got


# (B, N, D, K): odd N, small D, K from 1 to N; N=577 kept to one image where K is large because
# the interpreter runs every program in Python.
SHAPES = [
    (1, 1, 5, 1),
    (3, 1, 33, 1),
    (3, 7, 5, 7),
    (1, 7, 64, 3),
    (3, 97, 33, 50),
    (1, 97, 64, 97),
    (3, 97, 5, 1),
    (3, 97, 64, 120),  # K > lengths of the short images: repeated indices
    (1, 577, 64, 577),
    (3, 577, 33, 40),
]


@pytest.mark.parametrize("run", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("B,N,D,K", SHAPES)
def test_matches_oracle(run, dtype, B, N, D, K):
    if run is _run_cuda_emu and K * N > 100_000 and dtype != torch.float32:
        pytest.skip("K x N warp dot products take seconds per dtype on the emulator: float32 only (the "
                    "storage dtype changes only the loads, which the smaller shapes cover)")
    tokens, indices, lengths = make_case(B, N, D, K, dtype, seed=B * 100_003 + N * 101 + D * 7 + K)
    check(run, tokens, indices, lengths, ATOL[dtype])


@pytest.mark.parametrize("run", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_zero_vectors_give_zero_not_nan(run, dtype):
    tokens = torch.zeros(2, 9, 16, dtype=dtype)
    tokens[1, 3] = 1.0  # one non-zero token: still orthogonal to (similarity 0 with) the zeros
    indices = torch.tensor([[0, 4, 8], [3, 3, 5]])
    lengths = torch.tensor([9, 9])
    got = check(run, tokens, indices, lengths, ATOL[dtype])
    expected = torch.zeros(2, 9)
    expected[1, 3] = 1.0  # the non-zero token is selected and covers itself
    torch.testing.assert_close(got, expected, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("run", BACKENDS)
def test_nan_similarity_gives_nan_like_the_reference(run):
    """A NaN/Inf token makes every similarity it enters NaN; the row's best is then NaN, as
    torch's max gives it in the reference (facility_location turns NaN, theta_coverage does not
    count the row), not the best of the finite ones."""
    from vtprune import reference

    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 7, 12, generator=g)
    tokens[0, 2, 5] = float("nan")  # unselected in image 0: only its own row is NaN
    tokens[1, 4, 0] = float("inf")  # selected in image 1: every row meets it
    indices = torch.tensor([[0, 3, 6], [1, 4, 5]])
    lengths = torch.tensor([7, 7])
    got = run(tokens.to(DEVICE), indices.to(DEVICE), lengths.to(DEVICE)).cpu()
    want = reference.coverage_max_sim(tokens, indices, lengths)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    assert torch.isnan(got[0, 2]) and int(torch.isnan(got[0]).sum()) == 1 and bool(torch.isnan(got[1]).all())
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite].float(), atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("run", BACKENDS)
def test_norm_beyond_fp32_as_documented(run):
    """docs/semantics.md, "Norms beyond fp32": a finite token whose fp32 squared norm overflows is
    a zero vector to the reference and torch; the kernels divide its products by an infinite
    norm, so its similarity with itself is NaN and every other one 0. Pinned so that a change of
    either side is seen."""
    from vtprune import reference
    from vtprune.torch_backend import coverage_max_sim as torch_coverage

    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(1, 7, 16, generator=g)
    tokens[0, 3] *= 1e20  # finite entries; the squared norm overflows fp32
    indices, lengths = torch.tensor([[1, 3, 5]]), torch.tensor([7])
    zeroed = tokens.clone()
    zeroed[0, 3] = 0
    want = reference.coverage_max_sim(zeroed, indices, lengths)
    for got in (reference.coverage_max_sim(tokens, indices, lengths), torch_coverage(tokens, indices, lengths)):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=0)
    got = run(tokens.to(DEVICE), indices.to(DEVICE), lengths.to(DEVICE)).cpu()
    assert torch.isnan(got[0, 3]) and int(torch.isnan(got).sum()) == 1, got
    rows = torch.arange(7) != 3
    torch.testing.assert_close(got[0, rows].double(), want[0, rows].double(), atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("run", BACKENDS)
def test_invalid_indices_and_lengths_are_clamped_not_read(run):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(4, 11, 20, generator=g)
    # Out-of-range indices are skipped; lengths beyond N or below 0 are clamped to [0, N].
    indices = torch.tensor(
        [
            [2, -1, 11, 5],  # -1 and 11 (= N) skipped
            [6, 7, 8, 100],  # all >= lengths[1] = 6: no valid index -> -inf
            [0, 10, -5, 10],  # lengths > N clamped to N, so 10 is valid
            [0, 1, 2, 3],  # lengths < 0 clamped to 0: everything padded
        ]
    )
    lengths = torch.tensor([11, 6, 50, -3])
    got = check(run, tokens, indices, lengths, 1e-5)
    assert torch.all(torch.isneginf(got[1, :6]))
    assert torch.all(got[3] == 0)


@pytest.mark.parametrize("run", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_strided_tokens(run, dtype):
    """Row and batch strides are honoured (a view into a wider tensor, batch-major transposed)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(13, 2, 40, generator=g).to(dtype).to(DEVICE)
    tokens = base.transpose(0, 1)[:, :, 3:27]  # [2, 13, 24], strides (40, 80, 1)
    assert tokens.stride() == (40, 80, 1)
    indices = torch.tensor([[0, 12, 5], [1, 1, 9]])
    lengths = torch.tensor([13, 10])
    check(run, tokens, indices, lengths, ATOL[dtype])


@pytest.mark.parametrize("run", BACKENDS)
def test_empty_selection_and_empty_batch(run):
    tokens = torch.randn(2, 5, 8)
    no_indices = torch.zeros(2, 0, dtype=torch.int64, device=DEVICE)
    got = run(tokens.to(DEVICE), no_indices, torch.tensor([5, 3], device=DEVICE)).cpu()
    assert torch.all(torch.isneginf(got[0])) and torch.all(torch.isneginf(got[1, :3]))
    assert torch.all(got[1, 3:] == 0)
    empty = run(
        torch.randn(0, 5, 8, device=DEVICE),
        torch.zeros(0, 2, dtype=torch.int64, device=DEVICE),
        torch.zeros(0, dtype=torch.int64, device=DEVICE),
    )
    assert tuple(empty.shape) == (0, 5)


@pytest.mark.skipif(not HAS_GPU, reason="large shapes only on a GPU (the Triton interpreter and the emulator are too slow)")
@pytest.mark.parametrize("run", [pytest.param(_run_triton, id="triton"), CUDA_GPU])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("B,N,D,K", [(2, 1000, 4096, 300), (1, 4097, 1024, 64), (4, 577, 1024, 577)])
def test_large_shapes_on_gpu(run, dtype, B, N, D, K):
    tokens, indices, lengths = make_case(B, N, D, K, dtype, seed=N + D + K)
    check(run, tokens, indices, lengths, ATOL[dtype])


def test_triton_rejects_bad_inputs():
    with pytest.raises(ValueError, match="tokens must be"):
        triton_coverage.coverage_max_sim(torch.randn(5, 8), torch.zeros(1, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        triton_coverage.coverage_max_sim(
            torch.randn(1, 5, 8, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="indices"):
        triton_coverage.coverage_max_sim(torch.randn(2, 5, 8), torch.zeros(1, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="indices"):
        triton_coverage.coverage_max_sim(torch.randn(1, 5, 8), torch.zeros(1, 1))
