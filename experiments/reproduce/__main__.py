"""`python -m experiments.reproduce --table=NAME|all [--budget=tiny|full] [--out_dir=DIR]
[--presets=...] [--seeds=...] [--workdir=DIR] [--redraw]`: see the package docstring."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
from absl import app, flags, logging

from benchmarks import harness
from bmojo_jax import training
from experiments.reproduce import BUDGETS, TABLES, reproduce, runner

flags.DEFINE_enum("table", None, tuple(TABLES) + ("all",), "Which table to reproduce.")
flags.DEFINE_enum("budget", "full", BUDGETS, "tiny: seconds (tests); full: the committed results "
                  "(minutes per table on 2 CPU cores).")
flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
flags.DEFINE_list("presets", None, "Presets to run (default: all six; tiny: swa,bmojo).")
flags.DEFINE_list("seeds", None, "Only these of the budget's seeds (default: all), e.g. one "
                  "seed per core with --points_dir=results --commit.")
flags.DEFINE_string("workdir", str(runner.DEFAULT_WORKDIR), "Root of the points' training "
                    "workdirs (rerunning resumes them) and of the JAX compilation cache.")
flags.DEFINE_bool("redraw", False, "Only draw OUT_DIR/TABLE.png again from OUT_DIR/TABLE.json (no "
                  "training; needs --out_dir): the committed figures after a plotting change.")
flags.DEFINE_bool("commit", False, "git-commit each trained point's record "
                  "(POINTS_DIR/TABLE/points/<point>.json) as it lands.")
flags.DEFINE_string("points_dir", None, "Where the trained points' records go: "
                    "POINTS_DIR/TABLE/points/ (default: --out_dir's).")
flags.mark_flag_as_required("table")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
    jax.config.update("jax_compilation_cache_dir", str(Path(FLAGS.workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    tables = tuple(TABLES) if FLAGS.table == "all" else (FLAGS.table,)
    if FLAGS.redraw:
        if FLAGS.out_dir is None:
            raise app.UsageError("--redraw needs --out_dir (the directory of the tables' JSON).")
        for table in tables:
            if TABLES[table].plot is not None:
                try:
                    print(runner.redraw(TABLES[table], FLAGS.out_dir))
                except ValueError as e:
                    sys.exit(f"error: {e}")
        return
    command = harness.command_line("experiments.reproduce")
    out_dir = harness.output_dir(FLAGS.table, FLAGS.out_dir)  # one directory for --table=all
    try:
        seeds = None if FLAGS.seeds is None else [int(seed) for seed in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: expected integers, e.g. "
                             f"--seeds=1,2.") from None
    for table in tables:
        try:
            reproduce(table, FLAGS.budget, out_dir, FLAGS.presets, FLAGS.workdir, command,
                      FLAGS.commit, FLAGS.points_dir, seeds)
        except training.USER_ERRORS as e:  # one line, no traceback
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
