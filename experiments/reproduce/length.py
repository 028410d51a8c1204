"""Table 5 of docs/design.md section 7: length generalization. Train at context T on books
(Shakespeare + Austen), evaluate test perplexity at 1x..16x T on the same held-out tokens for
every context length."""

from __future__ import annotations

import functools
from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx

from bmojo_jax import data as data_lib
from bmojo_jax import training
from experiments import plotting, sweep
from experiments.reproduce import runner

NAME = "length"
TITLE = "Length generalization: train at context T, evaluate at 1x..16x T"
FINAL_EVAL_BATCH_SIZE = 64  # the library's final evaluation at T is not the measurement here


def budgets() -> dict:
    """{"tiny", "full"}: ConfigDicts of every setting.

    Fields: corpus (a `data.load_corpus` name), model (ModelConfig fields, dropout included),
    bmojo_model (added for `bmojo`), seq_len (training context T), multipliers (evaluation
    contexts in units of T), batch_size, num_steps (the cap), lrs (the grid: the best mean
    validation perplexity at T is used), warmup_steps, bpe_vocab_size, eval_batch_size
    (contiguous test streams), eval_every, patience and min_delta (`runner.until_converged`),
    seeds (initialisation and batch order; perplexities are their mean +- std) for the
    `headline` presets (the others run the first seed), seed (the data's). The tiny budget
    reads PTB: tokenizing books alone takes ~25 s on 2 busy cores.

    The full budget trains to convergence like the `lm` table's (validation perplexity at T
    every 250 steps, stop after 4 passes without a 1% gain, at most 8000 steps; dropout 0.1 on
    embeddings and residual branches; our choices), three seeds for the presets the paper's
    claim is about (transformer, mamba, bmojo).
    """
    full = dict(
        corpus="books", model=dict(d_model=128, n_layers=2, n_heads=4, window=32,
                                   embedding_dropout=0.1, residual_dropout=0.1),
        bmojo_model=dict(innovation_loss_weight=0.001),
        seq_len=128, multipliers=(1, 2, 4, 8, 16), batch_size=16, num_steps=8000, lrs=(3e-3,),
        warmup_steps=100, bpe_vocab_size=4096, eval_batch_size=8, eval_every=250, patience=4,
        min_delta=0.01, seeds=(0, 1, 2), headline=("transformer", "mamba", "bmojo"), seed=0)
    tiny = dict(full, corpus="ptb", model=dict(d_model=32, n_layers=2, n_heads=2, window=16),
                seq_len=32, multipliers=(1, 2), batch_size=8, num_steps=4, warmup_steps=1,
                eval_batch_size=4, eval_every=2, patience=1, seeds=(0,))
    return {"tiny": ml_collections.ConfigDict(tiny), "full": ml_collections.ConfigDict(full)}


