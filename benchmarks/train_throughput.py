"""Training throughput, memory and model FLOPs utilisation vs context length, for every preset.

    python -m benchmarks.train_throughput [--presets=transformer,bmojo] [--contexts=512,...,8192]
        [--selections=fading,state,...] [--baseline=transformer]
        [--rounds=3] [--tokens_per_step=8192] [--match_params=true]
        [--growth_contexts=1024,...,8192] [--rss=true] [--profile=bmojo:2048,...]
        [--out_dir=DIR | --out=PATH_PREFIX]

One training step = the training loop's loss (`training.lm_loss`: forward, next-token cross-entropy
fused with the LM head, + aux_loss), backward, and an optax AdamW update, all in one jit-compiled
function (parameters and optimizer state donated). All presets share one parameter count: each
preset's d_ff is set so that its non-embedding parameters match the `transformer`'s at the same
d_model and n_layers (`--match_params`, default; the d_ff used is in the table). For each preset
and context length T the batch is tokens_per_step // T sequences, so every step trains on the same
number of tokens. With `--selections`, every preset that has `B` layers is measured once per
eidetic selection rule (`ModelConfig.eidetic_selection`), as variants named `PRESET/RULE`, e.g.
`--presets=bmojo --selections=fading,state,threshold,learned,random --baseline=bmojo/fading` for
the cost of each rule against the default. Any `ModelConfig` field can be set per variant,
`PRESET/FIELD=VALUE` (`train_step.variant_config`): `--presets=bmojo,bmojo/dtype=bfloat16` gives
mixed precision against float32 (a "vs float32" column), `bmojo/remat=block` the
rematerialised step. The variants are timed with `benchmarks.harness`: compiled once
(`jit(...).lower(...).compile()`), warmed up, then run interleaved in rounds in this one process;
we report the median and the spread (min, max) over rounds.

Per variant we record:
  * tokens/s (tokens_per_step / median step time) and the ratio to `transformer` at the same T;
  * compiled memory: `compiled.memory_analysis()` temp + argument + output bytes (argument and
    output include the parameters and the AdamW state, which the donated buffers alias);
  * peak RSS (`--rss`, at `--rss_contexts`): the peak resident set (Linux VmHWM) of a fresh
    subprocess that builds, compiles and runs two steps of that one variant (the process's whole
    footprint: Python, jaxlib, XLA's compiler, the executable and its buffers);
  * model FLOPs utilisation (MFU): model FLOPs per step / step time / matmul peak. Model FLOPs are
    counted analytically (`model_flops`): 2 per multiply-add of every matmul-like op, useful work
    only (a query's visible keys: causal for full attention, window/fading/filled eidetic slots for
    B'MOJO; the causal half of the SSD's intra-chunk products), training = 3 x forward. Elementwise
    work (norms, softmax, RoPE, AdamW) is not counted. The peak is the f32 FLOP/s of a large
    `jnp.dot` ([N, N] @ [N, N], N = --peak_size) timed in every round of the same run (median over
    rounds of the best of 3). We also give XLA's own count, `compiled.cost_analysis()['flops']`
    (executed work, masked entries included, but the body of a `lax.scan` counted once: it
    under-counts the scans and the chunked cross-entropy), as "XLA GFLOP/step" and "HFU".
  * with `--profile=VARIANT:CONTEXT,...`, where the step's time goes: a trace of two more steps,
    each executed XLA instruction's self time by the Python function that emitted it and its kind
    (matmul, elementwise, reduction, ...; `benchmarks.op_profile`);
  * memory growth at a fixed batch of 1 sequence (`--growth_contexts`, compile only): the compiled
    footprint vs T, to check that it grows linearly with the context.
Writes OUT.json, OUT.md and OUT.png (default OUT:
runs/train_throughput-<timestamp>/train_throughput).
"""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import bmojo_jax as bj
from benchmarks import harness, op_profile
from benchmarks.train_step import compile_step, run_step, variant_config
from experiments import plotting

