"""Reproduces the experiments of the B'MOJO paper at small scale (DESIGN.md section 7).

    python -m experiments.reproduce --table=synthetic   [--budget=full] [--out_dir=results]
    python -m experiments.reproduce --table=mqar_memory
    python -m experiments.reproduce --table=lm
    python -m experiments.reproduce --table=inference
    python -m experiments.reproduce --table=length
    python -m experiments.reproduce --table=all --budget=tiny --out_dir=/tmp/repro  # smoke test

Each table writes OUT_DIR/NAME.md (the table, the exact command, the settings, seeds, parameter
counts, wall times and the machine), OUT_DIR/NAME.json (every run, machine-readable) and, where a
figure is natural, OUT_DIR/NAME.png.

Tables (the paper's experiment -> what runs here):
  synthetic    the four MAD recall tasks (in-context, noisy, fuzzy recall, selective copying) and
               MQAR, six presets at 2 layers, best of a learning-rate grid (chosen on the
               validation set; the table shows test accuracy).
  mqar_memory  MQAR whose queries sit far beyond the window (power_a > 1 pushes the queries to the
               end of the sequence), accuracy vs the decoding-state size, sweeping the SSM state
               size, the window and the eidetic slots; the eidetic-slot ablation.
  lm           Penn Treebank word-level validation/test perplexity and training throughput, six
               presets at matched non-embedding parameter counts (d_ff adjusted per preset), with
               Zaremba et al. 2014's LSTMs as an external reference.
  inference    prefill time of a 2k-token prompt and per-token decode latency after it.
  length       train at context T on books (Shakespeare + Austen), evaluate test perplexity at
               1x..16x T on the same held-out tokens for every context length.

Budgets: `tiny` (seconds per table: the tests) and `full` (the committed results, minutes per
table on 2 CPU cores). Training goes through `training.train_and_evaluate`, one fresh workdir per
run under --workdir; the JAX compilation cache is kept in --workdir/jax_cache so that runs with
equal shapes (e.g. the synthetic tasks) compile once.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from bmojo_jax import data as data_lib
from bmojo_jax import training
from bmojo_jax.config import PRESET_PATTERNS, ModelConfig
from bmojo_jax.model import LanguageModel, count_params, match_d_ff, param_count
from experiments import plotting

PRESETS = tuple(PRESET_PATTERNS)
TABLES = ("synthetic", "mqar_memory", "lm", "inference", "length")

# Zaremba, Sutskever & Vinyals 2014, "Recurrent neural network regularization", Table 1: PTB
# word-level test perplexity of 2-layer LSTMs (DESIGN.md section 6).
ZAREMBA = (("LSTM small, non-regularized (Zaremba et al. 2014)", 114.5),
           ("LSTM medium, dropout (Zaremba et al. 2014)", 82.7),
           ("LSTM large, dropout (Zaremba et al. 2014)", 78.4))

# --------------------------------------------------------------------------------------------------
# Budgets. Every number of a table's settings lives here, so the .md can print them.
# --------------------------------------------------------------------------------------------------

_SYNTHETIC_TASKS_FULL = {
    # name: (generator, task kwargs); all at one sequence length so that every task reuses one
    # compiled train step per (preset, lr).
    "in_context_recall": ("in_context_recall", dict(vocab_size=16)),
    "noisy_in_context_recall": ("noisy_in_context_recall",
                                dict(vocab_size=32, noise_vocab_size=16, frac_noise=0.2)),
    "fuzzy_in_context_recall": ("fuzzy_in_context_recall", dict(vocab_size=16)),
    "selective_copying": ("selective_copying", dict(vocab_size=16, num_tokens_to_copy=4)),
    "mqar": ("mqar", dict(vocab_size=64, num_kv_pairs=4)),
}

BUDGETS = {
    "full": {
        "synthetic": dict(
            tasks=_SYNTHETIC_TASKS_FULL, seq_len=32, model_vocab=64,
            model=dict(d_model=64, n_layers=2, n_heads=2, window=8, chunk_size=8, d_state=16,
                       ssm_head_dim=32),
            eidetic=dict(eidetic_per_chunk=2, eidetic_slots=4),
            lrs=(3e-3, 1e-2), lr_task="mqar", skip_grid_above=0.99, num_steps=400, batch_size=32,
            warmup_steps=20, num_train=12800, num_eval=256, seed=0),
        "mqar_memory": dict(
            seq_len=64, task=dict(vocab_size=128, num_kv_pairs=4, power_a=10.0),
            model=dict(d_model=64, n_layers=2, n_heads=2, window=16, chunk_size=16, d_state=16,
                       ssm_head_dim=32),
            variants=(("transformer", {}),
                      ("swa", dict(window=8)), ("swa", {}),
                      ("mamba", dict(d_state=8)), ("mamba", dict(d_state=32)),
                      ("hybrid", {}),
                      ("bmojo_f", {}),
                      ("bmojo", dict(eidetic_per_chunk=1, eidetic_slots=2)),
                      ("bmojo", dict(eidetic_per_chunk=2, eidetic_slots=4)),
                      ("bmojo", dict(eidetic_per_chunk=4, eidetic_slots=8)),
                      ("bmojo", dict(eidetic_per_chunk=8, eidetic_slots=16))),
            # One learning rate per preset: the best of {3e-3, 1e-2} on the synthetic table's MQAR.
            lrs=(3e-3,), lrs_by_preset={"mamba": (1e-2,)}, num_steps=500, batch_size=32,
            warmup_steps=20, num_train=16000, num_eval=256, seed=0),
        "lm": dict(
            model=dict(d_model=128, n_layers=2, n_heads=4, window=32),
            seq_len=128, batch_size=16, num_steps=250, lr=4e-3, warmup_steps=25,
            eval_batch_size=32, seed=0),
        "inference": dict(
            model=dict(d_model=256, n_layers=4, n_heads=4, window=64, vocab_size=10000),
            context=2048, decode_steps=32, rounds=5, batch_size=1),
        "length": dict(
            corpus="books", model=dict(d_model=128, n_layers=2, n_heads=4, window=32),
            seq_len=128, multipliers=(1, 2, 4, 8, 16), batch_size=16, num_steps=200, lr=3e-3,
            warmup_steps=30, bpe_vocab_size=4096, eval_batch_size=8, seed=0),
    },
    "tiny": {
        "synthetic": dict(
            tasks={"in_context_recall": ("in_context_recall", dict(vocab_size=16)),
                   "mqar": ("mqar", dict(vocab_size=64, num_kv_pairs=4))},
            seq_len=32, model_vocab=64,
            model=dict(d_model=32, n_layers=2, n_heads=2, window=16, chunk_size=16, d_state=8,
                       ssm_head_dim=16),
            eidetic=dict(eidetic_per_chunk=2, eidetic_slots=4),
            lrs=(1e-2, 3e-3), lr_task="mqar", skip_grid_above=0.99, num_steps=4, batch_size=8,
            warmup_steps=1, num_train=64, num_eval=16, seed=0),
        "mqar_memory": dict(
            seq_len=32, task=dict(vocab_size=64, num_kv_pairs=2, power_a=10.0),
            model=dict(d_model=32, n_layers=2, n_heads=2, window=8, chunk_size=8, d_state=8,
                       ssm_head_dim=16),
            variants=(("swa", {}), ("bmojo", dict(eidetic_per_chunk=1, eidetic_slots=2))),
            lrs=(1e-2,), num_steps=4, batch_size=8, warmup_steps=1, num_train=64, num_eval=16,
            seed=0),
        "lm": dict(
            model=dict(d_model=32, n_layers=2, n_heads=2, window=16),
            seq_len=32, batch_size=8, num_steps=4, lr=4e-3, warmup_steps=1, eval_batch_size=128,
            seed=0),
        "inference": dict(
            model=dict(d_model=32, n_layers=2, n_heads=2, window=16, vocab_size=256),
            context=64, decode_steps=4, rounds=2, batch_size=1),
        "length": dict(
            # PTB instead of books: tokenizing books alone takes ~25 s on 2 busy cores.
            corpus="ptb", model=dict(d_model=32, n_layers=2, n_heads=2, window=16),
            seq_len=32, multipliers=(1, 2), batch_size=8, num_steps=4, lr=3e-3, warmup_steps=1,
            bpe_vocab_size=4096, eval_batch_size=4, seed=0),
    },
}

# The presets a table runs when --presets is not given.
TINY_PRESETS = ("swa", "bmojo")


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}, "
            f"Python {platform.python_version()}")


def state_bytes(cache) -> int:
    """Bytes of every array of a decoding cache (as `benchmarks.decode.state_bytes`)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def decoding_state_bytes(model_cfg: ModelConfig, max_length: int) -> int:
    """Bytes of the decoding state for batch 1 after `max_length` tokens (abstract: no memory)."""
    model = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
    cache = jax.eval_shape(lambda: model.init_cache(1, max_length=max_length))
    return state_bytes(cache)


