"""Host overhead of the GPU paths of the public ops: torch ops dispatched per call, and where the
host's microseconds go.

Why: ``vtprune.bench.timing`` times one call between two CUDA events on an idle stream, so every
microsecond the host spends before the kernels start (Python, ``torch.library`` dispatch,
validation, small torch ops at ~5-10 us of CPU each on a CUDA tensor) counts as latency.

Two modes:

``--mode stub`` (default, runs anywhere, no GPU needed)
    CPU tensors; the kernel launches are replaced by stubs that do nothing, so what is timed is
    the host path alone. The ``cuda`` backend runs with :func:`vtprune._cuda._emulated` on a stub
    module whose launchers return at once; the ``triton`` backend runs its wrappers with every
    ``@triton.jit`` kernel of the module replaced by a no-op launcher (the wrappers' device check
    is told the kernels are interpreted, so CPU tensors pass). Per op and backend the table gives:

    - ``ops``: torch operators the call dispatches at top level (a ``torch.profiler`` trace of one
      call; operators nested in another operator are not counted), with the list;
    - ``total``: microseconds of one public call;
    - ``checks``: the public wrapper's own part (input checks, argument preparation) = ``total``
      - ``resolve`` - ``backend``, and - ``layer`` when the call enters the custom op;
    - ``layer``: the ``torch.library`` custom-op layer = the custom-op call with the prepared
      arguments - (``resolve`` + ``backend``); ``via_op`` says whether the public call pays it;
    - ``resolve``: :func:`vtprune._dispatch.resolve`;
    - ``backend``: the backend implementation with stubbed launches (its torch ops included).

    Times are thread CPU time (not wall time: a loaded, shared CPU would add other processes'
    time slices), the fastest of 7 loops; differences of columns still carry noise of a few
    microseconds on a busy machine.

    On CPU tensors each torch op costs less host time than on CUDA tensors (no CUDA allocator,
    no launch), so the figures are a floor; the ``ops`` column carries over as it is. Value
    checks of index tensors decide as for tensors on the GPU (``--host-values``: as for CPU
    tensors, which are read). On versions without ``vtprune._validation.read_values`` (before
    this change) the checks read the tensors either way.

``--mode gpu`` (a GPU host)
    Real CUDA tensors and kernels (default shapes: N=576, D=1024, k=64, L=640). Per op and
    backend: ``ops`` as above, ``event`` = CUDA-event time of one eager call on an idle stream
    (what the benchmark tables report), ``graph`` = the same call replayed from a CUDA graph
    captured at set-up (device time alone), ``host`` = ``event - graph``, and ``wall`` = host wall
    time of one call without a sync (the CPU cost of issuing it). A call that syncs cannot be
    captured; its row says so.

Usage::

    python benchmarks/host_overhead.py                 # stub mode, this machine
    python benchmarks/host_overhead.py --mode gpu      # on a GPU host
    python benchmarks/host_overhead.py --repeat 2000 --ops fused_scope_select,holov_select
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# Decided before vtprune (and Triton) is imported, so it cannot wait for argparse.
_STUB_MODE = not ("--mode=gpu" in sys.argv or any(a == "--mode" and b == "gpu" for a, b in zip(sys.argv, sys.argv[1:])))
if _STUB_MODE:
    # The Triton wrappers accept CPU tensors only when their kernels are interpreted; the kernels
    # themselves are replaced (host_stubs.stubbed), so the interpreter never runs.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vtprune  # noqa: E402
from vtprune import _dispatch, ops  # noqa: E402

try:
    from vtprune.bench import host_stubs  # noqa: E402
except ImportError:  # a vtprune from before host_stubs, measured for comparison: this checkout's copy
    _spec = importlib.util.spec_from_file_location(
        "host_stubs", Path(__file__).resolve().parents[1] / "python" / "vtprune" / "bench" / "host_stubs.py")
    host_stubs = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(host_stubs)

# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One public call: ``public()`` runs it; ``op()`` calls the custom op with the arguments the
    wrapper would pass; ``impl()`` calls the backend implementation directly."""

    name: str
    public: Callable[[], object]
    op: Callable[[], object]
    op_name: str
    impl_args: tuple
    device: torch.device
    dtype: torch.dtype


