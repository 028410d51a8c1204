"""Table 2 of docs/design.md section 7, at competence (section 7b): Zoology's frontier of MQAR
accuracy against decoding-state bytes, on far-query MQAR (every key/value pair has left the
window and the fading span of a `B` layer when its query comes), one curve per family:
Transformer, SWA over the window, Mamba over d_state, B'MOJO over its eidetic slots (window and
d_state fixed); and every eidetic selection rule at one slot count, bracketed by the content-blind
controls and the oracle, with the eidetic diagnostics of every B'MOJO row.

Every point is a point of `experiments/configs/mqar_far.py` with the budget's fields set
(`sweep.run_point`), so a sweep of that config with the same fields (several side by side, one per
core) trains the same points in the same workdirs, and this table collects them.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from benchmarks import decoding
from bmojo_jax import training
from experiments import plotting, sweep
from experiments.config_fields import load_config_module
from experiments.reproduce import runner

NAME = "mqar_memory"
TITLE = "MQAR accuracy vs decoding-state size at competence, and the eidetic selection rules"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mqar_far.py"
# The selection rules beside the default ("fading"), each a mqar_far argument bmojo_<rule>: the
# oracle first, then the rules, then the content-blind controls.
RULES = ("oracle", "state", "learned", "threshold", "quantile", "random", "projection")
def budgets() -> dict:
    """{"tiny", "full"}: ConfigDicts of every setting.

    Fields: set (the "FIELD=VALUE" overrides of `experiments/configs/mqar_far.py` for every row,
    the `--set` of a sweep), bmojo_set (added for the rows of B'MOJO with eidetic slots), rows
    ((argument of mqar_far.get_config, "FIELD=VALUE,..." swept fields or ""), ...), ablation
    ("model.eidetic_slots=N", ...: every rule of `RULES` with a row again at N slots, at the
    learning rate that row did best at), lrs (the
    grid, in the order tried), skip_grid_above (a row's grid stops at the first rate whose mean
    validation accuracy over the seeds reaches it), seeds (initialisation and batch order: every
    row runs each, mean +- std), seed (the data's).

    The rows: every family over its memory knob (Zoology's frontier; B'MOJO's default rule over
    4 to 64 eidetic slots, though at t = 32 with 4 selections per chunk of 4 no buffer holds more
    than 24), then every other selection rule at 8 slots (bmojo_set), and again at 4 and 16 at
    its best rate there (our choice, to fit the budget: a rule below 99% runs 9 points of about
    7 minutes for its grid): the eidetic-size ablation of each rule, bracketed by the oracle and
    the content-blind controls; last, the gates made more lenient: the "threshold" rule at the
    factors 1 and 0.5 (its default, 2 times the running mean of the scores, rejects most of the
    context: results/eidetic.md) and the "quantile" rule at q = 0.25 (the default 0.5 passes
    about half of it).

    The full budget is the far-query probe of results/eidetic.md (item 6, at d_model 64): t = 32,
    K = 4 pairs in [0, 8), queries from position 16, vocabulary 64, window 4, d_state 4, 20,000
    training examples, early stop at 99% validation accuracy or 3000 steps (our choice: the
    smallest size at which full attention, SWA and B'MOJO's slots separate, about 2-7 minutes a
    point on one core). Every row the same grid, 3e-3 (the probe's) first, then 1e-3 and 1e-2
    while its mean is below 99% (our choice: a row that solves the task at one rate cannot do
    better, and most rows do at the first).
    """
    probe = ("model.d_model=64", "model.window=4", "model.chunk_size=4", "model.d_state=4",
             "model.ssm_head_dim=8", "data.seq_len=32", "data.num_train=20000",
             "data.num_eval=256", "data.task.vocab_size=64", "data.task.query_start=16",
             "optimizer.warmup_steps=50", "num_steps=3000", "eval_every=100",
             "checkpoint_every=1000", "eval_batches=4")
    full = dict(
        set=probe, bmojo_set=("model.eidetic_per_chunk=4", "model.eidetic_slots=8"),
        rows=(("transformer", ""),
              ("swa", "model.window=4"), ("swa", "model.window=8"), ("swa", "model.window=16"),
              ("mamba", "model.d_state=4"), ("mamba", "model.d_state=16"),
              ("mamba", "model.d_state=64"),
              ("bmojo_f", ""),
              ("bmojo", "model.eidetic_slots=4"), ("bmojo", "model.eidetic_slots=8"),
              ("bmojo", "model.eidetic_slots=16"), ("bmojo", "model.eidetic_slots=32"),
              ("bmojo", "model.eidetic_slots=64"),
              *((f"bmojo_{rule}", "") for rule in RULES),
              ("bmojo_threshold", "model.eidetic_threshold=1"),
              ("bmojo_threshold", "model.eidetic_threshold=0.5"),
              ("bmojo_quantile", "model.eidetic_quantile=0.25")),
        ablation=("model.eidetic_slots=4", "model.eidetic_slots=16"),
        lrs=(3e-3, 1e-3, 1e-2), skip_grid_above=0.99, seeds=(0, 1, 2), seed=0)
    tiny = dict(
        full, set=("model.d_model=16", "model.n_heads=2", "model.window=4", "model.chunk_size=4",
                   "model.d_state=4", "model.ssm_head_dim=8", "data.seq_len=24",
                   "data.num_train=64", "data.num_eval=16", "data.task.vocab_size=32",
                   "data.task.num_kv_pairs=2", "data.task.query_start=12",
                   "optimizer.warmup_steps=1", "num_steps=4", "batch_size=8",
                   "early_stop.target=0.5", "eval_every=2", "checkpoint_every=4", "eval_batches=1", "log_every=2"),
        bmojo_set=("model.eidetic_per_chunk=4", "model.eidetic_slots=4"),
        rows=(("swa", "model.window=4"), ("bmojo", "model.eidetic_slots=4"), ("bmojo_oracle", "")),
        ablation=("model.eidetic_slots=8",),
        lrs=(1e-2,), seeds=(0, 1))
    return {"tiny": ml_collections.ConfigDict(tiny), "full": ml_collections.ConfigDict(full)}


def preset_of(arg: str) -> str:
    """The preset of a mqar_far argument ("bmojo_state" -> "bmojo", "bmojo_f" -> "bmojo_f")."""
    return "bmojo" if arg.startswith("bmojo_") and arg != "bmojo_f" else arg


def rule_of(arg: str) -> str | None:
    """The eidetic selection of a B'MOJO argument ("oracle" included; "fading" for "bmojo"),
    None for the other presets."""
    if preset_of(arg) != "bmojo":
        return None
    return arg.partition("_")[2] or "fading"


def overrides(s, arg: str) -> list[str]:
    """The `--set` of a row: the budget's fields, and bmojo_set for B'MOJO with slots."""
    return list(s.set) + (list(s.bmojo_set) if preset_of(arg) == "bmojo" else [])


def fields_of(text: str) -> dict:
    """{field: value} of a row's "FIELD=VALUE,..." (one value each)."""
    return {field: values[0] for field, values in sweep.parse_sweep(text.replace(",", ";"))
            .items()} if text else {}


def label(arg: str, fields: dict, eidetic_slots: int) -> str:
    """A row's name in the table, e.g. "swa (window=8)", "bmojo (eidetic_slots=8, oracle)"."""
    knobs = [f"{k.removeprefix('model.')}={v}" for k, v in fields.items()]
    rule = rule_of(arg)
    if rule and "model.eidetic_slots" not in fields:
        knobs.append(f"eidetic_slots={eidetic_slots}")
    return f"{preset_of(arg)} ({', '.join(knobs + ([rule] if rule else [])) or 'default'})"


def run(s, presets, workdir: Path, points: sweep.Points) -> dict:
    """Every row whose preset is in `presets` over `s.lrs` x `s.seeds` (`sweep.run_setting` of
    mqar_far.get_config, points in WORKDIR/<point>; the grid stops at the first rate whose mean
    validation accuracy reaches `s.skip_grid_above`), at its best rate, with the decoding-state
    bytes and, for B'MOJO rows, the eidetic diagnostics of every best-rate seed (mean); then the
    rows of `s.ablation`: every selection rule whose row ran again at each of those slot counts,
    at the rate that row did best at."""
    get_config = load_config_module(str(CONFIG)).get_config
    rows = []

    def add_row(arg, text, lrs):
        fields = fields_of(text)
        row = sweep.run_setting(get_config, arg, lrs, runner.seeds_of(arg, s), workdir,
                                log=NAME, points=points, overrides=overrides(s, arg), fields=fields,
                                stop_above=s.skip_grid_above, evaluate=sweep.point_diagnostics)
        best = row["best"]
        config = ml_collections.ConfigDict(best[0]["config"])  # the trained config, as recorded
        model_cfg = training.model_config(config, config.data.task.vocab_size)
        diags = [r["evaluation"] for r in best]
        rows.append(dict(
            runner.row_stats(row, "accuracy"), arg=arg, preset=preset_of(arg), rule=rule_of(arg),
            fields=fields, label=label(arg, fields, model_cfg.eidetic_slots),
            window=None if preset_of(arg) in ("transformer", "mamba") else model_cfg.window,
            d_state=None if preset_of(arg) in ("transformer", "swa") else model_cfg.d_state,
            eidetic_slots=model_cfg.eidetic_slots if preset_of(arg) == "bmojo" else 0,
            state_bytes=decoding.state_bytes(model_cfg, 1, config.data.seq_len),
            solved=[r["result"]["valid"]["accuracy"] >= config.early_stop.target for r in best],
            diagnostics=None if diags[0] is None else {  # points evaluated before a
                k: float(np.mean([d[k] for d in diags]))  # field existed lack it
                for k in diags[0] if all(k in d for d in diags)}))

    for arg, text in s.rows:
        if preset_of(arg) in presets:
            add_row(arg, text, s.lrs)
    best_lr = {r["arg"]: r["lr"] for r in rows if r["rule"] is not None and not r["fields"]}
    for text in s.ablation:
        for rule in RULES:
            if f"bmojo_{rule}" in best_lr:
                add_row(f"bmojo_{rule}", text, (best_lr[f"bmojo_{rule}"],))
    _, config = sweep.point_config(get_config, s.rows[0][0], s.lrs[0], s.seeds[0],
                                   overrides(s, s.rows[0][0]), fields_of(s.rows[0][1]))
    return dict(runs=rows, optimizer=config.optimizer.to_dict(), task=config.data.task.to_dict(),
                seq_len=config.data.seq_len, num_train=config.data.num_train,
                num_eval=config.data.num_eval, num_steps=config.num_steps,
                batch_size=config.batch_size, n_layers=config.model.n_layers)


def series(row) -> str:
    """The plotted series of a B'MOJO row: its rule, then any field other than eidetic_slots
    (the x axis), e.g. "threshold" or "threshold, eidetic_threshold=1"."""
    return ", ".join([row["rule"], *(f"{k.removeprefix('model.')}={v}"
                                     for k, v in row["fields"].items()
                                     if k != "model.eidetic_slots")])


def _lr(row) -> str:
    """The best learning rate, and the mean validation accuracy at each rate of a grid."""
    grid = row["lr_grid"]
    return f"{row['lr']:g}" + ("" if len(grid) < 2 else " (" + ", ".join(
        f"{lr}: {100 * v:.0f}%" for lr, v in grid.items()) + ")")


def _pct(row, key="test_accuracy"):
    return runner.mean_std(row, key, scale=100)


def markdown(record, s) -> str:
    """The frontier table, the selection rules with their diagnostics, and the settings."""
    lines = ["| model (memory knobs) | decoding state (KiB) | parameters | lr | test accuracy (%) "
             "| seeds at >= 99% | steps to 90% |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in record["runs"]:
        lines.append(f"| {r['label']} | {r['state_bytes'] / 1024:.1f} | {r['params']:,} | "
                     f"{_lr(r)} | {_pct(r)} | {sum(r['solved'])} of {len(r['solved'])} | "
                     f"{', '.join('-' if x is None else str(x) for x in r['steps_to_90'])} |")
    rules = ["| B'MOJO row | test accuracy (%) | selection recall (ceiling) | selection recall "
             "by layer | slot precision | attention: window / fading / slots | valid accuracy: "
             "own rule / oracle scores / no slots |", "|---|---:|---:|---|---:|---|---|"]
    for r in record["runs"]:
        d = r["diagnostics"]
        if d is not None:
            value = lambda key: f"{d[key]:.2f}" if key in d else "—"  # noqa: E731
            by_layer = ", ".join(value(k) for k in sorted(d) if k.endswith("_selection_recall")
                                 and k.startswith("layer"))
            rules.append(f"| {r['label']} | {_pct(r)} | {d['selection_recall']:.2f} "
                         f"({d['recall_ceiling']:.2f}) | {by_layer or '—'} | "
                         f"{d['slot_precision']:.2f} | {value('window_mass')} / "
                         f"{value('fading_mass')} / {d['eidetic_mass']:.2f} | "
                         f"{d['accuracy_own']:.3f} / {d['accuracy_oracle']:.3f} / "
                         f"{d['accuracy_no_slots']:.3f} |")
    task = record["task"]
    return (
        f"Far-query MQAR (`data.mqar({runner.describe(task)}, input_seq_len="
        f"{record['seq_len']})`): {task['num_kv_pairs']} key/value pairs in the first "
        f"{2 * task['num_kv_pairs']} tokens, every query from position {task['query_start']}, so "
        f"every key is more than {task['query_start'] - 2 * task['num_kv_pairs']} tokens before "
        f"its query: out of reach of {record['n_layers']} layers of a window of "
        f"{(task['query_start'] - 2 * task['num_kv_pairs']) // record['n_layers']} tokens (a "
        f"layer reads a window back, so a stack of windows reaches n_layers windows back; the "
        f"wider SWA rows reach some keys). Chance is 1 / {task['vocab_size'] // 2}. The decoding "
        f"state is the size of "
        f"`model.init_cache(1, max_length={record['seq_len']})` (float32: KV caches, ring "
        f"buffers, SSM and conv states, eidetic slots).\n\n" + "\n".join(lines) +
        "\n\nRows: the row's own memory knob (window, d_state or eidetic_slots; B'MOJO's "
        "chunk_size is its window); the last word "
        "of a B'MOJO row is its selection rule (`ModelConfig.eidetic_selection`; oracle: the "
        "key/value context handed in as eidetic scores, `config.eidetic_oracle`; the controls: "
        "random, fixed random positions, and projection, a fixed random function of the "
        "content). Seeds at >= 99%: final validation "
        "accuracy; steps to 90%: the first evaluated step at >= 90% validation accuracy per "
        "seed (-: never).\n\n### Eidetic diagnostics (every B'MOJO row)\n\n" + "\n".join(rules) +
        "\n\nMeans over the seeds, each on its final checkpoint (`sweep.point_diagnostics`): "
        "selection recall and slot precision on one validation batch, averaged over the `B` "
        "layers (recall by layer: each `B` layer's own, in layer order); attention: the "
        "queries' softmax mass on the window, fading and eidetic keys (—: the row's points "
        "were evaluated before those were recorded); valid "
        "accuracy with the model's own rule, with the oracle's scores instead, and with every "
        "slot empty (what the slots carry).\n\n"
        f"Every point is a point of `experiments/configs/mqar_far.py` (2 layers, 2 heads, score "
        f"eviction) with `{' '.join(s.set)}` and, for B'MOJO with slots, "
        f"`{' '.join(s.bmojo_set)}`, then the row's own field. Training: batch "
        f"{record['batch_size']} from {record['num_train']} examples, early stop at 99% "
        f"validation accuracy or {record['num_steps']} steps; learning rates tried in the order "
        f"{', '.join(f'{lr:g}' for lr in s.lrs)}, each row stopping at the first whose mean "
        f"validation accuracy over the seeds reaches {100 * s.skip_grid_above:.0f}% (the lr "
        f"column: the best rate, and the mean validation accuracy at each rate tried; the "
        f"size ablation's rows, a rule other than fading at another slot count, train at "
        f"the best rate of that rule's row), "
        f"{runner.describe_optimizer(record['optimizer'], record['num_steps'])}; "
        f"{record['num_eval']} test examples.")


def plot(record, s, path) -> None:
    """Left: test accuracy vs decoding-state size, one line per family (B'MOJO: its default rule
    over the eidetic slots, B'MOJO-F at 0 slots first). Middle: test accuracy vs eidetic slots,
    one line per selection rule (the mean) with a dot per seed, full attention and B'MOJO-F as
    references. Right: test accuracy vs selection recall, a marker per B'MOJO row (below the
    diagonal: the slots held what the queries needed and the layer did not use it)."""
    del s  # everything plotted is in the record
    plt = plotting.pyplot()
    fig, (left, right, use) = plt.subplots(1, 3, figsize=(18, 4.8))
    runs = record["runs"]
    families = {"transformer": ("transformer",), "swa": ("swa",), "mamba": ("mamba",),
                "bmojo": ("bmojo_f", "bmojo")}
    for order, (family, args) in enumerate(families.items()):
        mine = sorted((r for r in runs if r["arg"] in args), key=lambda r: r["state_bytes"])
        if not mine:
            continue
        xs = [r["state_bytes"] / 1024 for r in mine]
        left.plot(xs, [100 * r["test_accuracy"] for r in mine],
                  **dict(plotting.series_style(family, order),
                         label=family + (" (fading rule over slots)" if family == "bmojo" else "")))
        _error_bars(left, xs, mine)
    left.set_xscale("log")
    plotting.log2_ticks(left.xaxis, [r["state_bytes"] / 1024 for r in runs])
    left.set_title("accuracy vs decoding-state size")
    left.set_xlabel("decoding state (KiB, log scale)")
    left.set_ylabel("far-query MQAR test accuracy (%)")
    left.set_ylim(-2, 102)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    by_rule = {}  # a series per rule and setting other than the slot count
    for r in runs:
        if r["rule"] is not None:
            by_rule.setdefault(series(r), []).append(r)
    for order, (rule, mine) in enumerate(by_rule.items()):
        mine = sorted(mine, key=lambda r: r["eidetic_slots"])
        xs, style = [r["eidetic_slots"] for r in mine], plotting.series_style(rule, order)
        right.plot(xs, [100 * r["test_accuracy"] for r in mine], **style)
        for x, r in zip(xs, mine):  # one dot per seed
            right.plot([x] * len(r["test_accuracy_values"]),
                       [100 * v for v in r["test_accuracy_values"]], ls="none", marker=".",
                       color=style["color"], alpha=0.4)
    for arg, color in (("transformer", "C3"), ("bmojo_f", "C7")):
        for r in runs:
            if r["arg"] == arg:
                right.axhline(100 * r["test_accuracy"], color=color, ls="--", lw=1,
                              label=f"{r['label']} (mean)")
    right.set_xscale("log", base=2)
    if by_rule:
        plotting.log2_ticks(right.xaxis, [r["eidetic_slots"] for rows in by_rule.values()
                                          for r in rows])
    right.set_title("selection rules over the eidetic slots")
    right.set_xlabel("eidetic slots (log scale)")
    right.set_ylabel("far-query MQAR test accuracy (%)")
    right.set_ylim(-2, 102)
    right.grid(alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    for order, (rule, mine) in enumerate(by_rule.items()):  # selection against use
        mine = [r for r in mine if r["diagnostics"] is not None]
        style = dict(plotting.series_style(rule, order), ls="none")
        use.plot([r["diagnostics"]["selection_recall"] for r in mine],
                 [100 * r["test_accuracy"] for r in mine], **style)
        for r in mine:
            use.annotate(str(r["eidetic_slots"]), (r["diagnostics"]["selection_recall"],
                                                   100 * r["test_accuracy"]),
                         textcoords="offset points", xytext=(4, 3), fontsize=7)
    use.plot([0, 1], [0, 100], color="gray", ls=":", lw=1, label="accuracy = recall")
    use.set_title("selection vs use (B'MOJO rows; numbers: eidetic slots)")
    use.set_xlabel("selection recall: needed key/value tokens in the visible slots")
    use.set_ylabel("far-query MQAR test accuracy (%)")
    use.set_xlim(-0.02, 1.02)
    use.set_ylim(-2, 102)
    use.grid(alpha=0.3)
    use.legend(fontsize=8)
    seeds = record["seeds"]["model_init_and_batch_order"]
    plotting.save(fig, path, caption=(
        f"Test accuracy, mean over the model seeds {', '.join(map(str, seeds))} (data seed "
        f"{record['seeds']['data']}) at each row's best learning rate on validation; left: "
        f"error bars (gray) +- std over the seeds; middle: a line through the means, a dot per "
        f"seed; right: the diagnostics' selection recall (mean over seeds and B layers)."))


def _error_bars(ax, xs, rows) -> None:
    """+- std over the seeds of each row's test accuracy (%), in gray; nothing for one seed."""
    if any(len(r["seeds"]) > 1 for r in rows):
        ax.errorbar(xs, [100 * r["test_accuracy"] for r in rows],
                    yerr=[100 * r["test_accuracy_std"] for r in rows], fmt="none",
                    ecolor="gray", capsize=2, lw=1)
