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
seeds at that rate (`summarize`).

Points run in the order given; several sweeps can run side by side on one machine (e.g. pinned
to one core each with `taskset -c N`).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks import harness
from experiments.reproduce import runner

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "A config file with get_config(arg).", required=True)
flags.DEFINE_list("args", None, "Arguments of get_config (presets), comma-separated.",
                  required=True)
flags.DEFINE_list("lrs", None, "Learning rates (optimizer.lr); default: the config's.")
flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed: initialisation and batch order).")
flags.DEFINE_string("root", None, "Directory of the points' workdirs.", required=True)
flags.DEFINE_string("out", None, "Directory of the points' JSON results (default ROOT/points).")
flags.DEFINE_bool("commit", False, "git-commit each point's JSON as it lands.")
flags.DEFINE_bool("summary", False, "Only print the summary of the finished points in OUT.")


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


def run_point(module, arg: str, lr, seed: int, root: Path, out: Path, commit: bool) -> dict:
    """Trains (or collects) one point and writes OUT/<point>.json (see module docstring)."""
    config = module.get_config(arg)
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


def main(argv):
    del argv
    root = Path(FLAGS.root)
    out = Path(FLAGS.out) if FLAGS.out else root / "points"
    if FLAGS.summary:
        records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
        print(json.dumps(summarize([r for r in records if r["arg"] in FLAGS.args]), indent=1))
        return
    try:
        module = load_config_module(FLAGS.config)
        lrs = [None] if not FLAGS.lrs else [float(x) for x in FLAGS.lrs]
        seeds = [int(x) for x in FLAGS.seeds]
    except ValueError as e:
        sys.exit(f"Error: {e}")
    for arg, lr, seed in itertools.product(FLAGS.args, lrs, seeds):
        record = run_point(module, arg, lr, seed, root, out, FLAGS.commit)
        print(f"[sweep] {record['point']}: {_headline(record['result'])}", flush=True)


if __name__ == "__main__":
    app.run(main)
