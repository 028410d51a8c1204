"""Table 2 of docs/design.md section 7: MQAR whose queries sit far beyond the window (power_a > 1
pushes the queries to the end of the sequence), accuracy vs the decoding-state size, sweeping the
SSM state size, the window and the eidetic slots; the eidetic-slot ablation."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from benchmarks import decoding
from bmojo_jax import data as data_lib
from bmojo_jax import training
from experiments import plotting
from experiments.reproduce import runner, synthetic

NAME = "mqar_memory"
TITLE = "MQAR accuracy vs memory budget, and the eidetic-memory ablation"
SHORT = {"window": "w", "d_state": "n", "eidetic_slots": "m", "eidetic_per_chunk": "k_e"}


def budgets() -> dict:
    """{"tiny", "full"}: ConfigDicts of every setting.

    Fields: seq_len, task (`data.mqar` arguments), model (ModelConfig fields), variants ((preset,
    model overrides), ...: the rows; `bmojo` rows must set their eidetic slots), lrs (the grid),
    lrs_by_preset (a preset's own grid), num_steps, batch_size, warmup_steps, num_train, num_eval,
    seed. The full budget's learning rates are, per preset, the best of the synthetic table's
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
        warmup_steps=20, num_train=16000, num_eval=256, seed=0)
    tiny = dict(
        full, seq_len=32, task=dict(vocab_size=64, num_kv_pairs=2, power_a=10.0),
        model=dict(d_model=32, n_layers=2, n_heads=2, window=8, chunk_size=8, d_state=8,
                   ssm_head_dim=16),
        variants=(("swa", {}), ("bmojo", dict(eidetic_per_chunk=1, eidetic_slots=2))),
        lrs=(1e-2,), lrs_by_preset={}, num_steps=4, batch_size=8, warmup_steps=1, num_train=64,
        num_eval=16)
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


def run(s, presets, workdir: Path) -> dict:
    """Every variant of a preset in `presets`, each at the best of its learning rates."""
    runs = []
    distances = query_distances(s)
    for i, (preset, overrides) in enumerate(s.variants):
        if preset not in presets:
            continue
        if preset == "bmojo" and "eidetic_slots" not in overrides:
            raise ValueError(f"mqar_memory variant {i} (bmojo, {overrides}): give bmojo variants "
                             f"their eidetic_slots and eidetic_per_chunk.")
        best = None
        for lr in s.lrs_by_preset.get(preset, s.lrs):
            model = dict(s.model, vocab_size=s.task.vocab_size, **overrides)
            config = runner.point_config(preset, model, s, lr=lr)
            config.data.update(name="mqar", seq_len=s.seq_len, num_train=s.num_train,
                               num_eval=s.num_eval, seed=s.seed)
            config.data.task = s.task.to_dict()
            result = runner.train_point(config, workdir / f"{i:02d}-{preset}-lr{lr:g}")
            print(f"[mqar_memory] {preset} {short(overrides)} lr={lr:g}: valid acc "
                  f"{result['valid']['accuracy']:.3f} ({result['wall_s']:.0f} s)", flush=True)
            if best is None or result["valid"]["accuracy"] > best["valid"]["accuracy"]:
                best = dict(result, lr=lr)
        model_cfg = training.model_config(config, s.task.vocab_size)
        window = None if preset in ("transformer", "mamba") else model_cfg.window
        runs.append(dict(
            preset=preset, overrides=dict(overrides), label=f"{preset} ({short(overrides)})",
            window=window, d_state=None if preset in ("transformer", "swa") else model_cfg.d_state,
            eidetic_slots=model_cfg.eidetic_slots if preset == "bmojo" else 0,
            eidetic_eviction=model_cfg.eidetic_eviction, eidetic_lag=model_cfg.eidetic_lag,
            state_bytes=decoding.state_bytes(model_cfg, 1, s.seq_len), params=best["params"],
            lr=best["lr"], valid_accuracy=best["valid"]["accuracy"],
            test_accuracy=best["test"]["accuracy"], wall_s=best["wall_s"],
            queries_within_window=(None if window is None
                                   else float(np.mean(distances < window))),
            queries_within_2_windows=(None if window is None
                                      else float(np.mean(distances < 2 * window)))))
    return dict(runs=runs, optimizer=config.optimizer.to_dict(), query_distance=dict(
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
                     f"{r['lr']:g} | {within} | {_pct(r['test_accuracy'])} | "
                     f"{r['wall_s']:.0f} |")
    ablation = sorted((r for r in record["runs"] if r["preset"] in ("bmojo_f", "bmojo")),
                      key=lambda r: r["eidetic_slots"])
    abl = ["| eidetic slots m (k_e per chunk) | test accuracy (%) |", "|---:|---:|"]
    abl += [f"| {r['eidetic_slots']} ({r['overrides'].get('eidetic_per_chunk', 0)}) | "
            f"{_pct(r['test_accuracy'])} |" for r in ablation]
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
            f"examples, lr {lrs} (best on validation), "
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
        left.plot([r["state_bytes"] / 1024 for r in mine],
                  [100 * r["test_accuracy"] for r in mine], **plotting.series_style(preset, order))
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
        right.plot([r["eidetic_slots"] for r in ablation],
                   [100 * r["test_accuracy"] for r in ablation], **plotting.series_style("bmojo"))
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
    seeds = record["seeds"]
    plotting.save(fig, path, caption=(
        f"One training run per point (model seed {seeds['model_init_and_batch_order']}, data seed "
        f"{seeds['data']}) at the best learning rate of its grid on validation; no error bars. "
        f"Lines join the variants of one preset in order of state size."))