flags.DEFINE_list("presets", list(bj.PRESETS), "Variants to measure: presets, each optionally "
                  "with ModelConfig overrides, PRESET[/FIELD=VALUE]... (e.g. bmojo/dtype=bfloat16, "
                  "bmojo/remat=block, mamba/d_ff=0).")
flags.DEFINE_list("contexts", ["512", "1024", "2048", "4096", "8192"], "Context lengths (tokens).")
flags.DEFINE_list("selections", [], "Eidetic selection rules: each preset with B layers is "
                  "measured once per rule, as the variant PRESET/RULE (empty: the preset's own).")
flags.DEFINE_string("baseline", "transformer", "The variant the tokens/s ratio column divides by.")
flags.DEFINE_integer("tokens_per_step", 8192, "Tokens per training step (batch = this // context).")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
flags.DEFINE_integer("d_model", 256, "Model width.")
flags.DEFINE_integer("n_layers", 4, "Layers.")
flags.DEFINE_integer("n_heads", 4, "Attention heads.")
flags.DEFINE_integer("window", 64, "Window / chunk of W, F, B layers (tokens).")
flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size.")
flags.DEFINE_string("implementation", "xla", "Op implementation (ModelConfig.implementation).")
flags.DEFINE_bool("match_params", True, "Set each preset's d_ff so that its non-embedding "
                  "parameter count matches the transformer's (false: every preset at its default "
                  "d_ff).")
flags.DEFINE_integer("peak_size", 2048,
                     "N of the [N, N] @ [N, N] float32 matmul that sets the peak.")
flags.DEFINE_list("growth_contexts", ["1024", "4096", "8192"],
                  "Contexts of the batch-1 memory-growth sweep (compile only; empty to skip).")
flags.DEFINE_bool("rss", True, "Measure peak RSS in one subprocess per variant.")
flags.DEFINE_list("rss_contexts", ["1024", "8192"],
                  "Contexts whose peak RSS is measured (one subprocess each; empty: all).")
flags.DEFINE_list("profile", [],
                  "VARIANT:CONTEXT pairs whose step is also profiled op by op "
                  "(benchmarks.op_profile: self time by Python site and kind), e.g. bmojo:2048.")
flags.DEFINE_string("rss_child", "", "Internal: PRESET:CONTEXT:BATCH, run one variant, print RSS.")
flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
flags.DEFINE_string("out", None, "Output path prefix (instead of --out_dir), e.g. "
                    "results/train_throughput.")
FLAGS = flags.FLAGS


# ------------------------------------------------------------------------------ model and step


def variant_names() -> list[str]:
    """The measured variants: each of --presets (`PRESET[/FIELD=VALUE]...`), or with --selections
    each `PRESET/RULE` for the presets with `B` layers (the others once)."""
    names = []
    for preset in FLAGS.presets:
        has_b = "B" in variant_config(preset).layer_mixers
        names += [f"{preset}/{rule}" for rule in FLAGS.selections] if has_b and FLAGS.selections \
            else [preset]
    return names


@functools.lru_cache(maxsize=None)
def model_config(variant: str) -> bj.ModelConfig:
    """The variant (`PRESET[/FIELD=VALUE]...`, `train_step.variant_config`) at the flags' size;
    with --match_params and no d_ff of its own, its d_ff set so that its non-embedding parameter
    count matches the `transformer`'s at that size (`bj.match_d_ff`; dtype, remat and the rule
    change no parameter count). Cached: matching builds a few abstract models, and the growth
    sweep asks again per context."""
    def at_size(name):
        return variant_config(name, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                              n_heads=FLAGS.n_heads, window=FLAGS.window,
                              vocab_size=FLAGS.vocab_size, implementation=FLAGS.implementation)
    config = at_size(variant)
    if not FLAGS.match_params or config.d_ff is not None:
        return config
    return bj.match_d_ff(config, bj.param_count(at_size("transformer"), embedding=False))


