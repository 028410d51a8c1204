"""Table 4 of docs/design.md section 7: prefill time of a 2k-token prompt and per-token decode
latency after it, every preset at the transformer's non-embedding parameter count. Timed with
`benchmarks.harness` on the programs of `benchmarks.decoding`."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import bmojo_jax as bj
from benchmarks import decoding, harness
from experiments import plotting
from experiments.reproduce import lm, runner

NAME = "inference"
TITLE = "Inference time: prefill of a 2k-token prompt and per-token decoding"


def budgets() -> dict:
    """{"tiny", "full"}: ConfigDicts of every setting.

    Fields: model (ModelConfig fields incl. vocab_size; d_ff matched per preset as in the lm
    table), context (prompt tokens), decode_steps (greedy steps per timed call), rounds
    (interleaved timing rounds), batch_size.
    """
    full = dict(model=dict(d_model=256, n_layers=4, n_heads=4, window=64, vocab_size=10000),
                context=2048, decode_steps=32, rounds=5, batch_size=1)
    tiny = dict(model=dict(d_model=32, n_layers=2, n_heads=2, window=16, vocab_size=256),
                context=64, decode_steps=4, rounds=2, batch_size=1)
    return {"tiny": ml_collections.ConfigDict(tiny), "full": ml_collections.ConfigDict(full)}


def runners(preset: str, s) -> dict:
    """The compiled prefill and decode of one preset: {"prefill": run, "decode": run, "params",
    "state_bytes" (the cache after the prompt), "dtype", "implementation"}."""
    model_cfg = bj.ModelConfig.preset(preset, **lm.matched_models(s.model, [preset])[preset])
    model = bj.LanguageModel(model_cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.PRNGKey(0), (s.batch_size, s.context), 0,
                                model_cfg.vocab_size, jnp.int32)
    prefill, (logits, cache) = decoding.compile_prefill(model, prompt,
                                                        s.context + s.decode_steps)
    token = logits[:, -1].argmax(-1).astype(jnp.int32)
    return dict(prefill=prefill, decode=decoding.compile_decode(model, token, cache,
                                                                s.decode_steps),
                params=bj.count_params(model), state_bytes=decoding.cache_bytes(cache),
                dtype=model_cfg.dtype, implementation=model_cfg.implementation)


def run(s, presets, workdir: Path, points) -> dict:
    """Prefill and decode of every preset, interleaved in `s.rounds` rounds: the prefills in
    rounds of their own, then the decodes (`harness.interleave_apart`)."""
    del workdir, points  # nothing is trained
    compiled = {}
    for preset in presets:
        tic = time.perf_counter()
        compiled[preset] = runners(preset, s)
        print(f"[inference] {preset}: compiled in {time.perf_counter() - tic:.0f} s", flush=True)
    seconds = harness.interleave_apart({(p, part): compiled[p][part] for p in presets
                                        for part in ("prefill", "decode")}, s.rounds,
                                       group=lambda key: key[1]).seconds
    runs = []
    for p in presets:
        prefill = harness.spread(1e3 * np.asarray(seconds[p, "prefill"]))
        decode = harness.spread(1e3 * np.asarray(seconds[p, "decode"]) / s.decode_steps)
        runs.append(dict(
            preset=p, params=compiled[p]["params"], state_bytes=compiled[p]["state_bytes"],
            dtype=compiled[p]["dtype"], implementation=compiled[p]["implementation"],
            prefill_ms_median=prefill.median, prefill_ms_min=prefill.min,
            prefill_ms_max=prefill.max, decode_ms_median=decode.median,
            decode_ms_min=decode.min, decode_ms_max=decode.max))
    return dict(runs=runs)


def markdown(record, s) -> str:
    """The latency table and the method in prose."""
    transformer = next((r for r in record["runs"] if r["preset"] == "transformer"), None)
    lines = [f"| model | parameters | prefill {s.context} tokens (ms) [min, max] | "
             f"decode ms/token at {s.context} [min, max] | decoding state (MiB) | "
             f"vs transformer (prefill, decode) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in record["runs"]:
        ratio = ("—" if transformer is None else
                 f"{transformer['prefill_ms_median'] / r['prefill_ms_median']:.2f}x, "
                 f"{transformer['decode_ms_median'] / r['decode_ms_median']:.2f}x faster")
        lines.append(f"| {r['preset']} | {r['params']:,} | {r['prefill_ms_median']:.1f} "
                     f"[{r['prefill_ms_min']:.1f}, {r['prefill_ms_max']:.1f}] | "
                     f"{r['decode_ms_median']:.2f} [{r['decode_ms_min']:.2f}, "
                     f"{r['decode_ms_max']:.2f}] | {r['state_bytes'] / 2**20:.2f} | {ratio} |")
    first = record["runs"][0]
    implementation = (f"implementation `{first['implementation']}`" if first["implementation"]
                      else "the default implementation of every op on this backend")
    return ("\n".join(lines) +
            f"\n\nModel: {runner.describe(s.model)} with d_ff matched "
            f"per preset to the transformer's non-embedding parameter count (as in the lm table), "
            f"batch {s.batch_size}, {first['dtype']}, {implementation}. Prefill: the "
            f"jit-compiled `model.prefill` of a {s.context}-token prompt into a fresh cache "
            f"(parallel form). Decode: {s.decode_steps} jit-compiled `model.decode_step`s in one "
            f"`lax.scan`, greedy, continuing from the prefilled cache, per token. Compiled once "
            f"and warmed up; the presets are interleaved in {s.rounds} rounds, the prefills' "
            f"rounds first and then the decodes' (a decode timed right after a prefill pays for "
            f"its freed memory), and the median "
            f"[min, max] over rounds is shown. The full transformer's KV cache is preallocated to "
            f"{s.context} + {s.decode_steps} tokens; the other states do not grow with the "
            f"context. The machine is shared: compare ratios within this table only.")


def plot(record, s, path) -> None:
    """Prefill and decode latency per preset: bars at the median, error bars from the min to the
    max over the rounds (the caption says so), each preset in its own colour."""
    plt = plotting.pyplot()
    runs = record["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    names = [r["preset"] for r in runs]
    for ax, key, title, label in (
            (left, "prefill_ms", f"prefill of a {s.context}-token prompt", "time (ms)"),
            (right, "decode_ms", f"decode after {s.context} tokens", "time per token (ms)")):
        med = np.array([r[f"{key}_median"] for r in runs])
        err = np.array([[m - r[f"{key}_min"], r[f"{key}_max"] - m] for m, r in zip(med, runs)]).T
        ax.bar(names, med, yerr=err, capsize=3,
               color=[plotting.series_style(n, i)["color"] for i, n in enumerate(names)])
        ax.set_title(title)
        ax.set_xlabel("preset")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    plotting.save(fig, path, caption=(
        f"Bars: median over {s.rounds} interleaved rounds; error bars: the minimum and the maximum "
        f"over the rounds. Batch {s.batch_size}, jit-compiled, warmed up."))