def train_run(config, run_dir: Path) -> dict:
    """`training.train_and_evaluate` in a fresh `run_dir`; adds wall time and steady throughput.

    Returns the library's result plus "wall_s" (whole run: compile, training, evaluation),
    "tokens_per_s" (median over the logged training intervals, the first one, which holds the
    compilation, left out) and "train_s" (num_steps * batch * seq_len / tokens_per_s: training
    time without compilation and evaluation).
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    tic = time.perf_counter()
    result = training.train_and_evaluate(config, run_dir)
    result["wall_s"] = time.perf_counter() - tic
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["split"] == "train"]
    rate = float(np.median(rates[1:] if len(rates) > 1 else rates))
    result["tokens_per_s"] = rate
    result["train_s"] = config.num_steps * config.batch_size * config.data.seq_len / rate
    result["final_train_loss"] = [r["ce"] for r in records if r["split"] == "train"][-1]
    result.pop("sample", None)
    return result


def _base_config(preset: str, settings: dict, *, num_steps: int, batch_size: int, lr: float,
                 warmup_steps: int, seed: int):
    config = training.default_config(preset)
    config.model.update(**settings)
    config.optimizer.update(lr=lr, warmup_steps=warmup_steps)
    config.update(num_steps=num_steps, batch_size=batch_size, eval_every=num_steps,
                  eval_batches=1, checkpoint_every=num_steps, max_to_keep=1,
                  log_every=max(1, min(25, num_steps // 4)), seed=seed)
    config.sample.max_new_tokens = 0
    return config


def _fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}"


def _short(overrides: dict) -> str:
    names = {"window": "w", "d_state": "n", "eidetic_slots": "m", "eidetic_per_chunk": "k_e"}
    return ", ".join(f"{names.get(k, k)}={v}" for k, v in overrides.items()) or "default"


# --------------------------------------------------------------------------------------------------
# 1. Synthetic recall tasks
# --------------------------------------------------------------------------------------------------


def synthetic_config(preset, task, lr, s):
    generator, kwargs = s["tasks"][task]
    model = dict(s["model"], vocab_size=s["model_vocab"])
    if preset == "bmojo":
        model.update(s["eidetic"])
    config = _base_config(preset, model, num_steps=s["num_steps"], batch_size=s["batch_size"],
                          lr=lr, warmup_steps=s["warmup_steps"], seed=s["seed"])
    config.data.update(name=generator, seq_len=s["seq_len"], num_train=s["num_train"],
                       num_eval=s["num_eval"], seed=s["seed"])
    config.data.task = dict(kwargs)
    return config


def run_synthetic(s: dict, presets, workdir: Path):
    """The learning-rate grid runs on `s["lr_task"]` for every preset (every task when None); the
    other tasks reuse each preset's best learning rate there (our choice, to fit the budget)."""
    runs = []
    tasks = list(s["tasks"])
    if s.get("lr_task"):
        tasks.remove(s["lr_task"])
        tasks.insert(0, s["lr_task"])
    chosen = {}
    for task in tasks:
        for preset in presets:
            grid = s["lrs"] if not s.get("lr_task") or task == s["lr_task"] else [chosen[preset]]
            for lr in grid:
                config = synthetic_config(preset, task, lr, s)
                result = train_run(config, workdir / f"{task}-{preset}-lr{lr:g}")
                runs.append(dict(task=task, preset=preset, lr=lr, params=result["params"],
                                 valid_accuracy=result["valid"]["accuracy"],
                                 test_accuracy=result["test"]["accuracy"],
                                 wall_s=result["wall_s"], tokens_per_s=result["tokens_per_s"]))
                print(f"[synthetic] {task} {preset} lr={lr:g}: valid acc "
                      f"{runs[-1]['valid_accuracy']:.3f} ({result['wall_s']:.0f} s)", flush=True)
                if result["valid"]["accuracy"] >= s["skip_grid_above"]:
                    break  # the grid's best cannot get better: skip the other learning rates
            if task == s.get("lr_task"):
                mine = [r for r in runs if r["task"] == task and r["preset"] == preset]
                chosen[preset] = max(mine, key=lambda r: r["valid_accuracy"])["lr"]
    best = {}
    for r in runs:
        key = (r["task"], r["preset"])
        if key not in best or r["valid_accuracy"] > best[key]["valid_accuracy"]:
            best[key] = r
    return dict(runs=runs, best=[dict(v) for v in best.values()])


