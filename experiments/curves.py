"""Validation curves of several training workdirs side by side (e.g. the runs behind one table).

    python -m experiments.curves --workdirs=workdir/a,workdir/b --labels=A,B \\
        --title="far-query MQAR" [--out=PATH_PREFIX | --out_dir=results]

Reads each workdir's `metrics.jsonl` (the periodic "valid" records) and writes PREFIX.png (one
panel per metric: validation accuracy when the task has one, validation loss in nats/token, both
against the training step) and PREFIX.json (the curves, with the command, git commit and machine),
so the curves outlive the workdirs, which git does not keep. Default PREFIX:
runs/curves-<timestamp>/curves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from benchmarks import harness
from bmojo_jax import training
from experiments import plotting

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (other
    programs and the tests import it beside modules with flags of the same names)."""
    flags.DEFINE_list("workdirs", None, "Training workdirs (each with a metrics.jsonl).",
                      required=True)
    flags.DEFINE_list("labels", [], "One label per workdir (default: the workdir's name).")
    flags.DEFINE_string("title", "validation curves", "Figure title.")
    flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
    flags.DEFINE_string("out", None, "Output path prefix (instead of --out_dir).")


def valid_curve(workdir) -> list[dict]:
    """The periodic validation records of `workdir/metrics.jsonl`, [{"step", "loss", ...}] in step
    order (unreadable lines skipped: a run killed mid-write).

    Raises:
      FileNotFoundError: no metrics.jsonl in `workdir`.
    """
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"--workdirs: {workdir} has no metrics.jsonl (not a training "
                                f"workdir?).")
    records = [r for r in training.read_records(path) if r["split"] == "valid"]
    return sorted(records, key=lambda r: r["step"])


def plot(curves: dict, title: str, path) -> None:
    """One panel per metric present (accuracy, loss) of {label: records}, against the step."""
    metrics = [m for m in ("accuracy", "loss") if any(m in r for c in curves.values() for r in c)]
    plt = plotting.pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    units = {"accuracy": "validation accuracy (fraction of queries)",
             "loss": "validation loss (nats/token)"}
    for axis, metric in zip(axes[0], metrics):
        for order, (label, records) in enumerate(curves.items()):
            style = plotting.series_style(label, order)
            style.update(marker=None)
            axis.plot([r["step"] for r in records], [r.get(metric) for r in records], **style)
        axis.set_title(f"{title}: {metric}")
        axis.set_xlabel("training step")
        axis.set_ylabel(units[metric])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    plotting.save(fig, path)


def main(argv):
    del argv
    labels = FLAGS.labels or [Path(w).name for w in FLAGS.workdirs]
    if len(labels) != len(FLAGS.workdirs):
        sys.exit(f"Error: --labels has {len(labels)} entries for {len(FLAGS.workdirs)} workdirs.")
    try:
        curves = {label: valid_curve(w) for label, w in zip(labels, FLAGS.workdirs)}
    except FileNotFoundError as error:
        sys.exit(f"Error: {error}")
    prefix = harness.output_prefix("curves", out_dir=FLAGS.out_dir, out=FLAGS.out)
    meta = harness.provenance(harness.command_line("experiments.curves"))
    harness.write_report(prefix, dict(meta, workdirs=dict(zip(labels, FLAGS.workdirs)),
                                      curves=curves), None)
    plot(curves, FLAGS.title, f"{prefix}.png")
    print(f"wrote {prefix}.png and {prefix}.json")


if __name__ == "__main__":
    define_flags()
    app.run(main)
