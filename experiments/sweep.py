"""Sweeps: one config file over its arguments (presets), learning rates, seeds and any other
config fields, from one command.

    python -m experiments.sweep --config=experiments/configs/mqar.py:bmojo \\
        --sweep="seed=0,1,2;optimizer.lr=1e-3,3e-3"
    python -m experiments.sweep --config=experiments/configs/mqar_far.py \\
        --args=transformer,swa,bmojo_oracle --lrs=1e-3,3e-3,1e-2 --seeds=0 \\
        --root=workdir/sweeps/mqar_far --out=runs/mqar_far

The grid is the product of the arguments of get_config (`--args`, or the ARG of --config=PATH:ARG)
and the values of `--sweep` ("FIELD=V1,V2;FIELD=V1,..."; dotted config fields, Python literals),
where `seed` and `optimizer.lr` are the same axes as `--seeds` and `--lrs`. `--set FIELD=VALUE`
fixes a field for every point. Every field is checked before anything trains (an unknown one gets
"did you mean"), and so is every point's config.

Every point trains in its own workdir ROOT/<point> (default ROOT: runs/sweeps/<config file
stem>); a rerun of the same command resumes unfinished points and collects finished ones
(`train_point`). Points are named <arg>-lr<lr>-s<seed>, followed by
-<field>=<value> for every other `--sweep` field. Once finished, a point writes OUT/<point>.json:
the point, its config, the result of `training.train_and_evaluate`, the git commit, the machine
and the command (and "fields", the other `--sweep` fields, when there are any). With `--commit`,
each point's JSON is committed to git as it lands (long sweeps on a machine that may stop: nothing
finished is lost).

The aggregated table (`summarize`, `markdown`): per argument (and values of the other fields),
the best learning rate (by the mean final validation accuracy over seeds, or the lowest mean
validation loss for text) and the mean +- std over seeds at that rate, with the eidetic
diagnostics (`bmojo_jax.diagnostics`: selection recall, slot precision, attention mass on the
slots) of every MQAR point that has `B` layers, measured on its final checkpoint (in ROOT) and one
validation batch, and that checkpoint's validation accuracy with its own selection rule and with
the oracle's scores and with no slot (`diagnostics.accuracy_by_selection`: selection vs use). A
sweep writes it at the end, for every point in OUT (its own and those of earlier sweeps into the
same OUT), to `--markdown` (default OUT/summary.md) and prints it; `--summary` only summarizes
the finished points in OUT of the given arguments (JSON on stdout; the table with
`--markdown=PATH`).

Points run in the order given; several sweeps can run side by side on one machine (e.g. pinned
to one core each with `taskset -c N`).

The same functions train the reproduce tables' points (`experiments.reproduce`): `train_point`
(one workdir, resumable), `run_point` (a point of a config function), `run_setting` (a setting's
learning rates x seeds and its best rate) and `summarize`.
"""

from __future__ import annotations

import ast
import copy
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import ml_collections
import numpy as np
from absl import app, flags, logging

from bmojo_jax import data as data_lib
from bmojo_jax import diagnostics, training
from benchmarks import harness
from experiments.config_fields import load_config_module, unknown_field

FLAGS = flags.FLAGS



