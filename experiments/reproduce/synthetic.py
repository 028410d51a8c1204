"""Table 1 of docs/design.md section 7: the four MAD recall tasks (in-context, noisy, fuzzy recall,
selective copying) and MQAR, six presets at 2 layers, best of a learning-rate grid chosen on the
validation set (the table shows test accuracy)."""

from __future__ import annotations

import functools
from pathlib import Path

import ml_collections
import numpy as np

from experiments import plotting, sweep
from experiments.reproduce import runner

NAME = "synthetic"
TITLE = "Synthetic recall tasks (paper: the four recall tasks x model families, 2 layers)"


def budgets() -> dict:
    """{"tiny", "full"}: ConfigDicts of every setting.

    Fields: tasks ((name of a `bmojo_jax.data` generator, its keyword arguments), ...), all at one
    seq_len so that every task reuses one compiled train step per (preset, lr); model_vocab (the
    vocabulary of every model); model (ModelConfig fields), eidetic (added for `bmojo`); lrs (the
    grid, in the order tried), lr_task (the grid runs on this task first; every other task tries
    each preset's rates in the order of their mean validation accuracy there, untried rates last,
    so that a task where the first rate reaches skip_grid_above trains one rate only; our choice,
    to fit the budget; None: the grid in the order of lrs on every task), skip_grid_above (a grid
    stops once a rate reaches this mean validation accuracy); seeds (initialisation and
    batch order: every row runs each, mean +- std), seed (the data's); num_steps (the step cap),
    target (a point stops at this validation accuracy), eval_every and eval_batches (the
    validation evaluations that decide the stop), batch_size, warmup_steps, num_train and
    num_eval (examples per set).

    The full budget trains to competence (docs/design.md section 7b): to 99% validation accuracy
    or 5000 steps, over three learning rates and three seeds (our choice of sizes: the MAD recall
    tasks at 2 layers of d_model 64, where the 400-step table of the first round left full
    attention at chance).
    """
    full = dict(
        tasks=(("in_context_recall", dict(vocab_size=16)),
               ("noisy_in_context_recall", dict(vocab_size=32, noise_vocab_size=16,
                                                frac_noise=0.2)),
               ("fuzzy_in_context_recall", dict(vocab_size=16)),
               ("selective_copying", dict(vocab_size=16, num_tokens_to_copy=4)),
               ("mqar", dict(vocab_size=64, num_kv_pairs=4))),
        seq_len=32, model_vocab=64,
        model=dict(d_model=64, n_layers=2, n_heads=2, window=8, chunk_size=8, d_state=16,
                   ssm_head_dim=32),
        eidetic=dict(eidetic_per_chunk=2, eidetic_slots=4),
        lrs=(3e-3, 1e-3, 1e-2), lr_task="mqar", skip_grid_above=0.99, num_steps=5000,
        target=0.99, eval_every=100, eval_batches=4, batch_size=32, warmup_steps=50,
        num_train=20000, num_eval=256, seeds=(0, 1, 2), seed=0)
    tiny = dict(
        full, tasks=(("in_context_recall", dict(vocab_size=16)),
                     ("mqar", dict(vocab_size=64, num_kv_pairs=4))),
        model=dict(d_model=32, n_layers=2, n_heads=2, window=16, chunk_size=16, d_state=8,
                   ssm_head_dim=16),
        lrs=(1e-2, 3e-3), num_steps=4, eval_every=2, eval_batches=1, batch_size=8,
        warmup_steps=1, num_train=64, num_eval=16, seeds=(0,))
    return {"tiny": ml_collections.ConfigDict(tiny), "full": ml_collections.ConfigDict(full)}


def point_config(preset: str, task: str, s) -> ml_collections.ConfigDict:
    """The training config of one (preset, task) row (the sweep sets each point's lr and seed)."""
    model = dict(s.model, vocab_size=s.model_vocab)
    if preset == "bmojo":
        model.update(s.eidetic)
    config = runner.point_config(preset, model, s)
    config.update(eval_every=s.eval_every, eval_batches=s.eval_batches)
    config.early_stop.update(metric="accuracy", target=s.target)
    config.data.update(name=task, seq_len=s.seq_len, num_train=s.num_train, num_eval=s.num_eval,
                       seed=s.seed)
    config.data.task = dict(dict(s.tasks)[task])
    return config


def lr_order(lrs, by_lr: dict) -> list:
    """The rates `lrs` in the order a task tries them: by decreasing mean validation accuracy on
    the lr task (`by_lr`, {lr: accuracy}), the rates it did not try last, in the order of `lrs`."""
    return sorted(lrs, key=lambda lr: (lr not in by_lr, -by_lr.get(lr, 0.0)))


def run(s, presets, workdir: Path, points: sweep.Points) -> dict:
    """Every (task, preset) row over its learning rates x `s.seeds` (`sweep.run_setting`, which
    stops the grid once a rate reaches `s.skip_grid_above`): the grid `s.lrs` on `s.lr_task`
    first, then on every other task in the order of `lr_order` (`s.lrs` on every task when
    `s.lr_task` is None)."""
    tasks = [name for name, _ in s.tasks]
    if s.lr_task:
        tasks.remove(s.lr_task)
        tasks.insert(0, s.lr_task)
    rows, ranked = [], {}
    for task in tasks:
        for preset in presets:
            lrs = lr_order(s.lrs, ranked[preset]) if preset in ranked else s.lrs
            row = sweep.run_setting(functools.partial(point_config, task=task, s=s), preset,
                                    lrs, runner.seeds_of(preset, s), workdir / task,
                                    stop_above=s.skip_grid_above, log="synthetic",
                                    points=points._replace(out=points.out / task))
            if task == s.lr_task:
                ranked[preset] = row["by_lr"]
            rows.append(dict(runner.row_stats(row, "accuracy"), task=task, preset=preset))
    return dict(rows=rows, optimizer=row["records"][0]["config"]["optimizer"])


