"""Figures for `results/` (shared by `experiments` and `benchmarks`): matplotlib with the
non-interactive Agg backend, so they render without a display.

Readability rules every figure follows (our choice): each preset has one colour and one marker
shape in every figure (`series_style`), hollow and shrinking in drawing order so that a point
under another stays visible; lines are never drawn across a missing point (`aligned`: NaN
there); every panel has a title and axis labels with units; a figure with error bars says what
they are in its caption (`save(..., caption=...)`).
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

# One colour and marker per preset, the same in every figure.
PRESET_STYLES = {"transformer": ("C0", "s"), "swa": ("C1", "v"), "mamba": ("C2", "^"),
                 "hybrid": ("C3", "D"), "bmojo_f": ("C4", "P"), "bmojo": ("C5", "o")}
_MARKERS = "os^vDPX*"


def pyplot():
    """`matplotlib.pyplot`, on the Agg backend (selected on first use, not at import)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def series_style(name: str, order: int = 0) -> dict:
    """`Axes.plot` keyword arguments of the series `name` drawn `order`-th (0-based) in a panel:
    its preset's colour and marker (`PRESET_STYLES`; other names cycle by order), a hollow marker
    whose size shrinks with `order`, so that a point drawn later sits inside an equal one drawn
    earlier and both stay visible, and the label `name`."""
    color, marker = PRESET_STYLES.get(name, (f"C{order % 10}", _MARKERS[order % len(_MARKERS)]))
    return dict(color=color, marker=marker, ms=max(4.0, 10.0 - 1.2 * order), mfc="none",
                mew=1.6, label=name, zorder=2 + order)


def aligned(rows, group: str, x: str, value) -> dict:
    """{group value: (xs, ys)} of `rows` (dicts) over the sorted union of their `x` values; y is
    `value(row)` (a callable) and NaN where a group has no row at an x or its value is None, so
    a plotted line breaks at a missing point instead of joining its neighbours."""
    xs = sorted({r[x] for r in rows})
    out = {}
    for name in dict.fromkeys(r[group] for r in rows):
        mine = {r[x]: value(r) for r in rows if r[group] == name}
        out[name] = (xs, np.array([np.nan if mine.get(v) is None else float(mine[v])
                                   for v in xs]))
    return out


def save(fig, path, caption: str | None = None) -> None:
    """Lays out `fig`, writes it to `path` (PNG at 120 dpi) and closes it. `caption`: text under
    the panels (wrapped to the figure's width), e.g. what the error bars are."""
    if caption:
        width_in, height_in = fig.get_size_inches()
        lines = textwrap.wrap(caption, width=int(width_in * 15))
        fig.text(0.01, 0.01, "\n".join(lines), ha="left", va="bottom", fontsize=8)
        bottom = min(0.5, (len(lines) * 0.16 + 0.1) / height_in)
        fig.tight_layout(rect=(0, bottom, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plain_numbers(axis) -> None:
    """Tick labels of `axis` (an x or y `Axis` on a log scale) as plain numbers ("300", not
    "3 x 10^2"); minor ticks are labelled only where the axis spans about one decade or less
    (`matplotlib.ticker.LogFormatter`'s rule)."""
    import matplotlib.ticker as ticker
    axis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))


def log2_ticks(axis, values) -> None:
    """Powers of two from just below min(values) to just above max(values) as the only ticks
    of `axis` (an x or y `Axis` on a log scale), written as plain numbers."""
    import matplotlib.ticker as ticker
    values = [v for v in values if v and math.isfinite(v) and v > 0]
    low, high = math.floor(math.log2(min(values))), math.ceil(math.log2(max(values)))
    axis.set_ticks([2.0 ** i for i in range(low, high + 1)])
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())