def train_point(config: ml_collections.ConfigDict, run_dir) -> dict:
    """Trains and evaluates one point in its own workdir `run_dir`, or collects it if it finished.

    RUN_DIR/point.json holds the config, the git commit of the first start and, once finished,
    the result.

    Returns:
      `training.train_and_evaluate`'s result (without the sample) plus "wall_s" (the invocation
      that finished it: compilation, training, evaluation), "tokens_per_s" (median over the logged
      training intervals; the compiling first step of each start is in none of them), "train_s"
      (steps trained * batch_size * seq_len / tokens_per_s: training time without compilation and
      evaluation; early stopping can end a run before num_steps), "final_train_loss" (mean
      cross-entropy of the last logged interval, nats) and "valid_curve" ([[step, perplexity or
      accuracy], ...]: every validation evaluation of the run, in step order).

    Raises:
      ValueError: `run_dir` holds a point of another config, or files but no point.json.
    """
    run_dir = Path(run_dir)
    path = run_dir / "point.json"
    wanted = jsonable(config.to_dict())
    if path.exists():
        saved = json.loads(path.read_text())
        changed = config_changes(saved["config"], config)
        if changed:
            raise ValueError(f"{run_dir} holds a point of another config (fields {changed}); "
                             f"delete it or pass another --workdir.")
        if saved["result"] is not None:
            print(f"[sweep] collected the finished point {run_dir} (trained at commit "
                  f"{saved['git_commit']})", flush=True)
            return saved["result"]
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} holds files but no point.json: not a training point; "
                         f"delete it or pass another --workdir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    point = dict(config=wanted, git_commit=harness.git_commit(), result=None)
    path.write_text(json.dumps(point, indent=1) + "\n")
    tic = time.perf_counter()
    result = training.train_and_evaluate(config, run_dir)
    result["wall_s"] = time.perf_counter() - tic
    records = training.read_records(run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    # None: a record whose only step was a start's compiling first step (nothing timed)
    rates = [r["tokens_per_s"] for r in train if r["tokens_per_s"] is not None]
    rate = float(np.median(rates)) if rates else float("nan")
    result.update(tokens_per_s=rate,
                  train_s=result["step"] * config.batch_size * config.data.seq_len / rate,
                  final_train_loss=train[-1]["ce"], valid_curve=valid_curve(records))
    result.pop("sample", None)
    point["result"] = jsonable(result)
    path.write_text(json.dumps(point, indent=1) + "\n")
    return point["result"]


def valid_curve(records) -> list:
    """[[step, value], ...] of the validation records of a run's metrics.jsonl (`records`:
    `training.read_records`), the final evaluation included: perplexity for text, accuracy for
    synthetic tasks; the last record of a step wins (the final one, or a resumed run's repeat)."""
    curve = {}
    for r in records:
        if r["split"] in ("valid", "valid_final"):
            curve[r["step"]] = r["perplexity"] if "perplexity" in r else r["accuracy"]
    return [[step, value] for step, value in sorted(curve.items())]


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Sorted dotted names of the fields where a saved point's config (JSON) differs from
    `config`. A field the saved config lacks (a point trained before the field existed) differs
    only when `config` sets it to other than its default: the default keeps the old behaviour."""
    defaults = jsonable(training.default_config(config.model_preset).to_dict())
    wanted = json.loads(json.dumps(jsonable(config.to_dict())))  # as a JSON file reads back
    return sorted(_differences(saved, wanted, defaults))


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


def point_name(arg: str, lr: float, seed: int, fields: dict | None = None) -> str:
    """<arg>-lr<lr>-s<seed>, then -<field>=<value> for each of `fields` (the other swept
    fields; a "/" in a value becomes "_")."""
    extra = "".join(f"-{field}={_text(value)}".replace("/", "_")
                    for field, value in (fields or {}).items())
    return f"{arg}-lr{lr:g}-s{seed}{extra}"


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def literal(text: str):
    """A Python literal, or the text itself (a string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_field(config, field: str, value, source: str) -> None:
    """config.<field> = value for a dotted field.

    Raises:
      ValueError: no such field ("did you mean"), or a value of the wrong type; the message
        starts with `source` (e.g. "--set 'num_steps=x'").
    """
    message = unknown_field(config, field)
    if message:
        raise ValueError(f"{source}: {message}")
    *parents, name = field.split(".")
    node = config
    for key in parents:
        node = node[key]
    try:
        node[name] = value
    except TypeError as e:
        raise ValueError(f"{source}: {value!r} does not fit config.{field} "
                         f"({node.get_type(name).__name__}): {e}") from None


def apply_overrides(config, overrides: list[str]):
    """config with FIELD=VALUE overrides applied (dotted fields; VALUE a Python literal, or a
    string).

    Raises:
      ValueError: an override without "=", a field the config does not have, or a value of the
        wrong type.
    """
    for item in overrides:
        field, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: must be FIELD=VALUE.")
        set_field(config, field, literal(text), f"--set {item!r}")
    return config


def parse_sweep(text: str | None) -> dict:
    """{field: [values]} of a --sweep value "FIELD=V1,V2;FIELD=V1,..." (values Python literals,
    or strings, without "," or ";": a tuple value goes through --set), in the order given; {}
    for None or "".

    Raises:
      ValueError: a part without "=" or without values, or a field given twice.
    """
    grid = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        field, sep, values = part.partition("=")
        field = field.strip()
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not field or not values:
            raise ValueError(f"--sweep: {part!r} must be FIELD=V1,V2,... (parts separated by ';').")
        if field in grid:
            raise ValueError(f"--sweep: the field {field!r} is given twice.")
        grid[field] = [literal(v) for v in values]
    return grid


def grid_points(args, lrs, seeds, fields: dict):
    """The points (arg, lr, seed, {field: value}) of a grid in sweep order: arguments, the other
    fields' values ({field: [values]}), learning rates ([None]: the config's), then seeds (the
    seeds of one setting run one after another)."""
    names = list(fields)
    for arg, *values in itertools.product(args, *fields.values()):
        for lr, seed in itertools.product(lrs, seeds):
            yield arg, lr, seed, dict(zip(names, values))


def point_config(get_config, arg: str, lr, seed: int, overrides=(), fields: dict | None = None):
    """(point name, training config) of a point: `get_config(arg)` (a config file's get_config,
    or a reproduce table's), the --set `overrides`, the other swept `fields`, the learning rate
    (None: the config's) and the seed.

    Raises:
      ValueError: an override or swept value that does not fit the config.
    """
    fields = fields or {}
    config = apply_overrides(get_config(arg), list(overrides))
    for field, value in fields.items():
        set_field(config, field, copy.deepcopy(value), f"--sweep {field}={value!r}")
    if lr is not None:
        set_field(config, "optimizer.lr", lr, f"learning rate {lr!r}")
    set_field(config, "seed", seed, f"seed {seed!r}")
    return point_name(arg, config.optimizer.lr, seed, fields), config


def check_points(get_config, points, overrides) -> None:
    """Builds and validates every point's config (`point_config`, `training.validate_config`)
    before anything trains.

    Raises:
      ValueError: the first bad point (its name and the field).
    """
    for arg, lr, seed, fields in points:
        name, config = point_config(get_config, arg, lr, seed, overrides, fields)
        try:
            training.validate_config(config)
        except ValueError as e:
            raise ValueError(f"point {name}: {e}") from None


class Points(NamedTuple):
    """Where finished points' records go: OUT/<point>.json, git-committed as each lands when
    `commit` (long runs on a machine that may stop: nothing finished is lost), recording
    `command` (the command line that trains them)."""
    out: Path
    commit: bool = False
    command: str = ""


def run_point(get_config, arg: str, lr, seed: int, root: Path, points: Points | None = None,
              overrides: list[str] = (), fields: dict | None = None, evaluate=None) -> dict:
    """Trains (or collects) one point in ROOT/<point> and returns its record: the point's name,
    arg, lr, seed, config, result (`train_point`), the other swept `fields` when there are any,
    and "evaluation" with `evaluate`. With `points`, the record also gets the git commit, the
    machine and the command and is written to OUT/<point>.json (committed with `points.commit`).
    A rerun that finds the point's workdir finished returns the record already in OUT untouched
    (its provenance is the run's that trained it); so does a rerun on a machine without the
    workdir (a fresh clone: the committed record is the point, nothing retrains).

    `evaluate`: None, or a function of the finished point's workdir that returns what a table
    measures on its final checkpoint beyond the result (JSON-able), kept in the record as
    "evaluation" so that it is committed with it (our choice: a fresh clone has it without the
    workdir). A committed record without one gets it from the workdir, added with
    "evaluation_git_commit"; where the workdir is gone too, the point trains again.

    Raises:
      ValueError: OUT/<point>.json records another config (a different --set, say) for the same
        point name (before any training).
    """
    name, config = point_config(get_config, arg, lr, seed, overrides, fields)
    as_json = lambda x: json.loads(json.dumps(x))  # noqa: E731  (as a JSON file reads back)
    path = None if points is None else points.out / f"{name}.json"
    kept = json.loads(path.read_text()) if path is not None and path.exists() else None
    changed = [] if kept is None else config_changes(kept.get("config", {}), config)
    if changed:
        raise ValueError(f"{path} holds point {name} trained with another config (fields "
                         f"{changed}): rerun with the config it records, or give another --out.")
    complete = kept is not None and (evaluate is None or "evaluation" in kept)
    if kept is not None and not (root / name / "point.json").exists():
        if complete:
            print(f"[sweep] collected the committed point {path} (no workdir {root / name})",
                  flush=True)
            return kept
        print(f"[sweep] {path} has no evaluation and there is no workdir {root / name} to "
              f"evaluate: training the point again", flush=True)
    tic = time.time()
    result = train_point(config, root / name)
    if kept is not None and kept.get("result") == as_json(result):  # a rerun of a finished point
        if complete:
            return kept  # the committed record stays as it is
        kept.update(evaluation=as_json(evaluate(root / name)),
                    evaluation_git_commit=harness.git_commit())
        _save(path, kept, f"sweep point {name}: its evaluation added" if points.commit else None)
        return kept
    record = dict(point=name, arg=arg, lr=config.optimizer.lr, seed=seed,
                  config=jsonable(config.to_dict()), result=result)
    if fields:
        record["fields"] = jsonable(fields)
    if evaluate is not None:
        record["evaluation"] = as_json(evaluate(root / name))
    if points is None:
        return record
    record.update(git_commit=harness.git_commit(), machine=harness.machine(),
                  command=points.command,
                  finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  collect_s=time.time() - tic)
    _save(path, record, f"sweep point {name}: {_headline(result)}" if points.commit else None)
    return record


def _save(path: Path, record: dict, commit_message: str | None) -> None:
    """Writes a point's record to PATH, and git-commits it with `commit_message` unless None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    if commit_message is not None:
        _commit(path, commit_message)


def run_setting(get_config, arg: str, lrs, seeds, root: Path, *, stop_above=None,
                log: str = "sweep", points: Points | None = None, overrides: list[str] = (),
                fields: dict | None = None, evaluate=None) -> dict:
    """Every point of one setting (one argument of `get_config`, learning rates x seeds) in
    ROOT/<point>, then its `summarize` row: the best learning rate and the mean +- std over the
    seeds. The reproduce tables run their grids through this.

    Args:
      get_config: arg -> training config (`ml_collections.ConfigDict`).
      lrs: peak learning rates, in the order tried; seeds: `config.seed` values (initialisation
        and batch order; the data's seed is the config's).
      stop_above: the remaining learning rates are skipped once one reaches this mean final
        validation accuracy over the seeds (None: never; our choice, to fit a budget: the grid's
        best cannot get much better).
      log: the prefix of the progress lines printed.
      points, overrides, fields: `run_point`'s (where the records go, the "FIELD=VALUE" --set,
        the other swept fields).
      evaluate: `run_point`'s, applied to the best rate's points only (our choice: a table
        reads the evaluation of those alone, so the other rates' points never train again for
        one on a machine without their workdirs). With one rate it is the best from the start,
        and each point is evaluated as it lands, so that its committed record is complete
        before the next point trains (a stop between points loses no evaluation); with several,
        once the grid is done. A point that trains again for it can change its result: the row
        is then summarised again, and if its best rate moves, the new best rate's points are
        evaluated in turn.

    Returns:
      The `summarize` row plus "records" (every point's record, in training order) and "best"
      (the best rate's records, one per seed, with "evaluation" when `evaluate` is given).
    """
    records = []
    eager = evaluate if len(lrs) == 1 else None  # the only rate is the best one
    for lr in lrs:
        mine = [run_point(get_config, arg, lr, seed, root, points, overrides, fields, eager)
                for seed in seeds]
        for r in mine:
            print(f"[{log}] {r['point']}: {_headline(r['result'])} "
                  f"({r['result']['wall_s']:.0f} s)", flush=True)
        records += mine
        valid = [r["result"]["valid"] for r in mine]
        if stop_above is not None and "accuracy" in valid[0] and \
                np.mean([v["accuracy"] for v in valid]) >= stop_above:
            break
    while True:  # a point trained again for its evaluation may change the row, its best rate too
        row, = summarize(records).values()
        best = [r for r in records if r["lr"] == row["lr"]]
        if evaluate is None or all("evaluation" in r for r in best):
            return dict(row, records=records, best=best)
        evaluated = {r["point"]: run_point(get_config, arg, r["lr"], r["seed"], root, points,
                                           overrides, fields, evaluate) for r in best}
        records = [evaluated.get(r["point"], r) for r in records]


def _headline(result: dict) -> str:
    valid = result["valid"]
    key = "accuracy" if "accuracy" in valid else "perplexity"
    return f"valid {key} {valid[key]:.4g} at step {result['step']} ({result['stop_reason']})"


def _commit(path: Path, message: str, attempts: int = 20) -> None:
    """git add + commit of one file in the repository that holds it, retried while another
    process holds the index lock."""
    git = ["git", "-C", str(path.parent.resolve())]
    for _ in range(attempts):
        done = subprocess.run(git + ["add", path.name], capture_output=True).returncode == 0 and \
            subprocess.run(git + ["commit", "-q", "-m", message, "--", path.name],
                           capture_output=True).returncode == 0
        if done:
            return
        time.sleep(3)
    print(f"[sweep] could not commit {path} (git busy?); it is on disk", file=sys.stderr)


def setting_label(arg: str, fields: dict | None) -> str:
    """The name of a setting (the points that differ only in lr and seed): "<arg>" or
    "<arg> field=value ..."."""
    return " ".join([arg] + [f"{k}={_text(v)}" for k, v in (fields or {}).items()])


def summarize(records: list[dict]) -> dict:
    """Per setting (argument and the other swept fields): the best learning rate and the mean +-
    std over its seeds.

    The best rate has the highest mean final validation accuracy (synthetic tasks; ties: fewer
    steps) or the lowest mean validation loss (text). std is the population standard deviation
    (ddof 0; 0 for one seed).

    Returns:
      {setting_label: {"arg", "fields", "lr", "seeds", "points" (their names), "metric", "mean",
       "std", "steps_to_0.9" (list, None = never), "steps", "by_lr": {lr: mean}}}, in the order
      of the records' first appearance.
    """
    groups = {}
    for r in records:
        groups.setdefault(setting_label(r["arg"], r.get("fields")), []).append(r)
    summary = {}
    for label, group in groups.items():
        accuracy = "accuracy" in group[0]["result"]["valid"]
        metric = "accuracy" if accuracy else "loss"
        by_lr = {}
        for r in group:
            by_lr.setdefault(r["lr"], []).append(r)

        def score(lr):
            values = [r["result"]["valid"][metric] for r in by_lr[lr]]
            steps = np.mean([r["result"]["step"] for r in by_lr[lr]])
            return (np.mean(values) if accuracy else -np.mean(values), -steps)

        best = max(by_lr, key=score)
        values = [r["result"]["valid"][metric] for r in by_lr[best]]
        summary[label] = dict(
            arg=group[0]["arg"], fields=group[0].get("fields", {}), lr=best,
            seeds=[r["seed"] for r in by_lr[best]], points=[r["point"] for r in by_lr[best]],
            metric=metric, mean=float(np.mean(values)), std=float(np.std(values)),
            steps=[r["result"]["step"] for r in by_lr[best]],
            **{"steps_to_0.9": [r["result"].get("steps_to_0.9") for r in by_lr[best]]},
            by_lr={lr: float(np.mean([r["result"]["valid"][metric] for r in rs]))
                   for lr, rs in sorted(by_lr.items())})
    return summary


def point_diagnostics(workdir: Path):
    """The eidetic diagnostics of a finished MQAR point's final checkpoint on its first validation
    batch, and its validation accuracy with its own selection rule, with the oracle's scores and
    with no slot (`diagnostics.accuracy_by_selection`, whole split); None when it has no `B`
    layers (or is not MQAR).

    Returns:
      {"selection_recall", "slot_precision", "recall_ceiling", "window_mass", "fading_mass",
       "eidetic_mass": means over the `B` layers (the masses: the queries' softmax weight on each
       kind of key), f"layer{i}_{name}" for each of those but the ceiling: the `B` layer i's own,
       "accuracy_own", "accuracy_oracle", "accuracy_no_slots"}: floats.
    """
    model, config, _ = training.load_model(workdir)
    if config.data.name != "mqar" or "B" not in model.config.layer_mixers:
        return None
    data = data_lib.load_data(config)
    inputs, targets = data.eval_batches("valid", config.batch_size, config.data.seq_len)[0]
    scores = training.context_scores(np.asarray(inputs), training.oracle_length(config))
    layers = diagnostics.eidetic_diagnostics(model, inputs, targets,
                                             training.context_length(config),
                                             eidetic_scores=scores)
    per_layer = {layer: dict(selection_recall=d["selection_recall"],
                             slot_precision=d["slot_precision"],
                             **{f"{kind}_mass": d["attention_mass"][kind]
                                for kind in ("window", "fading", "eidetic")})
                 for layer, d in layers.items()}
    swapped = diagnostics.accuracy_by_selection(
        model, data.eval_batches("valid", config.batch_size, config.data.seq_len),
        training.context_length(config))
    names = next(iter(per_layer.values()))
    return dict(**{name: float(np.mean([d[name] for d in per_layer.values()])) for name in names},
                recall_ceiling=float(np.mean([d["recall_ceiling"] for d in layers.values()])),
                **{f"layer{layer}_{name}": float(value) for layer, d in per_layer.items()
                   for name, value in d.items()},
                accuracy_own=swapped["own"], accuracy_oracle=swapped["oracle"],
                accuracy_no_slots=swapped["no_slots"])


def markdown(summary: dict, root: Path) -> str:
    """The summary as a markdown table and its caption (diagnostics of the best learning rate's
    first seed, from its workdir under `root`)."""
    metric = next(iter(summary.values()))["metric"] if summary else "accuracy"
    lines = [f"| config | best lr | valid {metric} (mean +- std) | seeds | steps | steps to 90% | "
             "selection recall | slot precision | attention on slots | accuracy: own rule / "
             "oracle scores / no slots | lr grid (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in summary.items():
        workdir = root / row["points"][0]
        diag = point_diagnostics(workdir) if (workdir / "checkpoints").is_dir() else None
        cells = ("-", "-", "-", "-") if diag is None else (
            f"{diag['selection_recall']:.2f} (ceiling {diag['recall_ceiling']:.2f})",
            f"{diag['slot_precision']:.2f}", f"{diag['eidetic_mass']:.2f}",
            f"{diag['accuracy_own']:.3f} / {diag['accuracy_oracle']:.3f} / "
            f"{diag['accuracy_no_slots']:.3f}")
        grid = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in row["by_lr"].items())
        value = (f"{row['mean']:.4f} +- {row['std']:.4f}" if len(row["seeds"]) > 1 else
                 f"{row['mean']:.4f} (one seed)")
        lines.append(f"| {label} | {row['lr']:g} | {value} | "
                     f"{', '.join(map(str, row['seeds']))} | "
                     f"{', '.join(map(str, row['steps']))} | "
                     f"{', '.join(str(s) for s in row['steps_to_0.9'])} | {' | '.join(cells)} | "
                     f"{grid} |")
    best = ("the highest mean final validation accuracy (ties: fewer steps)" if metric ==
            "accuracy" else "the lowest mean final validation loss (nats/token)")
    lines += ["", f"Best lr: {best} over the seeds; mean +- std: over the seeds at that lr "
              f"(population std, ddof 0). Steps: the last training step of each seed (an early "
              f"stop or num_steps); steps to 90%: the first evaluated step with validation "
              f"accuracy >= 0.9 (None: never). Diagnostics (MQAR points with B layers): the best "
              f"lr's first seed, final checkpoint, one validation batch, mean over the B layers; "
              f"accuracy own rule / oracle scores / no slots: the same checkpoint on the whole "
              f"validation split with its own selection rule, with the key/value context handed "
              f"in as eidetic scores (selection vs use), and with every eidetic slot empty (what "
              f"the slots carry). lr grid: the mean over seeds at every lr."]
    return "\n".join(lines) + "\n"



def define_flags() -> None:
    """The command line's flags; defined only when this module runs as the program, so that the
    reproduce tables can import it beside their own flags."""
    flags.DEFINE_string("config", None, "A config file with get_config(arg): PATH, or PATH:ARG for "
                        "one argument.", required=True)
    flags.DEFINE_list("args", None, "Arguments of get_config (presets), comma-separated (or the "
                      "ARG of --config=PATH:ARG).")
    flags.DEFINE_list("lrs", None, "Learning rates (optimizer.lr); default: the config's.")
    flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed: initialisation and batch order).")
    flags.DEFINE_string("sweep", None, "The grid: FIELD=V1,V2;FIELD=V1,... over dotted config "
                        "fields (Python literals), e.g. \"seed=0,1,2;optimizer.lr=1e-3,3e-3\"; "
                        "seed and optimizer.lr replace --seeds and --lrs.")
    flags.DEFINE_list("set", [], "Config overrides FIELD=VALUE (dotted fields, Python literals), "
                      "e.g. num_steps=12000,data.num_train=32768; they are part of each point's "
                      "config (a workdir holding another config is refused).")
    flags.DEFINE_string("root", None, "Directory of the points' workdirs (default "
                        "runs/sweeps/<config file stem>).")
    flags.DEFINE_string("out", None, "Directory of the points' JSON results (default ROOT/points).")
    flags.DEFINE_bool("commit", False, "git-commit each point's JSON as it lands.")
    flags.DEFINE_bool("summary", False, "Only print the summary of the finished points in OUT.")
    flags.DEFINE_string("markdown", None, "The aggregated table's path (default: OUT/summary.md at "
                        "the end of a sweep; with --summary: only when given).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
    try:
        path, has_arg, arg = FLAGS.config.partition(":")
        if has_arg and FLAGS.args:
            raise ValueError(f"--config={FLAGS.config} names the argument {arg!r} and --args "
                             f"names {FLAGS.args}: give the arguments once.")
        args = [arg] if has_arg else FLAGS.args
        if not args:
            raise ValueError("no argument of get_config: give --args=A,B or --config=PATH:ARG.")
        root = Path(FLAGS.root) if FLAGS.root else Path("runs/sweeps") / Path(path).stem
        out = Path(FLAGS.out) if FLAGS.out else root / "points"
        if FLAGS.summary:
            records = [r for r in finished_points(out) if r["arg"] in args]
            summary = summarize(records)
            print(json.dumps(summary, indent=1))
            if FLAGS.markdown:
                Path(FLAGS.markdown).write_text(markdown(summary, root))
            return
        module = load_config_module(path)
        grid = parse_sweep(FLAGS.sweep)
        seeds, lrs = FLAGS.seeds, FLAGS.lrs
        for field, flag in (("seed", "seeds"), ("optimizer.lr", "lrs")):
            if field in grid and FLAGS[flag].present:
                raise ValueError(f"--sweep sweeps {field} and --{flag} is given: give it once.")
        seeds = grid.pop("seed", None) or [_number("--seeds", x, int) for x in seeds]
        lrs = grid.pop("optimizer.lr", None) or ([_number("--lrs", x, float) for x in lrs]
                                                  if lrs else [None])
        planned = list(grid_points(args, lrs, seeds, grid))
        check_points(module.get_config, planned, FLAGS.set)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"[sweep] {len(planned)} points under {root}", flush=True)
    points = Points(out, FLAGS.commit, harness.command_line("experiments.sweep"))
    for arg, lr, seed, fields in planned:
        try:
            record = run_point(module.get_config, arg, lr, seed, root, points, FLAGS.set,
                               fields)
        except training.USER_ERRORS as e:  # no traceback
            name, _ = point_config(module.get_config, arg, lr, seed, FLAGS.set, fields)
            sys.exit(f"error: point {name}: {e}")
        print(f"[sweep] {record['point']}: {_headline(record['result'])}", flush=True)
    table = markdown(summarize(finished_points(out)), root)
    path = Path(FLAGS.markdown) if FLAGS.markdown else out / "summary.md"
    path.write_text(table)
    print(f"{table}\n[sweep] wrote {path}", flush=True)


def finished_points(out: Path) -> list[dict]:
    """The records of every finished point in OUT (its *.json files), by file name."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def _number(source: str, text: str, kind: type):
    """kind(text) (int or float) of a flag's list entry; ValueError naming the flag."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{source}: {text!r} is not {'an integer' if kind is int else 'a number'}"
                         f".") from None


if __name__ == "__main__":
    define_flags()
    app.run(main)
