"""Matmul throughput by dtype on this machine: what mixed precision can buy the training step.

    python -m benchmarks.matmul_dtypes [--shapes=2048x2048x2048,8192x256x256,...] [--rounds=7]
        [--out_dir=DIR | --out=PATH_PREFIX]

Each shape is m x k x n of [m, k] @ [k, n], compiled with the training step's XLA options
(`training.compiler_options`). Variants: float32; bfloat16 inputs with a bfloat16 result (what a
`ModelConfig.dtype="bfloat16"` linear layer runs: `nnx.Linear` casts its float32 kernel and
multiplies in bfloat16); bfloat16 inputs accumulated into a float32 result
(`preferred_element_type`, as the attention and SSD einsums do); and the float32 kernel cast to
bfloat16 inside the compiled function (the cast a layer pays per use). Timed with
`benchmarks.harness` (compiled once, warmed up, interleaved in rounds); GFLOP/s = 2 m k n / the
median time, with the spread over rounds. Writes OUT.json and OUT.md (default OUT:
runs/matmul_dtypes-<timestamp>/matmul_dtypes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import harness
from bmojo_jax.training import compiler_options

def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (the tests
    import it beside other modules with flags of the same names)."""
    flags.DEFINE_list("shapes", ["2048x2048x2048", "8192x256x256", "8192x256x688", "8192x688x256"],
                      "m x k x n of the [m, k] @ [k, n] matmuls (the last three: the "
                      "projections and MLP of benchmarks.train_throughput's default model at "
                      "8192 tokens/step).")
    flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")
    flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
    flags.DEFINE_string("out", None, "Output path prefix (instead of --out_dir), e.g. "
                        "results/matmul_dtypes.")


FLAGS = flags.FLAGS

BF16 = jnp.bfloat16
VARIANTS = {  # name -> (the function, the dtypes of its two inputs)
    "float32": (jnp.dot, (jnp.float32, jnp.float32)),
    "bfloat16 -> bfloat16": (jnp.dot, (BF16, BF16)),
    "bfloat16 -> float32": (lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32),
                            (BF16, BF16)),
    "bfloat16 x float32 kernel cast in the step": (lambda a, b: jnp.dot(a, b.astype(BF16)),
                                                   (BF16, jnp.float32)),
}


def parse_shape(text: str) -> tuple:
    """"MxKxN" -> (m, k, n) ints >= 1; ValueError naming the --shapes entry otherwise."""
    try:
        m, k, n = (int(part) for part in text.split("x"))
    except ValueError:
        raise ValueError(f"--shapes entry {text!r}: expected MxKxN, three positive integers "
                         "joined by x (e.g. 8192x256x256).") from None
    if min(m, k, n) < 1:
        raise ValueError(f"--shapes entry {text!r}: every dimension must be >= 1.")
    return m, k, n


def main(argv):
    del argv
    meta = harness.provenance(harness.command_line("benchmarks.matmul_dtypes"))
    prefix = harness.output_prefix("matmul_dtypes", out_dir=FLAGS.out_dir, out=FLAGS.out)
    load_before = harness.load_average()
    shapes = [parse_shape(text) for text in FLAGS.shapes]
    runners = {}
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
        for name, (fn, (a_dtype, b_dtype)) in VARIANTS.items():
            args = (a.astype(a_dtype), b.astype(b_dtype))
            compiled = harness.compile_once(fn, *args, compiler_options=compiler_options())
            runners[(m, k, n), name] = (lambda c=compiled, args=args:
                                        jax.block_until_ready(c(*args)))
    seconds = harness.interleave(runners, FLAGS.rounds, label="matmul_dtypes").seconds
    rows = []
    for (shape, name), values in seconds.items():
        step = harness.spread(values)
        flops = 2.0 * shape[0] * shape[1] * shape[2]
        rows.append(dict(shape=list(shape), variant=name, gflops=flops / step.median / 1e9,
                         gflops_min=flops / step.max / 1e9, gflops_max=flops / step.min / 1e9))
    meta.update(load_average_before=load_before, load_average_after=harness.load_average())
    harness.write_report(prefix, dict(meta, rows=rows), markdown(meta, rows))


def markdown(meta, rows) -> str:
    """The report: provenance and one row per shape, a column per variant (OUT.json's rows)."""
    float32 = {tuple(r["shape"]): r["gflops"] for r in rows if r["variant"] == "float32"}
    lines = ["# Matmul throughput by dtype\n", *harness.provenance_lines(meta),
             f"Load average before: {meta['load_average_before']}, after: "
             f"{meta['load_average_after']}  ",
             "GFLOP/s (2 m k n / median time; min-max over rounds) and the ratio to float32.\n",
             "| m x k x n | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        cells = []
        for name in VARIANTS:
            (r,) = [r for r in rows if tuple(r["shape"]) == shape and r["variant"] == name]
            cells.append(f"{r['gflops']:.0f} ({r['gflops_min']:.0f}-{r['gflops_max']:.0f}), "
                         f"{r['gflops'] / float32[shape]:.2f}x")
        lines.append(f"| {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    define_flags()
    app.run(main)
