"""Providers, shapes and timing for the vtprune benchmarks.

A *provider* is one way to run an op (the official-style loop, the reference, a backend,
``torch.compile`` of the torch backend). Each benchmark case times every provider that can
run here on the same inputs in the same process, checks that it selects what the reference
selects, and reports the ratio to the baseline provider measured in that run. Absolute
figures only mean something next to the device name, which every report carries.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Callable

import torch

import vtprune
from vtprune import reference, torch_backend
from vtprune._dispatch import implements, triton_interpret

# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """One benchmark case: ``B`` images of ``N`` tokens of width ``D``, keep ``k``."""

    name: str
    b: int
    n: int
    d: int
    k: int

    def label(self) -> str:
        return f"{self.name} B={self.b} N={self.n} D={self.d} k={self.k}"


SCOPE_SHAPES = {
    "llava15-k64": Shape("llava15", 1, 576, 1024, 64),
    "llava15-k128": Shape("llava15", 1, 576, 1024, 128),
    "llava15-k192": Shape("llava15", 1, 576, 1024, 192),
    "llavanext-crops": Shape("llavanext", 5, 576, 1024, 32),
    "n2880-k160": Shape("n2880", 1, 2880, 1024, 160),
    "n2880-k320": Shape("n2880", 1, 2880, 1024, 320),
    "n2880-k640": Shape("n2880", 1, 2880, 1024, 640),
    "serving-b32": Shape("serving", 32, 576, 1024, 64),
    "qwen-n16384": Shape("qwen25vl", 1, 16384, 1280, 1024),
}
#: What a 2-core CPU finishes in minutes; the issue-2 targets are the first two.
SCOPE_CPU_SHAPES = ("llava15-k64", "n2880-k160", "llava15-k128", "llavanext-crops")

# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in ms; on CUDA, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
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
    return statistics.median(times)


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by ``fn`` beyond what was live before, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ----------------------------------------------------------------------------- providers


@dataclass
class Provider:
    name: str
    fn: Callable[..., torch.Tensor]
    #: Skip cases whose ``B * k * N * N`` exceeds this (dense-per-step providers on big N).
    max_work: float = float("inf")


def scope_providers(device: torch.device) -> list[Provider]:
    """Every way to run SCOPE that this machine can run for tensors on ``device``."""
    cpu = device.type == "cpu"
    provs = [
        Provider("reference_loop", lambda x, s, k: reference.reference_loop(x, s, k, 1.0), 4e11 if cpu else float("inf")),
        Provider(
            "reference",
            lambda x, s, k: vtprune.fused_scope_select(x, s, k, 1.0, sorted=False, backend="reference"),
            4e10 if cpu else 4e12,
        ),
        Provider("torch", lambda x, s, k: vtprune.fused_scope_select(x, s, k, 1.0, sorted=False, backend="torch")),
    ]
    compiled = torch.compile(
        lambda x, s, k: torch_backend.OPS["scope_select"](x, s, k, 1.0, "mul", None, False), dynamic=False
    )
    provs.append(Provider("torch.compile", compiled))
    for backend in ("triton", "cuda"):
        if backend == "triton" and cpu and triton_interpret():
            continue  # the interpreter's speed says nothing about the kernel
        if implements(backend, "scope_select") and (not cpu):
            provs.append(
                Provider(backend, lambda x, s, k, _b=backend: vtprune.fused_scope_select(x, s, k, 1.0, sorted=False, backend=_b))
            )
    return provs


# ----------------------------------------------------------------------------- running


@dataclass
class Row:
    case: str
    provider: str
    dtype: str
    median_ms: float | None
    ratio_vs_baseline: float | None
    peak_extra_mib: float | None
    same_as_reference: bool | None
    note: str = ""


@dataclass
class Report:
    op: str
    device: str
    baseline: str
    environment: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"op": self.op, "device": self.device, "baseline": self.baseline,
                "environment": self.environment, "rows": [asdict(r) for r in self.rows]}


def environment(device: torch.device) -> dict:
    """Device, versions and date: what makes an absolute figure meaningful."""
    env = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
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
        env["cuda_runtime_torch"] = torch.version.cuda
        env["driver"] = _driver_version()
    return env


def _driver_version() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - a missing nvidia-smi only loses one field
        return "unknown"


def run_scope(shapes: list[Shape], device: torch.device, dtype: torch.dtype, repeat: int,
              providers: list[str] | None = None, log: Callable[[str], None] = print) -> Report:
    """Time every SCOPE provider on every shape; the baseline is ``reference_loop``."""
    report = Report("scope", str(device), "reference_loop", environment(device))
    for shape in shapes:
        g = torch.Generator(device="cpu").manual_seed(shape.n * 31 + shape.k)
        x = torch.randn(shape.b, shape.n, shape.d, generator=g).to(device=device, dtype=dtype)
        s = torch.rand(shape.b, shape.n, generator=g).to(device=device, dtype=dtype)
        truth = vtprune.fused_scope_select(x, s, shape.k, 1.0, sorted=False, backend="torch")
        base_ms = None
        for prov in scope_providers(device):
            if providers is not None and prov.name not in providers:
                continue
            work = float(shape.b) * shape.k * shape.n * shape.n
            if work > prov.max_work:
                report.rows.append(Row(shape.label(), prov.name, str(dtype).replace("torch.", ""), None, None, None, None,
                                       "skipped: dense per-step work too slow on this device"))
                continue
            try:
                out = prov.fn(x, s, shape.k)
                same = bool(torch.equal(out.to(truth.device), truth))
                reps = repeat if work < 1e10 else max(1, repeat // 3)
                ms = median_ms(lambda: prov.fn(x, s, shape.k), device, reps)
                mem = peak_extra_mb(lambda: prov.fn(x, s, shape.k), device)
                note = ""
            except torch.cuda.OutOfMemoryError:
                ms, mem, same, note = None, None, None, "out of memory"
            if prov.name == report.baseline:
                base_ms = ms
            ratio = base_ms / ms if (base_ms and ms) else None
            row = Row(shape.label(), prov.name, str(dtype).replace("torch.", ""), ms, ratio, mem, same, note)
            report.rows.append(row)
            log(format_row(row))
    return report


# ----------------------------------------------------------------------------- output


def format_row(r: Row) -> str:
    ms = f"{r.median_ms:10.3f}" if r.median_ms is not None else f"{'-':>10}"
    ratio = f"{r.ratio_vs_baseline:8.1f}x" if r.ratio_vs_baseline is not None else f"{'-':>9}"
    mem = f"{r.peak_extra_mib:9.1f}" if r.peak_extra_mib is not None else f"{'-':>9}"
    same = {True: "yes", False: "NO", None: "-"}[r.same_as_reference]
    return f"{r.case:42s} {r.provider:15s} {r.dtype:9s} {ms} {ratio} {mem} {same:>5s} {r.note}"


def markdown(report: Report) -> str:
    env = report.environment
    lines = [
        f"# vtprune benchmark: {report.op}",
        "",
        f"- device: {env.get('device')} (driver {env.get('driver', 'n/a')})",
        f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA (torch) {env.get('cuda_runtime_torch', 'n/a')}, "
        f"Python {env.get('python')}, vtprune {env.get('vtprune')}",
        f"- date: {env.get('date')}",
        f"- ratio: baseline `{report.baseline}` time / provider time, both measured in this run",
        "",
        "| case | provider | dtype | median ms | vs baseline | peak extra MiB | same picks | note |",
        "|---|---|---|---:|---:|---:|:---:|---|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.case} | {r.provider} | {r.dtype} | "
            f"{'' if r.median_ms is None else f'{r.median_ms:.3f}'} | "
            f"{'' if r.ratio_vs_baseline is None else f'{r.ratio_vs_baseline:.1f}x'} | "
            f"{'' if r.peak_extra_mib is None else f'{r.peak_extra_mib:.1f}'} | "
            f"{ {True: 'yes', False: 'NO', None: ''}[r.same_as_reference] } | {r.note} |"
        )
    return "\n".join(lines) + "\n"