def perplexities(run_dir: Path, tokens, s) -> dict:
    """{context L: test perplexity} of the latest checkpoint of `run_dir` (loaded with
    `training.load_model`) at every L = m x T of `s.multipliers`: the first max(L) tokens of each
    of the `s.eval_batch_size` streams of `data.lm_eval_batches`, the same tokens for every L."""
    model, _, _ = training.load_model(run_dir)
    eval_step = training.make_eval_step(model.config)
    params = nnx.state(model, nnx.Param)
    span = s.seq_len * max(s.multipliers)
    out = {}
    for m in s.multipliers:
        length = m * s.seq_len
        batches = data_lib.lm_eval_batches(tokens, s.eval_batch_size, length)[:span // length]
        out[length] = training.evaluate(eval_step, params, batches)["perplexity"]
    return out


def point_config(preset: str, s):
    """The training config of one preset at T (the sweep sets each point's lr and seed)."""
    model = dict(s.model, **(s.bmojo_model if preset == "bmojo" else {}))
    config = runner.until_converged(runner.point_config(preset, model, s), s)
    config.data.update(name=s.corpus, seq_len=s.seq_len, bpe_vocab_size=s.bpe_vocab_size,
                       seed=s.seed)
    config.eval_batch_size = FINAL_EVAL_BATCH_SIZE
    return config


def run(s, presets, workdir: Path, points: sweep.Points) -> dict:
    """Every preset trained at T over `s.lrs` x `s.seeds` (`sweep.run_setting`); the best rate's
    seeds are each evaluated at every context, and their perplexities averaged."""
    corpus = data_lib.load_corpus(s.corpus, vocab_size=s.bpe_vocab_size, seed=s.seed)
    runs = []
    for preset in presets:
        row = sweep.run_setting(functools.partial(point_config, s=s), preset, s.lrs,
                                runner.seeds_of(preset, s), workdir, log="length",
                                points=points, evaluate=functools.partial(
                                    perplexities, tokens=corpus.test, s=s))
        by_seed = [r["evaluation"] for r in row["best"]]  # {"L": perplexity}: JSON keys
        lengths = list(by_seed[0])
        runs.append(dict(
            preset=preset, params=row["best"][0]["result"]["params"], lr=row["lr"],
            seeds=row["seeds"], wall_s=float(sum(r["result"]["wall_s"] for r in row["records"])),
            train_seq_len=s.seq_len,
            steps=[r["result"]["step"] for r in row["best"]],
            late_gain=[runner.late_gain(r["result"].get("valid_curve")) for r in row["best"]],
            perplexity={L: float(np.mean([p[L] for p in by_seed])) for L in lengths},
            perplexity_std={L: float(np.std([p[L] for p in by_seed])) for L in lengths}))
        print(f"[length] {preset}: " + ", ".join(f"{L}: {runs[-1]['perplexity'][L]:.1f}"
                                                 for L in lengths), flush=True)
    return dict(runs=runs, optimizer=row["records"][0]["config"]["optimizer"],
                eval_tokens=s.eval_batch_size * s.seq_len * max(s.multipliers),
                test_tokens=int(len(corpus.test)), vocab_size=corpus.vocab_size)


def markdown(record, s) -> str:
    """The perplexity-vs-context table and the method in prose."""
    t = s.seq_len
    lengths = [m * t for m in s.multipliers]
    lines = ["| model | parameters | " + " | ".join(f"{L} ({L // t}x)" for L in lengths) +
             f" | ratio {lengths[-1] // t}x / 1x |",
             "|---|---:|" + "---:|" * len(lengths) + "---:|"]
    for r in record["runs"]:
        ppl = [r["perplexity"][str(L)] for L in lengths]
        spread = r.get("perplexity_std") if len(r.get("seeds", ())) > 1 else None
        cells = [f"{p:.1f}" if spread is None else f"{p:.1f} +- {spread[str(L)]:.1f}"
                 for p, L in zip(ppl, lengths)]
        lines.append(f"| {r['preset']} | {r['params']:,} | " + " | ".join(cells) +
                     f" | {ppl[-1] / ppl[0]:.2f} |")
    corpus = (f"Books = Shakespeare's 42 works + Austen's 6 novels, split by document "
              f"(`load_corpus('books')`, BPE {record['vocab_size']}); the test documents are "
              f"held out from training and from the tokenizer." if s.corpus == "books" else
              f"Corpus `{s.corpus}` (vocabulary {record['vocab_size']}).")
    return (f"Test perplexity at evaluation context length (tokens), training context T = {t}."
            f"\n\n" + "\n".join(lines) + f"\n\n{corpus} At every context length L the same "
            f"{record['eval_tokens']:,} test tokens are scored: the first {lengths[-1]} tokens "
            f"of each of {s.eval_batch_size} contiguous streams of the test split "
            f"({record['test_tokens']:,} tokens), cut into windows of L tokens (each window "
            f"starts from an empty state; perplexity averages over all positions of the "
            f"windows). Model: {runner.describe(s.model)}; `bmojo` adds "
            f"{runner.describe(s.bmojo_model)}. Training: batches of {s.batch_size} x {t} "
            f"tokens until validation perplexity at T (the whole split, every {s.eval_every} "
            f"steps) has improved by less than {100 * s.min_delta:g}% on its best for "
            f"{s.patience} evaluations in a row, at most {s.num_steps} steps (steps trained, "
            f"and in brackets how much validation perplexity still fell over the last 10% of "
            f"them; converged: under 1%: "
            + "; ".join(f"{r['preset']} " + ", ".join(
                f"{n} ({'-' if g is None else f'{100 * g:.1f}%'})"
                for n, g in zip(r["steps"], r["late_gain"]))
                for r in record["runs"]) +
            f"), {runner.describe_lrs(s.lrs, 'the mean validation perplexity at T')}, "
            f"{runner.describe_headline_seeds(s, [r['preset'] for r in record['runs']])}, "
            f"{runner.describe_optimizer(record['optimizer'], s.num_steps)}. RoPE positions "
            f"continue past T for the attention layers (no interpolation).")


def plot(record, s, path) -> None:
    """Test perplexity vs evaluation context, one line per preset (log-log); a length a preset
    has no value for breaks its line (`plotting.aligned`)."""
    plt = plotting.pyplot()
    t = s.seq_len
    lengths = [m * t for m in s.multipliers]
    rows = [dict(preset=r["preset"], length=L, perplexity=r["perplexity"].get(str(L)))
            for r in record["runs"] for L in lengths]
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    series = plotting.aligned(rows, "preset", "length", lambda row: row["perplexity"])
    for order, (preset, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, **plotting.series_style(preset, order))
    ax.axvline(t, color="gray", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plotting.plain_numbers(ax.yaxis)
    ax.set_title("length extrapolation")
    ax.set_xlabel(f"evaluation context (tokens, log scale); training context T = {t} (dashed)")
    ax.set_ylabel("test perplexity (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    plotting.save(fig, path, caption=(
        f"Mean over the training runs of a preset (seeds "
        f"{runner.describe_seeds(s)}) at "
        f"context {t}; at every context the same {record['eval_tokens']:,} test tokens are "
        f"scored; no error bars (the table gives the std over seeds)."))