def synthetic_markdown(out, s, presets):
    best = {(r["task"], r["preset"]): r for r in out["best"]}
    tasks = list(s["tasks"])
    lines = ["| task | " + " | ".join(presets) + " |", "|---|" + "---:|" * len(presets)]
    for task in tasks:
        cells = []
        top = max(best[task, p]["test_accuracy"] for p in presets)
        for p in presets:
            acc = best[task, p]["test_accuracy"]
            cell = _pct(acc)
            cells.append(f"**{cell}**" if acc == top else cell)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = [np.mean([best[t, p]["test_accuracy"] for t in tasks]) for p in presets]
    lines.append("| **mean** | " + " | ".join(_pct(m) for m in means) + " |")
    lines.append("| parameters | " + " | ".join(
        f"{best[tasks[0], p]['params']:,}" for p in presets) + " |")
    lines.append("| chosen lr per task | " + " | ".join(
        "/".join(f"{best[t, p]['lr']:g}" for t in tasks) for p in presets) + " |")
    table = "\n".join(lines)
    runs = ["| task | preset | lr | valid acc (%) | test acc (%) | wall (s) |",
            "|---|---|---:|---:|---:|---:|"]
    runs += [f"| {r['task']} | {r['preset']} | {r['lr']:g} | {_pct(r['valid_accuracy'])} | "
             f"{_pct(r['test_accuracy'])} | {r['wall_s']:.0f} |" for r in out["runs"]]
    task_lines = [f"* `{t}`: `{g}({', '.join(f'{k}={v}' for k, v in kw.items())})`, "
                  f"seq_len {s['seq_len']}" for t, (g, kw) in s["tasks"].items()]
    grid = ", ".join(f"{lr:g}" for lr in s["lrs"])
    where = (f"on `{s['lr_task']}` for each preset; the other tasks reuse that preset's chosen "
             f"learning rate" if s.get("lr_task") else "on every task")
    body = (f"Test accuracy (%) on labelled positions (Zoology/MAD metric), {s['num_eval']} test "
            f"examples per task. Learning rate: the best validation accuracy over {{{grid}}}, "
            f"searched {where} (a grid stops early once a run reaches "
            f"{100 * s['skip_grid_above']:.0f}% validation accuracy). Bold: the best preset of a "
            f"task.\n\n{table}\n\nTasks (generators of "
            f"`bmojo_jax.data`; MAD tasks train on their evaluation targets, the library's "
            f"`SyntheticData`):\n\n" + "\n".join(task_lines) +
            f"\n\nModel: {s['model']}, model vocabulary {s['model_vocab']} for every task (one "
            f"compiled step per preset and lr); `bmojo` adds {s['eidetic']}. Training: "
            f"{s['num_steps']} steps of {s['batch_size']} sequences from a set of "
            f"{s['num_train']} examples, AdamW (library defaults: wd 0.1, b2 0.95, clip 1.0), "
            f"warmup {s['warmup_steps']}, cosine to 0.1 lr.\n\n### Every run\n\n" +
            "\n".join(runs))
    return body


