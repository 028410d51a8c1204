"""Per-token decode latency and decoding-state size vs context length, for every preset.

    python -m benchmarks.decode [--contexts=1024,2048,...] [--out=results/decode]

For each preset and context length T, the jit-compiled `decode_step` runs at position T on a cache
of that length (state values do not change the cost, so the cache is the empty one moved to
position T; full attention preallocates T + steps slots and attends over all of them, masked).
Variants are interleaved in rounds in one process; we report the median and the spread (min, max)
over rounds of the per-token latency, and the state size in bytes. Writes OUT.json, OUT.md, OUT.png.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import bmojo_jax as bj
from experiments import plotting

flags.DEFINE_list("contexts", ["1024", "2048", "4096", "8192", "16384", "32768"],
                  "Context lengths (tokens).")
flags.DEFINE_list("presets", list(bj.PRESETS), "Presets to measure.")
flags.DEFINE_integer("d_model", 256, "Model width.")
flags.DEFINE_integer("n_layers", 4, "Layers.")
flags.DEFINE_integer("batch_size", 1, "Sequences decoded together.")
flags.DEFINE_integer("steps", 16, "Decode steps timed per round.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_string("out", "results/decode", "Output path prefix.")
FLAGS = flags.FLAGS


def state_bytes(cache) -> int:
    """Bytes of every array in a decoding cache."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


def make_runner(preset: str, context: int):
    """A compiled function running FLAGS.steps decode steps from position `context`."""
    config = bj.ModelConfig.preset(preset, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                                   vocab_size=10000, n_heads=4, window=64)
    model = bj.LanguageModel(config, rngs=nnx.Rngs(0))
    cache = model.init_cache(FLAGS.batch_size, max_length=context + FLAGS.steps)
    cache["position"] = jnp.asarray(context, jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, cache):
        model = nnx.merge(graphdef, state)

        def step(carry, _):
            token, cache = carry
            logits, cache = model.decode_step(token, cache)
            return (logits.argmax(-1).astype(jnp.int32), cache), None

        token = jnp.zeros((FLAGS.batch_size,), jnp.int32)
        return jax.lax.scan(step, (token, cache), None, length=FLAGS.steps)[0]

    compiled = run.lower(state, cache).compile()
    jax.block_until_ready(compiled(state, cache))  # warm-up
    return lambda: jax.block_until_ready(compiled(state, cache)), state_bytes(cache)


def main(argv):
    del argv
    contexts = [int(c) for c in FLAGS.contexts]
    runners, sizes = {}, {}
    for preset in FLAGS.presets:
        for context in contexts:
            runners[preset, context], sizes[preset, context] = make_runner(preset, context)
    times = {key: [] for key in runners}
    for _ in range(FLAGS.rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - start) / FLAGS.steps)
    rows = [dict(preset=p, context=c, state_bytes=sizes[p, c],
                 ms_per_token_median=1e3 * float(np.median(times[p, c])),
                 ms_per_token_min=1e3 * float(np.min(times[p, c])),
                 ms_per_token_max=1e3 * float(np.max(times[p, c])))
            for p, c in runners]
    meta = dict(command="python -m benchmarks.decode " + " ".join(
        f"--{name}={FLAGS[name].value}" for name in ("d_model", "n_layers", "batch_size", "steps",
                                                      "rounds")),
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"jax {jax.__version__} on {jax.default_backend()}")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    lines = [f"# Decode latency and state size vs context\n\nCommand: `{meta['command']}`  ",
             f"Machine: {meta['machine']}\n",
             "| preset | context (tokens) | state (MiB) | ms/token median | min | max |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['preset']} | {r['context']} | {r['state_bytes'] / 2**20:.2f} | "
              f"{r['ms_per_token_median']:.2f} | {r['ms_per_token_min']:.2f} | "
              f"{r['ms_per_token_max']:.2f} |" for r in rows]
    with open(FLAGS.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, FLAGS.out + ".png")


def plot(rows, path):
    plt = plotting.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        ctx = [r["context"] for r in mine]
        left.plot(ctx, [r["ms_per_token_median"] for r in mine], marker="o", label=preset)
        right.plot(ctx, [r["state_bytes"] / 2**20 for r in mine], marker="o", label=preset)
    for axis, label in ((left, "ms / token (median)"), (right, "decoding state (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend()
    plotting.save(fig, path)


if __name__ == "__main__":
    app.run(main)