def xla_flops(compiled) -> float:
    """XLA's executed-FLOPs estimate, `compiled.cost_analysis()["flops"]` (NaN if absent)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


# ------------------------------------------------------------------------------ model FLOPs


def _visible_keys(config: bj.ModelConfig, letter: str, t: int) -> float:
    """Sum over the t queries of the number of keys each one reads (useful attention work)."""
    i = np.arange(t)
    if letter == "A":
        return float(np.sum(i + 1))
    w = config.window
    count = np.minimum(i + 1, w)  # in-context window
    if letter in "FB":
        count = count + np.clip(i - w + 1, 0, w)  # fading keys j in [i-2w+1, i-w]
    if letter == "B" and config.eidetic_per_chunk:
        chunk = i // w
        visible_chunks = np.maximum(chunk - config.eidetic_lag + 1, 0)
        filled = np.minimum(config.eidetic_slots, config.eidetic_per_chunk * visible_chunks)
        count = count + filled
    return float(np.sum(count))


def _ssm_flops(config: bj.ModelConfig, inner: int, t: int) -> float:
    d, n = config.d_model, config.d_state
    heads = inner // config.ssm_head_dim
    dt_width = heads if config.ssm_kind == "mamba2" else -(-d // 16)
    flops = 2 * t * d * (2 * inner + 2 * n + dt_width)  # in_proj
    flops += 2 * t * inner * d  # out_proj
    flops += 2 * t * (inner + 2 * n) * config.d_conv  # depthwise conv
    if config.ssm_kind == "mamba1":
        flops += 2 * t * dt_width * inner  # dt_proj
        return flops + 6 * t * inner * n  # state update and readout
    q = min(config.chunk_size, t)
    pairs = t * (q + 1) / 2  # causal (i, j) pairs inside chunks, per sequence
    flops += 2 * pairs * n  # C_i . B_j
    flops += 2 * pairs * inner  # weights @ (dt x)
    flops += 2 * 2 * t * inner * n  # chunk states + their readout
    return flops


def model_flops(config: bj.ModelConfig, t: int) -> float:
    """Training FLOPs of one sequence of t tokens: 3 x the forward's matmul-like work."""
    d = config.d_model
    forward = 2 * t * d * config.vocab_size  # LM head
    for letter in config.layer_mixers:
        forward += 2 * t * 3 * d * config.hidden_dim  # SwiGLU
        if letter == "M":
            forward += _ssm_flops(config, config.ssm_expand * d, t)
            continue
        forward += 2 * t * 4 * d * d  # q, k, v, o
        forward += 2 * 2 * d * _visible_keys(config, letter, t)  # q.k and p.v
        if letter in "FB":
            forward += _ssm_flops(config, config.fading_expand * d, t)
            forward += 2 * t * 2 * d * d  # fading keys and values
        if letter == "B" and config.eidetic_per_chunk and config.innovation_predictor == "linear":
            forward += 2 * t * d * d  # innovation predictor
    return 3.0 * forward


# ------------------------------------------------------------------------------ measurements


def matmul_peak() -> tuple:
    """(compiled, a, b) of the float32 [N, N] @ [N, N] matmul; FLOPs 2 N^3."""
    n = FLAGS.peak_size
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    compiled = harness.compile_once(jnp.dot, a, b)
    jax.block_until_ready(compiled(a, b))  # warm-up
    return compiled, a, b


