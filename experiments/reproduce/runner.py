"""The machinery every reproduce table shares (docs/design.md section 7): training points through
the sweep machinery (`experiments.sweep`: one workdir per point, resumable; learning rates x seeds,
best rate, mean +- std); the table driver (provenance, JSON, markdown header, figure); prose
generated from config values.

A table is a module with:
    NAME, TITLE                 its file name (NAME.md, .json, .png) and its heading
    budgets()                   {"tiny": ConfigDict, "full": ConfigDict}: every setting of the table
    run(settings, presets, workdir, points) -> dict     the measurements (JSON-able); points
                                (`sweep.Points`): where the trained points' records go
    markdown(record, settings) -> str           the table and its prose, from the record
    plot(record, settings, path) or plot = None the figure (PNG)

Training points: `point_config` builds a training config from the library's `default_config` (the
optimizer's unset fields keep the library's defaults, and the prose quotes the values used);
`run_setting` trains one setting (a preset or a table row) over the settings' learning rates
(`lrs`) and seeds (`seeds`: initialisation and batch order; the data's seed is `seed`) with
`sweep.run_setting`, each point in WORKDIR/<row>-lr<lr>-s<seed> (`sweep.train_point`), and
returns the best rate's mean +- std. Rerunning a table resumes it: finished points are collected
from their `point.json`, unfinished ones resume from their latest checkpoint (the library's exact
resume). Delete the workdir to retrain from scratch. Every trained point's record also goes to
OUT_DIR/NAME/points/ (or POINTS_DIR/NAME/points/; git-committed as it lands with `commit`: hours of training on a machine that
may stop lose nothing finished), and a rerun without the workdir (a fresh clone) collects the
committed records instead of training again.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Mapping, Optional

import ml_collections
import numpy as np

import bmojo_jax as bj
from benchmarks import harness
from bmojo_jax import training
from experiments import sweep

PRESETS = bj.PRESETS
TINY_PRESETS = ("swa", "bmojo")  # what the tiny budget runs when no presets are given
BUDGETS = ("tiny", "full")
DEFAULT_WORKDIR = Path("/tmp/bmojo_reproduce")
CHECKPOINT_EVERY = 100  # steps between checkpoints of a point (and its last step); our choice


# --------------------------------------------------------------------------------------------------
# Training points
# --------------------------------------------------------------------------------------------------


def point_config(preset: str, model: Mapping, settings) -> ml_collections.ConfigDict:
    """The training config of one row: `training.default_config(preset)` with `model`'s fields
    and the settings' num_steps, batch_size and warmup_steps; one validation pass at the end, no
    sample. The data fields are the caller's to set; `sweep.run_setting` sets each point's
    learning rate and seed."""
    config = training.default_config(preset)
    config.model.update(**model)
    config.optimizer.update(warmup_steps=settings.warmup_steps)
    config.update(num_steps=settings.num_steps, batch_size=settings.batch_size,
                  eval_every=settings.num_steps, eval_batches=1,
                  checkpoint_every=min(CHECKPOINT_EVERY, settings.num_steps), max_to_keep=1,
                  log_every=max(1, min(25, settings.num_steps // 4)))
    config.sample.max_new_tokens = 0
    return config


def until_converged(config: ml_collections.ConfigDict, settings) -> ml_collections.ConfigDict:
    """A text point trained to convergence (docs/design.md section 7b): a validation pass over the
    whole split every `settings.eval_every` steps, and a stop once `settings.patience` passes in a
    row have not improved the best validation perplexity by more than `settings.min_delta`
    (relative), or at num_steps (the cap). Returns `config`, changed in place."""
    config.update(eval_every=settings.eval_every, eval_batches=0)
    config.early_stop.update(metric="perplexity", patience=settings.patience,
                             min_delta=settings.min_delta)
    return config


def seeds_of(preset: str, settings) -> tuple:
    """The seeds a preset runs: all of `settings.seeds` for the headline presets
    (`settings.headline`; every preset where a table has none), the first alone for the others
    (our choice, to fit the budget: the claims compare the headline rows); only those in
    `settings.only_seeds` where it is set (`run_table`'s `seeds`: one part of a table on one
    core or machine).

    Raises:
      ValueError: `only_seeds` leaves the preset no seed to run.
    """
    headline = settings.get("headline")
    seeds = tuple(settings.seeds if headline is None or preset in headline
                  else settings.seeds[:1])
    only = settings.get("only_seeds")
    if only is None:
        return seeds
    chosen = tuple(seed for seed in seeds if seed in only)
    if not chosen:
        raise ValueError(f"seeds={list(only)} leaves {preset} nothing to run: this table runs "
                         f"it with seed(s) {list(seeds)}.")
    return chosen


def tune_then_seeds(get_config, arg: str, lrs, seeds, root: Path, **kwargs) -> dict:
    """`sweep.run_setting` with the learning rate tuned on the first seed alone: the grid `lrs` x
    seeds[:1], then every seed at the grid's best rate (our choice, for tables whose points take
    an hour each: a grid over every seed would triple their cost).

    Args:
      get_config, arg, root, kwargs: as in `sweep.run_setting`.
      lrs: the grid, in the order tried; seeds: the seeds of the row (the first tunes).

    Returns:
      The second `run_setting` row (its best rate is the grid's), with "by_lr" (the first seed's
      final validation metric at every rate) and "records" (every point trained, the grid's
      other rates included) of both calls.
    """
    grid = sweep.run_setting(get_config, arg, lrs, seeds[:1], root, **kwargs)
    row = sweep.run_setting(get_config, arg, [grid["lr"]], seeds, root, **kwargs)
    others = [r for r in grid["records"] if r["lr"] != grid["lr"]]
    return dict(row, by_lr=grid["by_lr"], records=others + row["records"])


def late_gain(curve, fraction: float = 0.1) -> Optional[float]:
    """How much a text point was still improving when it stopped: 1 - (final validation
    perplexity) / (the last one evaluated at or before (1 - fraction) x its final step), e.g.
    0.017 for 107.5 -> 105.7 (docs/design.md section 7b: converged is < 1% over the last 10% of
    steps). `curve`: the point's "valid_curve" ([[step, perplexity], ...]); None when it is
    missing (a point trained before the curve was recorded) or has no evaluation that early."""
    if not curve:
        return None
    final_step, final = curve[-1]
    before = [value for step, value in curve if step <= (1 - fraction) * final_step]
    return float(1 - final / before[-1]) if before else None


def row_stats(row: Mapping, metric: str) -> dict:
    """The JSON of one table row from a `sweep.run_setting` row (a setting over learning rates x
    seeds), at its best learning rate.

    Args:
      row: `sweep.run_setting`'s return value.
      metric: the result's metric ("accuracy" or "perplexity").

    Returns:
      {"lr" (the best rate), "lr_grid" ({lr: the mean final validation metric that chose it:
       accuracy, or loss for text; `sweep.summarize`'s "by_lr"}), "seeds", "params",
       "valid_<metric>" and "test_<metric>" (means over the seeds), "valid_<metric>_std" and
       "test_<metric>_std" (population std, ddof 0), "test_<metric>_values" (per seed), "steps"
       (per seed), "steps_to_90" (per seed: the first evaluated step at >= 90% validation
       accuracy, None if never or not evaluated), "wall_s" (the row's points together: every rate and seed), "tokens_per_s"
       (median over the best rate's seeds), "train_s" (their mean), "final_train_loss" (their
       mean, nats)}; for perplexity also "late_gain" (per seed: `late_gain`).
    """
    best = row["best"]
    out = dict(lr=row["lr"], seeds=[r["seed"] for r in best],
               lr_grid={f"{lr:g}": value for lr, value in row["by_lr"].items()},
               params=best[0]["result"]["params"], steps=[r["result"]["step"] for r in best],
               steps_to_90=[r["result"].get("steps_to_0.9") for r in best],
               wall_s=float(sum(r["result"]["wall_s"] for r in row["records"])),
               tokens_per_s=float(np.median([r["result"]["tokens_per_s"] for r in best])),
               train_s=float(np.mean([r["result"]["train_s"] for r in best])),
               final_train_loss=float(np.mean([r["result"]["final_train_loss"] for r in best])))
    if metric == "perplexity":
        out["late_gain"] = [late_gain(r["result"].get("valid_curve")) for r in best]
    for split in ("valid", "test"):
        values = [float(r["result"][split][metric]) for r in best]
        out.update({f"{split}_{metric}": float(np.mean(values)),
                    f"{split}_{metric}_std": float(np.std(values))})
        if split == "test":
            out[f"test_{metric}_values"] = values
    return out


def mean_std(row: Mapping, key: str, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    """"m +- s" of a `row_stats` value `key` over its seeds ("m" for one seed, or for a row
    without a std: a table made before the seeds), each times `scale`."""
    mean = fmt.format(scale * row[key])
    if len(row.get("seeds", ())) < 2:
        return mean
    return f"{mean} +- {fmt.format(scale * row[key + '_std'])}"


def seeds_run(settings) -> list:
    """The seeds this run of a table trains: `settings.only_seeds` where set (`run_table`'s
    `seeds`), else all of the budget's `settings.seeds` ([] for a table that trains nothing)."""
    return list(settings.get("only_seeds") or settings.get("seeds", ()))


def describe_seeds(settings) -> str:
    """`seeds_run` as prose: "0, 1, 2"."""
    return ", ".join(map(str, seeds_run(settings)))


def describe_headline_seeds(settings, presets) -> str:
    """Prose for the seeds of a table with headline presets: "seeds 0, 1, 2 for transformer,
    bmojo (perplexities: mean +- std over them)", then ", seed 0 for the others" where `presets`
    (those the table's run trained) hold others (`seeds_of`: they run the first seed alone)."""
    seeds = "seed" if len(seeds_run(settings)) == 1 else "seeds"
    text = (f"{seeds} {describe_seeds(settings)} for {', '.join(settings.headline)} "
            f"(perplexities: mean +- std over them)")
    if any(p not in settings.headline for p in presets):
        text += f", seed {settings.seeds[0]} for the others"
    return text


def describe_lrs(lrs, metric: str) -> str:
    """Prose for a table's learning rates: "peak lr 0.003 (one rate; no grid)" or "peak lr the
    best of 0.001, 0.003 by METRIC"."""
    if len(lrs) == 1:
        return f"peak lr {lrs[0]:g} (one rate; no grid)"
    return f"peak lr the best of {', '.join(f'{lr:g}' for lr in lrs)} by {metric}"


def describe_optimizer(optimizer: Mapping, num_steps: int) -> str:
    """Prose for a training config's `optimizer` fields (all but the peak lr, which the tables
    state), e.g. "AdamW (b1 0.9, b2 0.95, eps 1e-08, weight decay 0.1 on matrices only,
    global-norm clip 1), linear warmup over 20 steps, then cosine decay to 0.1 x peak lr at step
    400"."""
    o = optimizer
    warmup = f"{o['warmup_steps']} step" + ("" if o["warmup_steps"] == 1 else "s")
    schedule = (f"then cosine decay to {o['min_lr_ratio']:g} x peak lr at step {num_steps}"
                if o["schedule"] == "cosine" else "then constant")
    return (f"AdamW (b1 {o['b1']:g}, b2 {o['b2']:g}, eps {o['eps']:g}, weight decay "
            f"{o['weight_decay']:g} on matrices only, global-norm clip {o['clip_norm']:g}), "
            f"linear warmup over {warmup}, {schedule}")


def describe(values: Mapping) -> str:
    """"k=v, k=v" of a mapping (model overrides and task arguments in the prose)."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


# --------------------------------------------------------------------------------------------------
# The table driver
# --------------------------------------------------------------------------------------------------


def run_table(table, budget: str = "full", out_dir=None, presets=None, workdir=None,
              command: Optional[str] = None, commit: bool = False, points_dir=None,
              seeds=None) -> dict:
    """Runs one table and writes OUT_DIR/NAME.md, NAME.json and (where the table has a figure)
    NAME.png.

    Args:
      table: a table module (see the module docstring).
      budget: "tiny" (seconds per table: the tests) or "full" (the committed results).
      out_dir: where the files go (created). None: a new runs/NAME-YYYYmmdd-HHMMSS/
        (`harness.output_dir`); only an explicit "results" writes the committed results.
      presets: the presets to run (None: all six; the tiny budget: TINY_PRESETS).
      workdir: the points' workdirs go under WORKDIR/NAME-BUDGET (None: DEFAULT_WORKDIR); rerunning
        resumes them (`run_setting`).
      command: the command line to record (None: the `python -m experiments.reproduce` command
        equivalent to these arguments).
      commit: git-commit each trained point's record (POINTS_DIR/NAME/points/...) as it lands.
      points_dir: where the points' records go, POINTS_DIR/NAME/points/ (None: OUT_DIR); e.g. a
        subset of presets run on one core with --out_dir=runs/... --points_dir=results --commit
        adds its points to the committed ones without writing a partial table into results/.
      seeds: only these of the budget's seeds (None: all; `seeds_of`), e.g. one seed per core
        with --out_dir=runs/... --points_dir=results --commit, like a subset of presets.

    Returns:
      The JSON object written.

    Raises:
      ValueError: an unknown budget, preset or seed, or seeds that leave a preset none.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget={budget!r}: allowed values are {', '.join(BUDGETS)}.")
    presets = tuple(presets or (TINY_PRESETS if budget == "tiny" else PRESETS))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"presets {unknown}: allowed values are {', '.join(PRESETS)}.")
    settings = table.budgets()[budget]
    if seeds is not None:
        unknown = [seed for seed in seeds if seed not in settings.get("seeds", ())]
        if unknown:
            raise ValueError(f"seeds {unknown}: the {budget} budget of the {table.NAME} table "
                             f"runs seeds {list(settings.get('seeds', ()))}.")
        settings.only_seeds = tuple(seeds)
        for preset in presets:  # before anything trains
            seeds_of(preset, settings)
    out_dir = harness.output_dir(table.NAME, out_dir)
    if command is None:
        args = [f"--table={table.NAME}", f"--budget={budget}", f"--out_dir={out_dir}"]
        args += [f"--presets={','.join(presets)}"] if presets else []
        args += [f"--workdir={workdir}"] if workdir else []
        args += ["--commit"] if commit else []
        args += [f"--points_dir={points_dir}"] if points_dir else []
        args += [f"--seeds={','.join(map(str, seeds))}"] if seeds is not None else []
        command = "python -m experiments.reproduce " + " ".join(shlex.quote(a) for a in args)
    workdir = Path(workdir or DEFAULT_WORKDIR) / f"{table.NAME}-{budget}"
    workdir.mkdir(parents=True, exist_ok=True)
    meta = harness.provenance(command)
    tic = time.perf_counter()
    points = Path(points_dir or out_dir) / table.NAME / "points"
    out = table.run(settings, presets, workdir, sweep.Points(points, commit, command))
    wall = time.perf_counter() - tic
    seeds = seeds_run(settings)
    trained = dict(seeds=dict(model_init_and_batch_order=seeds, data=settings.seed)) if seeds \
        else {}
    record = sweep.jsonable(dict(table=table.NAME, title=table.TITLE, **meta, budget=budget,
                                 presets=list(presets), settings=settings, **trained,
                                 wall_seconds=wall, **out))
    header = (f"# {table.TITLE}\n\n" + "\n".join(harness.provenance_lines(record)) + "\n"
              f"Budget `{budget}`; wall time {wall / 60:.1f} min on a machine shared with other "
              f"jobs  \n")
    if seeds:
        header += (f"Seeds: model initialisation and batch order {', '.join(map(str, seeds))} "
                   f"(one run each; mean +- std over them), data {settings.seed} (synthetic "
                   f"sets: train seed, valid seed+1, test seed+2)  \n")
    header += (f"Presets: {', '.join(presets)}; raw numbers and every setting: "
               f"`{table.NAME}.json`\n\n")
    figure = ""
    if table.plot is not None:
        table.plot(record, settings, out_dir / f"{table.NAME}.png")
        figure = f"\n\n![{table.NAME}]({table.NAME}.png)\n"
    harness.write_report(out_dir / table.NAME, record,
                         header + table.markdown(record, settings) + figure + "\n")
    return record


def redraw(table, out_dir) -> Path:
    """Draws OUT_DIR/NAME.png again from OUT_DIR/NAME.json, training nothing: the committed figures
    after a change of the plotting code. The JSON and the markdown are left as they are.

    Returns:
      The PNG's path.

    Raises:
      ValueError: the table has no figure, or OUT_DIR/NAME.json is missing or holds another table.
    """
    path = Path(out_dir) / f"{table.NAME}.json"
    if table.plot is None:
        raise ValueError(f"--redraw: the table {table.NAME!r} has no figure.")
    if not path.is_file():
        raise ValueError(f"--redraw: {path} does not exist; run the table first (without --redraw).")
    record = json.loads(path.read_text())
    if record.get("table") != table.NAME:
        raise ValueError(f"--redraw: {path} holds the table {record.get('table')!r}, not "
                         f"{table.NAME!r}.")
    png = path.with_suffix(".png")
    table.plot(record, ml_collections.ConfigDict(record["settings"]), png)
    return png

