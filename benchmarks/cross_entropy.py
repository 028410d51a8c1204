"""The LM head + cross-entropy: `ops.linear_cross_entropy` reference (full logits, autodiff) vs xla
(chunked, gradients in the forward pass), forward+backward time and compiled memory.

    python -m benchmarks.cross_entropy [--shapes=8x1024x128,1x8192x256] [--vocab_size=8192]
        [--rounds=7] [--out_dir=DIR | --out=PATH_PREFIX]

Each shape is batch x time x d_model; the loss is the mean over all tokens, differentiated with
respect to the hidden states and the head matrix [vocab, d_model]. The variants are timed with
`benchmarks.harness` (compiled once, warmed up, interleaved in rounds); we report the median and
spread (min, max) of the step time and `compiled.memory_analysis()` (temp + argument + output
bytes). Writes OUT.json and OUT.md (default OUT: runs/cross_entropy-<timestamp>/cross_entropy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import harness
from bmojo_jax import ops
from bmojo_jax.training import compiler_options

flags.DEFINE_list("shapes", ["8x1024x128", "4x2048x256", "1x8192x256"],
                  "batch x time x d_model of the hidden states.")
flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size (rows of the head matrix).")
flags.DEFINE_list("implementations", ["reference", "xla"], "Implementations to compare.")
flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")
flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
flags.DEFINE_string("out", None, "Output path prefix (instead of --out_dir), e.g. "
                    "results/cross_entropy.")
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

    compiled = harness.compile_once(jax.value_and_grad(loss, (0, 1)), hidden, weight,
                                    compiler_options=compiler_options())
    return ((lambda: jax.block_until_ready(compiled(hidden, weight))),
            harness.memory_bytes(compiled)["total"])


def main(argv):
    del argv
    meta = harness.provenance(harness.command_line("benchmarks.cross_entropy"))
    prefix = harness.output_prefix("cross_entropy", out_dir=FLAGS.out_dir, out=FLAGS.out)
    shapes = [tuple(int(x) for x in s.split("x")) for s in FLAGS.shapes]
    variants = {(shape, impl): compile_variant(shape, impl)
                for shape in shapes for impl in FLAGS.implementations}
    seconds = harness.interleave({key: run for key, (run, _) in variants.items()},
                                 FLAGS.rounds).seconds
    rows = []
    for (shape, impl), (_, memory) in variants.items():
        ms = harness.spread([1e3 * s for s in seconds[shape, impl]])
        rows.append(dict(shape="x".join(map(str, shape)), implementation=impl,
                         median_ms=ms.median, min_ms=ms.min, max_ms=ms.max,
                         compiled_bytes=memory))
    meta["load_average"] = harness.load_average()
    first = FLAGS.implementations[0]
    base = {r["shape"]: r for r in rows if r["implementation"] == first}
    lines = ["# LM head + cross-entropy, forward + backward\n", *harness.provenance_lines(meta),
             f"Load average after: {meta['load_average']}\n",
             f"Vocabulary {FLAGS.vocab_size}; median (min-max) over {FLAGS.rounds} interleaved "
             "rounds; memory: compiled temp + argument + output.\n",
             f"| batch x time x d_model | implementation | ms | speed vs {first} | "
             f"compiled MiB |", "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['implementation']} | {r['median_ms']:.1f} "
                     f"({r['min_ms']:.1f}-{r['max_ms']:.1f}) | "
                     f"{base[r['shape']]['median_ms'] / r['median_ms']:.2f}x | "
                     f"{r['compiled_bytes'] / 2**20:.0f} |")
    harness.write_report(prefix, dict(meta, vocab_size=FLAGS.vocab_size, rows=rows),
                         "\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
