"""The HTML report's plots, as PNG bytes, drawn with matplotlib's Agg canvas.

No pyplot and no global backend switch: each plot is its own ``Figure`` on a
``FigureCanvasAgg``, so importing this module changes nothing for the caller.
The data comes in as plain records (``ParetoPoint``, ``HistoryPoint``); drawing
is all this module does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

MiB = 1024 * 1024


@dataclass(frozen=True)
class ParetoPoint:
    quant: str
    tg_tps: float
    size_bytes: float | None
    quality: float | None
    on_front: bool
    is_reference: bool


@dataclass(frozen=True)
class HistoryPoint:
    started_at: float
    run_id: str
    tg_tps: float | None
    quality: float | None


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # no Software/URL text chunk: the page must not carry any address, even inside an image
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    fig.set_facecolor("white")
    return fig


def pareto_png(points: list[ParetoPoint], device: str, quality_label: str | None,
               quality_higher_is_better: bool = True) -> bytes:
    """Quality against generation tokens/s, marker area proportional to the file size, the Pareto front
    (quality, tg t/s, size) ringed and joined.  Without quality figures the y axis is the size."""
    fig = _figure(8, 5.2)
    ax = fig.add_subplot()
    pts = [p for p in points if p.tg_tps is not None]
    use_quality = quality_label is not None and any(p.quality is not None for p in pts)
    if use_quality:
        pts = [p for p in pts if p.quality is not None]
    sizes = [p.size_bytes for p in pts if p.size_bytes]
    biggest = max(sizes) if sizes else 1.0

    def y(p):
        return p.quality if use_quality else (p.size_bytes or 0) / MiB

    for p in pts:
        area = 60 + 900 * ((p.size_bytes or 0) / biggest)
        ax.scatter([p.tg_tps], [y(p)], s=area, alpha=0.55, color="#1f6fb2" if not p.is_reference else "#6b6b6b",
                   edgecolors="#c0392b" if p.on_front else "white", linewidths=2.5 if p.on_front else 0.8, zorder=3)
        size_txt = "" if p.size_bytes is None else f"\n{p.size_bytes / MiB:,.0f} MiB"
        ax.annotate(p.quant + (" (ref)" if p.is_reference else "") + size_txt, (p.tg_tps, y(p)),
                    textcoords="offset points", xytext=(9, 6), fontsize=8, zorder=4)
    front = sorted((p for p in pts if p.on_front), key=lambda p: p.tg_tps)
    front_label = "Pareto front (quality, tg t/s, size)" if use_quality else "Pareto front (tg t/s, size)"
    if len(front) > 1:
        ax.plot([p.tg_tps for p in front], [y(p) for p in front], linestyle="--", color="#c0392b", linewidth=1.2,
                zorder=2, label=front_label)
    elif front:
        ax.plot([], [], linestyle="--", color="#c0392b", label=front_label)
    ax.set_xlabel("generation (tg) tokens/s  →  faster")
    if use_quality:
        ax.set_ylabel(f"{quality_label}  {'↑' if quality_higher_is_better else '↓'} better")
        if not quality_higher_is_better:
            ax.invert_yaxis()
    else:
        ax.set_ylabel("size MiB (no quality figures in this run)")
    ax.set_title(f"{device} · " + (f"{quality_label} vs tg t/s vs size" if use_quality else "size vs tg t/s"),
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    ax.legend(loc="best", fontsize=8, title="marker area ∝ file size; red ring = on the front", title_fontsize=8)
    return _png(fig)


def history_png(series: dict[str, list[HistoryPoint]], title: str, quality_label: str | None,
                current_run: str | None = None) -> bytes:
    """tg tokens/s (and the quality measure) of each rung over the runs' start times."""
    from matplotlib import dates as mdates

    has_quality = quality_label is not None and any(p.quality is not None for s in series.values() for p in s)
    fig = _figure(8, 6.4 if has_quality else 3.6)
    axes = fig.subplots(2 if has_quality else 1, 1, sharex=True, squeeze=False)[:, 0]
    current_at = None
    times = {p.started_at for pts in series.values() for p in pts}
    for quant, pts in series.items():
        pts = sorted(pts, key=lambda p: p.started_at)
        when = [datetime.fromtimestamp(p.started_at, timezone.utc) for p in pts]
        for ax, attr in zip(axes, ("tg_tps", "quality")):
            xs = [w for w, p in zip(when, pts) if getattr(p, attr) is not None]
            ys = [getattr(p, attr) for p in pts if getattr(p, attr) is not None]
            if ys:
                ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.2, label=quant)
        for w, p in zip(when, pts):
            if p.run_id == current_run:
                current_at = w
    axes[0].set_ylabel("tg tokens/s")
    if has_quality:
        axes[1].set_ylabel(quality_label)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if current_at is not None:
            ax.axvline(current_at, color="#c0392b", linestyle=":", linewidth=1)
    axes[-1].set_xlabel("run started (UTC); dotted line = this run")
    if len(times) == 1:              # one run: a day either side, not matplotlib's default years
        t = datetime.fromtimestamp(times.pop(), timezone.utc)
        axes[-1].set_xlim(t - timedelta(days=1), t + timedelta(days=1))
    locator = mdates.AutoDateLocator()
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    axes[0].set_title(title, fontsize=10)
    axes[0].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="rung", title_fontsize=8)
    return _png(fig)


def sustained_png(curves: dict[str, list[dict]], title: str) -> bytes:
    """Generation tokens/s of each back-to-back run ([sustained]), with the hottest temperature read after
    each run on a second axis where one was readable; the dashed line is 90 % of the first run."""
    fig = _figure(8, 3.8)
    ax = fig.add_subplot()
    temp_ax = None
    for label, runs in curves.items():
        xs = [r["run"] for r in runs]
        line, = ax.plot(xs, [r["tg_tps"] for r in runs], marker="o", markersize=4, linewidth=1.4, label=label)
        if runs:
            ax.axhline(0.9 * runs[0]["tg_tps"], color=line.get_color(), linestyle="--", linewidth=0.8)
        temps = [(r["run"], r["celsius"]) for r in runs if r.get("celsius") is not None]
        if temps:
            temp_ax = temp_ax or ax.twinx()
            temp_ax.plot([t[0] for t in temps], [t[1] for t in temps], linestyle=":", marker="^", markersize=3,
                         color=line.get_color(), label=f"{label} °C")
    ax.set_xlabel("run (back to back, no cool-down)")
    ax.set_ylabel("tg tokens/s")
    ax.grid(True, alpha=0.3)
    if temp_ax is not None:
        temp_ax.set_ylabel("hottest sensor °C (dotted)")
    ax.set_title(title + " · dashed: 90 % of the first run", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)
