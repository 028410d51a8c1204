"""Table 3 of docs/design.md section 7: Penn Treebank word-level validation/test perplexity and
training throughput, six presets at matched non-embedding parameter counts (d_ff set per preset),
with Zaremba et al. 2014's LSTMs as an external reference."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import ml_collections

import bmojo_jax as bj
from bmojo_jax import data as data_lib
from bmojo_jax import training
from bmojo_jax.config import DROPOUTS
from experiments import sweep
from experiments.reproduce import runner

NAME = "lm"
TITLE = "Penn Treebank perplexity and training time at matched parameter counts"

# Zaremba, Sutskever & Vinyals 2014, "Recurrent neural network regularization", Table 1: PTB
# word-level test perplexity of 2-layer LSTMs (docs/design.md section 6), trained 13-55 epochs.
ZAREMBA = (("LSTM small, non-regularized (Zaremba et al. 2014)", 114.5),
           ("LSTM medium, dropout (Zaremba et al. 2014)", 82.7),
           ("LSTM large, dropout (Zaremba et al. 2014)", 78.4))

plot = None  # a table only
GRID_METRIC = "the first seed's validation perplexity (the grid column; the best in bold)"


def budgets() -> dict:
    """{"tiny", "full"}: ConfigDicts of every setting.

    Fields: model (ModelConfig fields shared by every preset, dropout included; d_ff is matched
    per preset), bmojo_model (added for `bmojo`), seq_len, batch_size, num_steps (the cap), lrs
    (the grid, run on the first seed: its best validation perplexity picks the rate of every
    seed; `runner.tune_then_seeds`), warmup_steps, eval_batch_size,
    eval_every, patience and min_delta (`runner.until_converged`), seeds (initialisation and
    batch order, mean +- std) for the `headline` presets (the others run the first seed),
    ablation_presets and ablation_dropouts (each of these presets is also trained, at its best
    rate and first seed, with every dropout that `model` sets at each of these rates: the rows
    that say whether dropout helps).

    The full budget trains to convergence (docs/design.md section 7b; our choices): validation
    perplexity over the whole split every 250 steps (0.55 epochs), stopping once 4 passes in a row
    improve on the best by less than 1%, at most 8000 steps (17.6 epochs); dropout 0.1 on the
    embeddings and on each block's residual branches for every preset (1.7M parameters on 0.93M
    training tokens; the ablation rows say where it helps); peak learning rates 1e-3, 3e-3 and
    1e-2 (the synthetic tables' grid); three seeds for the presets
    the paper's claim compares (transformer, bmojo_f, bmojo); the transformer and bmojo also
    without dropout.
    """
    full = dict(
        model=dict(d_model=128, n_layers=2, n_heads=4, window=32, embedding_dropout=0.1,
                   residual_dropout=0.1),
        bmojo_model=dict(innovation_loss_weight=0.001),
        seq_len=128, batch_size=16, num_steps=8000, lrs=(1e-3, 3e-3, 1e-2), warmup_steps=100,
        eval_batch_size=32, eval_every=250, patience=4, min_delta=0.01, seeds=(0, 1, 2),
        headline=("transformer", "bmojo_f", "bmojo"), ablation_presets=("transformer", "bmojo"),
        ablation_dropouts=(0.0,), seed=0)
    tiny = dict(full, model=dict(d_model=32, n_layers=2, n_heads=2, window=16,
                                 embedding_dropout=0.1, residual_dropout=0.1),
                seq_len=32, batch_size=8, num_steps=4, lrs=(3e-3, 1e-2), warmup_steps=1,
                eval_batch_size=128,
                eval_every=2, patience=1, seeds=(0,), ablation_presets=("swa",))
    return {"tiny": ml_collections.ConfigDict(tiny), "full": ml_collections.ConfigDict(full)}


def matched_models(model, presets, bmojo_model=None) -> dict:
    """{preset: ModelConfig fields}: `model` (ModelConfig fields including vocab_size; plus
    `bmojo_model` for bmojo) with a d_ff that matches the transformer's non-embedding parameter
    count at those fields (`bmojo_jax.match_d_ff`)."""
    model = dict(model)
    target = bj.param_count(bj.ModelConfig.preset("transformer", **model), embedding=False)
    out = {}
    for preset in presets:
        fields = dict(model, **((bmojo_model or {}) if preset == "bmojo" else {}))
        out[preset] = dict(fields, d_ff=bj.match_d_ff(bj.ModelConfig.preset(preset, **fields),
                                                      target).d_ff)
    return out


def point_config(preset: str, models, s):
    """The training config of one preset with its matched `models[preset]` (the sweep sets each
    point's lr and seed)."""
    config = runner.until_converged(runner.point_config(preset, models[preset], s), s)
    config.data.update(name="ptb", seq_len=s.seq_len)
    config.eval_batch_size = s.eval_batch_size
    return config


def run(s, presets, workdir: Path, points: sweep.Points) -> dict:
    """Every preset on PTB: `s.lrs` on the first seed, then `s.seeds` at the best rate
    (`runner.tune_then_seeds`); then
    the dropout ablation of `s.ablation_presets` at that rate and the first seed (rows with a
    "dropout" key: the rate of both dropouts)."""
    corpus = data_lib.load_corpus("ptb")
    models = matched_models(dict(s.model, vocab_size=corpus.vocab_size), presets, s.bmojo_model)
    get_config = functools.partial(point_config, models=models, s=s)
    runs = []
    for preset in presets:
        row = runner.tune_then_seeds(get_config, preset, s.lrs, runner.seeds_of(preset, s),
                                     workdir, log="lm", points=points)
        model_cfg = training.model_config(get_config(preset), corpus.vocab_size)
        shared = dict(preset=preset, d_ff=model_cfg.hidden_dim,
                      non_embedding_params=bj.param_count(model_cfg, embedding=False))
        runs.append(dict(runner.row_stats(row, "perplexity"), **shared))
        for rate in s.ablation_dropouts if preset in s.ablation_presets else ():
            fields = {f"model.{knob}": rate for knob in DROPOUTS if knob in s.model}
            ablated = sweep.run_setting(get_config, preset, [row["lr"]],
                                        runner.seeds_of(preset, s)[:1], workdir,
                                        log="lm", points=points, fields=fields)
            runs.append(dict(runner.row_stats(ablated, "perplexity"), dropout=rate, **shared))
    return dict(runs=runs, optimizer=row["records"][0]["config"]["optimizer"],
                vocab_size=corpus.vocab_size, train_tokens=int(len(corpus.train)),
                reference=[dict(model=m, test_perplexity=p) for m, p in ZAREMBA])


def markdown(record, s) -> str:
    """The perplexity and speed table with the LSTM references, and the settings in prose."""
    transformer = next((r for r in record["runs"]
                        if r["preset"] == "transformer" and "dropout" not in r), None)
    epoch = s.batch_size * s.seq_len / record["train_tokens"]  # epochs per step
    lstm = ZAREMBA[0][1]
    lines = ["| model | d_ff | parameters (non-embedding) | valid perplexity | test perplexity | "
             f"test perplexity / small LSTM ({lstm}) | valid perplexity by peak lr, first seed "
             "| steps (epochs) | valid perplexity gain, last 10% of steps | train tokens/s | "
             "train time (s) | vs transformer |",
             "|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|"]
    for r in record["runs"]:
        speed = ("—" if transformer is None else
                 f"{r['tokens_per_s'] / transformer['tokens_per_s']:.2f}x tokens/s, "
                 f"{r['test_perplexity'] / transformer['test_perplexity']:.2f}x perplexity")
        gains = ", ".join("-" if g is None else f"{100 * g:.1f}%" for g in r["late_gain"])
        label = r["preset"] + (f", dropout {r['dropout']:g}" if "dropout" in r else "")
        grid = ", ".join(f"**{lr}: {math.exp(loss):.1f}**" if float(lr) == r["lr"] else
                         f"{lr}: {math.exp(loss):.1f}" for lr, loss in r["lr_grid"].items())
        lines.append(f"| {label} | {r['d_ff']} | {r['params']:,} "
                     f"({r['non_embedding_params']:,}) | "
                     f"{runner.mean_std(r, 'valid_perplexity')} | "
                     f"{runner.mean_std(r, 'test_perplexity')} | "
                     f"{r['test_perplexity'] / lstm:.2f}x | {grid} | "
                     f"{', '.join(f'{n} ({n * epoch:.1f})' for n in r['steps'])} | {gains} | "
                     f"{r['tokens_per_s']:,.0f} | "
                     f"{r['train_s']:.0f} | {speed} |")
    for ref in record["reference"]:
        lines.append(f"| *{ref['model']}* | | | | *{ref['test_perplexity']}* | "
                     f"*{ref['test_perplexity'] / lstm:.2f}x* | | | | | | |")
    vocab = record["vocab_size"]
    return ("\n".join(lines) +
            f"\n\nPenn Treebank, word level (Mikolov split, vocabulary {vocab:,}; "
            f"`load_corpus('ptb')`, {record['train_tokens']:,} training tokens). Perplexity over "
            f"every token of the validation and test splits, in contiguous windows of {s.seq_len} "
            f"tokens. Model: {runner.describe(s.model)}; d_ff is set per preset to match the "
            f"transformer's non-embedding parameter count (the tied {vocab:,} x "
            f"{s.model.d_model} embedding is the same for all); `bmojo` adds "
            f"{runner.describe(s.bmojo_model)}. Training: batches of {s.batch_size} x "
            f"{s.seq_len} tokens until validation perplexity (the whole split, every "
            f"{s.eval_every} steps) has improved by less than {100 * s.min_delta:g}% on its best "
            f"for {s.patience} evaluations in a row, at most {s.num_steps} steps "
            f"({s.num_steps * epoch:.1f} epochs); the perplexities are the last checkpoint's, "
            f"and the gain column says how much validation perplexity still fell over the last "
            f"10% of each seed's steps (converged: under 1%; a run that the step cap ended "
            f"under a cosine schedule keeps gaining as the rate anneals). "
            f"Learning rate: {runner.describe_lrs(s.lrs, GRID_METRIC)}; at that rate "
            f"{runner.describe_headline_seeds(s, [r['preset'] for r in record['runs']])}, "
            f"{runner.describe_optimizer(record['optimizer'], s.num_steps)}. A row "
            f"\"PRESET, dropout R\" is the dropout ablation: that preset at its best rate and "
            f"first seed with every dropout above at R. Training throughput (tokens/s) is the "
            f"median over logged intervals (compilation excluded), the median over seeds; train "
            f"time is the mean over seeds of each run's tokens / throughput. The machine is shared, so throughputs carry ~10-20% noise. The LSTM "
            f"rows are external references trained for 13-55 epochs (the small one without "
            f"dropout), not runs of this code.")
