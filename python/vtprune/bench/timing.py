"""Timing, peak memory and the environment block every benchmark report carries.

Latency is the median of several timed calls after warm-up calls (CUDA events around each
call on a GPU, so a provider's host-side gaps count as the device sat idle through them).
Memory is what a call allocates on the GPU beyond what was live before it (its inputs and
anything else already allocated); the CPU has no such counter, so it is ``None`` there.
"""

from __future__ import annotations

import gc
import platform
import statistics
import subprocess
import time
from datetime import date
from typing import Callable

import torch

#: A warm-up call slower than this ends the warm-up: one such call has already paid every
#: lazy cost (allocator, JIT, thread pool), and more would only lengthen the run.
SLOW_CALL_S = 1.0


def sync(device: torch.device) -> None:
    """Wait for the device to finish queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    repeat: int,
    warmup: int = 3,
    max_seconds: float | None = None,
) -> tuple[float, int]:
    """``(median ms, timed runs)`` of ``fn`` over up to ``repeat`` runs after ``warmup`` calls.

    ``max_seconds`` stops the timed runs once they have taken that long (at least one run),
    so a baseline that needs seconds per call does not hold up the whole table.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1; got {repeat}")
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if time.perf_counter() - t0 > SLOW_CALL_S:
            break
    times: list[float] = []
    began = time.perf_counter()
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        if max_seconds is not None and time.perf_counter() - began > max_seconds:
            break
    return statistics.median(times), len(times)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak GPU memory one call of ``fn`` allocates beyond what was live before it, in MiB.

    ``None`` on the CPU. What was live before includes the inputs, so this is the provider's
    own working memory plus its output.
    """
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def release_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, so the next provider starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):  # no nvidia-smi: one field lost
        return "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """Device, driver, versions and date: what makes an absolute figure meaningful."""
    import vtprune

    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]})"
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    env = {
        "date": date.today().isoformat(),
        "device": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vtprune": vtprune.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if device.type == "cuda":
        env["cuda_runtime_torch"] = str(torch.version.cuda)
        env["driver"] = _driver_version()
    return env
