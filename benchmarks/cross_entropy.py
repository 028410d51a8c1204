"""The LM head + cross-entropy: `ops.linear_cross_entropy` reference (full logits, autodiff) vs xla
(chunked, gradients in the forward pass), forward+backward time and compiled memory.

    python -m benchmarks.cross_entropy [--shapes=8x1024x128,1x8192x256] [--vocab_size=8192]
        [--rounds=7] [--out=results/cross_entropy]

Each shape is batch x time x d_model; the loss is the mean over all tokens, differentiated with
respect to the hidden states and the head matrix [vocab, d_model]. Every variant is compiled once
and warmed up, then all run interleaved in rounds; we report the median and spread (min, max) of
the step time and `compiled.memory_analysis()` (temp + argument + output bytes). Writes OUT.json
and OUT.md.
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

from bmojo_jax import ops
from bmojo_jax.training import compiler_options

flags.DEFINE_list("shapes", ["8x1024x128", "4x2048x256", "1x8192x256"],
                  "batch x time x d_model of the hidden states.")
flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size (rows of the head matrix).")
flags.DEFINE_list("implementations", ["reference", "xla"], "Implementations to compare.")
flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")
flags.DEFINE_string("out", "results/cross_entropy", "Output path prefix.")
FLAGS = flags.FLAGS


def compile_variant(shape: tuple, implementation: str):
    """(run, compiled memory bytes): one jit-compiled value_and_grad of the mean loss."""
    b, t, d = shape
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    hidden = jax.random.normal(keys[0], (b, t, d), jnp.float32)
    weight = 0.05 * jax.random.normal(keys[1], (FLAGS.vocab_size, d), jnp.float32)
    targets = jax.random.randint(keys[2], (b, t), 0, FLAGS.vocab_size)
    weights = jnp.full((b, t), 1.0 / (b * t), jnp.float32)

    def loss(hidden, weight):
        return ops.linear_cross_entropy(hidden, weight, targets, weights,
                                        implementation=implementation)

    compiled = jax.jit(jax.value_and_grad(loss, (0, 1)),
                       compiler_options=compiler_options()).lower(hidden, weight).compile()
    jax.block_until_ready(compiled(hidden, weight))  # warm-up
    m = compiled.memory_analysis()
    memory = int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    return (lambda: jax.block_until_ready(compiled(hidden, weight))), memory


def main(argv):
    del argv
    shapes = [tuple(int(x) for x in s.split("x")) for s in FLAGS.shapes]
    variants = {(shape, impl): compile_variant(shape, impl)
                for shape in shapes for impl in FLAGS.implementations}
    times = {key: [] for key in variants}
    for _ in range(FLAGS.rounds):
        for key, (run, _) in variants.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    rows = []
    for (shape, impl), (_, memory) in variants.items():
        t = 1e3 * np.asarray(times[shape, impl])
        rows.append(dict(shape="x".join(map(str, shape)), implementation=impl,
                         median_ms=float(np.median(t)), min_ms=float(t.min()),
                         max_ms=float(t.max()), compiled_bytes=memory))
    first = FLAGS.implementations[0]
    base = {r["shape"]: r for r in rows if r["implementation"] == first}
    meta = dict(
        command="python -m benchmarks.cross_entropy " + " ".join(
            f"--{n}={','.join(v) if isinstance(v, list) else v}"
            for n in ("shapes", "vocab_size", "implementations", "rounds", "out")
            for v in [FLAGS[n].value]),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"jax {jax.__version__} on {jax.default_backend()}",
        load_average=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    lines = ["# LM head + cross-entropy, forward + backward\n", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}; load average after: {meta['load_average']}\n",
             f"Vocabulary {FLAGS.vocab_size}; median (min-max) over {FLAGS.rounds} interleaved "
             "rounds; memory: compiled temp + argument + output.\n",
             f"| batch x time x d_model | implementation | ms | speed vs {first} | "
             f"compiled MiB |", "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['implementation']} | {r['median_ms']:.1f} "
                     f"({r['min_ms']:.1f}-{r['max_ms']:.1f}) | "
                     f"{base[r['shape']]['median_ms'] / r['median_ms']:.2f}x | "
                     f"{r['compiled_bytes'] / 2**20:.0f} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(dict(meta, vocab_size=FLAGS.vocab_size, rows=rows), f, indent=1)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
