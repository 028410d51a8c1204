"""Per-token decode latency and decoding-state size vs context length, for every preset.

    python -m benchmarks.decode [--contexts=1024,2048,...] [--presets=...] [--steps=16]
        [--rounds=5] [--out_dir=DIR | --out=PATH_PREFIX]

For each preset and context length T, `--steps` jit-compiled greedy `decode_step`s (one
`lax.scan`, `benchmarks.decoding`) run on a cache with room for T + steps tokens: full attention
preallocates them and attends over all of them, masked; every other state has a fixed size. The
decode starts from the empty cache: the work of a step does not depend on the cached values nor
on the position, except through the position's phase within the window (B'MOJO selects eidetic
tokens at chunk ends), which equals T's when T is a multiple of the window (64: every default
context). The variants are timed with `benchmarks.harness` (compiled once, warmed up, interleaved
in rounds); we report the median and the spread (min, max) over rounds of the per-token latency,
and the state size in bytes. Writes OUT.json, OUT.md, OUT.png (default OUT:
runs/decode-<timestamp>/decode).
"""

from __future__ import annotations

import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import bmojo_jax as bj
from benchmarks import decoding, harness
from experiments import plotting

flags.DEFINE_list("contexts", ["1024", "2048", "4096", "8192", "16384", "32768"],
                  "Context lengths (tokens).")
flags.DEFINE_list("presets", list(bj.PRESETS), "Presets to measure.")
flags.DEFINE_integer("d_model", 256, "Model width.")
flags.DEFINE_integer("n_layers", 4, "Layers.")
flags.DEFINE_integer("batch_size", 1, "Sequences decoded together.")
flags.DEFINE_integer("steps", 16, "Decode steps timed per round.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
flags.DEFINE_string("out", None, "Output path prefix (instead of --out_dir), e.g. results/decode.")
FLAGS = flags.FLAGS

N_HEADS, WINDOW, VOCAB_SIZE = 4, 64, 10000  # fixed model settings besides the flags


def make_runner(preset: str, context: int):
    """(run, state bytes): FLAGS.steps compiled decode steps on a cache of context + steps."""
    config = bj.ModelConfig.preset(preset, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                                   vocab_size=VOCAB_SIZE, n_heads=N_HEADS, window=WINDOW)
    model = bj.LanguageModel(config, rngs=nnx.Rngs(0))
    cache = model.init_cache(FLAGS.batch_size, max_length=context + FLAGS.steps)
    token = jnp.zeros((FLAGS.batch_size,), jnp.int32)
    return (decoding.compile_decode(model, token, cache, FLAGS.steps),
            decoding.cache_bytes(cache))


def main(argv):
    del argv
    meta = harness.provenance(harness.command_line("benchmarks.decode"))
    prefix = harness.output_prefix("decode", out_dir=FLAGS.out_dir, out=FLAGS.out)
    contexts = [int(c) for c in FLAGS.contexts]
    runners, sizes = {}, {}
    for preset in FLAGS.presets:
        for context in contexts:
            runners[preset, context], sizes[preset, context] = make_runner(preset, context)
    seconds = harness.interleave(runners, FLAGS.rounds).seconds
    rows = []
    for preset, context in runners:
        ms = harness.spread([1e3 * s / FLAGS.steps for s in seconds[preset, context]])
        rows.append(dict(preset=preset, context=context, state_bytes=sizes[preset, context],
                         ms_per_token_median=ms.median, ms_per_token_min=ms.min,
                         ms_per_token_max=ms.max))
    lines = ["# Decode latency and state size vs context\n", *harness.provenance_lines(meta),
             f"Model: d_model {FLAGS.d_model}, n_layers {FLAGS.n_layers}, n_heads {N_HEADS}, "
             f"window {WINDOW}, vocabulary {VOCAB_SIZE}, batch {FLAGS.batch_size}; "
             f"{FLAGS.steps} greedy steps per call, median (min, max) over {FLAGS.rounds} "
             f"interleaved rounds.\n",
             "| preset | context (tokens) | state (MiB) | ms/token median | min | max |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['preset']} | {r['context']} | {r['state_bytes'] / 2**20:.2f} | "
              f"{r['ms_per_token_median']:.2f} | {r['ms_per_token_min']:.2f} | "
              f"{r['ms_per_token_max']:.2f} |" for r in rows]
    harness.write_report(prefix, dict(meta, rows=rows), "\n".join(lines) + "\n")
    plot(rows, f"{prefix}.png")


def plot(rows, path):
    """Latency (median, min-max error bars) and state size vs context, one line per preset (rows
    as in OUT.json); a context a preset did not run breaks its line."""
    plt = plotting.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
    latency = plotting.aligned(rows, "preset", "context", lambda r: r["ms_per_token_median"])
    low = plotting.aligned(rows, "preset", "context", lambda r: r["ms_per_token_min"])
    high = plotting.aligned(rows, "preset", "context", lambda r: r["ms_per_token_max"])
    state = plotting.aligned(rows, "preset", "context", lambda r: r["state_bytes"] / 2**20)
    for order, preset in enumerate(latency):
        style = plotting.series_style(preset, order)
        xs, ys = latency[preset]
        left.errorbar(xs, ys, yerr=[ys - low[preset][1], high[preset][1] - ys], capsize=3,
                      **style)
        right.plot(*state[preset], **style)
    for axis, title, label in ((left, "decode latency",
                                "ms per token (median over rounds, log scale)"),
                               (right, "decoding-state size", "state (MiB, log scale)")):
        axis.set_xscale("log", base=2)
        axis.set_title(title)
        axis.set_xlabel("context (tokens, log scale)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    for axis in (left, right):
        axis.set_yscale("log")
        plotting.plain_numbers(axis.yaxis)
    left.legend(fontsize=8)
    plotting.save(fig, path, caption=(
        "Latency: median over the interleaved timing rounds of a jit-compiled greedy decode loop, "
        "per token; error bars from the minimum to the maximum round. A missing point (a preset "
        "that did not run at that context) leaves a gap."))


if __name__ == "__main__":
    app.run(main)
