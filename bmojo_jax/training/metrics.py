"""The records of a training workdir: `metrics.jsonl` (one JSON object a line, {"step", "split",
...}), the same records as TensorBoard event files beside it (`MetricsLog`), the final results
(`results.json`, written by `write_json_atomic`) and a loss / perplexity figure of the run
(`plot_metrics`).

Crash safety (our choice): a line is appended and flushed per record, so a killed run leaves at
most one unreadable last line. On resume `MetricsLog` drops the lines after the restored step (and
unreadable ones) by writing the kept lines to a temporary file in the same directory, syncing it
to disk and renaming it over the old file (`os.replace`): a kill during the rewrite leaves the old
file or the new one, never a mix. The training loop makes the kept and the new lines those of an
uninterrupted run, except the fields in `TIMING_FIELDS`, which measure this machine and process.

TensorBoard (tensorboardX, no TensorFlow): every number of a record is a scalar tagged
"<split>/<field>" at its step (e.g. "train/loss", "valid/perplexity"), every string a text entry
(the early stop's "stop/message"); `tensorboard --logdir=WORKDIR` shows a run, a sweep's root its
points. A resumed run's event file starts with a purge at the restored step + 1, so TensorBoard
drops the earlier files' records after the restored step, as the JSON lines are dropped.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import jax

# Fields of the "train" records that measure the machine and the process, not the run.
TIMING_FIELDS = ("tokens_per_s", "compile_s")


def write_json_atomic(path, value) -> None:
    """Writes `value` as indented JSON to `path` atomically: a temporary file in the same directory,
    flushed and fsynced, renamed over `path` (`os.replace`), then the directory synced (POSIX)."""
    _write_atomic(Path(path), json.dumps(value, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename itself reaches the disk
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def read_records(path) -> list[dict]:
    """The readable records of a metrics file, in order (unreadable lines, e.g. a half-written
    last line, are skipped); [] when there is no file."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record and "split" in record:
            records.append(record)
    return records


class MetricsLog:
    """`metrics.jsonl` at `path` and TensorBoard event files in its directory (module docstring).

    Opening drops the lines whose "step" exceeds `keep_through_step`, and unreadable ones,
    atomically. Multi-host: process 0 alone writes. Use as a context manager, or `close()`.
    """

    def __init__(self, path, keep_through_step: int):
        self.path = Path(path)
        self.enabled = jax.process_index() == 0
        self._events = None
        if not self.enabled:
            return
        if self.path.exists():
            kept = [r for r in read_records(self.path) if r["step"] <= keep_through_step]
            _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        import tensorboardX  # process 0 only
        # A unique suffix: two starts within one second must not share (and truncate) a file.
        self._events = tensorboardX.SummaryWriter(
            str(self.path.parent), purge_step=keep_through_step + 1,
            filename_suffix=f".{time.time_ns()}")

    def write(self, record: dict) -> None:
        """Appends `record` (JSON-able, flat, with "step" and "split") as a line and as TensorBoard
        entries; no-op off process 0."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step, split = record["step"], record["split"]
        for field, value in record.items():
            if field in ("step", "split") or value is None:
                continue
            if isinstance(value, str):
                self._events.add_text(f"{split}/{field}", value, step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self._events.add_scalar(f"{split}/{field}", value, step)
        self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plot_metrics(metrics_path, figure_path, title: str = "") -> None:
    """Draws a run's metrics file as a PNG (matplotlib, no display needed): cross-entropy
    (nats/token) and perplexity against the training step, the training records' "ce" (the
    mean over each logged window, drawn at its last step) and the periodic validation as lines
    with markers, the final validation and test evaluations as single hollow markers; a third
    panel of accuracy on synthetic tasks. Panels are titled with `title` (e.g. the workdir's
    name).

    Raises:
      ValueError: the metrics file holds no training or evaluation record.
    """
    from matplotlib.figure import Figure  # imported when a figure is drawn
    from matplotlib.ticker import LogFormatter, MaxNLocator

    records = read_records(metrics_path)
    series = {split: [r for r in records if r["split"] == split]
              for split in ("train", "valid", "valid_final", "test_final")}
    if not any(series.values()):
        raise ValueError(f"{metrics_path}: no training or evaluation record to plot.")
    with_accuracy = any("accuracy" in r for r in series["valid"] + series["valid_final"])
    fig = Figure(figsize=(5 * (2 + with_accuracy), 3.8))
    axes = fig.subplots(1, 2 + with_accuracy, sharex=True)
    # One colour per split in every panel; hollow final markers of two shapes stay visible when
    # they coincide.
    styles = {"train": dict(label="training (window mean)", color="C0", marker=".", ms=4, lw=1),
              "valid": dict(label="validation", color="C1", marker="o", ms=4),
              "valid_final": dict(label="final validation", color="C1", marker="s", ms=9,
                                  mfc="none", mew=1.5, ls="none", zorder=3),
              "test_final": dict(label="final test", color="C2", marker="D", ms=6, mfc="none",
                                 mew=1.5, ls="none", zorder=4)}
    fields = {"train": "ce", "valid": "loss", "valid_final": "loss", "test_final": "loss"}
    panels = [("cross-entropy", "loss (nats/token)", lambda r, field: r.get(field)),
              ("perplexity", "perplexity (log scale)",
               lambda r, field: math.exp(min(r[field], 700.0)) if field in r else None)]
    if with_accuracy:
        panels.append(("accuracy", "accuracy on labelled tokens (%)",
                       lambda r, field: 100 * r["accuracy"] if "accuracy" in r else None))
    for axis, (name, ylabel, value) in zip(axes, panels):
        for split, style in styles.items():
            points = [(r["step"], value(r, fields[split])) for r in series[split]]
            points = [(step, v) for step, v in points if v is not None]
            if points:
                axis.plot(*zip(*points), **style)
        axis.set_title(f"{title}: {name}" if title else name)
        axis.set_xlabel("training step")
        axis.set_ylabel(ylabel)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[1].set_yscale("log")
    for set_formatter in (axes[1].yaxis.set_major_formatter, axes[1].yaxis.set_minor_formatter):
        set_formatter(LogFormatter(labelOnlyBase=False))  # "80", not "8 x 10^1"
    if with_accuracy:
        axes[2].set_ylim(-2, 102)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure_path, dpi=120)
