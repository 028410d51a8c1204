"""Sweeps: one config file over its arguments (presets), learning rates and seeds.

    python -m experiments.sweep --config=experiments/configs/mqar_far.py \\
        --args=transformer,swa,bmojo_oracle --lrs=1e-3,3e-3,1e-2 --seeds=0 \\
        --root=workdir/sweeps/mqar_far --out=runs/mqar_far

Every point (argument, learning rate, seed) trains in its own workdir ROOT/<point> (a rerun of the
same command resumes unfinished points and collects finished ones: `reproduce.runner.train_point`)
and, once finished, writes OUT/<point>.json: the point, its config, the result of
`training.train_and_evaluate`, the git commit, the machine and the command. With `--commit`, each
point's JSON is committed to git as it lands (long sweeps on a machine that may stop: nothing
finished is lost). `--summary` prints, per argument, the best learning rate (by the mean final
validation accuracy over seeds, or the lowest validation loss for text) and the mean +- std over
seeds at that rate (`summarize`); with `--markdown=PATH` it writes that as a table, with the
eidetic diagnostics (`bmojo_jax.diagnostics`: selection recall, slot precision, attention mass on
the slots) of every MQAR point that has `B` layers, measured on its final checkpoint (in ROOT) and
one validation batch.

Points run in the order given; several sweeps can run side by side on one machine (e.g. pinned
to one core each with `taskset -c N`).
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from bmojo_jax import data as data_lib
from bmojo_jax import diagnostics, training
from benchmarks import harness
from experiments.reproduce import runner

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "A config file with get_config(arg).", required=True)
flags.DEFINE_list("args", None, "Arguments of get_config (presets), comma-separated.",
                  required=True)
flags.DEFINE_list("lrs", None, "Learning rates (optimizer.lr); default: the config's.")
flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed: initialisation and batch order).")
flags.DEFINE_list("set", [], "Config overrides FIELD=VALUE (dotted fields, Python literals), "
                  "e.g. num_steps=12000,data.num_train=32768; they are part of each point's "
                  "config (a workdir holding another config is refused).")
flags.DEFINE_string("root", None, "Directory of the points' workdirs.", required=True)
flags.DEFINE_string("out", None, "Directory of the points' JSON results (default ROOT/points).")
flags.DEFINE_bool("commit", False, "git-commit each point's JSON as it lands.")
flags.DEFINE_bool("summary", False, "Only print the summary of the finished points in OUT.")
flags.DEFINE_string("markdown", None, "With --summary: also write the summary table here.")


def load_config_module(path: str):
    """The module of a config file (its `get_config`).

    Raises:
      ValueError: no such file, or no get_config in it.
    """
    if not Path(path).is_file():
        raise ValueError(f"--config={path}: no such file.")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config={path}: defines no get_config(arg).")
    return module


def point_name(arg: str, lr: float, seed: int) -> str:
    return f"{arg}-lr{lr:g}-s{seed}"


def apply_overrides(config, overrides: list[str]):
    """config with FIELD=VALUE overrides applied (dotted fields; VALUE a Python literal, or a
    string).

    Raises:
      ValueError: an override without "=", or a field the config does not have.
    """
    for item in overrides:
        field, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: must be FIELD=VALUE.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, name = field.split(".")
        node = config
        for key in parents:
            node = node[key] if key in node else None
            if node is None:
                raise ValueError(f"--set {item!r}: the config has no field {field!r}.")
        if name not in node:
            raise ValueError(f"--set {item!r}: the config has no field {field!r}.")
        node[name] = value
    return config


def run_point(module, arg: str, lr, seed: int, root: Path, out: Path, commit: bool,
              overrides: list[str] = ()) -> dict:
    """Trains (or collects) one point and writes OUT/<point>.json (see module docstring)."""
    config = apply_overrides(module.get_config(arg), list(overrides))
    if lr is not None:
        config.optimizer.lr = lr
    config.seed = seed
    name = point_name(arg, config.optimizer.lr, seed)
    tic = time.time()
    result = runner.train_point(config, root / name)
    record = dict(point=name, arg=arg, lr=config.optimizer.lr, seed=seed,
                  config=runner.jsonable(config.to_dict()), result=result,
                  git_commit=harness.git_commit(), machine=harness.machine(),
                  command=harness.command_line("experiments.sweep"),
                  finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  collect_s=time.time() - tic)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    if commit:
        _commit(path, f"sweep point {name}: {_headline(result)}")
    return record


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


def summarize(records: list[dict]) -> dict:
    """Per argument: the best learning rate and the mean +- std over its seeds.

    The best rate has the highest mean final validation accuracy (synthetic tasks; ties: fewer
    steps) or the lowest mean validation loss (text).

    Returns:
      {arg: {"lr", "seeds", "metric", "mean", "std", "steps_to_0.9" (list, None = never),
             "steps", "by_lr": {lr: mean}}}.
    """
    summary = {}
    for arg, group in itertools.groupby(sorted(records, key=lambda r: r["arg"]),
                                        key=lambda r: r["arg"]):
        group = list(group)
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
        summary[arg] = dict(
            lr=best, seeds=[r["seed"] for r in by_lr[best]], metric=metric,
            mean=float(np.mean(values)), std=float(np.std(values)),
            steps=[r["result"]["step"] for r in by_lr[best]],
            **{"steps_to_0.9": [r["result"].get("steps_to_0.9") for r in by_lr[best]]},
            by_lr={lr: float(np.mean([r["result"]["valid"][metric] for r in rs]))
                   for lr, rs in sorted(by_lr.items())})
    return summary


def point_diagnostics(workdir: Path):
    """The eidetic diagnostics of a finished MQAR point's final checkpoint on its first validation
    batch, averaged over its `B` layers; None when it has none (or is not MQAR)."""
    model, config, _ = training.load_model(workdir)
    if config.data.name != "mqar" or "B" not in model.config.layer_mixers:
        return None
    data = data_lib.load_data(config)
    inputs, targets = data.eval_batches("valid", config.batch_size, config.data.seq_len)[0]
    scores = training.context_scores(np.asarray(inputs), training.oracle_length(config))
    layers = diagnostics.eidetic_diagnostics(model, inputs, targets,
                                             training.context_length(config),
                                             eidetic_scores=scores)
    mean = lambda key: float(np.mean([d[key] for d in layers.values()]))  # noqa: E731
    return dict(selection_recall=mean("selection_recall"), slot_precision=mean("slot_precision"),
                eidetic_mass=float(np.mean([d["attention_mass"]["eidetic"]
                                            for d in layers.values()])),
                recall_ceiling=mean("recall_ceiling"))


def markdown(summary: dict, records: list[dict], root: Path) -> str:
    """The summary as a markdown table (diagnostics of the best learning rate's first seed)."""
    lines = ["| config | best lr | valid accuracy (mean +- std) | seeds | steps | steps to 90% | "
             "selection recall | slot precision | attention on slots | lr grid (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arg, row in summary.items():
        point = point_name(arg, row["lr"], row["seeds"][0])
        diag = point_diagnostics(root / point) if (root / point / "checkpoints").is_dir() else None
        cells = ("-", "-", "-") if diag is None else (
            f"{diag['selection_recall']:.2f} (ceiling {diag['recall_ceiling']:.2f})",
            f"{diag['slot_precision']:.2f}", f"{diag['eidetic_mass']:.2f}")
        grid = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in row["by_lr"].items())
        lines.append(f"| {arg} | {row['lr']:g} | {row['mean']:.4f} +- {row['std']:.4f} | "
                     f"{len(row['seeds'])} | {', '.join(map(str, row['steps']))} | "
                     f"{', '.join(str(s) for s in row['steps_to_0.9'])} | {' | '.join(cells)} | "
                     f"{grid} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    root = Path(FLAGS.root)
    out = Path(FLAGS.out) if FLAGS.out else root / "points"
    if FLAGS.summary:
        records = [r for r in (json.loads(p.read_text()) for p in sorted(out.glob("*.json")))
                   if r["arg"] in FLAGS.args]
        summary = summarize(records)
        print(json.dumps(summary, indent=1))
        if FLAGS.markdown:
            Path(FLAGS.markdown).write_text(markdown(summary, records, root))
        return
    try:
        module = load_config_module(FLAGS.config)
        lrs = [None] if not FLAGS.lrs else [float(x) for x in FLAGS.lrs]
        seeds = [int(x) for x in FLAGS.seeds]
        apply_overrides(module.get_config(FLAGS.args[0]), FLAGS.set)  # fail before training
    except ValueError as e:
        sys.exit(f"Error: {e}")
    for arg, lr, seed in itertools.product(FLAGS.args, lrs, seeds):
        record = run_point(module, arg, lr, seed, root, out, FLAGS.commit, FLAGS.set)
        print(f"[sweep] {record['point']}: {_headline(record['result'])}", flush=True)


if __name__ == "__main__":
    app.run(main)
