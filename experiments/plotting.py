"""Figures for `results/` (shared by `experiments` and `benchmarks`): matplotlib with the
non-interactive Agg backend, so they render without a display."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot`, on the Agg backend (selected on first use, not at import)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path) -> None:
    """Lays out `fig`, writes it to `path` (PNG at 120 dpi) and closes it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
