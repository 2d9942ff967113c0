"""
Tiny SVG charts, written by hand: a line chart for loss curves and a bar chart for evaluations.

SVG is just text: a <polyline> with the points of a curve, <text> for labels, <line> for the axes.
Writing it ourselves keeps a plotting library out of the dependencies and shows that a chart is
nothing more than a mapping from data coordinates to pixel coordinates:

    px = left + (x - x_min) / (x_max - x_min) * width        (y is flipped: SVG's y grows downwards)

    write_svg("loss.svg", line_chart({"train": [(0, 8.3), (10, 5.1)], "val": [(10, 5.3)]},
                                     title="loss", xlabel="step", ylabel="nats/token"))
"""

import math
from html import escape
from pathlib import Path

from nano.common.fileio import write_text

WIDTH, HEIGHT = 640, 360
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 120, 36, 48
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round numbers covering [lo, hi]: (0, 7.3) -> [0, 2, 4, 6]."""
    if hi <= lo:
        return [lo]
    raw_step = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step), default=raw_step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _frame(title: str, xlabel: str, ylabel: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="15">{escape(title)}</text>',
        f'<text x="{MARGIN_LEFT + (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / 2}" y="{HEIGHT - 8}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="14" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 14 {HEIGHT / 2})">{escape(ylabel)}</text>',
    ]


def line_chart(series: dict[str, list[tuple[float, float]]], title: str = "", xlabel: str = "",
               ylabel: str = "", log_x: bool = False) -> str:
    """An SVG line chart of named (x, y) series sharing one pair of axes.

    log_x: x on a logarithmic scale (for x > 0 that doubles from point to point, such as request
    rates), ticked at the data's own x values.
    """
    if log_x:
        ticks = sorted({x for pts in series.values() for x, _ in pts})
        series = {name: [(math.log10(x), y) for x, y in pts] for name, pts in series.items()}
    points = [p for pts in series.values() for p in pts if math.isfinite(p[1])]
    if not points:
        points = [(0.0, 0.0), (1.0, 1.0)]
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    if x_max == x_min:
        x_max = x_min + 1
    if y_max == y_min:
        y_max = y_min + 1
    plot_w, plot_h = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def px(x: float) -> float:
        return MARGIN_LEFT + (x - x_min) / (x_max - x_min) * plot_w

    def py(y: float) -> float:
        return MARGIN_TOP + (1 - (y - y_min) / (y_max - y_min)) * plot_h

    out = _frame(title, xlabel, ylabel)
    bottom = MARGIN_TOP + plot_h
    for t in _nice_ticks(y_min, y_max):  # horizontal grid lines with y labels
        out.append(f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{MARGIN_LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    x_ticks = [(math.log10(t), t) for t in ticks] if log_x else [(t, t) for t in _nice_ticks(x_min, x_max)]
    for t, label in x_ticks:
        out.append(f'<text x="{px(t):.1f}" y="{bottom + 16}" text-anchor="middle">{_fmt(label)}</text>')
    out.append(f'<polyline points="{MARGIN_LEFT},{MARGIN_TOP} {MARGIN_LEFT},{bottom} {MARGIN_LEFT + plot_w},{bottom}" fill="none" stroke="black"/>')
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts if math.isfinite(y))
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        legend_y = MARGIN_TOP + 16 * i + 8
        out.append(f'<line x1="{WIDTH - MARGIN_RIGHT + 10}" x2="{WIDTH - MARGIN_RIGHT + 30}" y1="{legend_y}" y2="{legend_y}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{WIDTH - MARGIN_RIGHT + 36}" y="{legend_y + 4}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(values: dict[str, float], title: str = "", ylabel: str = "", errors: dict[str, float] | None = None,
              y_max: float = 1e-9) -> str:
    """An SVG bar chart, one bar per name, optional error bars (e.g. a standard error).

    The axis runs from 0 to the tallest bar, or to y_max if that is higher (an accuracy chart
    passes y_max=1.0 so that bars of 0 do not get an axis of 0 to 2e-10).
    """
    errors = errors or {}
    top = max([v + errors.get(k, 0.0) for k, v in values.items()] + [y_max])
    plot_w, plot_h = WIDTH - MARGIN_LEFT - 24, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    slot = plot_w / max(len(values), 1)
    out = _frame(title, "", ylabel)
    bottom = MARGIN_TOP + plot_h
    for t in _nice_ticks(0.0, top):
        y = bottom - t / top * plot_h
        out.append(f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for i, (name, v) in enumerate(values.items()):
        x, h = MARGIN_LEFT + i * slot + slot * 0.15, v / top * plot_h
        out.append(f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" fill="{COLOURS[i % len(COLOURS)]}"/>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{bottom - h - 4:.1f}" text-anchor="middle">{_fmt(v)}</text>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{bottom + 16}" text-anchor="middle">{escape(name)}</text>')
        if name in errors:
            e_top, e_bottom = bottom - (v + errors[name]) / top * plot_h, bottom - max(v - errors[name], 0) / top * plot_h
            cx = x + slot * 0.35
            out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{e_top:.1f}" y2="{e_bottom:.1f}" stroke="black"/>')
    out.append(f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" y1="{bottom}" y2="{bottom}" stroke="black"/>')
    out.append("</svg>")
    return "\n".join(out)


def write_svg(path: str | Path, svg: str) -> Path:
    """Write an SVG atomically (a viewer never sees half a file)."""
    return write_text(path, svg)
