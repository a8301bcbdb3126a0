"""Tiny dependency-free SVG charts for the offline HTML report: line chart, scatter, heat map."""

from __future__ import annotations

import html
import math

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _fmt(v: float) -> str:
    if v != v:
        return "nan"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.2g}" if a < 0.01 and a > 0 else f"{v:.2f}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    step = (hi - lo) / (n - 1)
    return [lo + i * step for i in range(n)]


def _range(values: list[float], pad: float = 0.05) -> tuple[float, float]:
    vals = [v for v in values if v == v and math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    return lo - pad * span, hi + pad * span


class _Frame:
    def __init__(self, width, height, xlim, ylim, title, xlabel, ylabel, margin=(50, 20, 30, 45), integer_x=False):
        self.w, self.h = width, height
        self.ml, self.mr, self.mt, self.mb = margin
        self.xlim, self.ylim = xlim, ylim
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                      f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
                      f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="13" font-weight="bold">{html.escape(title)}</text>']
        x0, y0, x1, y1 = self.ml, self.mt, width - self.mr, height - self.mb
        self.parts.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#999"/>')
        if integer_x:
            first, last = math.ceil(xlim[0]), math.floor(xlim[1])
            step = max(1, math.ceil((last - first + 1) / 10))
            xticks = list(range(first, last + 1, step))
        else:
            xticks = _ticks(*xlim)
        for t in xticks:
            x = self.x(t)
            self.parts.append(f'<line x1="{x}" y1="{y1}" x2="{x}" y2="{y1 + 4}" stroke="#999"/>'
                              f'<text x="{x}" y="{y1 + 15}" text-anchor="middle">{t if integer_x else _fmt(t)}</text>')
        for t in _ticks(*ylim):
            y = self.y(t)
            self.parts.append(f'<line x1="{x0 - 4}" y1="{y}" x2="{x1}" y2="{y}" stroke="#eee"/>'
                              f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end">{_fmt(t)}</text>')
        self.parts.append(f'<text x="{(x0 + x1) / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
        self.parts.append(f'<text transform="translate(12,{(y0 + y1) / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>')

    def x(self, v):
        lo, hi = self.xlim
        return round(self.ml + (v - lo) / (hi - lo) * (self.w - self.ml - self.mr), 2)

    def y(self, v):
        lo, hi = self.ylim
        return round(self.h - self.mb - (v - lo) / (hi - lo) * (self.h - self.mt - self.mb), 2)

    def legend(self, names, colors=None):
        per_row = max(1, (self.w - self.ml - self.mr) // 150)
        for i, name in enumerate(names):
            x, y = self.ml + 8 + 150 * (i % per_row), self.mt + 12 + 14 * (i // per_row)
            color = colors[i] if colors else PALETTE[i % len(PALETTE)]
            self.parts.append(f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{color}"/>'
                              f'<text x="{x + 14}" y="{y + 1}">{html.escape(name)}</text>')

    def done(self):
        return "\n".join(self.parts + ["</svg>"])


def line_chart(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str,
               width: int = 640, height: int = 300, ylim: tuple[float, float] | None = None,
               vline: float | None = None, integer_x: bool = True) -> str:
    """One polyline per series ``{name: (xs, ys)}``; NaNs break the line. Layer axes get integer ticks."""
    xs = [x for s in series.values() for x in s[0]]
    ys = [y for s in series.values() for y in s[1]]
    f = _Frame(width, height, _range(xs, 0.02), ylim or _range(ys), title, xlabel, ylabel, integer_x=integer_x)
    if vline is not None:
        f.parts.append(f'<line x1="{f.x(vline)}" y1="{f.mt}" x2="{f.x(vline)}" y2="{height - f.mb}" stroke="#444" stroke-dasharray="4 3"/>')
    colors: dict[str, str] = {}
    for i, (name, (sx, sy)) in enumerate(series.items()):
        # "X: controls' mean" is drawn dashed in X's colour
        base = name.split(":")[0] if "control" in name else name
        color = colors.setdefault(base, PALETTE[len(colors) % len(PALETTE)])
        dash = ' stroke-dasharray="5 4"' if "control" in name else ""
        seg: list[str] = []
        for x, y in zip(sx, sy):
            if y == y and math.isfinite(y):
                seg.append(f"{f.x(x)},{f.y(y)}")
                f.parts.append(f'<circle cx="{f.x(x)}" cy="{f.y(y)}" r="2.5" fill="{color}"/>')
            elif seg:
                f.parts.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
                seg = []
        if seg:
            f.parts.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
    shown = [n for n in series if "control" not in n]
    extra = ["dashed: matched controls' mean"] if len(shown) < len(series) else []
    f.legend(shown + extra, [colors[n] for n in shown] + ["#777"] * len(extra))
    return f.done()


def scatter(groups: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str,
            width: int = 480, height: int = 360) -> str:
    """Points per named group ``{name: (xs, ys)}``."""
    xs = [x for g in groups.values() for x in g[0]]
    ys = [y for g in groups.values() for y in g[1]]
    f = _Frame(width, height, _range(xs), _range(ys), title, xlabel, ylabel)
    for i, (name, (gx, gy)) in enumerate(groups.items()):
        color = PALETTE[i % len(PALETTE)]
        for x, y in zip(gx, gy):
            if x == x and y == y:
                f.parts.append(f'<circle cx="{f.x(x)}" cy="{f.y(y)}" r="3" fill="{color}" fill-opacity="0.6"/>')
    f.legend(list(groups))
    return f.done()


def heatmap(rows: list[str], cols: list[str], values: list[list[float]], title: str, marks: set[tuple[int, int]] = frozenset(),
            best: tuple[int, int] | None = None, cell: int = 18, label: str = "") -> str:
    """``values[i][j]`` coloured on a blue-white-red scale; NaN cells grey; ``marks`` outlined; ``best`` starred."""
    finite = [v for r in values for v in r if v == v and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi == lo:
        hi = lo + 1
    ml, mt = 70, 34
    width = ml + cell * len(cols) + 230
    height = max(mt + cell * len(rows) + 52, mt + 7 * 16 + 10)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="10">',
             f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="13" font-weight="bold">{html.escape(title)}</text>']

    def color(v):
        if v != v or not math.isfinite(v):
            return "#ccc"
        t = (v - lo) / (hi - lo)
        if t < 0.5:
            a = t / 0.5
            return f"rgb({int(40 + 215 * a)},{int(90 + 165 * a)},255)"
        a = (t - 0.5) / 0.5
        return f"rgb(255,{int(255 - 200 * a)},{int(255 - 215 * a)})"

    for i, r in enumerate(rows):
        y = mt + i * cell
        parts.append(f'<text x="{ml - 4}" y="{y + cell * 0.7}" text-anchor="end">{html.escape(r)}</text>')
        for j, v in enumerate(values[i]):
            x = ml + j * cell
            stroke = ' stroke="#000" stroke-width="1.5"' if (i, j) in marks else ""
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{color(v)}"{stroke}>'
                         f'<title>{html.escape(r)} / {html.escape(cols[j])}: {_fmt(v)}</title></rect>')
            if best == (i, j):
                parts.append(f'<text x="{x + cell / 2 - 0.5}" y="{y + cell * 0.72}" text-anchor="middle" font-size="12">★</text>')
    for j, c in enumerate(cols):
        x = ml + j * cell + cell / 2 + 3
        y = mt + len(rows) * cell + 6
        parts.append(f'<text transform="translate({x},{y}) rotate(-90)" text-anchor="end">{html.escape(c)}</text>')
    lx = ml + cell * len(cols) + 20
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        parts.append(f'<rect x="{lx}" y="{mt + k * 16}" width="14" height="14" fill="{color(v)}"/>'
                     f'<text x="{lx + 18}" y="{mt + k * 16 + 11}">{_fmt(v)}</text>')
    if label:
        parts.append(f'<text x="{lx}" y="{mt + 5 * 16 + 14}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def bar_chart(bars: list[tuple[str, float, float | None, float | None]], title: str, xlabel: str,
              width: int = 640, row_height: int = 26, xlim: tuple[float, float] | None = None,
              error: list[tuple[float, float] | None] | None = None) -> str:
    """Horizontal bars ``(label, value, control_mean, control_sd)``; a control's mean ± sd is drawn as a grey whisker.

    ``error``: optional ``(low, high)`` interval per bar (e.g. a 95% interval), drawn as a thin black line.
    """
    vals = [b[1] for b in bars] + [b[2] + s * (b[3] or 0) for b in bars if b[2] is not None for s in (-1, 1)]
    if error:
        vals += [v for e in error if e for v in e]
    lo, hi = xlim or _range(vals + [0.0], 0.08)
    ml = 150
    height = 40 + row_height * len(bars) + 35
    f = _Frame(width, height, (lo, hi), (0, len(bars)), title, xlabel, "", margin=(ml, 20, 26, 35), integer_x=False)
    # the _Frame draws y ticks for a numeric axis; drop them for a categorical one
    f.parts = [p for p in f.parts if not (p.startswith('<line x1="' + str(ml - 4)))]
    zero = f.x(0.0) if lo <= 0 <= hi else None
    for i, (label, v, cm, csd) in enumerate(bars):
        yc = f.y(len(bars) - i - 0.5)
        color = "#999" if label.startswith("baseline") else PALETTE[i % len(PALETTE)]
        x0 = zero if zero is not None else f.x(lo)
        x1 = f.x(v) if v == v else x0
        f.parts.append(f'<rect x="{min(x0, x1)}" y="{yc - 8}" width="{abs(x1 - x0)}" height="16" fill="{color}" fill-opacity="0.8"/>'
                       f'<text x="{ml - 6}" y="{yc + 4}" text-anchor="end">{html.escape(label)}</text>')
        if error and error[i]:
            a, b = error[i]
            f.parts.append(f'<line x1="{f.x(a)}" y1="{yc}" x2="{f.x(b)}" y2="{yc}" stroke="#000" stroke-width="1"/>')
        if cm is not None and cm == cm:
            sd = csd or 0.0
            a, b = f.x(cm - sd), f.x(cm + sd)
            f.parts.append(f'<line x1="{a}" y1="{yc + 11}" x2="{b}" y2="{yc + 11}" stroke="#555" stroke-width="3"/>'
                           f'<circle cx="{f.x(cm)}" cy="{yc + 11}" r="3" fill="#555"/>')
    if zero is not None:
        f.parts.append(f'<line x1="{zero}" y1="{f.mt}" x2="{zero}" y2="{height - f.mb}" stroke="#333"/>')
    return f.done()