def _cases(
    device: torch.device, backend: str, n: int, d: int, k: int, batch: int, length_l: int, dtype: torch.dtype = torch.float32
) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    f32 = dtype
    x = torch.randn(batch, n, d, generator=g).to(device, dtype)
    s = torch.rand(batch, n, generator=g).to(device, dtype)
    lens_cpu = torch.full((batch,), n, dtype=torch.int64)
    lens = lens_cpu.to(device)
    # varlen: two sequences packed, one budget
    seq = (n // 2, n - n // 2)
    xp = torch.randn(n, d, generator=g).to(device, dtype)
    sp = torch.rand(n, generator=g).to(device, dtype)
    cu = torch.tensor([0, seq[0], n], dtype=torch.int32)  # host offsets, as docs/semantics.md advises
    ks = torch.tensor([k // 2, k // 2], dtype=torch.int64)
    # the sync-free form: device offsets, the longest length given, one int k
    cu_dev, ks_dev = cu.to(device, torch.int64), ks.to(device)
    c = 4
    w = torch.rand(batch, c, generator=g).to(device, dtype)
    cap = torch.full((batch, c), n // c, dtype=torch.int64, device=device)
    sizes = torch.full((batch, c), n // c, dtype=torch.int64, device=device)
    q = torch.full((batch, c), k // c, dtype=torch.int64, device=device)
    h, hd = 2, 16
    qa = torch.randn(batch, h, length_l, hd, generator=g).to(device, dtype)
    ka = torch.randn(batch, h, length_l, hd, generator=g).to(device, dtype)
    groups = torch.zeros(batch, length_l, dtype=torch.int64, device=device)
    groups[:, : length_l // 2] = -1

    cases = [
        Case("fused_scope_select", lambda: vtprune.fused_scope_select(x, s, k, backend=backend),
             lambda: ops._scope_select_op(x, s, k, 1.0, "mul", None, True, backend),
             "scope_select", (x, s, k, 1.0, "mul", None, True), device, f32),
        Case("fused_scope_select+lengths", lambda: vtprune.fused_scope_select(x, s, k, lengths=lens, backend=backend),
             lambda: ops._scope_select_op(x, s, k, 1.0, "mul", lens, True, backend),
             "scope_select", (x, s, k, 1.0, "mul", lens, True), device, f32),
        Case("scope_select_varlen", lambda: vtprune.scope_select_varlen(xp, sp, cu, k // 2, backend=backend),
             lambda: ops._scope_select_varlen_op(xp, sp, cu.to(device, torch.int64), ks.to(device), 1.0, "mul", True, backend),
             "scope_select_varlen", (xp, sp, cu.to(device, torch.int64), ks.to(device), 1.0, "mul", True), device, f32),
        Case("scope_select_varlen+max_seqlen",
             lambda: vtprune.scope_select_varlen(xp, sp, cu_dev, k // 2, max_seqlen=seq[1], backend=backend),
             lambda: ops._scope_select_varlen_op(xp, sp, cu_dev, ks_dev, 1.0, "mul", True, backend, seq[1], k // 2),
             "scope_select_varlen", (xp, sp, cu_dev, ks_dev, 1.0, "mul", True, seq[1], k // 2), device, f32),
        Case("holov_select", lambda: vtprune.holov_select(x, s, k, backend=backend),
             lambda: ops._holov_select_op(x, s, k, None, 0.09, "attn", None, True, backend),
             "holov_select", (x, s, k, None, 0.09, "attn", None, True), device, f32),
        Case("crop_budgets", lambda: vtprune.crop_budgets(w, k, cap, backend=backend),
             lambda: ops._crop_budgets_op(w, k, cap, backend),
             "crop_budgets", (w, k, cap), device, f32),
        Case("crop_topk", lambda: vtprune.crop_topk(s, sizes, q, k=k // c * c, backend=backend),
             lambda: ops._crop_topk_op(s, sizes, q, k // c * c, True, backend),
             "crop_topk", (s, sizes, q, k // c * c, True), device, f32),
        Case("attention_importance", lambda: vtprune.attention_importance(qa, ka, groups, num_groups=1, backend=backend),
             lambda: ops._attention_importance_op(qa, ka, groups, 1, True, hd ** -0.5, 0, length_l, backend),
             "attention_importance", (qa, ka, groups, 1, True, hd ** -0.5, 0, length_l), device, f32),
    ]
    return cases


# ----------------------------------------------------------------------------- measurement


def per_call_us(fn: Callable[[], object], repeat: int, rounds: int = 7) -> float:
    """Fastest over ``rounds`` of the mean CPU microseconds per call of this thread in a loop of
    ``repeat`` calls. Thread CPU time, not wall time: on a shared, loaded CPU the wall clock also
    counts the time other processes held the core; the minimum drops the remaining disturbances
    (cache and frequency effects only ever add time)."""
    for _ in range(min(repeat, 50)):
        fn()
    means = []
    for _ in range(rounds):
        t0 = time.thread_time_ns()
        for _ in range(repeat):
            fn()
        means.append(1e-3 * (time.thread_time_ns() - t0) / repeat)
    return min(means)


def goes_through_custom_op(case: Case) -> bool:
    """Whether the public call of ``case`` enters its ``torch.library`` custom op (in plain eager
    mode the wrappers may call the backend directly, see :mod:`vtprune.ops`)."""
    attr = {
        "scope_select": "_scope_select_op",
        "scope_select_varlen": "_scope_select_varlen_op",
        "holov_select": "_holov_select_op",
        "crop_budgets": "_crop_budgets_op",
        "crop_topk": "_crop_topk_op",
        "attention_importance": "_attention_importance_op",
    }[case.op_name]
    real = getattr(ops, attr)
    entered = []

    def spy(*args, **kwargs):
        entered.append(True)
        return real(*args, **kwargs)

    setattr(ops, attr, spy)
    try:
        case.public()
    finally:
        setattr(ops, attr, real)
    return bool(entered)


def run_stub(names: list[str] | None, repeat: int, show_ops: bool, device_values: bool = True) -> None:
    device = torch.device("cpu")
    # The host path of a GPU call runs on one thread; intra-op threads on the tiny CPU stand-ins
    # would only add contention noise.
    torch.set_num_threads(1)
    print(f"# stub mode: CPU tensors, kernel launches stubbed; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; thread-CPU us per call (fastest of 7 loops of {repeat} calls)")
    print("# ops: top-level torch ops per public call; total: the public call; checks: its own part")
    print("# (total - resolve - backend, and - layer when it enters the custom op); layer: the custom op's")
    print("# torch.library layer (op call - resolve - backend); via_op: whether the public call enters it")
    if device_values:
        print("# index tensors are treated as device-resident: value checks only with check_values=True")
    header = (f"{'op':28s} {'backend':7s} {'ops':>4s} {'total':>8s} {'checks':>8s} {'layer':>8s} "
              f"{'via_op':>6s} {'resolve':>8s} {'backend':>8s}")
    print(header)
    print("-" * len(header))
    listing = []
    for backend in ("cuda", "triton"):
        with host_stubs.stubbed(backend), (host_stubs.device_side_values() if device_values else contextlib.nullcontext()):
            for case in _cases(device, backend, n=32, d=16, k=8, batch=1, length_l=32):
                if names and case.name not in names and case.name.split("+")[0] not in names:
                    continue
                try:
                    _, impl = _dispatch.resolve(case.op_name, backend, case.device, case.dtype)
                except NotImplementedError:
                    print(f"{case.name:28s} {backend:7s}  (not implemented by this backend)")
                    continue
                opnames = host_stubs.top_level_ops(case.public)
                via_op = goes_through_custom_op(case)
                total = per_call_us(case.public, repeat)
                op = per_call_us(case.op, repeat)
                res = per_call_us(lambda: _dispatch.resolve(case.op_name, backend, case.device, case.dtype), repeat)
                direct = per_call_us(lambda: impl(*case.impl_args), repeat)
                layer = op - res - direct
                checks = total - res - direct - (layer if via_op else 0.0)
                print(f"{case.name:28s} {backend:7s} {len(opnames):4d} {total:8.1f} {checks:8.1f} {layer:8.1f} "
                      f"{'yes' if via_op else 'no':>6s} {res:8.1f} {direct:8.1f}")
                listing.append((case.name, backend, opnames))
    if show_ops:
        print()
        for name, backend, opnames in listing:
            print(f"{name} [{backend}]: {', '.join(opnames) or '-'}")


def run_gpu(names: list[str] | None, repeat: int, n: int, d: int, k: int, length_l: int, dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device")
    device = torch.device("cuda")
    print(f"# gpu mode: {torch.cuda.get_device_name()}, torch {torch.__version__}; N={n} D={d} k={k} L={length_l} {dtype}; "
          f"us (median of {repeat})")
    header = f"{'op':28s} {'backend':7s} {'ops':>4s} {'event':>8s} {'graph':>8s} {'host':>8s} {'wall':>8s}"
    print(header)
    print("-" * len(header))
    for backend in ("cuda", "triton"):
        if not _dispatch.status(backend):
            print(f"{'*':28s} {backend:7s}  unavailable: {_dispatch.status(backend).reason}")
            continue
        for case in _cases(device, backend, n=n, d=d, k=k, batch=1, length_l=length_l, dtype=dtype):
            if names and case.name not in names and case.name.split("+")[0] not in names:
                continue
            try:
                for _ in range(3):
                    case.public()
                torch.cuda.synchronize()
            except NotImplementedError:
                print(f"{case.name:28s} {backend:7s}  (not implemented by this backend)")
                continue
            event = _event_us(case.public, repeat)
            graph_s = "-"
            host_s = "-"
            try:
                replay = _graphed(case.public)
                graph = _event_us(replay, repeat)
                graph_s, host_s = f"{graph:8.1f}", f"{event - graph:8.1f}"
            except Exception as exc:  # a call that syncs cannot be captured: say so in the row
                graph_s = f"capture failed: {type(exc).__name__}: {str(exc)[:60]}"
            wall = _wall_us(case.public, repeat)
            count = len(host_stubs.top_level_ops(case.public))
            print(f"{case.name:28s} {backend:7s} {count:4d} {event:8.1f} {graph_s:>8s} {host_s:>8s} {wall:8.1f}")


def _event_us(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end))
    return statistics.median(times)


def _wall_us(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(times)


def _graphed(fn: Callable[[], object]) -> Callable[[], None]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("stub", "gpu"), default="stub")
    parser.add_argument("--ops", default="", help="comma-separated public op names (default: all)")
    parser.add_argument("--repeat", type=int, default=500)
    parser.add_argument("--list-ops", action="store_true", help="print the dispatched operators of each call")
    parser.add_argument("--host-values", action="store_true",
                        help="stub mode: let the value checks read the (CPU) index tensors, as for CPU inputs")
    parser.add_argument("--n", type=int, default=576)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--L", type=int, default=640)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16",
                        help="gpu mode: dtype of the float inputs (stub mode: float32)")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.ops.split(",") if s.strip()] or None
    if args.mode == "stub":
        run_stub(names, args.repeat, args.list_ops, device_values=not args.host_values)
    else:
        run_gpu(names, args.repeat, args.n, args.d, args.k, args.L, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
