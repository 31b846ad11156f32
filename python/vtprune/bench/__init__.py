"""Benchmarks of vtprune's ops: shapes, providers, timing, reports, plots and ``vtprune bench``.

A *provider* is one way to run an op (the official-style loop, the reference, a backend,
``torch.compile`` of the torch backend, a materialized-attention baseline). Each case runs
every provider usable here on the same inputs in one process, checks each output against
the torch backend's, and reports the median latency, the ratio to the op's baseline measured
in the same run, and (on a GPU) the peak extra memory. Absolute figures only mean something
next to the environment block (device, driver, versions, date) every report carries.

* :mod:`.timing` — median latency, peak memory, environment.
* :mod:`.report` — rows and reports, JSON and markdown.
* :mod:`.runner` — the provider/case loop shared by every op (OOM rows included).
* :mod:`.scope`, :mod:`.holov`, :mod:`.attention` — each op's shapes and providers.
* :mod:`.plot`, :mod:`.progress`, :mod:`.command` — the PNG, the progress bar, the command.

Importing this package imports no Triton and touches no GPU.
"""

from __future__ import annotations

from .command import OPS, add_bench_arguments, run_bench
from .report import SCHEMA, Report, Row, format_row, markdown
from .runner import OpBench, Provider, run_op
from .shapes import Shape
from .timing import environment, median_ms, peak_extra_mib, sync

__all__ = [
    "OPS",
    "SCHEMA",
    "OpBench",
    "Provider",
    "Report",
    "Row",
    "Shape",
    "add_bench_arguments",
    "environment",
    "format_row",
    "markdown",
    "median_ms",
    "peak_extra_mib",
    "run_bench",
    "run_op",
    "sync",
]