def time_peak(peak) -> float:
    compiled, a, b = peak
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(compiled(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * a.shape[0] ** 3 / best


def rss_child(spec: str):
    """Runs one variant (two steps) in this fresh process and prints its peak RSS as JSON."""
    preset, context, batch = spec.split(":")
    compiled, state = compile_step(model_config(preset), int(batch), int(context))
    run_step(compiled, state)
    run_step(compiled, state)
    print(json.dumps(dict(rss_bytes=peak_rss_bytes())))


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: VmHWM, which starts afresh at exec (unlike
    getrusage's ru_maxrss, which a child inherits from the parent's RSS at fork); else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_rss(preset: str, context: int, batch: int) -> float:
    flag_names = ("d_model", "n_layers", "n_heads", "window", "vocab_size", "implementation",
                  "match_params")
    command = [sys.executable, "-m", "benchmarks.train_throughput",
               f"--rss_child={preset}:{context}:{batch}"]
    command += [f"--{name}={FLAGS[name].value}" for name in flag_names]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
        return float(json.loads(result.stdout.strip().splitlines()[-1])["rss_bytes"])
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError) as error:
        print(f"RSS of {preset} at {context} failed: {error}", file=sys.stderr)
        return float("nan")


# ------------------------------------------------------------------------------ main


def main(argv):
    del argv
    if FLAGS.rss_child:
        rss_child(FLAGS.rss_child)
        return
    meta = harness.provenance(harness.command_line("benchmarks.train_throughput"))
    prefix = harness.output_prefix("train_throughput", out_dir=FLAGS.out_dir, out=FLAGS.out)
    contexts = [int(c) for c in FLAGS.contexts]
    started = time.time()
    load_before = harness.load_average()
    variants, params = {}, {}
    for preset in variant_names():
        config = model_config(preset)
        for context in contexts:
            batch = max(FLAGS.tokens_per_step // context, 1)
            t0 = time.perf_counter()
            compiled, state = compile_step(config, batch, context)
            compile_s = time.perf_counter() - t0
            params[preset] = (state[3], config.hidden_dim)
            variants[preset, context] = dict(
                compiled=compiled, state=state, batch=batch, compile_s=compile_s,
                memory=harness.memory_bytes(compiled), xla_flops=xla_flops(compiled),
                model_flops=batch * model_flops(config, context))
            print(f"compiled {preset} T={context} b={batch} in {compile_s:.1f}s", flush=True)
    peak = matmul_peak()
    peaks = []

    def before_round(r):  # the matmul peak is timed in every round, and once after the last
        peaks.append(time_peak(peak))
        print(f"round {r + 1}/{FLAGS.rounds}: peak {peaks[-1] / 1e9:.1f} GFLOP/s, "
              f"load {harness.load_average()}", flush=True)

    runners = {key: functools.partial(run_step, v["compiled"], v["state"])
               for key, v in variants.items()}
    times = harness.interleave(runners, FLAGS.rounds, before_round=before_round).seconds
    peaks.append(time_peak(peak))
    peak_flops = float(np.median(peaks))
    load_after = harness.load_average()
    profiles = {key: op_profile.profile(variants[key]["compiled"], runners[key])
                for key in variants if f"{key[0]}:{key[1]}" in FLAGS.profile}

    rows = []
    for (preset, context), variant in variants.items():
        step = harness.spread(times[preset, context])
        tokens = variant["batch"] * context
        rows.append(dict(
            preset=preset, context=context, batch=variant["batch"], params=params[preset][0],
            d_ff=params[preset][1],
            step_s_median=step.median, step_s_min=step.min, step_s_max=step.max,
            tokens_per_s=tokens / step.median,
            tokens_per_s_min=tokens / step.max, tokens_per_s_max=tokens / step.min,
            compile_s=variant["compile_s"], memory=variant["memory"],
            model_gflop_per_step=variant["model_flops"] / 1e9,
            xla_gflop_per_step=variant["xla_flops"] / 1e9,
            mfu=variant["model_flops"] / step.median / peak_flops,
            hfu=variant["xla_flops"] / step.median / peak_flops,
            **({"profile": profiles[preset, context]} if (preset, context) in profiles else {})))
    base = {r["context"]: r["tokens_per_s"] for r in rows if r["preset"] == FLAGS.baseline}
    for r in rows:
        r["vs_baseline"] = r["tokens_per_s"] / base[r["context"]] if r["context"] in base \
            else None
    float32 = {(model_config(r["preset"]), r["context"]): r["tokens_per_s"] for r in rows}
    for r in rows:  # mixed precision against the same variant in float32, where it ran
        config = model_config(r["preset"])
        twin = float32.get((config.replace(dtype="float32"), r["context"]))
        r["vs_float32"] = r["tokens_per_s"] / twin if twin and config.dtype != "float32" else None
    del variants  # free the compiled executables and buffers before the subprocesses

    if FLAGS.rss:
        for r in rows:
            if FLAGS.rss_contexts and str(r["context"]) not in FLAGS.rss_contexts:
                continue
            r["peak_rss_bytes"] = measure_rss(r["preset"], r["context"], r["batch"])
            print(f"RSS {r['preset']} T={r['context']}: {r['peak_rss_bytes'] / 2**30:.2f} GiB",
                  flush=True)

    growth = []
    for preset in variant_names() if FLAGS.growth_contexts else []:
        for context in [int(c) for c in FLAGS.growth_contexts]:
            compiled, state = compile_step(model_config(preset), 1, context)
            growth.append(dict(preset=preset, context=context, batch=1,
                               memory=harness.memory_bytes(compiled)))
            del compiled, state
        print(f"memory growth {preset} done", flush=True)

    meta.update(
        load_average_before=load_before, load_average_after=load_after,
        peak_gflops_median=peak_flops / 1e9, peak_gflops_rounds=[p / 1e9 for p in peaks],
        wall_s=time.time() - started, baseline=FLAGS.baseline,
        flops_note="model FLOPs analytic (useful matmul work, training = 3 x forward); "
                   "XLA FLOPs from compiled.cost_analysis()['flops']")
    harness.write_report(prefix, dict(meta, rows=rows, growth=growth),
                         markdown(meta, rows, growth))
    plot(rows, f"{prefix}.png", FLAGS.baseline)


def markdown(meta, rows, growth) -> str:
    """The report: provenance, the per-variant table and the memory-growth table (OUT.json's
    fields)."""
    mib = 2 ** 20
    mixed = any(r.get("vs_float32") for r in rows)
    lines = [
        "# Training throughput, memory and MFU vs context\n",
        *harness.provenance_lines(meta),
        f"Load average (1, 5, 15 min) before: {meta['load_average_before']}, after: "
        f"{meta['load_average_after']}  ",
        f"Matmul peak (f32 [{FLAGS.peak_size}]^2 @ [{FLAGS.peak_size}]^2, median over rounds): "
        f"{meta['peak_gflops_median']:.1f} GFLOP/s; wall time {meta['wall_s'] / 60:.1f} min\n",
        "Tokens/s: median over rounds (min-max in brackets). Memory: compiled temp + argument + "
        "output. MFU: analytic model FLOPs / time / matmul peak; HFU: XLA-counted FLOPs instead.\n",
        f"| preset | params | d_ff | context | batch | tokens/s | vs {meta['baseline']} | "
        + ("vs float32 | " if mixed else "") + "compiled MiB | "
        "peak RSS MiB | model GFLOP/step | XLA GFLOP/step | MFU | HFU |",
        "|---|---:|---:|---:|---:|---|---:|" + ("---:|" if mixed else "") +
        "---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = _ratio(r["vs_baseline"])
        rss = r.get("peak_rss_bytes")
        rss = f"{rss / mib:.0f}" if rss is not None and np.isfinite(rss) else "-"
        lines.append(
            f"| {r['preset']} | {r['params']:,} | {r['d_ff']} | {r['context']} | {r['batch']} | "
            f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}) | "
            f"{ratio} | " + (f"{_ratio(r['vs_float32'])} | " if mixed else "") +
            f"{r['memory']['total'] / mib:.0f} | {rss} | "
            f"{r['model_gflop_per_step']:.0f} | {r['xla_gflop_per_step']:.0f} | "
            f"{100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% |")
    for r in rows:
        if "profile" in r:
            lines += profile_lines(r)
    if growth:
        contexts = sorted({g["context"] for g in growth})
        lines += ["", "## Memory growth at batch 1 (compiled temp + argument + output, MiB)\n",
                  "| preset | " + " | ".join(str(c) for c in contexts) +
                  f" | {contexts[-1]} / {contexts[0]} |",
                  "|---|" + "---:|" * (len(contexts) + 1)]
        for preset in dict.fromkeys(g["preset"] for g in growth):
            mem = {g["context"]: g["memory"]["total"] for g in growth if g["preset"] == preset}
            lines.append(f"| {preset} | " + " | ".join(f"{mem[c] / mib:.0f}" for c in contexts) +
                         f" | {mem[contexts[-1]] / mem[contexts[0]]:.2f}x |")
    return "\n".join(lines) + "\n"


def profile_lines(row) -> list:
    """The op-by-op profile of one row (`op_profile.profile`) as a markdown section."""
    profile = row["profile"]
    kinds = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in profile["by_kind"].items())
    lines = [f"\n## Where the time goes: {row['preset']} at T={row['context']} "
             f"(batch {row['batch']})\n",
             f"Self time of the executed XLA instructions, by the Python function that emitted "
             f"them and their kind (benchmarks/op_profile.py), per step: "
             f"{1e3 * profile['op_seconds']:.0f} ms of instructions in a "
             f"{1e3 * row['step_s_median']:.0f} ms step (median). By kind: {kinds}.\n",
             "| site | kind | ms/step | share |", "|---|---|---:|---:|"]
    lines += [f"| {p['site']} | {p['kind']} | {1e3 * p['seconds']:.1f} | "
              f"{100 * p['share']:.1f}% |" for p in profile["rows"]]
    return lines