def synthetic_plot(out, s, presets, path):
    plt = plotting.pyplot()
    best = {(r["task"], r["preset"]): r for r in out["best"]}
    tasks = list(s["tasks"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(presets)
    for i, p in enumerate(presets):
        ax.bar(np.arange(len(tasks)) + i * width,
               [100 * best[t, p]["test_accuracy"] for t in tasks], width, label=p)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
    ax.set_xticklabels([t.replace("_", " ") for t in tasks], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=len(presets), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.grid(axis="y", alpha=0.3)
    plotting.save(fig, path)


# --------------------------------------------------------------------------------------------------
# 2. MQAR vs memory budget
# --------------------------------------------------------------------------------------------------


def mqar_distances(s: dict, num_examples: int = 1000) -> np.ndarray:
    """Distances (tokens) from each query to its key's position in the context."""
    inputs, labels = data_lib.mqar(**s["task"], input_seq_len=s["seq_len"],
                                   num_examples=num_examples, seed=s["seed"] + 2)
    k = s["task"]["num_kv_pairs"]
    distances = []
    for x, y in zip(inputs, labels):
        for pos in np.flatnonzero(y != data_lib.IGNORE_INDEX):
            distances.append(pos - np.flatnonzero(x[:2 * k] == x[pos])[0])
    return np.asarray(distances)


def run_mqar_memory(s: dict, presets, workdir: Path):
    runs = []
    distances = mqar_distances(s)
    for i, (preset, overrides) in enumerate(s["variants"]):
        if preset not in presets:
            continue
        best = None
        for lr in s.get("lrs_by_preset", {}).get(preset, s["lrs"]):
            model = dict(s["model"], vocab_size=s["task"]["vocab_size"])
            if preset == "bmojo" and "eidetic_slots" not in overrides:
                raise ValueError("mqar_memory: give bmojo variants their eidetic settings")
            model.update(overrides)
            config = _base_config(preset, model, num_steps=s["num_steps"],
                                  batch_size=s["batch_size"], lr=lr,
                                  warmup_steps=s["warmup_steps"], seed=s["seed"])
            config.data.update(name="mqar", seq_len=s["seq_len"], num_train=s["num_train"],
                               num_eval=s["num_eval"], seed=s["seed"])
            config.data.task = dict(s["task"])
            result = train_run(config, workdir / f"{i:02d}-{preset}-lr{lr:g}")
            print(f"[mqar_memory] {preset} {_short(overrides)} lr={lr:g}: valid acc "
                  f"{result['valid']['accuracy']:.3f} ({result['wall_s']:.0f} s)", flush=True)
            if best is None or result["valid"]["accuracy"] > best["valid"]["accuracy"]:
                best = dict(result, lr=lr)
        model_cfg = training.model_config(config, s["task"]["vocab_size"])
        window = None if preset in ("transformer", "mamba") else model_cfg.window
        runs.append(dict(
            preset=preset, overrides=dict(overrides), label=f"{preset} ({_short(overrides)})",
            window=window, d_state=None if preset in ("transformer", "swa") else model_cfg.d_state,
            eidetic_slots=model_cfg.eidetic_slots if preset == "bmojo" else 0,
            state_bytes=decoding_state_bytes(model_cfg, s["seq_len"]), params=best["params"],
            lr=best["lr"], valid_accuracy=best["valid"]["accuracy"],
            test_accuracy=best["test"]["accuracy"], wall_s=best["wall_s"],
            queries_within_window=(None if window is None
                                   else float(np.mean(distances < window))),
            queries_within_2_windows=(None if window is None
                                      else float(np.mean(distances < 2 * window)))))
    return dict(runs=runs, query_distance=dict(
        min=int(distances.min()), median=float(np.median(distances)),
        max=int(distances.max())))


def mqar_memory_markdown(out, s, presets):
    d = out["query_distance"]
    lines = ["| model (memory knobs) | decoding state (KiB) | parameters | lr | queries with key "
             "in window / in 2 windows (%) | test accuracy (%) | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in out["runs"]:
        within = ("—" if r["queries_within_window"] is None else
                  f"{_pct(r['queries_within_window'])} / {_pct(r['queries_within_2_windows'])}")
        lines.append(f"| {r['label']} | {r['state_bytes'] / 1024:.1f} | {r['params']:,} | "
                     f"{r['lr']:g} | {within} | {_pct(r['test_accuracy'])} | "
                     f"{r['wall_s']:.0f} |")
    ablation = [r for r in out["runs"] if r["preset"] in ("bmojo_f", "bmojo")]
    ablation.sort(key=lambda r: r["eidetic_slots"])
    abl = ["| eidetic slots m (k_e per chunk) | test accuracy (%) |", "|---:|---:|"]
    abl += [f"| {r['eidetic_slots']} ({r['overrides'].get('eidetic_per_chunk', 0)}) | "
            f"{_pct(r['test_accuracy'])} |" for r in ablation]
    return (f"MQAR (`mqar({', '.join(f'{k}={v}' for k, v in s['task'].items())}, "
            f"input_seq_len={s['seq_len']})`): `power_a` > 1 draws the query gaps towards the "
            f"end of the sequence, so every query is {d['min']} to {d['max']} tokens (median "
            f"{d['median']:.0f}) after its key: beyond the window, so that the window alone cannot "
            f"answer. The decoding state is the size of `model.init_cache(1, max_length="
            f"{s['seq_len']})` (float32: KV caches, ring buffers, SSM and conv states, eidetic "
            f"slots), the memory that a recurrent reading of the model carries.\n\n"
            + "\n".join(lines) +
            "\n\n### Eidetic-memory ablation (B'MOJO-F = 0 slots; window and SSM fixed)\n\n"
            + "\n".join(abl) +
            f"\n\nModel: {s['model']} unless the row says otherwise (w window = chunk, n SSM "
            f"state, m eidetic slots, k_e eidetic tokens selected per chunk; FIFO eviction, lag "
            f"2 chunks). Training: {s['num_steps']} steps of {s['batch_size']} sequences from "
            f"{s['num_train']} examples, lr {', '.join(f'{lr:g}' for lr in s['lrs'])}"
            + (f" except {s['lrs_by_preset']} (per preset, the best of {{3e-3, 1e-2}} on the "
               f"synthetic table's MQAR)" if s.get("lrs_by_preset") else " (best on validation)")
            + f", warmup {s['warmup_steps']}, {s['num_eval']} test examples.")


def mqar_memory_plot(out, s, path):
    plt = plotting.pyplot()
    import matplotlib.ticker
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for preset in dict.fromkeys(r["preset"] for r in out["runs"]):
        mine = [r for r in out["runs"] if r["preset"] == preset]
        mine.sort(key=lambda r: r["state_bytes"])
        left.plot([r["state_bytes"] / 1024 for r in mine],
                  [100 * r["test_accuracy"] for r in mine], marker="o", label=preset)
    left.set_xscale("log")
    kib = [r["state_bytes"] / 1024 for r in out["runs"]]
    left.set_xticks([2.0 ** i for i in range(-4, 24)
                     if min(kib) / 2 <= 2.0 ** i <= max(kib) * 2])
    left.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("decoding state (KiB)")
    left.set_ylabel("MQAR test accuracy (%)")
    left.set_ylim(-2, 102)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    ablation = sorted((r for r in out["runs"] if r["preset"] in ("bmojo_f", "bmojo")),
                      key=lambda r: r["eidetic_slots"])
    if ablation:
        right.plot([r["eidetic_slots"] for r in ablation],
                   [100 * r["test_accuracy"] for r in ablation], marker="o", color="C5")
    right.set_xlabel("eidetic slots m (0 = B'MOJO-F)")
    right.set_ylabel("MQAR test accuracy (%)")
    right.set_ylim(-2, 102)
    right.grid(alpha=0.3)
    plotting.save(fig, path)


# --------------------------------------------------------------------------------------------------
# 3. Language modelling on Penn Treebank
# --------------------------------------------------------------------------------------------------


def lm_models(s: dict, presets, vocab_size: int) -> dict:
    """{preset: model overrides}: `s["model"]` plus a d_ff matching the transformer's
    non-embedding parameter count."""
    model = dict(s["model"], vocab_size=vocab_size)
    target = param_count(ModelConfig.preset("transformer", **model), embedding=False)
    out = {}
    for preset in presets:
        extra = {"innovation_loss_weight": 0.001} if preset == "bmojo" else {}
        matched = match_d_ff(ModelConfig.preset(preset, **model, **extra), target)
        out[preset] = dict(model, **extra, d_ff=matched.d_ff)
    return out


def run_lm(s: dict, presets, workdir: Path):
    corpus = data_lib.load_corpus("ptb")
    models = lm_models(s, presets, corpus.vocab_size)
    runs = []
    for preset in presets:
        config = _base_config(preset, models[preset], num_steps=s["num_steps"],
                              batch_size=s["batch_size"], lr=s["lr"],
                              warmup_steps=s["warmup_steps"], seed=s["seed"])
        config.data.update(name="ptb", seq_len=s["seq_len"])
        config.eval_batch_size = s["eval_batch_size"]
        result = train_run(config, workdir / preset)
        model_cfg = training.model_config(config, corpus.vocab_size)
        runs.append(dict(
            preset=preset, d_ff=model_cfg.hidden_dim, params=result["params"],
            non_embedding_params=param_count(model_cfg, embedding=False),
            valid_perplexity=result["valid"]["perplexity"],
            test_perplexity=result["test"]["perplexity"], tokens_per_s=result["tokens_per_s"],
            train_s=result["train_s"], wall_s=result["wall_s"],
            final_train_loss=result["final_train_loss"]))
        print(f"[lm] {preset}: valid ppl {runs[-1]['valid_perplexity']:.1f}, test ppl "
              f"{runs[-1]['test_perplexity']:.1f}, {result['tokens_per_s']:.0f} tok/s "
              f"({result['wall_s']:.0f} s)", flush=True)
    return dict(runs=runs, reference=[dict(model=m, test_perplexity=p) for m, p in ZAREMBA])


def lm_markdown(out, s, presets):
    transformer = next((r for r in out["runs"] if r["preset"] == "transformer"), None)
    lines = ["| model | d_ff | parameters (non-embedding) | valid ppl | test ppl | train "
             "tokens/s | train time (s) | vs transformer |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["runs"]:
        speed = ("—" if transformer is None else
                 f"{transformer['train_s'] / r['train_s']:.2f}x speed, "
                 f"{r['test_perplexity'] / transformer['test_perplexity']:.2f}x ppl")
        lines.append(f"| {r['preset']} | {r['d_ff']} | {r['params']:,} "
                     f"({r['non_embedding_params']:,}) | {r['valid_perplexity']:.1f} | "
                     f"{r['test_perplexity']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['train_s']:.0f} | {speed} |")
    for ref in out["reference"]:
        lines.append(f"| *{ref['model']}* | | | | *{ref['test_perplexity']}* | | | |")
    tokens = s["num_steps"] * s["batch_size"] * s["seq_len"]
    return ("\n".join(lines) +
            f"\n\nPenn Treebank, word level (Mikolov split, 10k words; `load_corpus('ptb')`). "
            f"Perplexity over every token of the validation and test splits, in contiguous "
            f"windows of {s['seq_len']} tokens. Model: {s['model']}; d_ff is set per preset to "
            f"match the transformer's non-embedding parameter count (the tied 10k x "
            f"{s['model']['d_model']} embedding is the same for all). `bmojo` uses "
            f"innovation_loss_weight 0.001 as in `experiments/configs/ptb.py`. Training: "
            f"{s['num_steps']} steps x {s['batch_size']} x {s['seq_len']} tokens = {tokens:,} "
            f"tokens (~{tokens / 929_000:.2f} epochs), lr {s['lr']:g}, warmup "
            f"{s['warmup_steps']}, cosine to 0.1 lr, AdamW wd 0.1. Training throughput is the "
            f"median over logged intervals (compilation excluded); train time = tokens / "
            f"throughput. The machine is shared, so throughputs carry ~10-20% noise. The LSTM "
            f"rows are external references trained for 13-55 epochs with dropout, not runs of "
            f"this code.")


# --------------------------------------------------------------------------------------------------
# 4. Inference time
# --------------------------------------------------------------------------------------------------


def inference_runners(preset: str, s: dict):
    """(prefill, decode, state bytes, parameters): compiled, warmed-up callables for one preset,
    at the transformer's non-embedding parameter count (d_ff matched as in the lm table)."""
    model = dict(s["model"])
    model_cfg = ModelConfig.preset(preset, **lm_models(dict(model=model), [preset],
                                                       model.pop("vocab_size"))[preset])
    model = LanguageModel(model_cfg, rngs=nnx.Rngs(0))
    b, t, steps = s["batch_size"], s["context"], s["decode_steps"]
    prompt = jax.random.randint(jax.random.PRNGKey(0), (b, t), 0, model_cfg.vocab_size,
                                jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, prompt):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(b, max_length=t + steps)
        return model.prefill(prompt, cache)

    @jax.jit
    def decode(state, token, cache):
        model = nnx.merge(graphdef, state)

        def step(carry, _):
            token, cache = carry
            logits, cache = model.decode_step(token, cache)
            return (logits.argmax(-1).astype(jnp.int32), cache), None

        return jax.lax.scan(step, (token, cache), None, length=steps)[0]

    logits, cache = jax.block_until_ready(prefill(state, prompt))  # compile + warm-up
    token = logits[:, -1].argmax(-1).astype(jnp.int32)
    jax.block_until_ready(decode(state, token, cache))
    return (lambda: jax.block_until_ready(prefill(state, prompt)),
            lambda: jax.block_until_ready(decode(state, token, cache)),
            state_bytes(cache), count_params(model))


def run_inference(s: dict, presets, workdir: Path):
    del workdir
    runners = {}
    for preset in presets:
        tic = time.perf_counter()
        runners[preset] = inference_runners(preset, s)
        print(f"[inference] {preset}: compiled in {time.perf_counter() - tic:.0f} s", flush=True)
    prefill_s = {p: [] for p in presets}
    decode_s = {p: [] for p in presets}
    for _ in range(s["rounds"]):  # interleaved rounds: machine noise hits every preset alike
        for p in presets:
            prefill, decode = runners[p][:2]
            tic = time.perf_counter()
            prefill()
            prefill_s[p].append(time.perf_counter() - tic)
            tic = time.perf_counter()
            decode()
            decode_s[p].append((time.perf_counter() - tic) / s["decode_steps"])
    runs = []
    for p in presets:
        runs.append(dict(
            preset=p, params=runners[p][3], state_bytes=runners[p][2],
            prefill_ms_median=1e3 * float(np.median(prefill_s[p])),
            prefill_ms_min=1e3 * float(np.min(prefill_s[p])),
            prefill_ms_max=1e3 * float(np.max(prefill_s[p])),
            decode_ms_median=1e3 * float(np.median(decode_s[p])),
            decode_ms_min=1e3 * float(np.min(decode_s[p])),
            decode_ms_max=1e3 * float(np.max(decode_s[p]))))
    return dict(runs=runs)


def inference_markdown(out, s, presets):
    transformer = next((r for r in out["runs"] if r["preset"] == "transformer"), None)
    lines = [f"| model | parameters | prefill {s['context']} tokens (ms) [min, max] | "
             f"decode ms/token at {s['context']} [min, max] | decoding state (MiB) | "
             f"vs transformer (prefill, decode) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in out["runs"]:
        ratio = ("—" if transformer is None else
                 f"{transformer['prefill_ms_median'] / r['prefill_ms_median']:.2f}x, "
                 f"{transformer['decode_ms_median'] / r['decode_ms_median']:.2f}x faster")
        lines.append(f"| {r['preset']} | {r['params']:,} | {r['prefill_ms_median']:.1f} "
                     f"[{r['prefill_ms_min']:.1f}, {r['prefill_ms_max']:.1f}] | "
                     f"{r['decode_ms_median']:.2f} [{r['decode_ms_min']:.2f}, "
                     f"{r['decode_ms_max']:.2f}] | {r['state_bytes'] / 2**20:.2f} | {ratio} |")
    return ("\n".join(lines) +
            f"\n\nModel: {s['model']} with d_ff matched per preset to the transformer's "
            f"non-embedding parameter count (as in the lm table), batch {s['batch_size']}, "
            f"float32, the default "
            f"implementation of every op on this backend. Prefill: the jit-compiled "
            f"`model.prefill` of a {s['context']}-token prompt into a fresh cache (parallel form). "
            f"Decode: {s['decode_steps']} jit-compiled `model.decode_step`s in one `lax.scan`, "
            f"greedy, continuing from the prefilled cache, per token. Compiled once and warmed "
            f"up; the presets are interleaved in {s['rounds']} rounds and the median [min, max] "
            f"over rounds is shown. The full transformer's KV cache is preallocated to "
            f"{s['context']} + {s['decode_steps']} tokens; the other states do not grow with the "
            f"context. The machine is shared: compare ratios within this table only.")


def inference_plot(out, s, path):
    plt = plotting.pyplot()
    runs = out["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["preset"] for r in runs]
    for ax, key, label in ((left, "prefill_ms", f"prefill {s['context']} tokens (ms)"),
                           (right, "decode_ms", f"decode at {s['context']} (ms/token)")):
        med = np.array([r[f"{key}_median"] for r in runs])
        err = np.array([[m - r[f"{key}_min"], r[f"{key}_max"] - m] for m, r in zip(med, runs)]).T
        ax.bar(names, med, yerr=err, color=[f"C{i}" for i in range(len(names))], capsize=3)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    plotting.save(fig, path)


# --------------------------------------------------------------------------------------------------
# 5. Length generalization on books
# --------------------------------------------------------------------------------------------------


def load_params(run_dir: Path):
    """(ModelConfig, params) of the latest checkpoint of a training workdir."""
    with training.Checkpoints(run_dir / "checkpoints", create=False) as checkpoints:
        meta, _, _ = checkpoints.restore(None)
        model_cfg = ModelConfig(**meta["model"])
        params = nnx.split(LanguageModel(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)[1]
        _, params, _ = checkpoints.restore(meta["step"], params)
    return model_cfg, params


def length_eval(model_cfg, params, tokens: np.ndarray, batch_size: int, seq_len: int,
                span: int) -> dict:
    """Perplexity of `tokens` at context `seq_len`, on the first `span` tokens of each of the
    `batch_size` streams of `lm_eval_batches`: the same tokens for every seq_len dividing span."""
    batches = data_lib.lm_eval_batches(tokens, batch_size, seq_len)[:span // seq_len]
    return training.evaluate(training.make_eval_step(model_cfg), params, batches)


def run_length(s: dict, presets, workdir: Path):
    corpus = data_lib.load_corpus(s["corpus"], vocab_size=s["bpe_vocab_size"], seed=s["seed"])
    t = s["seq_len"]
    span = t * max(s["multipliers"])
    runs = []
    for preset in presets:
        model = dict(s["model"])
        if preset == "bmojo":
            model["innovation_loss_weight"] = 0.001
        config = _base_config(preset, model, num_steps=s["num_steps"], batch_size=s["batch_size"],
                              lr=s["lr"], warmup_steps=s["warmup_steps"], seed=s["seed"])
        config.data.update(name=s["corpus"], seq_len=t, bpe_vocab_size=s["bpe_vocab_size"],
                           seed=s["seed"])
        # The library's final evaluation (whole valid/test splits at T) is not the measurement
        # here; large batches keep it quick.
        config.eval_batch_size = 64
        result = train_run(config, workdir / preset)
        model_cfg, params = load_params(workdir / preset)
        perplexity = {}
        tic = time.perf_counter()
        for m in s["multipliers"]:
            perplexity[m * t] = length_eval(model_cfg, params, corpus.test,
                                            s["eval_batch_size"], m * t, span)["perplexity"]
        runs.append(dict(preset=preset, params=result["params"], wall_s=result["wall_s"],
                         eval_s=time.perf_counter() - tic, train_seq_len=t,
                         perplexity={str(k): v for k, v in perplexity.items()}))
        print(f"[length] {preset}: " + ", ".join(f"{k}: {v:.1f}" for k, v in perplexity.items()),
              flush=True)
    return dict(runs=runs, eval_tokens=s["eval_batch_size"] * span,
                test_tokens=int(len(corpus.test)), vocab_size=corpus.vocab_size)


def length_markdown(out, s, presets):
    t = s["seq_len"]
    lengths = [m * t for m in s["multipliers"]]
    lines = ["| model | parameters | " + " | ".join(f"{L} ({L // t}x)" for L in lengths) +
             f" | ratio {lengths[-1] // t}x / 1x |",
             "|---|---:|" + "---:|" * len(lengths) + "---:|"]
    for r in out["runs"]:
        ppl = [r["perplexity"][str(L)] for L in lengths]
        lines.append(f"| {r['preset']} | {r['params']:,} | " +
                     " | ".join(f"{p:.1f}" for p in ppl) + f" | {ppl[-1] / ppl[0]:.2f} |")
    corpus = (f"Books = Shakespeare's 42 works + Austen's 6 novels, split by document "
              f"(`load_corpus('books')`, BPE {out['vocab_size']}); the test documents are held "
              f"out from training and from the tokenizer." if s["corpus"] == "books" else
              f"Corpus `{s['corpus']}` (vocabulary {out['vocab_size']}).")
    return (f"Test perplexity at evaluation context length (tokens), training context T = {t}."
            f"\n\n" + "\n".join(lines) + f"\n\n{corpus} At every context length L the same {out['eval_tokens']:,} test "
            f"tokens are scored: the first {max(s['multipliers']) * t} tokens of each of "
            f"{s['eval_batch_size']} contiguous streams of the test split "
            f"({out['test_tokens']:,} tokens), cut into windows of L tokens (each window starts "
            f"from an empty state; perplexity averages over all positions of the windows). "
            f"Model: {s['model']}; training: {s['num_steps']} steps x {s['batch_size']} x {t} "
            f"tokens, lr {s['lr']:g}, warmup {s['warmup_steps']}, cosine to 0.1 lr. RoPE "
            f"positions continue past T for the attention layers (no interpolation).")


def length_plot(out, s, path):
    plt = plotting.pyplot()
    t = s["seq_len"]
    lengths = [m * t for m in s["multipliers"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in out["runs"]:
        ax.plot(lengths, [r["perplexity"][str(L)] for L in lengths], marker="o",
                label=r["preset"])
    ax.axvline(t, color="gray", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"evaluation context (tokens); training context T = {t}")
    ax.set_ylabel("test perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    plotting.save(fig, path)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

TITLES = {
    "synthetic": "Synthetic recall tasks (paper: the four recall tasks x model families, 2 layers)",
    "mqar_memory": "MQAR accuracy vs memory budget, and the eidetic-memory ablation",
    "lm": "Penn Treebank perplexity and training time at matched parameter counts",
    "inference": "Inference time: prefill of a 2k-token prompt and per-token decoding",
    "length": "Length generalization: train at context T, evaluate at 1x..16x T",
}
RUNNERS = {"synthetic": run_synthetic, "mqar_memory": run_mqar_memory, "lm": run_lm,
           "inference": run_inference, "length": run_length}
MARKDOWN = {"synthetic": synthetic_markdown, "mqar_memory": mqar_memory_markdown,
            "lm": lm_markdown, "inference": inference_markdown, "length": length_markdown}
PLOTS = {"synthetic": lambda out, s, presets, path: synthetic_plot(out, s, presets, path),
         "mqar_memory": lambda out, s, presets, path: mqar_memory_plot(out, s, path),
         "inference": lambda out, s, presets, path: inference_plot(out, s, path),
         "length": lambda out, s, presets, path: length_plot(out, s, path)}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def reproduce(table: str, budget: str = "full", out_dir="results", presets=None,
              workdir=None, command: str | None = None) -> dict:
    """Runs one table and writes OUT_DIR/TABLE.{md,json[,png]}.

    Args:
      table: one of TABLES.
      budget: "tiny" or "full" (see BUDGETS).
      out_dir: where the files go (created).
      presets: the presets to run (None: all six; the tiny budget: TINY_PRESETS).
      workdir: training workdirs go under WORKDIR/TABLE-BUDGET (None: a temporary directory
        under /tmp); each run's directory is replaced.
      command: the command line to print in the files (None: this process's).

    Returns:
      The JSON object written.
    """
    if table not in TABLES:
        raise ValueError(f"table={table!r}: allowed values are {', '.join(TABLES)}.")
    if budget not in BUDGETS:
        raise ValueError(f"budget={budget!r}: allowed values are {', '.join(BUDGETS)}.")
    presets = tuple(presets or (TINY_PRESETS if budget == "tiny" else PRESETS))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"presets {unknown}: allowed values are {', '.join(PRESETS)}.")
    settings = BUDGETS[budget][table]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(workdir or "/tmp/bmojo_reproduce") / f"{table}-{budget}"
    workdir.mkdir(parents=True, exist_ok=True)
    command = command or "python -m experiments.reproduce " + " ".join(sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    tic = time.perf_counter()
    out = RUNNERS[table](settings, presets, workdir)
    wall = time.perf_counter() - tic
    record = dict(table=table, title=TITLES[table], command=command, budget=budget,
                  presets=list(presets), settings=settings, seeds=dict(
                      model_init_and_batch_order=settings.get("seed", 0),
                      data=settings.get("seed", 0)),
                  machine=machine(), started_utc=started.isoformat(timespec="seconds"),
                  wall_seconds=wall, **out)
    record = _jsonable(record)
    (out_dir / f"{table}.json").write_text(json.dumps(record, indent=1) + "\n")
    header = (f"# {TITLES[table]}\n\n"
              f"Command: `{command}` (budget `{budget}`)  \n"
              f"Machine: {record['machine']}; shared with other jobs while it ran  \n"
              f"Started {record['started_utc']}, wall time {wall / 60:.1f} min  \n"
              f"Seeds: model initialisation and batch order {settings.get('seed', 0)}, data "
              f"{settings.get('seed', 0)} (synthetic sets: train seed, valid seed+1, test "
              f"seed+2)  \n"
              f"Presets: {', '.join(presets)}; raw numbers and every setting: `{table}.json`\n\n")
    body = MARKDOWN[table](record, settings, presets)
    figure = ""
    if table in PLOTS:
        PLOTS[table](record, settings, presets, out_dir / f"{table}.png")
        figure = f"\n\n![{table}]({table}.png)\n"
    (out_dir / f"{table}.md").write_text(header + body + figure + "\n")
    return record


flags.DEFINE_enum("table", None, TABLES + ("all",), "Which table to reproduce.")
flags.DEFINE_enum("budget", "full", tuple(BUDGETS), "tiny: seconds (tests); full: the committed "
                  "results (minutes per table on 2 CPU cores).")
flags.DEFINE_string("out_dir", "results", "Directory for TABLE.md, TABLE.json, TABLE.png.")
flags.DEFINE_list("presets", None, "Presets to run (default: all six; tiny: swa,bmojo).")
flags.DEFINE_string("workdir", "/tmp/bmojo_reproduce", "Root of the training workdirs and of the "
                    "JAX compilation cache.")
flags.mark_flag_as_required("table")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
    jax.config.update("jax_compilation_cache_dir", str(Path(FLAGS.workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    tables = TABLES if FLAGS.table == "all" else (FLAGS.table,)
    for table in tables:
        command = ("python -m experiments.reproduce " +
                   " ".join(f"--{n}={FLAGS[n].value}" for n in ("table", "budget", "out_dir")
                            if n != "table") + f" --table={table}" +
                   (f" --presets={','.join(FLAGS.presets)}" if FLAGS.presets else ""))
        reproduce(table, FLAGS.budget, FLAGS.out_dir, FLAGS.presets, FLAGS.workdir, command)
        print(f"wrote {Path(FLAGS.out_dir) / table}.md", flush=True)


if __name__ == "__main__":
    app.run(main)
