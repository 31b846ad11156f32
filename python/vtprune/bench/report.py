"""Benchmark results: one :class:`Row` per (case, provider), a :class:`Report` per op, and
their JSON, markdown and plain-text forms.

JSON schema (``SCHEMA``): a report is ``{"schema", "op", "device", "dtype", "baseline",
"check", "environment", "rows"}``; each row holds the fields of :class:`Row`. ``status`` is
``"ok"``, ``"OOM"`` (the provider ran out of GPU memory), ``"skipped"`` (``note`` says why) or
``"error"`` (``note`` holds the exception). Ratios are baseline / provider, both from the same
run: above 1 means faster (or less memory) than the baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA = "vtprune-bench/1"
STATUSES = ("ok", "OOM", "skipped", "error")


@dataclass
class Row:
    """One provider on one case."""

    case: str
    provider: str
    dtype: str
    #: The case's sizes (``B``, ``N``, ``D``, ``k``; ``L``, ``H``, ... for attention), for plots.
    params: dict[str, int]
    status: str = "ok"
    median_ms: float | None = None
    #: Timed runs behind the median (fewer than asked when a call is slow).
    runs: int = 0
    ratio_vs_baseline: float | None = None
    peak_extra_mib: float | None = None
    mem_ratio_vs_baseline: float | None = None
    #: Output agrees with the check (see ``Report.check``); None where not compared.
    same_as_reference: bool | None = None
    #: False for a provider whose math runs in the input dtype: a difference is expected there.
    exact: bool = True
    note: str = ""


@dataclass
class Report:
    """Every row of one op's benchmark run, with what the figures need to be read."""

    op: str
    device: str
    dtype: str
    baseline: str
    check: str
    environment: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "op": self.op,
            "device": self.device,
            "dtype": self.dtype,
            "baseline": self.baseline,
            "check": self.check,
            "environment": dict(self.environment),
            "rows": [asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """The inverse of :meth:`to_dict` (for plotting a saved run)."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} report: schema is {data.get('schema')!r}")
        names = {f.name for f in fields(Row)}
        rows = [Row(**{k: v for k, v in r.items() if k in names}) for r in data["rows"]]
        return cls(data["op"], data["device"], data["dtype"], data["baseline"], data["check"],
                   dict(data.get("environment", {})), rows)

    def failed(self) -> list[Row]:
        """Rows that make the run fail: a disagreeing exact provider, or a provider that raised."""
        return [r for r in self.rows if (r.same_as_reference is False and r.exact) or r.status == "error"]


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _latency_cell(r: Row) -> str:
    if r.status == "ok":
        return _num(r.median_ms, ".3f")
    return r.status  # OOM / skipped / error, in the latency column where the eye looks


_SAME = {True: "yes", False: "NO", None: ""}

TEXT_HEADER = (
    f"{'case':44s} {'provider':15s} {'median ms':>10} {'vs base':>9} {'peak MiB':>9} {'mem vs':>7} {'same':>5s}"
)


def format_row(r: Row) -> str:
    """One aligned text line (the live table the command prints as rows complete)."""
    ms = _latency_cell(r) or "-"
    ratio = f"{r.ratio_vs_baseline:.1f}x" if r.ratio_vs_baseline is not None else "-"
    mem = _num(r.peak_extra_mib, ".1f") or "-"
    mem_ratio = f"{r.mem_ratio_vs_baseline:.1f}x" if r.mem_ratio_vs_baseline is not None else "-"
    same = _SAME[r.same_as_reference] or "-"
    return f"{r.case:44s} {r.provider:15s} {ms:>10} {ratio:>9} {mem:>9} {mem_ratio:>7} {same:>5s} {r.note}".rstrip()


def markdown(report: Report) -> str:
    """The report as a markdown section: environment, how to read it, then the table."""
    env = report.environment
    lines = [
        f"# vtprune benchmark: {report.op}",
        "",
        f"- device: {env.get('device')} (driver {env.get('driver', 'n/a')})",
        f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA (torch) {env.get('cuda_runtime_torch', 'n/a')}, "
        f"Python {env.get('python')}, vtprune {env.get('vtprune')}",
        f"- date: {env.get('date')}; inputs {report.dtype}",
        f"- vs baseline: `{report.baseline}` time (or peak memory) / the provider's, both measured in this run",
        f"- same: {report.check}",
        "",
        "| case | provider | median ms | runs | vs baseline | peak extra MiB | mem vs baseline | same | note |",
        "|---|---|---:|---:|---:|---:|---:|:---:|---|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.case} | {r.provider} | {_latency_cell(r)} | {r.runs or ''} | "
            f"{_num(r.ratio_vs_baseline, '.1f') + ('x' if r.ratio_vs_baseline is not None else '')} | "
            f"{_num(r.peak_extra_mib, '.1f')} | "
            f"{_num(r.mem_ratio_vs_baseline, '.1f') + ('x' if r.mem_ratio_vs_baseline is not None else '')} | "
            f"{_SAME[r.same_as_reference]} | {r.note.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"
