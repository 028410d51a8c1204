"""The machinery every reproduce table shares (docs/design.md section 7): one training point per
workdir, resumable; the table driver (provenance, JSON, markdown header, figure); prose generated
from config values.

A table is a module with:
    NAME, TITLE                 its file name (NAME.md, .json, .png) and its heading
    budgets()                   {"tiny": ConfigDict, "full": ConfigDict}: every setting of the table
    run(settings, presets, workdir) -> dict     the measurements (JSON-able)
    markdown(record, settings) -> str           the table and its prose, from the record
    plot(record, settings, path) or plot = None the figure (PNG)

Training points: `point_config` builds a training config from the library's `default_config` (the
optimizer's unset fields keep the library's defaults, and the prose quotes the values used);
`train_point` trains it with `training.train_and_evaluate` in its own workdir. Rerunning a table
resumes it: finished points are collected from their `point.json`, unfinished ones resume from
their latest checkpoint (the library's exact resume). Delete the workdir to retrain from scratch.
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

PRESETS = bj.PRESETS
TINY_PRESETS = ("swa", "bmojo")  # what the tiny budget runs when no presets are given
BUDGETS = ("tiny", "full")
DEFAULT_WORKDIR = Path("/tmp/bmojo_reproduce")
CHECKPOINT_EVERY = 100  # steps between checkpoints of a point (and its last step); our choice


# --------------------------------------------------------------------------------------------------
# Training points
# --------------------------------------------------------------------------------------------------


def point_config(preset: str, model: Mapping, settings, *, lr: float) -> ml_collections.ConfigDict:
    """The training config of one point: `training.default_config(preset)` with `model`'s fields,
    the peak learning rate `lr` and the settings' num_steps, batch_size, warmup_steps and seed;
    one validation pass at the end, no sample. The data fields are the caller's to set."""
    config = training.default_config(preset)
    config.model.update(**model)
    config.optimizer.update(lr=lr, warmup_steps=settings.warmup_steps)
    config.update(num_steps=settings.num_steps, batch_size=settings.batch_size,
                  eval_every=settings.num_steps, eval_batches=1,
                  checkpoint_every=min(CHECKPOINT_EVERY, settings.num_steps), max_to_keep=1,
                  log_every=max(1, min(25, settings.num_steps // 4)), seed=settings.seed)
    config.sample.max_new_tokens = 0
    return config


def train_point(config: ml_collections.ConfigDict, run_dir) -> dict:
    """Trains and evaluates one point in its own workdir `run_dir`, or collects it if it finished.

    RUN_DIR/point.json holds the config, the git commit of the first start and, once finished,
    the result.

    Returns:
      `training.train_and_evaluate`'s result (without the sample) plus "wall_s" (the invocation
      that finished it: compilation, training, evaluation), "tokens_per_s" (median over the logged
      training intervals; the compiling first step of each start is in none of them), "train_s"
      (steps trained * batch_size * seq_len / tokens_per_s: training time without compilation and
      evaluation; early stopping can end a run before num_steps) and "final_train_loss" (mean cross-entropy of the last logged interval, nats).

    Raises:
      ValueError: `run_dir` holds a point of another config, or files but no point.json.
    """
    run_dir = Path(run_dir)
    path = run_dir / "point.json"
    wanted = jsonable(config.to_dict())
    if path.exists():
        saved = json.loads(path.read_text())
        defaults = jsonable(training.default_config(config.model_preset).to_dict())
        changed = sorted(_differences(saved["config"], wanted, defaults))
        if changed:
            raise ValueError(f"{run_dir} holds a point of another config (fields {changed}); "
                             f"delete it or pass another --workdir.")
        if saved["result"] is not None:
            print(f"[runner] collected the finished point {run_dir} (trained at commit "
                  f"{saved['git_commit']})", flush=True)
            return saved["result"]
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} holds files but no point.json: not a point of this runner; "
                         f"delete it or pass another --workdir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    point = dict(config=wanted, git_commit=harness.git_commit(), result=None)
    path.write_text(json.dumps(point, indent=1) + "\n")
    tic = time.perf_counter()
    result = training.train_and_evaluate(config, run_dir)
    result["wall_s"] = time.perf_counter() - tic
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    # None: a record whose only step was a start's compiling first step (nothing timed)
    rates = [r["tokens_per_s"] for r in train if r["tokens_per_s"] is not None]
    rate = float(np.median(rates)) if rates else float("nan")
    result.update(tokens_per_s=rate,
                  train_s=result["step"] * config.batch_size * config.data.seq_len / rate,
                  final_train_loss=train[-1]["ce"])
    result.pop("sample", None)
    point["result"] = jsonable(result)
    path.write_text(json.dumps(point, indent=1) + "\n")
    return point["result"]


def _differences(saved, wanted, defaults, prefix=""):
    """Dotted names of the fields where two configs (JSON objects) differ. A field missing from
    `saved` (a point started before the field existed) differs only when `wanted` sets it to
    other than its default in `defaults` (the same tree): the default keeps the old behaviour."""
    if not (isinstance(saved, dict) and isinstance(wanted, dict)):
        return [prefix or "."] if saved != wanted else []
    defaults = defaults if isinstance(defaults, dict) else {}
    out = []
    for key in dict.fromkeys([*saved, *wanted]):
        if key not in saved and key in defaults and wanted.get(key) == defaults[key]:
            continue
        out += _differences(saved.get(key), wanted.get(key), defaults.get(key),
                            f"{prefix}.{key}" if prefix else key)
    return out


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


def jsonable(x):
    """`x` with ConfigDicts, tuples and numpy scalars turned into JSON types (keys to str)."""
    if isinstance(x, ml_collections.ConfigDict):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x


# --------------------------------------------------------------------------------------------------
# The table driver
# --------------------------------------------------------------------------------------------------


def run_table(table, budget: str = "full", out_dir=None, presets=None, workdir=None,
              command: Optional[str] = None) -> dict:
    """Runs one table and writes OUT_DIR/NAME.md, NAME.json and (where the table has a figure)
    NAME.png.

    Args:
      table: a table module (see the module docstring).
      budget: "tiny" (seconds per table: the tests) or "full" (the committed results).
      out_dir: where the files go (created). None: a new runs/NAME-YYYYmmdd-HHMMSS/
        (`harness.output_dir`); only an explicit "results" writes the committed results.
      presets: the presets to run (None: all six; the tiny budget: TINY_PRESETS).
      workdir: the points' workdirs go under WORKDIR/NAME-BUDGET (None: DEFAULT_WORKDIR); rerunning
        resumes them (`train_point`).
      command: the command line to record (None: the `python -m experiments.reproduce` command
        equivalent to these arguments).

    Returns:
      The JSON object written.

    Raises:
      ValueError: an unknown budget or preset.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget={budget!r}: allowed values are {', '.join(BUDGETS)}.")
    presets = tuple(presets or (TINY_PRESETS if budget == "tiny" else PRESETS))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"presets {unknown}: allowed values are {', '.join(PRESETS)}.")
    settings = table.budgets()[budget]
    out_dir = harness.output_dir(table.NAME, out_dir)
    if command is None:
        args = [f"--table={table.NAME}", f"--budget={budget}", f"--out_dir={out_dir}"]
        args += [f"--presets={','.join(presets)}"] if presets else []
        args += [f"--workdir={workdir}"] if workdir else []
        command = "python -m experiments.reproduce " + " ".join(shlex.quote(a) for a in args)
    workdir = Path(workdir or DEFAULT_WORKDIR) / f"{table.NAME}-{budget}"
    workdir.mkdir(parents=True, exist_ok=True)
    meta = harness.provenance(command)
    tic = time.perf_counter()
    out = table.run(settings, presets, workdir)
    wall = time.perf_counter() - tic
    seed = settings.get("seed", 0)
    record = jsonable(dict(table=table.NAME, title=table.TITLE, **meta, budget=budget,
                           presets=list(presets), settings=settings,
                           seeds=dict(model_init_and_batch_order=seed, data=seed),
                           wall_seconds=wall, **out))
    header = (f"# {table.TITLE}\n\n" + "\n".join(harness.provenance_lines(record)) + "\n"
              f"Budget `{budget}`; wall time {wall / 60:.1f} min on a machine shared with other "
              f"jobs  \n"
              f"Seeds: model initialisation and batch order {seed}, data {seed} (synthetic sets: "
              f"train seed, valid seed+1, test seed+2)  \n"
              f"Presets: {', '.join(presets)}; raw numbers and every setting: "
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

