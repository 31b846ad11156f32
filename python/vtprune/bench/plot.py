"""PNG plots of benchmark reports: latency against the problem size, one line per provider.

Token selection (SCOPE, HoloV): latency vs ``N`` at a fixed keep ratio ``k / N`` and latency
vs ``k`` at a fixed ``N``, for single images (``B = 1``). Attention importance: latency and,
where measured (GPU), peak extra memory vs ``L``, one line per provider and mode. Uses the
matplotlib object API (no pyplot, no global backend switch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .report import Report, Row


@dataclass(frozen=True)
class Panel:
    title: str
    x: str  # a key of Row.params
    #: Rows with the same provider and group label form one line.
    group: Callable[[dict[str, int]], str]
    where: Callable[[dict[str, int]], bool]
    y: str = "median_ms"
    ylabel: str = "median latency (ms)"


def _keep_pct(p: dict[str, int]) -> str:
    return f"k/N={round(100 * p['k'] / p['N'])}%"


def _mode(p: dict[str, int]) -> str:
    if p["H"] == 1:
        return f"lowrank R={p['d']}"
    return f"H={p['H']}" + (f"/{p['Hkv']}" if p["Hkv"] != p["H"] else "") + f" d={p['d']}"


def _single(p: dict[str, int]) -> bool:
    return p.get("B") == 1


_SELECTION = (
    Panel("latency vs N (B=1, fixed k/N)", "N", _keep_pct, _single),
    Panel("latency vs k (B=1, fixed N)", "k", lambda p: f"N={p['N']}", _single),
)
_ATTENTION = (
    Panel("latency vs L", "L", _mode, _single),
    Panel("peak extra memory vs L", "L", _mode, _single, y="peak_extra_mib", ylabel="peak extra GPU memory (MiB)"),
)
PANELS = {"scope": _SELECTION, "holov": _SELECTION, "attention": _ATTENTION}


def _lines(rows: list[Row], panel: Panel) -> dict[tuple[str, str], list[tuple[float, float]]]:
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        value = getattr(r, panel.y)
        if r.status != "ok" or value is None or panel.x not in r.params or not panel.where(r.params):
            continue
        lines.setdefault((r.provider, panel.group(r.params)), []).append((r.params[panel.x], value))
    return {key: sorted(points) for key, points in lines.items()}


def plot_reports(reports: list[Report], path: str | Path) -> Path:
    """Draw every report's panels (one row of panels per report) into the PNG ``path``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullLocator
    except ImportError as exc:
        raise RuntimeError(
            f"plotting needs matplotlib ({exc}); pip install matplotlib (or the 'demo' extra: pip install 'vtprune[demo]')"
        ) from None
    if not reports:
        raise ValueError("plot_reports needs at least one report")
    ncols = max(len(PANELS.get(r.op, _SELECTION)) for r in reports)
    fig = Figure(figsize=(6.5 * ncols, 4.6 * len(reports)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(reports), ncols, squeeze=False)
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D", "v", "P")
    for row_axes, report in zip(axes, reports):
        panels = PANELS.get(report.op, _SELECTION)
        providers = list(dict.fromkeys(r.provider for r in report.rows))
        colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
        for ax, panel in zip(row_axes, panels):
            lines = _lines(report.rows, panel)
            groups = list(dict.fromkeys(g for _, g in lines))
            for (prov, group), points in lines.items():
                gi = groups.index(group)
                xs, ys = zip(*points)
                ax.plot(xs, ys, linestyle=styles[gi % len(styles)], marker=markers[gi % len(markers)],
                        color=colors[prov], label=f"{prov}, {group}")
            ax.set_title(f"{report.op}: {panel.title}")
            ax.set_xlabel(panel.x)
            ax.set_ylabel(panel.ylabel)
            if lines:
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ticks = sorted({x for points in lines.values() for x, _ in points})
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.xaxis.set_minor_locator(NullLocator())  # the sizes themselves are the x ticks
                ax.legend(fontsize="x-small")
                ax.grid(True, which="both", alpha=0.3)
            else:
                why = "measured on a GPU only" if panel.y == "peak_extra_mib" else "no single-image rows to plot"
                ax.text(0.5, 0.5, f"{panel.title}: {why}", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
        for ax in row_axes[len(panels):]:
            ax.set_visible(False)
    env = reports[0].environment
    fig.suptitle(f"vtprune {env.get('vtprune', '')} on {env.get('device', '?')}, {reports[0].dtype}, {env.get('date', '')}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