def _pct(x):
    return f"{100 * x:.1f}"


def markdown(record, s) -> str:
    """The accuracy table (tasks x presets, mean +- std over the seeds), the settings in prose,
    and every row's learning-rate grid."""
    presets = record["presets"]
    best = {(r["task"], r["preset"]): r for r in record["rows"]}
    tasks = [name for name, _ in s.tasks]
    lines = ["| task | " + " | ".join(presets) + " |", "|---|" + "---:|" * len(presets)]
    for task in tasks:
        top = max(best[task, p]["test_accuracy"] for p in presets)
        cells = [runner.mean_std(best[task, p], "test_accuracy", scale=100) for p in presets]
        cells = [f"**{c}**" if best[task, p]["test_accuracy"] == top else c
                 for c, p in zip(cells, presets)]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = [np.mean([best[t, p]["test_accuracy"] for t in tasks]) for p in presets]
    lines.append("| **mean** | " + " | ".join(_pct(m) for m in means) + " |")
    lines.append("| parameters | " + " | ".join(
        f"{best[tasks[0], p]['params']:,}" for p in presets) + " |")
    lines.append("| chosen lr per task | " + " | ".join(
        "/".join(f"{best[t, p]['lr']:g}" for t in tasks) for p in presets) + " |")
    every = ["| task | preset | lr grid: mean valid acc (%) | chosen lr | valid acc (%) | "
             "test acc (%) | steps | steps to 90% | wall (s) |",
             "|---|---|---|---:|---:|---:|---|---|---:|"]
    every += [f"| {r['task']} | {r['preset']} | "
              f"{', '.join(f'{lr}: {_pct(v)}' for lr, v in r['lr_grid'].items())} | "
              f"{r['lr']:g} | {runner.mean_std(r, 'valid_accuracy', scale=100)} | "
              f"{runner.mean_std(r, 'test_accuracy', scale=100)} | "
              f"{', '.join(map(str, r['steps']))} | "
              f"{', '.join('-' if x is None else str(x) for x in r['steps_to_90'])} | "
              f"{r['wall_s']:.0f} |" for r in record["rows"]]
    task_lines = [f"* `{name}`: `{name}({runner.describe(kwargs)})`, seq_len {s.seq_len}"
                  for name, kwargs in s.tasks]
    grid = ", ".join(f"{lr:g}" for lr in s.lrs)
    where = (f"on `{s.lr_task}` first, then on every other task in the order of the preset's "
             f"validation accuracy on `{s.lr_task}`" if s.lr_task else "on every task")
    seeds = runner.describe_seeds(s)
    return (f"Test accuracy (%) on labelled positions (Zoology/MAD metric), {s.num_eval} test "
            f"examples per task, mean +- std over the seeds {seeds} (one training run each; std "
            f"over seeds, ddof 0). Learning rate: the best mean validation accuracy over "
            f"{{{grid}}}, searched {where} (a grid stops early once a rate reaches "
            f"{100 * s.skip_grid_above:.0f}% mean validation accuracy). Bold: the best preset of "
            f"a task.\n\n" + "\n".join(lines) + "\n\nTasks (generators of `bmojo_jax.data`; MAD "
            f"tasks train on their evaluation targets, the library's `SyntheticData`):\n\n"
            + "\n".join(task_lines) +
            f"\n\nModel: {runner.describe(s.model)}, vocabulary {s.model_vocab} for every task "
            f"(one compiled step per preset and lr); `bmojo` adds {runner.describe(s.eidetic)}. "
            f"Training: until {100 * s.target:.0f}% validation accuracy (evaluated every "
            f"{s.eval_every} steps on {s.eval_batches} batches; the reported accuracies are on "
            f"the whole split) or at most {s.num_steps} steps of {s.batch_size} sequences from "
            f"a set of "
            f"{s.num_train} examples, "
            f"{runner.describe_optimizer(record['optimizer'], s.num_steps)}.\n\n"
            "### Every row: its learning-rate grid and seeds\n\n" + "\n".join(every))


def plot(record, s, path) -> None:
    """Test accuracy per task, one bar per preset in its colour (mean over the seeds, error bar
    +- std when there are several), each bar labelled with its value (so that a bar at 0% is
    still seen)."""
    presets = record["presets"]
    plt = plotting.pyplot()
    best = {(r["task"], r["preset"]): r for r in record["rows"]}
    tasks = [name for name, _ in s.tasks]
    fig, ax = plt.subplots(figsize=(10, 4.6))
    width = 0.8 / len(presets)
    for i, p in enumerate(presets):
        bars = ax.bar(np.arange(len(tasks)) + i * width,
                      [100 * best[t, p]["test_accuracy"] if (t, p) in best else np.nan
                       for t in tasks], width, label=p,
                      yerr=[100 * best[t, p]["test_accuracy_std"] if (t, p) in best else 0
                            for t in tasks], capsize=2,
                      color=plotting.series_style(p, i)["color"])
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
    ax.set_xticklabels([t.replace("_", " ") for t in tasks], fontsize=8)
    ax.set_title("synthetic recall tasks: test accuracy at the best learning rate")
    ax.set_xlabel("task")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 108)
    ax.legend(fontsize=8, ncol=len(presets), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    seeds = runner.seeds_run(s)
    plotting.save(fig, path, caption=(
        f"Mean test accuracy over {len(seeds)} training run(s) per (task, preset) (seeds "
        f"{runner.describe_seeds(s)}) at the best learning rate on validation; "
        f"{s.num_eval} test examples; error bars: +- std over the seeds (none for one seed). "
        f"The number over a bar is its mean accuracy in %."))
