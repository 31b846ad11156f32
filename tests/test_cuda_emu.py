"""The CUDA emulator itself (tests/cuda_emu): it must catch what it claims to catch.

Planted bugs in tiny kernels (tests/cuda_emu/selftest.cu) must be detected: a ``__syncthreads``
that part of the block skips or reaches at another line, a shuffle that half a warp skips, a
shared-memory race and an inter-block race (different results under two schedules), a read of
unwritten shared memory (poison), a misaligned WMMA pointer, launch configurations the CUDA
runtime refuses, and for thread-block clusters a missing ``cluster.sync()`` (schedule
disagreement), a divergent one (barrier error) and the cluster size and compute capability limits. The intrinsics, WMMA, the fp16/bf16 conversions and the source rewrite must be
exact. These tests run wherever g++ and pybind11 are installed (no GPU involved).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cuda_emu
from cuda_emu import Schedule
from cuda_emu.rewrite import RewriteError, rewrite_source
from cuda_emu.runtime import emulator_or_skip

HERE = Path(__file__).resolve().parent
SELFTEST = "selftest.cu"

# cudaError_t values (the real ones)
SUCCESS, INVALID_VALUE, INVALID_CONFIGURATION, LAUNCH_FAILURE = 0, 1, 9, 719
NOT_SUPPORTED, INVALID_CLUSTER_SIZE = 801, 912
FULL = Schedule("forward")
REVERSED = Schedule("reverse", poison=0)


@pytest.fixture(scope="module")
def emu() -> cuda_emu.Emulator:
    return emulator_or_skip()


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _launch_failed(emu, err: int, *needles: str) -> str:
    """The launch failed with cudaErrorLaunchFailure and an explanation containing ``needles``."""
    assert err == LAUNCH_FAILURE, (err, emu.last_detail())
    text = emu.error_string(err)
    assert text.startswith("unspecified launch failure [cuda_emu: "), text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# ----------------------------------------------------------------------------- barrier errors


def test_syncthreads_skipped_by_part_of_the_block_is_a_barrier_error(emu):
    out = torch.zeros(64, dtype=torch.int32)
    err = emu.lib.emu_test_partial_barrier(_p(out), 64, 16)
    _launch_failed(emu, err, "barrier error in partial_barrier_kernel, block (0,0,0)",
                   "48 thread(s) [16-63] exited", f"16 thread(s) [0-15] wait at __syncthreads() ")
    # the same kernel with every thread at the barrier is fine
    assert emu.lib.emu_test_partial_barrier(_p(out), 64, 64) == SUCCESS
    assert bool((out == 1).all())


def test_syncthreads_at_different_lines_is_a_barrier_error(emu):
    out = torch.zeros(64, dtype=torch.int32)
    text = _launch_failed(emu, emu.lib.emu_test_split_barrier(_p(out), 64), "threads wait at different __syncthreads()")
    assert "[0,2,...,62]" in text and "[1,3,...,63]" in text and SELFTEST in text


def test_shuffle_skipped_by_half_a_warp_is_detected(emu):
    out = torch.zeros(64, dtype=torch.int32)
    _launch_failed(emu, emu.lib.emu_test_partial_shuffle(_p(out), 64), "[16-31,48-63] exited",
                   "[0-15,32-47] wait at __shfl_xor_sync")


def test_partial_warp_masks_are_refused(emu):
    out = torch.zeros(32, dtype=torch.int32)
    _launch_failed(emu, emu.lib.emu_test_partial_mask(_p(out)), "mask 0x0000ffff", "supports only the mask of every lane")


# ----------------------------------------------------------------------------- races and poison


def _neighbour(emu, schedule: Schedule, with_barrier: bool) -> torch.Tensor:
    out = torch.zeros(256, dtype=torch.int32)
    with emu.schedule(schedule):
        assert emu.lib.emu_test_neighbour(_p(out), 256, int(with_barrier)) == SUCCESS
    return out


def test_shared_memory_race_gives_order_dependent_results(emu):
    expected = (torch.arange(1, 257) % 256) * 3 + 1  # each thread reads its right neighbour's slot
    racy = [_neighbour(emu, s, False) for s in (FULL, REVERSED, Schedule("random", seed=3))]
    assert not torch.equal(racy[0], racy[1])
    # forward: the right neighbour has not written yet (poison); reverse: it has, except for the
    # wrap-around read of thread 0's slot by the last thread (zero poison in that schedule)
    assert bool((racy[0][:255] == 0x7FFF7FFF).all()) and int(racy[0][255]) == 1
    assert torch.equal(racy[1][:255], expected[:255].int()) and int(racy[1][255]) == 0
    fixed = [_neighbour(emu, s, True) for s in (FULL, REVERSED, Schedule("random", seed=3))]
    assert all(torch.equal(f, expected.int()) for f in fixed)


def test_schedule_check_flags_the_race_and_passes_the_fixed_kernel(emu):
    """Emulator.same_under_schedules, which every emulated kernel test goes through."""
    def run(with_barrier: bool) -> torch.Tensor:
        out = torch.zeros(256, dtype=torch.int32)
        assert emu.lib.emu_test_neighbour(_p(out), 256, int(with_barrier)) == SUCCESS
        return out

    with pytest.raises(AssertionError, match="different results under schedules"):
        emu.same_under_schedules(run, False)
    assert torch.equal(emu.same_under_schedules(run, True), (torch.arange(1, 257) % 256 * 3 + 1).int())


def test_scratch_reuse_race_needs_a_warp_major_schedule(emu):
    """Block reductions reusing one scratch without the barrier after their reads (the race of
    holov.cu's block_sum without its second barrier): every thread-major schedule hides it, because
    each warp's next write waits for five shuffles that let all warps read first; a warp-major
    schedule runs one warp ahead and shows it. The default schedules include one of each."""
    threads = 256
    base = sum(range(threads))
    want = torch.full((threads,), base + base + 1000 * threads, dtype=torch.int32)

    def run(schedule: Schedule, with_barrier: bool) -> torch.Tensor:
        out = torch.zeros(threads, dtype=torch.int32)
        with emu.schedule(schedule):
            assert emu.lib.emu_test_scratch_reuse(_p(out), threads, int(with_barrier)) == SUCCESS
        return out

    thread_major = [run(Schedule(o, seed=5), False) for o in ("forward", "reverse", "random")]
    assert all(torch.equal(r, want) for r in thread_major)  # the race is invisible here
    warp_major = [run(Schedule(o, warp_major=True, seed=5), False) for o in ("forward", "reverse", "random")]
    assert not any(torch.equal(r, want) for r in warp_major)
    assert all(torch.equal(run(Schedule(o, wm, seed=5), True), want) for o in ("forward", "reverse", "random") for wm in (False, True))
    if "VTPRUNE_EMU_SCHEDULES" not in os.environ:
        assert [str(s) for s in emu.schedules] == ["forward/poison=0x7fff7fff", "reverse-warp/poison=0x00000000"]


def test_inter_block_race_gives_order_dependent_results(emu):
    out = torch.zeros(1, dtype=torch.int32)
    results = []
    for s in (FULL, REVERSED):
        with emu.schedule(s):
            assert emu.lib.emu_test_last_block_wins(_p(out), 9) == SUCCESS
        results.append(int(out))
    assert results == [8, 0]  # blocks run in order, then in reverse


def test_unwritten_shared_memory_reads_the_poison(emu):
    out = torch.zeros(2)
    assert emu.lib.emu_test_unwritten_shared(_p(out)) == SUCCESS
    assert bool(torch.isnan(out).all())  # static and dynamic shared memory, default poison (NaN)
    with emu.schedule(Schedule("forward", poison=0x3F800000)):
        assert emu.lib.emu_test_unwritten_shared(_p(out)) == SUCCESS
    assert out.tolist() == [1.0, 1.0]


def test_static_shared_memory_is_per_block(emu):
    out = torch.zeros(5 * 32, dtype=torch.int32)
    for s in (FULL, REVERSED):
        with emu.schedule(s):
            assert emu.lib.emu_test_per_block_shared(_p(out), 5) == SUCCESS
        want = torch.tensor([b * 100 + 31 - t for b in range(5) for t in range(32)], dtype=torch.int32)
        assert torch.equal(out, want)


# ----------------------------------------------------------------------------- exact semantics


def test_shuffles_ballot_and_popc(emu):
    threads = 96
    out = torch.zeros(threads * 5, dtype=torch.int64)
    assert emu.lib.emu_test_intrinsics(_p(out), threads) == SUCCESS
    got = out.view(threads, 5).tolist()
    ballot = sum(1 << lane for lane in range(32) if lane % 3 == 0)
    for t in range(threads):
        lane, base = t % 32, t - t % 32
        assert got[t][0] == 1000 + base + (lane ^ 5)
        assert got[t][1] == 1000 + (t - 3 if lane >= 3 else t)  # lanes below delta keep their value
        assert got[t][2] == ballot
        assert got[t][3] == bin(ballot & ((1 << lane) - 1)).count("1")
        # a float through the same shuffle (bit copy): 0.5 * v of lane ^ 16, times 4
        assert got[t][4] == int(np.float32(np.float32(1000 + base + (lane ^ 16)) * np.float32(0.5)) * np.float32(4.0))


def test_thread_block_and_grid_indices_in_3d(emu):
    grid, block = (3, 2, 2), (4, 3, 2)
    blocks, threads = int(np.prod(grid)), int(np.prod(block))
    out = torch.full((blocks * threads * 6,), -1, dtype=torch.int32)
    for s in (FULL, REVERSED):
        with emu.schedule(s):
            assert emu.lib.emu_test_index(_p(out), *grid, *block) == SUCCESS
        rows = out.view(blocks, threads, 6)
        for b in range(blocks):
            bx, by, bz = b % grid[0], (b // grid[0]) % grid[1], b // (grid[0] * grid[1])
            for t in range(threads):
                tx, ty, tz = t % block[0], (t // block[0]) % block[1], t // (block[0] * block[1])
                assert rows[b, t].tolist() == [tx, ty, tz, bx, by, bz]


@pytest.mark.parametrize("dtype,code", [(torch.float16, 1), (torch.bfloat16, 2)], ids=["fp16", "bf16"])
def test_wmma_tile_product(emu, dtype, code):
    g = torch.Generator().manual_seed(code)
    # small integers: every product and sum is exact, so the layouts are checked bit for bit
    a = torch.randint(-4, 5, (16 * 16,), generator=g).to(dtype)
    a_tile = a.view(16, 16)
    b_cols = torch.randint(-4, 5, (16, 16), generator=g).to(dtype)  # b_cols[j] = column j of B
    c = torch.randint(-50, 50, (16, 16), generator=g).float()
    d = torch.zeros(16, 16)
    assert emu.lib.emu_test_wmma(code, _p(a), 0, _p(b_cols), _p(c), _p(d)) == SUCCESS
    want = a_tile.double() @ b_cols.double().T + c.double()
    assert torch.equal(d.double(), want)
    # real values: fp32 accumulation of exact products, close to the float64 product
    a.copy_(torch.randn(a.shape, generator=g).to(dtype))
    b_cols.copy_(torch.randn(16, 16, generator=g).to(dtype))
    assert emu.lib.emu_test_wmma(code, _p(a), 0, _p(b_cols), _p(c), _p(d)) == SUCCESS
    want = a_tile.double() @ b_cols.double().T + c.double()
    torch.testing.assert_close(d.double(), want, rtol=1e-6, atol=1e-5)


def test_wmma_misaligned_pointer_is_an_error(emu):
    a = torch.zeros(16 * 16 + 16, dtype=torch.float16)
    b = torch.zeros(16, 16, dtype=torch.float16)
    c, d = torch.zeros(16, 16), torch.zeros(16, 16)
    assert a.data_ptr() % 32 == 0
    err = emu.lib.emu_test_wmma(1, _p(a), 1, _p(b), _p(c), _p(d))  # a + 1 element: 2-byte aligned
    _launch_failed(emu, err, "wmma: pointer is not 256-bit aligned")


def test_half_and_bfloat16_conversions_are_bit_exact(emu):
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    for to_float, dtype in ((emu.lib.emu_test_half_to_float, torch.float16), (emu.lib.emu_test_bf16_to_float, torch.bfloat16)):
        out = torch.empty(1 << 16)
        to_float(_p(bits), _p(out), ctypes.c_longlong(1 << 16))
        want = bits.view(dtype).float()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))  # -0.0, subnormals, inf
    g = torch.Generator().manual_seed(0)
    floats = torch.cat([
        torch.randn(200_000, generator=g) * 10.0 ** torch.randint(-9, 6, (200_000,), generator=g),
        torch.randint(0, 1 << 31, (200_000,), generator=g).view(torch.float32),  # any bit pattern
        torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                      2.0**-14, float("inf"), float("-inf"), float("nan"), 3.3895314e38]),
    ])
    for to_bits, dtype in ((emu.lib.emu_test_float_to_half, torch.float16), (emu.lib.emu_test_float_to_bf16, torch.bfloat16)):
        out = torch.empty(floats.numel(), dtype=torch.int16)
        to_bits(_p(floats), _p(out), ctypes.c_longlong(floats.numel()))
        want = floats.to(dtype)  # torch rounds to nearest even
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(out.view(dtype)), nan)
        assert torch.equal(out[~nan], want.view(torch.int16)[~nan])


# ----------------------------------------------------------------------------- launch configuration


def test_launch_configurations_the_runtime_refuses(emu):
    out = torch.zeros(2048, dtype=torch.int32)
    index = torch.zeros(6 * 1025, dtype=torch.int32)
    assert emu.lib.emu_test_index(_p(index), 1, 1, 1, 1025, 1, 1) == INVALID_CONFIGURATION  # > 1024 threads
    assert "not a valid block size" in emu.error_string(INVALID_CONFIGURATION)
    assert emu.lib.emu_test_index(_p(index), 1, 1, 1, 16, 16, 8) == INVALID_CONFIGURATION  # 2048 threads
    assert emu.lib.emu_test_index(_p(index), 0, 1, 1, 32, 1, 1) == INVALID_CONFIGURATION  # empty grid
    assert emu.lib.emu_test_index(_p(index), 1, 65536, 1, 1, 1, 1) == INVALID_CONFIGURATION  # grid.y > 65535
    # dynamic shared memory: 48 KiB without an opt-in, up to the attribute with one, never above
    # the device's opt-in maximum (H100: 232448 B)
    smem = ctypes.c_longlong
    assert emu.lib.emu_test_dynamic_smem(_p(out), 256, smem(48 * 1024), -1) == SUCCESS
    assert torch.equal(out[:256], torch.arange(255, -1, -1, dtype=torch.int32))
    assert emu.lib.emu_test_dynamic_smem(_p(out), 256, smem(48 * 1024 + 4), -1) == INVALID_VALUE
    assert "exceed the kernel's limit of 49152 B" in emu.error_string(INVALID_VALUE)
    assert emu.lib.emu_test_dynamic_smem(_p(out), 256, smem(100_000), 100_000) == SUCCESS
    assert emu.lib.emu_test_dynamic_smem(_p(out), 256, smem(100_004), -1) == INVALID_VALUE
    assert emu.lib.emu_test_dynamic_smem(_p(out), 256, smem(1024), 232448 + 4) == INVALID_VALUE  # attribute above the opt-in


def test_module_reports_an_emulated_device(emu):
    m = emu.module
    assert m.device_count() >= 1 and m.cuda_status().startswith("ok: ")
    assert m.compiled_archs() == "cuda_emu"
    assert m.cuda_runtime_version() == 13000


# ----------------------------------------------------------------------------- thread-block clusters


def _exchange(emu, blocks: int, threads: int, cluster: int, with_sync: bool = True, nonportable: bool = False):
    out = torch.full((blocks, threads, 6), -7, dtype=torch.int32)
    err = emu.lib.emu_test_cluster_exchange(_p(out), blocks, threads, cluster, int(with_sync), int(nonportable))
    return err, out


@pytest.mark.parametrize("cluster,threads", [(2, 64), (4, 33), (8, 96)])
def test_cluster_blocks_exchange_through_distributed_shared_memory(emu, cluster, threads):
    blocks = 3 * cluster
    for schedule in (FULL, REVERSED, Schedule("reverse", warp_major=True), Schedule("random", seed=3)):
        with emu.schedule(schedule):
            err, out = _exchange(emu, blocks, threads, cluster)
        assert err == SUCCESS, emu.last_detail()
        block = torch.arange(blocks).view(-1, 1)
        rank = block % cluster
        nxt = (rank + 1) % cluster
        t = torch.arange(threads).view(1, -1)
        assert torch.equal(out[..., 0], (1000 * nxt + t).int()), schedule  # static __shared__ of the next block
        assert torch.equal(out[..., 1], (-1000 * nxt - t).int()), schedule  # its dynamic shared memory
        assert torch.equal(out[..., 2], rank.expand(-1, threads).int())
        assert torch.all(out[..., 3] == cluster) and torch.all(out[..., 4] == cluster)
        assert torch.equal(out[..., 5], rank.expand(-1, threads).int())


def test_missing_cluster_sync_gives_schedule_dependent_results(emu):
    """Reading the neighbour's shared memory before the cluster barrier reads its poison under one
    schedule and its value (or other poison) under another: what same_under_schedules reports."""
    def run():
        err, out = _exchange(emu, 4, 64, 2, with_sync=False)
        assert err == SUCCESS, emu.last_detail()
        return out

    with pytest.raises(AssertionError, match="different results under schedules"):
        emu.same_under_schedules(run)
    # the fixed kernel passes the same check
    emu.same_under_schedules(lambda: _exchange(emu, 4, 64, 2)[1])


def test_cluster_sync_skipped_by_one_block_is_a_barrier_error(emu):
    out = torch.zeros(4 * 32, dtype=torch.int32)
    text = _launch_failed(emu, emu.lib.emu_test_cluster_divergent(_p(out), 4, 32, 2, 1), "wait at cluster.sync()", "exited")
    assert "cluster of 2 blocks" in text
    # every block reaching it is fine
    assert emu.lib.emu_test_cluster_divergent(_p(out), 4, 32, 2, 99) == SUCCESS


def test_cluster_launch_limits(emu):
    # 16 blocks need the non-portable attribute; more than 16 never run; the cluster must divide the grid
    assert _exchange(emu, 16, 32, 16)[0] == INVALID_CLUSTER_SIZE
    assert "NonPortableClusterSizeAllowed" in emu.last_detail()
    err, out = _exchange(emu, 32, 32, 16, nonportable=True)
    assert err == SUCCESS and torch.all(out[..., 3] == 16)
    assert _exchange(emu, 32, 32, 32, nonportable=True)[0] == INVALID_CLUSTER_SIZE
    assert _exchange(emu, 6, 32, 4)[0] == INVALID_CLUSTER_SIZE
    assert "does not divide" in emu.last_detail()
    # clusters of 132 / size fit at once on the emulated H100 (one block per SM)
    assert emu.lib.emu_test_max_active_clusters(64, 8) == 132 // 8
    assert emu.lib.emu_test_max_active_clusters(64, 16) == 132 // 16  # attribute set above
    assert emu.lib.emu_test_max_active_clusters(2048, 8) == -1 or emu.lib.emu_test_max_active_clusters(2048, 8) == 0


def test_clusters_are_refused_below_compute_capability_9(emu):
    with emu.device(166912, (8, 0)):
        err, _ = _exchange(emu, 4, 32, 2)
    assert err == NOT_SUPPORTED and "compute capability 9.0" in emu.last_detail()
    # the default device is an sm_90 one, with the attributes the launchers query
    assert emu.module.device_count() >= 1
    assert _exchange(emu, 4, 32, 2)[0] == SUCCESS


# ----------------------------------------------------------------------------- the source rewrite


def test_rewrite_translates_launches_and_shared_declarations():
    src = (
        "template <typename T> __global__ void k(T* x) {\n"
        "  __shared__ __align__(16) float tile[4][Cfg::kLd];\n"
        "  extern __shared__ __align__(16) unsigned char smem[];\n"
        "}\n"
        "void f(float* x, int n) {\n"
        "  k<float><<<dim3(n, 2), 128,\n"
        "             static_cast<size_t>(n * 4), stream>>>(\n"
        "      x);\n"
        "  k<float><<<1, 32>>>(x);\n"
        "}\n"
    )
    out = rewrite_source(src, "t.cu")
    lines = out.split("\n")
    assert lines[0] == '#line 1 "t.cu"' and len(lines) == len(src.split("\n")) + 1
    assert 'float (&tile)[4][Cfg::kLd] = *::emu::block_shared<float[4][Cfg::kLd]>(&emu_shared_key_tile, 16, "tile");' in out
    assert "unsigned char* smem = static_cast<unsigned char*>(::emu::dynamic_shared());" in out
    assert ('::emu::launch("k<float>", &k<float>, ::emu::LaunchConfig(dim3(n, 2), 128, static_cast<size_t>(n * 4), '
            "stream), x);") in lines[6]
    assert lines[9].strip() == '::emu::launch("k<float>", &k<float>, ::emu::LaunchConfig(1, 32), x);'
    assert "<<<" not in out and ">>>" not in out and "__shared__" not in out


@pytest.mark.parametrize(
    "src,message",
    [
        ("void f() { __shared__ float x[4] = {0}; }", "does not understand"),
        ("void f() { k<<<1, 32>>>(x) + 1; }", "statement of its own"),
        ("void f() { k<<<1>>>(x); }", "2 to 4 parts"),
        ("void f() { k<<<1, 32(x); }", "without >>>"),
    ],
)
def test_rewrite_refuses_what_it_does_not_understand(src, message):
    with pytest.raises(RewriteError, match=message):
        rewrite_source(src, "t.cu")


# ----------------------------------------------------------------------------- AddressSanitizer (optional)


@pytest.mark.skipif(os.environ.get("VTPRUNE_EMU_ASAN") != "1", reason="set VTPRUNE_EMU_ASAN=1 to build and run the ASan emulator (~1 min)")
def test_asan_build_reports_out_of_bounds_writes():
    """The AddressSanitizer build catches out-of-bounds writes to shared memory (a malloc of the
    exact size per block) and to a torch CPU tensor, and runs a correct kernel clean."""
    from cuda_emu.build import build

    path = build(asan=True)
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    script = (
        "import ctypes, sys, torch; sys.path.insert(0, %r); import cuda_emu\n"
        "e = cuda_emu.Emulator(__import__('pathlib').Path(%r))\n"
        "out = torch.zeros(64, dtype=torch.int32)\n"
        "if sys.argv[1] == 'clean':\n"
        "    o = torch.zeros(256, dtype=torch.int32)\n"
        "    assert e.lib.emu_test_neighbour(ctypes.c_void_p(o.data_ptr()), 256, 1) == 0\n"
        "    print('CLEAN')\n"
        "elif sys.argv[1] == 'shared':\n"
        "    e.lib.emu_test_shared_overflow(ctypes.c_void_p(out.data_ptr()))\n"
        "else:\n"
        "    small = torch.zeros(6 * 16, dtype=torch.int32)  # index_kernel writes 6 ints per thread\n"
        "    e.lib.emu_test_index(ctypes.c_void_p(small.data_ptr()), 1, 1, 1, 32, 1, 1)\n"
    ) % (str(HERE), str(path))
    env = {**os.environ, "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0"}
    clean = subprocess.run([sys.executable, "-c", script, "clean"], capture_output=True, text=True, env=env)
    assert clean.returncode == 0 and "CLEAN" in clean.stdout, clean.stderr[-3000:]
    for case, kernel in (("shared", "shared_overflow_kernel"), ("global", "index_kernel")):
        bad = subprocess.run([sys.executable, "-c", script, case], capture_output=True, text=True, env=env)
        assert bad.returncode != 0 and "heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
        assert kernel in bad.stderr
