"""Table 2 of docs/design.md section 7: MQAR whose queries sit far beyond the window (power_a > 1
pushes the queries to the end of the sequence), accuracy vs the decoding-state size, sweeping the
SSM state size, the window and the eidetic slots; the eidetic-slot ablation."""

from __future__ import annotations

import functools
from pathlib import Path

import ml_collections
import numpy as np

from benchmarks import decoding
from bmojo_jax import data as data_lib
from bmojo_jax import training
from experiments import plotting, sweep
from experiments.reproduce import runner, synthetic

NAME = "mqar_memory"
TITLE = "MQAR accuracy vs memory budget, and the eidetic-memory ablation"
SHORT = {"window": "w", "d_state": "n", "eidetic_slots": "m", "eidetic_per_chunk": "k_e"}


def budgets() -> dict:
    """{"tiny", "full"}: ConfigDicts of every setting.

    Fields: seq_len, task (`data.mqar` arguments), model (ModelConfig fields), variants ((preset,
    model overrides), ...: the rows; `bmojo` rows must set their eidetic slots), lrs (the grid),
    lrs_by_preset (a preset's own grid), seeds (initialisation and batch order: every row runs
    each, mean +- std), seed (the data's), num_steps, batch_size, warmup_steps, num_train,
    num_eval. The full budget's learning rates are, per preset, the best of the synthetic table's
    grid on its MQAR task.
    """
    full = dict(
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
        lrs=(3e-3,), lrs_by_preset={"mamba": (1e-2,)}, num_steps=500, batch_size=32,
        warmup_steps=20, num_train=16000, num_eval=256, seeds=(0,), seed=0)
    tiny = dict(
        full, seq_len=32, task=dict(vocab_size=64, num_kv_pairs=2, power_a=10.0),
        model=dict(d_model=32, n_layers=2, n_heads=2, window=8, chunk_size=8, d_state=8,
                   ssm_head_dim=16),
        variants=(("swa", {}), ("bmojo", dict(eidetic_per_chunk=1, eidetic_slots=2))),
        lrs=(1e-2,), lrs_by_preset={}, num_steps=4, batch_size=8, warmup_steps=1, num_train=64,
        num_eval=16, seeds=(0, 1))
    return {"tiny": ml_collections.ConfigDict(tiny), "full": ml_collections.ConfigDict(full)}


def short(overrides) -> str:
    """A row's memory knobs in the table's notation, e.g. "w=8" ("default" when none)."""
    return ", ".join(f"{SHORT.get(k, k)}={v}" for k, v in overrides.items()) or "default"


def query_distances(s, num_examples: int = 1000) -> np.ndarray:
    """Distances (tokens) from each query to its key's position in the context, on test-seed
    examples: int [queries]."""
    inputs, labels = data_lib.mqar(**s.task, input_seq_len=s.seq_len, num_examples=num_examples,
                                   seed=s.seed + 2)
    k = s.task.num_kv_pairs
    distances = []
    for x, y in zip(inputs, labels):
        for pos in np.flatnonzero(y != data_lib.IGNORE_INDEX):
            distances.append(pos - np.flatnonzero(x[:2 * k] == x[pos])[0])
    return np.asarray(distances)


def point_config(row: str, s):
    """The training config of a row "<i>-<preset>", the variant `s.variants[i]` (the sweep sets
    each point's lr and seed)."""
    preset, overrides = s.variants[int(row.partition("-")[0])]
    model = dict(s.model, vocab_size=s.task.vocab_size, **overrides)
    config = runner.point_config(preset, model, s)
    config.data.update(name="mqar", seq_len=s.seq_len, num_train=s.num_train,
                       num_eval=s.num_eval, seed=s.seed)
    config.data.task = s.task.to_dict()
    return config