def _ratio(value) -> str:
    return f"{value:.2f}x" if value else "-"


def plot(rows, path, baseline: str):
    """Tokens/s (median, min-max error bars), ratio to the baseline, compiled memory and MFU vs
    context (OUT.json's rows); a context a variant did not run breaks its line."""
    plt = plotting.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.6))
    panels = [(axes[0, 0], lambda r: r["tokens_per_s"], "training throughput",
               "tokens/s (median over rounds)"),
              (axes[0, 1], lambda r: r["vs_baseline"] or None, f"throughput relative to {baseline}",
               f"tokens/s / tokens/s of {baseline}"),
              (axes[1, 0], lambda r: r["memory"]["total"] / 2**20, "compiled memory per step",
               "temp + arguments + outputs (MiB, log scale)"),
              (axes[1, 1], lambda r: 100 * r["mfu"], "model FLOPs utilisation",
               "MFU (% of the matmul peak)")]
    low = plotting.aligned(rows, "preset", "context", lambda r: r["tokens_per_s_min"])
    high = plotting.aligned(rows, "preset", "context", lambda r: r["tokens_per_s_max"])
    for axis, value, title, label in panels:
        series = plotting.aligned(rows, "preset", "context", value)
        for order, (preset, (xs, ys)) in enumerate(series.items()):
            style = plotting.series_style(preset, order)
            if axis is axes[0, 0]:
                axis.errorbar(xs, ys, yerr=[ys - low[preset][1], high[preset][1] - ys],
                              capsize=3, **style)
            else:
                axis.plot(xs, ys, **style)
        axis.set_xscale("log", base=2)
        axis.set_title(title)
        axis.set_xlabel("context (tokens, log scale)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1, 0].set_yscale("log")
    plotting.plain_numbers(axes[1, 0].yaxis)
    axes[0, 0].legend(fontsize=8)
    plotting.save(fig, path, caption=(
        "Training tokens/s: median over the interleaved timing rounds, error bars from the "
        "minimum to the maximum round. Memory: XLA's compiled-memory analysis at a fixed number "
        "of tokens per step. MFU: analytic model FLOPs / step time / measured matmul peak. A "
        "missing point (a variant that did not run at that context) leaves a gap."))


if __name__ == "__main__":
    app.run(main)
