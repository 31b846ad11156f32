"""The loop every op's benchmark shares: inputs, check, memory, timing, ratios.

An op is described by an :class:`OpBench` (its named cases, how to build inputs for one,
the output every provider is checked against, and its providers); :func:`run_op` runs the
cases through the providers on the same inputs in the same process. A provider that runs
out of GPU memory gets an ``OOM`` row and the run goes on; any other exception gets an
``error`` row, which makes the run fail (see :meth:`Report.failed`).
"""

from __future__ import annotations

import math
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor

from vtprune._dispatch import implements, status, triton_interpret

from .report import Report, Row, format_row
from .timing import environment, median_ms, peak_extra_mib, release_memory


class Case(Protocol):
    """A named benchmark shape."""

    name: str
    gpu_only: bool

    def label(self) -> str: ...

    def params(self) -> dict[str, int]: ...


@dataclass
class Provider:
    """One way to run an op on the inputs of a case."""

    name: str
    fn: Callable[[Any], Tensor]
    #: Skip cases whose :attr:`OpBench.work` exceeds this (dense per-step loops on big inputs).
    max_work: float = math.inf
    #: False where the provider's math runs in the input dtype (an official-style loop in 16
    #: bits): its output is still compared, but a difference is expected and does not fail the run.
    exact: bool = True
    #: Run when no ``providers`` list is given (False: only when asked for by name).
    default: bool = True
    #: Run by default in quick mode (False for providers that compile for a long time first).
    quick: bool = True
    #: Added to every row of this provider (e.g. "Triton interpreter: timing is meaningless").
    note: str = ""
    #: Skip cases with more tokens than this (a kernel that takes only up to N tokens), with a note.
    max_n: float = math.inf


@dataclass(frozen=True)
class OpBench:
    """Everything :func:`run_op` needs to benchmark one op."""

    name: str
    baseline: str
    #: What ``same`` means in this op's table (one sentence for the report).
    check: str
    shapes: Mapping[str, Case]
    #: Default shape names on the CPU (on a GPU every shape but the quick ones).
    cpu_shapes: tuple[str, ...]
    quick_shapes: tuple[str, ...]
    #: Every provider this op knows, in table order (usable here or not).
    provider_names: tuple[str, ...]
    #: ``(case, device, dtype) -> inputs`` handed to every provider.
    make_inputs: Callable[[Any, torch.device, torch.dtype], Any]
    #: ``inputs -> output`` every provider's output is checked against.
    reference: Callable[[Any], Tensor]
    #: ``(output, reference output, inputs) -> bool``, or ``(bool, note for the row)``.
    agrees: Callable[[Tensor, Tensor, Any], "bool | tuple[bool, str]"]
    #: ``(device, dtype) -> {name: Provider, or the reason it cannot run here}``.
    providers: Callable[[torch.device, torch.dtype], dict[str, "Provider | str"]]
    #: ``case -> work`` compared with :attr:`Provider.max_work`.
    work: Callable[[Any], float] = field(default=lambda case: 0.0)

    def default_shapes(self, device: torch.device, quick: bool) -> list[str]:
        if quick:
            return list(self.quick_shapes)
        if device.type == "cuda":
            return [n for n in self.shapes if n not in self.quick_shapes]
        return list(self.cpu_shapes)


def backend_provider(backend: str, op: str, device: torch.device, fn: Callable[[Any], Tensor]) -> Provider | str:
    """A provider for a kernel backend, or why it cannot run here.

    Under the Triton interpreter (CPU tensors) the provider exists but runs only when named:
    its timings measure the interpreter, not the kernel.
    """
    st = status(backend)
    if not st.usable:
        return st.reason
    if not implements(backend, op):
        return f"backend {backend!r} does not implement {op} yet"
    if device.type != "cuda":
        if backend == "triton" and triton_interpret():
            return Provider(backend, fn, default=False, note="Triton interpreter: timing is meaningless")
        return f"backend {backend!r} needs CUDA tensors"
    return Provider(backend, fn)


def kernel_providers(
    op: str, device: torch.device, fn_for: Callable[[str], Callable[[Any], Tensor]]
) -> dict[str, Provider | str]:
    """The ``triton`` and ``cuda`` providers of ``op`` (see :func:`backend_provider`);
    ``fn_for(backend)`` runs the op on that backend."""
    return {backend: backend_provider(backend, op, device, fn_for(backend)) for backend in ("triton", "cuda")}


def distinct_valid_picks(out: Tensor, truth: Tensor, n: int) -> bool:
    """Whether ``out`` has ``truth``'s shape and each row holds distinct indices in ``[0, n)``:
    what a selection must be before it can be compared with the reference's up to ties."""
    if out.shape != truth.shape or bool(((out < 0) | (out >= n)).any()):
        return False
    return bool((out.sort(dim=-1).values.diff(dim=-1) != 0).all())


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _ratio(base: float | None, value: float | None) -> float | None:
    return base / value if (base is not None and value) else None


def _fill_ratios(rows: list[Row], baseline: str) -> None:
    base = next((r for r in rows if r.provider == baseline and r.status == "ok"), None)
    for r in rows:
        r.ratio_vs_baseline = _ratio(base.median_ms if base else None, r.median_ms)
        r.mem_ratio_vs_baseline = _ratio(base.peak_extra_mib if base else None, r.peak_extra_mib)