def run(s, presets, workdir: Path) -> dict:
    """Every variant of a preset in `presets` over its learning rates x `s.seeds`
    (`sweep.run_setting`, points in WORKDIR/<i>-<preset>-lr<lr>-s<seed>), at its best rate."""
    rows = []
    distances = query_distances(s)
    for i, (preset, overrides) in enumerate(s.variants):
        if preset not in presets:
            continue
        if preset == "bmojo" and "eidetic_slots" not in overrides:
            raise ValueError(f"mqar_memory variant {i} (bmojo, {overrides}): give bmojo variants "
                             f"their eidetic_slots and eidetic_per_chunk.")
        name = f"{i:02d}-{preset}"
        row = sweep.run_setting(functools.partial(point_config, s=s), name,
                                s.lrs_by_preset.get(preset, s.lrs), s.seeds, workdir,
                                log="mqar_memory")
        model_cfg = training.model_config(point_config(name, s), s.task.vocab_size)
        window = None if preset in ("transformer", "mamba") else model_cfg.window
        rows.append(dict(
            runner.row_stats(row, "accuracy"),
            preset=preset, overrides=dict(overrides), label=f"{preset} ({short(overrides)})",
            window=window, d_state=None if preset in ("transformer", "swa") else model_cfg.d_state,
            eidetic_slots=model_cfg.eidetic_slots if preset == "bmojo" else 0,
            eidetic_eviction=model_cfg.eidetic_eviction, eidetic_lag=model_cfg.eidetic_lag,
            state_bytes=decoding.state_bytes(model_cfg, 1, s.seq_len),
            queries_within_window=(None if window is None
                                   else float(np.mean(distances < window))),
            queries_within_2_windows=(None if window is None
                                      else float(np.mean(distances < 2 * window)))))
    return dict(runs=rows, optimizer=row["records"][0]["config"]["optimizer"], query_distance=dict(
        min=int(distances.min()), median=float(np.median(distances)),
        max=int(distances.max())))


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(record, s) -> str:
    """The memory table, the eidetic-slot ablation and the settings in prose."""
    d = record["query_distance"]
    lines = ["| model (memory knobs) | decoding state (KiB) | parameters | lr | queries with key "
             "in window / in 2 windows (%) | test accuracy (%) | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["runs"]:
        within = ("—" if r["queries_within_window"] is None else
                  f"{_pct(r['queries_within_window'])} / {_pct(r['queries_within_2_windows'])}")
        lines.append(f"| {r['label']} | {r['state_bytes'] / 1024:.1f} | {r['params']:,} | "
                     f"{r['lr']:g} | {within} | "
                     f"{runner.mean_std(r, 'test_accuracy', scale=100)} | "
                     f"{r['wall_s']:.0f} |")
    ablation = sorted((r for r in record["runs"] if r["preset"] in ("bmojo_f", "bmojo")),
                      key=lambda r: r["eidetic_slots"])
    abl = ["| eidetic slots m (k_e per chunk) | test accuracy (%) |", "|---:|---:|"]
    abl += [f"| {r['eidetic_slots']} ({r['overrides'].get('eidetic_per_chunk', 0)}) | "
            f"{runner.mean_std(r, 'test_accuracy', scale=100)} |" for r in ablation]
    bmojo = next((r for r in record["runs"] if r["preset"] == "bmojo"), None)
    eviction = ("" if bmojo is None else f"; {bmojo['eidetic_eviction']} eviction, lag "
                f"{bmojo['eidetic_lag']} chunks")
    lrs = ", ".join(f"{lr:g}" for lr in s.lrs)
    if s.lrs_by_preset:
        own = "; ".join(f"{p}: {', '.join(f'{lr:g}' for lr in v)}"
                        for p, v in s.lrs_by_preset.items())
        synthetic_grid = ", ".join(f"{lr:g}" for lr in synthetic.budgets()["full"].lrs)
        lrs += (f" except {own} (per preset, the best of {{{synthetic_grid}}} on the synthetic "
                f"table's MQAR)")
    return (f"MQAR (`mqar({runner.describe(s.task)}, input_seq_len={s.seq_len})`): `power_a` > 1 "
            f"draws the query gaps towards the end of the sequence, so every query is {d['min']} "
            f"to {d['max']} tokens (median {d['median']:.0f}) after its key: beyond the window, "
            f"so that the window alone cannot answer. The decoding state is the size of "
            f"`model.init_cache(1, max_length={s.seq_len})` (float32: KV caches, ring buffers, "
            f"SSM and conv states, eidetic slots), the memory that a recurrent reading of the "
            f"model carries.\n\n" + "\n".join(lines) +
            "\n\n### Eidetic-memory ablation (B'MOJO-F = 0 slots; window and SSM fixed)\n\n"
            + "\n".join(abl) +
            f"\n\nModel: {runner.describe(s.model)} unless the row says otherwise (w window, n "
            f"SSM state, m eidetic slots, k_e eidetic tokens selected per chunk{eviction}). "
            f"Training: {s.num_steps} steps of {s.batch_size} sequences from {s.num_train} "
            f"examples, lr {lrs} (best mean on validation), seeds "
            f"{', '.join(map(str, s.seeds))} (test accuracy: mean +- std over them), "
            f"{runner.describe_optimizer(record['optimizer'], s.num_steps)}; {s.num_eval} test "
            f"examples.")


def plot(record, s, path) -> None:
    """Accuracy vs decoding-state size per preset (left); accuracy vs eidetic slots (right). Every
    point is drawn with its preset's hollow marker (`plotting.series_style`), so points that
    nearly coincide (the transformer and the B'MOJO points near 64 KiB) all stay visible."""
    del s  # everything plotted is in the record
    plt = plotting.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    for order, preset in enumerate(dict.fromkeys(r["preset"] for r in record["runs"])):
        mine = sorted((r for r in record["runs"] if r["preset"] == preset),
                      key=lambda r: r["state_bytes"])
        xs = [r["state_bytes"] / 1024 for r in mine]
        left.plot(xs, [100 * r["test_accuracy"] for r in mine],
                  **plotting.series_style(preset, order))
        _error_bars(left, xs, mine)
    left.set_xscale("log")
    plotting.log2_ticks(left.xaxis, [r["state_bytes"] / 1024 for r in record["runs"]])
    left.set_title("accuracy vs decoding-state size")
    left.set_xlabel("decoding state (KiB, log scale)")
    left.set_ylabel("MQAR test accuracy (%)")
    left.set_ylim(-2, 102)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    ablation = sorted((r for r in record["runs"] if r["preset"] in ("bmojo_f", "bmojo")),
                      key=lambda r: r["eidetic_slots"])
    if ablation:
        xs = [r["eidetic_slots"] for r in ablation]
        right.plot(xs, [100 * r["test_accuracy"] for r in ablation],
                   **plotting.series_style("bmojo"))
        _error_bars(right, xs, ablation)
        for r in ablation:
            if r["preset"] == "bmojo_f":  # its own marker over the line's first point
                right.plot([0], [100 * r["test_accuracy"]], ls="none",
                           **plotting.series_style("bmojo_f"))
        right.legend(fontsize=8)
    right.set_title("eidetic-memory ablation (window and SSM fixed)")
    right.set_xlabel("eidetic slots m (0 = B'MOJO-F)")
    right.set_ylabel("MQAR test accuracy (%)")
    right.set_ylim(-2, 102)
    right.grid(alpha=0.3)
    seeds = record["seeds"]["model_init_and_batch_order"]
    seeds = seeds if isinstance(seeds, list) else [seeds]  # a table made before the seeds
    plotting.save(fig, path, caption=(
        f"Mean test accuracy over the model seeds {', '.join(map(str, seeds))} (data seed "
        f"{record['seeds']['data']}) at the best learning rate of each point's grid on "
        f"validation; " + ("error bars (gray): +- std over the seeds" if len(seeds) > 1 else
                           "one seed, so no error bars") +
        ". Lines join the variants of one preset in order of state size."))


def _error_bars(ax, xs, rows) -> None:
    """+- std over the seeds of each row's test accuracy (%), in gray; nothing for rows of one
    seed (or a table made before the seeds)."""
    if any(len(r.get("seeds", ())) > 1 for r in rows):
        ax.errorbar(xs, [100 * r["test_accuracy"] for r in rows],
                    yerr=[100 * r.get("test_accuracy_std", 0.0) for r in rows], fmt="none",
                    ecolor="gray", capsize=2, lw=1)
