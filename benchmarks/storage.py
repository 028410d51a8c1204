"""The cost of the in-storage eidetic memory (docs/design.md section 7c): prefill time against the
context and the store's capacity, decode latency and state size against the capacity.

    python -m benchmarks.storage [--contexts=1024,2048,4096,8192] [--capacities=0,256,1024,4096]
        [--topk=16] [--rounds=5] [--out_dir=DIR | --out=PATH_PREFIX]

A `bmojo` model (d_model, n_layers, window 64 as the flags say) with `storage_slots` = each
capacity (0: no store, the reference row) and `storage_topk` = --topk. For each (context,
capacity): `prefill` of a random prompt of that many tokens into a fresh cache (the parallel
form: the retrieval's [b, c, t] scores are part of it), and --steps greedy `decode_step`s after
the empty cache (per token; the ring of capacity + window keys is scored once per chunk). The
variants are compiled once and timed interleaved in rounds, the decodes in rounds of their own
and then the prefills (`benchmarks.harness.interleave_apart`); we report the
median and the (min, max) over rounds, the ratio to the capacity-0 row of the same context, and
the decoding state in bytes. Writes OUT.json and OUT.md (default OUT: runs/storage-<timestamp>/
storage).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import bmojo_jax as bj
from benchmarks import decoding, harness

WINDOW, N_HEADS, VOCAB_SIZE = 64, 4, 10000  # fixed model settings besides the flags


def define_flags() -> None:
    """The command line's flags (defined only when this module is the program)."""
    flags.DEFINE_list("contexts", ["1024", "2048", "4096", "8192"], "Prompt lengths (tokens).")
    flags.DEFINE_list("capacities", ["0", "256", "1024", "4096"],
                      "storage_slots values (tokens; 0 = no store).")
    flags.DEFINE_integer("topk", 16, "storage_topk: tokens retrieved per chunk.")
    flags.DEFINE_integer("d_model", 256, "Model width.")
    flags.DEFINE_integer("n_layers", 2, "Layers (all `B`).")
    flags.DEFINE_integer("steps", 64, "Decode steps timed per round (one chunk of the window).")
    flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
    flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
    flags.DEFINE_string("out", None, "Output path prefix (instead of --out_dir), e.g. "
                        "results/storage.")


def model_of(capacity: int, f) -> bj.LanguageModel:
    """The measured `bmojo` model with a store of `capacity` tokens (0: none)."""
    config = bj.ModelConfig.preset(
        "bmojo", d_model=f.d_model, n_layers=f.n_layers, n_heads=N_HEADS, window=WINDOW,
        vocab_size=VOCAB_SIZE, storage_slots=capacity, storage_topk=min(f.topk, capacity))
    return bj.LanguageModel(config, rngs=nnx.Rngs(0))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    meta = harness.provenance(harness.command_line("benchmarks.storage"))
    prefix = harness.output_prefix("storage", out_dir=f.out_dir, out=f.out)
    contexts, capacities = [int(c) for c in f.contexts], [int(c) for c in f.capacities]
    runners, state_bytes = {}, {}
    for capacity in capacities:
        model = model_of(capacity, f)
        token = jnp.zeros((1,), jnp.int32)
        cache = model.init_cache(1)
        runners["decode", capacity, 0] = decoding.compile_decode(model, token, cache, f.steps)
        state_bytes[capacity] = decoding.cache_bytes(cache)
        for context in contexts:
            prompt = jax.random.randint(jax.random.PRNGKey(0), (1, context), 0, VOCAB_SIZE)
            runners["prefill", capacity, context] = decoding.compile_prefill(model, prompt,
                                                                             context)[0]
    seconds = harness.interleave_apart(runners, f.rounds, group=lambda key: key[0],
                                       label="storage").seconds  # decodes, then prefills
    rows = []
    for (kind, capacity, context), values in seconds.items():
        scale = 1e3 / (f.steps if kind == "decode" else 1)
        ms = harness.spread([scale * s for s in values])
        base = harness.spread([scale * s for s in seconds[kind, 0, context]]).median \
            if (kind, 0, context) in seconds else None
        rows.append(dict(kind=kind, capacity=capacity, context=context or None,
                         ms_median=ms.median, ms_min=ms.min, ms_max=ms.max,
                         vs_no_store=None if base is None else ms.median / base,
                         state_bytes=state_bytes[capacity] if kind == "decode" else None))
    lines = ["# The cost of the in-storage memory\n", *harness.provenance_lines(meta),
             f"Model: `bmojo`, d_model {f.d_model}, {f.n_layers} `B` layers, {N_HEADS} heads, "
             f"window {WINDOW}, vocabulary {VOCAB_SIZE}, storage_topk {f.topk} (capacity 0: no "
             f"store); batch 1. Median (min, max) over {f.rounds} interleaved rounds; the ratio "
             f"is to capacity 0 at the same context.\n",
             "| what | capacity (tokens) | context (tokens) | ms median | min | max | vs no store "
             "| decoding state (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["kind"], r["context"] or 0, r["capacity"])):
        state = "" if r["state_bytes"] is None else f"{r['state_bytes'] / 2**20:.2f}"
        what = "prefill (ms)" if r["kind"] == "prefill" else "decode (ms/token)"
        lines.append(f"| {what} | {r['capacity']} | {r['context'] or ''} | {r['ms_median']:.2f} "
                     f"| {r['ms_min']:.2f} | {r['ms_max']:.2f} | {r['vs_no_store']:.2f}x | "
                     f"{state} |")
    harness.write_report(prefix, dict(meta, rows=rows), "\n".join(lines) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
