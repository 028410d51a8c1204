"""Reproduces the experiments of the B'MOJO paper at small scale (docs/design.md section 7).

    python -m experiments.reproduce --table=synthetic [--budget=full] [--out_dir=results]
    python -m experiments.reproduce --table=mqar_memory
    python -m experiments.reproduce --table=lm
    python -m experiments.reproduce --table=inference
    python -m experiments.reproduce --table=length
    python -m experiments.reproduce --table=all --budget=tiny  # smoke test
    python -m experiments.reproduce --table=all --out_dir=results --redraw  # figures only

Each table writes OUT_DIR/NAME.md (the table, the exact command, the commit, the settings, seeds,
parameter counts, wall times and the machine), OUT_DIR/NAME.json (every run, machine-readable)
and, where a figure is natural, OUT_DIR/NAME.png. OUT_DIR defaults to a new
runs/NAME-YYYYmmdd-HHMMSS/ (runs/all-... for --table=all); only an explicit --out_dir=results
replaces the committed results. `--redraw` only draws the figures again from the JSON files of
--out_dir (after a change of the plotting code; nothing trains).

One module per table (its budgets, run, markdown and figure): `synthetic`, `mqar_memory`, `lm`,
`inference`, `length`; the machinery they share (training points, provenance, files) is `runner`.
Budgets: `tiny` (seconds per table: the tests) and `full` (the committed results, minutes per
table on 2 CPU cores). Training goes through `training.train_and_evaluate`, one workdir per point
under --workdir, resumed when the command is rerun.
"""

from __future__ import annotations

from typing import Optional

from experiments.reproduce import inference, length, lm, mqar_memory, runner, synthetic

TABLES = {table.NAME: table for table in (synthetic, mqar_memory, lm, inference, length)}
PRESETS = runner.PRESETS
BUDGETS = runner.BUDGETS


def reproduce(table: str, budget: str = "full", out_dir=None, presets=None, workdir=None,
              command: Optional[str] = None, commit: bool = False, points_dir=None,
              seeds=None) -> dict:
    """Runs one table (`runner.run_table`) and writes OUT_DIR/TABLE.{md,json[,png]}.

    Args:
      table: one of TABLES.
      budget, out_dir, presets, workdir, command, commit, points_dir, seeds: see
        `runner.run_table` (out_dir None: a new
        runs/TABLE-YYYYmmdd-HHMMSS/).

    Returns:
      The JSON object written.

    Raises:
      ValueError: an unknown table, budget, preset or seed.
    """
    if table not in TABLES:
        raise ValueError(f"table={table!r}: allowed values are {', '.join(TABLES)}.")
    return runner.run_table(TABLES[table], budget, out_dir, presets, workdir, command,
                            commit, points_dir, seeds)