def _run_provider(
    op: OpBench, case: Any, prov: Provider, inputs: Any, truth: Tensor | None, device: torch.device,
    dtype_name: str, repeat: int, warmup: int, max_seconds: float | None,
) -> Row:
    row = Row(case.label(), prov.name, dtype_name, case.params(), exact=prov.exact, note=prov.note)
    if op.work(case) > prov.max_work:
        row.status = "skipped"
        row.note = "skipped: too slow on this device (dense per-step work)"
        return row
    if getattr(case, "n", 0) > prov.max_n:
        row.status = "skipped"
        row.note = f"skipped: this provider takes at most {prov.max_n:g} tokens"
        return row
    oom = False
    try:
        out = prov.fn(inputs)
        if truth is not None:
            verdict = op.agrees(out, truth, inputs)
            same, why = verdict if isinstance(verdict, tuple) else (verdict, "")
            row.same_as_reference = bool(same)
            if not same and not prov.exact:
                why = "; ".join(filter(None, [why, f"math in {dtype_name}: a difference is expected (not a failure)"]))
            row.note = "; ".join(filter(None, [row.note, why]))
        del out
        row.peak_extra_mib = peak_extra_mib(lambda: prov.fn(inputs), device)
        row.median_ms, row.runs = median_ms(lambda: prov.fn(inputs), device, repeat, warmup, max_seconds)
    except Exception as exc:  # noqa: BLE001 - recorded in the table (OOM) or failing the run (error)
        if _is_oom(exc):
            oom = True
            row.status, row.note, row.same_as_reference = "OOM", "out of GPU memory", None
            row.median_ms = row.peak_extra_mib = None
        else:
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)  # the row keeps one line; the whole story goes here
    if oom:  # outside the handler, once the traceback and its frames' tensors are gone
        release_memory(device)
    return row


def run_op(
    op: OpBench,
    shape_names: list[str],
    device: torch.device,
    dtype: torch.dtype,
    repeat: int,
    providers: list[str] | None = None,
    quick: bool = False,
    warmup: int = 3,
    max_seconds: float | None = 10.0,
    log: Callable[[str], None] | None = print,
    step: Callable[[str], None] | None = None,
) -> Report:
    """Time ``op``'s providers on the named cases; ``providers`` None takes every default one.

    Each cell runs the provider once for the check (which also warms it up), once more for
    the peak memory on a GPU, ``warmup`` untimed calls, then up to ``repeat`` timed ones
    (stopping after ``max_seconds``).

    ``log`` receives each row as a text line as soon as it is complete; ``step`` is called
    once per (case, provider) with a short label (a progress bar's update).
    """
    available = op.providers(device, dtype)
    if providers is None:
        chosen = [p for p in available.values() if isinstance(p, Provider) and p.default and (p.quick or not quick)]
    else:
        chosen = []
        for name in providers:
            prov = available.get(name)
            if prov is None:
                raise ValueError(f"{op.name} has no provider {name!r}; it knows {', '.join(op.provider_names)}")
            if not isinstance(prov, Provider):
                raise RuntimeError(f"{op.name} provider {name!r} cannot run here: {prov}")
            chosen.append(prov)
        chosen.sort(key=lambda p: op.provider_names.index(p.name))
    dtype_name = str(dtype).replace("torch.", "")
    report = Report(op.name, str(device), dtype_name, op.baseline, op.check, environment(device))
    for name in shape_names:
        case = op.shapes[name]
        if case.gpu_only and device.type != "cuda":
            row = Row(case.label(), "all", dtype_name, case.params(), status="skipped",
                      note="GPU-only shape: skipped on the CPU, where it would take minutes")
            report.rows.append(row)
            if log:
                log(format_row(row))
            for prov in chosen:
                if step:
                    step(f"{case.name} {prov.name}")
            continue
        rows = _run_case(op, case, chosen, device, dtype, dtype_name, repeat, warmup, max_seconds, log, step)
        report.rows.extend(rows)
    return report


def _run_case(
    op: OpBench, case: Any, chosen: list[Provider], device: torch.device, dtype: torch.dtype, dtype_name: str,
    repeat: int, warmup: int, max_seconds: float | None, log: Callable[[str], None] | None,
    step: Callable[[str], None] | None,
) -> list[Row]:
    rows: list[Row] = []
    inputs = truth = None
    failure: tuple[str, str] | None = None
    try:
        inputs = op.make_inputs(case, device, dtype)
        truth = op.reference(inputs)
    except Exception as exc:  # noqa: BLE001 - recorded below
        failure = ("OOM", "out of GPU memory for the inputs or the check") if _is_oom(exc) else (
            "error", f"inputs/check: {type(exc).__name__}: {exc}".splitlines()[0][:300])
    if failure is not None:
        inputs = truth = None
        release_memory(device)
    for prov in chosen:
        if step:
            step(f"{case.name} {prov.name}")
        if failure is not None:
            row = Row(case.label(), prov.name, dtype_name, case.params(), status=failure[0], note=failure[1])
        else:
            row = _run_provider(op, case, prov, inputs, truth, device, dtype_name, repeat, warmup, max_seconds)
        rows.append(row)
        _fill_ratios(rows, op.baseline)
        if log:
            log(format_row(row))
    del inputs, truth
    release_memory(device)
    return rows
