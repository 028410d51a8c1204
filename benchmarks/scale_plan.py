"""Paper-scale training planned on this machine: the training step of every config of the size
ladder (experiments/configs/scale.py) compiled for a simulated device mesh from abstract arrays,
and what it implies on named accelerators.

    python -m benchmarks.scale_plan [--presets=transformer,bmojo] [--sizes=130M,370M]
        [--contexts=2k,8k] [--devices=64] [--mesh_shape=8,8,1] [--mfu=0.4] [--quick]
        [--time_limit_min=0] [--out_dir=DIR]

For each "PRESET:SIZE:CONTEXT" config the training loop's own step (`training.make_train_step`:
loss, gradients, clipping, AdamW, with the in/out shardings of `sharding.PARAM_RULES` on a
`sharding.make_mesh` mesh) is lowered and compiled from `jax.ShapeDtypeStruct`s: the parameters
come from `training.abstract_model` (`nnx.eval_shape`), the optimizer state from
`jax.eval_shape(optimizer.init, ...)`, the batch is a [batch_size, seq_len] int32 shape. Nothing
of the model is allocated. The mesh has `--devices` devices: on CPU this process restarts itself
with XLA_FLAGS=--xla_force_host_platform_device_count=N when it has fewer (the device count is
fixed when JAX starts). We report per config:

  * parameters (total, with the tied embedding counted once) and the matched d_ff;
  * per-device memory: `compiled.memory_analysis()` of the partitioned program (argument: the
    device's shard of parameters, AdamW state and batch; temp: activations and gradients;
    output; total = their sum, `harness.memory_bytes`). Caveat: it is XLA:CPU's buffer
    assignment (its fusions and schedule); a GPU or TPU compiler assigns buffers differently,
    so read it as an estimate, not the accelerator's exact footprint;
  * training FLOPs per token, two ways: XLA's count, `compiled.cost_analysis()["flops"]` of the
    per-device program x devices / tokens per step (it counts the body of a `lax.scan` once, so
    it under-counts the scans: the SSM chunk loops and the chunked cross-entropy; and it counts
    work that the partitioned program repeats on every device, e.g. activations that a mesh
    leaves unsplit, as often as it is done), and the
    analytic 6N + attention of PaLM (Chowdhery et al. 2022, appendix B: 6N + 12 L H Q T per
    token), with T, for each attention layer, the keys in its memory (`attention_span`): the
    context for `A`, the window for `W`, window + fading window for `F`, + the eidetic slots
    for `B` (at most the context); `M` layers add no attention term. N counts every parameter,
    so with a tied embedding it is the LM head's matmul (the lookup costs nothing); the SSM
    scans' own work (not a parameter matmul) is not in it;
  * the step time those imply on each accelerator of `ACCELERATORS` at `--mfu` (model FLOPs
    utilisation): analytic FLOPs per step / (devices x peak x MFU), whether the per-device
    memory fits its HBM, and the hours to train the config's num_steps (20 tokens per
    parameter).

The grid runs smallest size first. The report is rewritten after every config, so an
interrupted run keeps what it compiled; `--time_limit_min` stops it cleanly (the report lists
the configs left out). Compilation uses `PLAN_COMPILER_OPTIONS` (LLVM at -O0: faster, the same
reported numbers). Writes OUT_DIR/scale_plan.json and .md (default
OUT_DIR: runs/scale_plan-<timestamp>/).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import bmojo_jax as bj
from benchmarks import harness
from bmojo_jax import sharding, training
from experiments.configs import scale

QUICK = dict(sizes=["130M"], contexts=["2k"])
# Added to the step's own compiler options (our choice, for speed): LLVM code generation at -O0.
# The HLO passes, buffer assignment and cost analysis that we report come before it and do not
# change (checked on a 2-layer bmojo on 2 devices: the same memory_analysis and cost_analysis,
# 2.2x less compile CPU time); the executable is never run.
PLAN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (the tests
    import it beside other modules with flags of the same names)."""
    flags.DEFINE_list("presets", list(bj.PRESETS), "Presets to plan (bmojo_jax.PRESETS).")
    flags.DEFINE_list("sizes", list(scale.SIZES), "Rungs of the ladder (experiments/configs/scale.py "
        "SIZES).")
    flags.DEFINE_list("contexts", list(scale.CONTEXTS), "Contexts (scale.CONTEXTS).")
    flags.DEFINE_bool("quick", False, f"Only sizes {QUICK['sizes']} and contexts "
        f"{QUICK['contexts']} (overrides --sizes and --contexts).")
    flags.DEFINE_integer("devices", 64, "Devices of the (simulated) mesh (our default: 8 hosts of 8 "
        "chips, 8192 tokens per chip at 0.5M tokens per step).")
    flags.DEFINE_list("mesh_shape", [], "(data, fsdp, tensor[, sequence]) of the mesh, one entry may "
        "be -1; empty: each config's mesh_shape (scale.py: data parallel).")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step times, in (0, 1].")
    flags.DEFINE_float("time_limit_min", 0, "Compile no further config after this many minutes of "
        "wall time (the report says which were left out); 0: no limit.")
    flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)


class Accelerator(NamedTuple):
    """A chip: dense bfloat16 matmul peak (FLOP/s), HBM (bytes, vendor GB = 1e9) and the source."""
    peak_flops: float
    hbm_bytes: float
    source: str


ACCELERATORS = {
    "TPU v5e": Accelerator(197e12, 16e9, "Google Cloud TPU v5e documentation: 197 TFLOP/s bf16, "
                           "16 GB HBM2 per chip"),
    "TPU v5p": Accelerator(459e12, 95e9, "Google Cloud TPU v5p documentation: 459 TFLOP/s bf16, "
                           "95 GB HBM2e per chip"),
    "H100 SXM": Accelerator(989e12, 80e9, "NVIDIA H100 datasheet: 1,979 TFLOP/s bf16 with 2:4 "
                            "sparsity, half of it dense; 80 GB HBM3"),
    "A100 SXM 80GB": Accelerator(312e12, 80e9, "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense; "
                                 "80 GB HBM2e"),
}


# ------------------------------------------------------------------------------ devices


def ensure_devices(count: int) -> list:
    """The first `count` devices; on CPU with fewer, restarts this process (`os.execve`, same
    arguments) with XLA_FLAGS asking for `count` simulated host devices.

    Raises:
      ValueError: count < 1, or still too few devices (another backend, or the restart did not
        take).
    """
    if count < 1:
        raise ValueError(f"--devices={count}: must be >= 1.")
    if jax.device_count() >= count:
        return jax.devices()[:count]
    xla_flags = os.environ.get("XLA_FLAGS", "")
    wanted = f"{DEVICE_COUNT_FLAG}={count}"
    if jax.default_backend() != "cpu" or wanted in xla_flags.split():
        raise ValueError(f"--devices={count}: this process has {jax.device_count()} "
                         f"{jax.default_backend()} devices.")
    xla_flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", xla_flags).strip()
    env = dict(os.environ, XLA_FLAGS=f"{xla_flags} {wanted}".strip())
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.scale_plan", *sys.argv[1:]], env)


# ------------------------------------------------------------------------------ one config


def attention_span(model_cfg: bj.ModelConfig, letter: str, context: int) -> int:
    """Keys in the memory of one query of a layer of mixer `letter` (tokens): the context for
    `A`, the window for `W`, window + fading window for `F`, + eidetic slots for `B`, at most
    the context; 0 for `M` (the T of PaLM's 12 L H Q T, see module docstring)."""
    w = model_cfg.window
    span = {"A": context, "W": w, "F": 2 * w, "B": 2 * w + model_cfg.eidetic_slots, "M": 0}[letter]
    return min(span, context)


def analytic_flops_per_token(model_cfg: bj.ModelConfig, n_params: int, context: int) -> dict:
    """Training FLOPs per token: {"6N": 6 n_params, "attention": 12 d_model x the sum over layers
    of `attention_span`, "total": their sum} (PaLM appendix B; module docstring)."""
    attention = 12 * model_cfg.d_model * sum(attention_span(model_cfg, letter, context)
                                             for letter in model_cfg.layer_mixers)
    return {"6N": 6.0 * n_params, "attention": float(attention),
            "total": 6.0 * n_params + float(attention)}


def xla_flops(compiled) -> float:
    """`compiled.cost_analysis()["flops"]` of the (per-device) program; NaN if absent."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def plan_config(config, devices: list, mesh_shape=None) -> dict:
    """Compiles the training step of `config` (a training config, e.g. `scale.get_config(...)`)
    on a mesh of `devices` from abstract arrays and returns its row (module docstring): params,
    d_ff, batch_size, seq_len, tokens_per_step, tokens_per_device (the step's tokens over the
    batch and sequence axes), devices, mesh_shape, memory (per device, bytes),
    flops_per_token ({"xla", "6N", "attention", "total"}), compile_s and compile_cpu_s
    (lowering and compiling, wall and CPU seconds of this process on this machine), num_steps.

    Raises:
      ValueError: an invalid config, a mesh shape that does not fit the devices, or a batch that
        does not divide over the mesh's batch axes.
    """
    training.validate_config(config)
    model_cfg = training.model_config(config, config.model.vocab_size)
    mesh = sharding.make_mesh(mesh_shape or config.mesh_shape, devices)
    sharding.batch_sharding(mesh, config.batch_size)  # raises when the batch does not divide
    model = training.abstract_model(model_cfg)
    params, n_params = nnx.state(model, nnx.Param), bj.count_params(model)
    opt_state = jax.eval_shape(training.make_optimizer(config).init, params)
    batch = jax.ShapeDtypeStruct((config.batch_size, config.data.seq_len), jnp.int32)
    start, start_cpu = time.perf_counter(), time.process_time()
    compiled = training.make_train_step(model_cfg, config, mesh).lower(
        params, opt_state, batch, batch).compile(PLAN_COMPILER_OPTIONS)
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    tokens = config.batch_size * config.data.seq_len
    splits = math.prod(mesh.shape[axis] for axis in (*sharding.BATCH_AXES, sharding.SEQUENCE_AXIS))
    flops = analytic_flops_per_token(model_cfg, n_params, config.data.seq_len)
    return dict(
        params=n_params, d_ff=model_cfg.hidden_dim, batch_size=config.batch_size,
        seq_len=config.data.seq_len, tokens_per_step=tokens, tokens_per_device=tokens // splits,
        devices=len(devices),
        mesh_shape=[int(s) for s in mesh.devices.shape], memory=harness.memory_bytes(compiled),
        flops_per_token=dict(flops, xla=xla_flops(compiled) * len(devices) / tokens),
        compile_s=compile_s, compile_cpu_s=compile_cpu_s, num_steps=config.num_steps)


def implied(row: dict, mfu: float) -> dict:
    """{accelerator: {"step_s", "fits", "train_hours"}}: the step time of `row` on
    `row["devices"]` chips at `mfu`, whether its per-device memory fits the chip's HBM, and
    num_steps of them in hours."""
    flops = row["flops_per_token"]["total"] * row["tokens_per_step"]
    out = {}
    for name, chip in ACCELERATORS.items():
        step_s = flops / (row["devices"] * chip.peak_flops * mfu)
        out[name] = dict(step_s=step_s, fits=row["memory"]["total"] <= chip.hbm_bytes,
                         train_hours=step_s * row["num_steps"] / 3600)
    return out


# ------------------------------------------------------------------------------ report


def markdown(meta: dict, rows: list) -> str:
    """The report: provenance and settings, the accelerators with their sources, the compiled
    table and the implied step times (scale_plan.json's fields)."""
    gib = 2 ** 30
    lines = [
        "# Paper-scale training, planned on this machine\n",
        *harness.provenance_lines(meta),
        f"Load average (1, 5, 15 min) before: {meta['load_average_before']}, after: "
        f"{meta['load_average_after']}; wall time {meta['wall_s'] / 60:.1f} min\n",
        f"Configs: `experiments/configs/scale.py` (every preset at one parameter count per rung: "
        f"d_ff matched to the transformer's non-embedding count; the docstring gives every "
        f"choice). Compiled here: {len(rows)} of the {meta['planned']} configs asked for "
        f"(sizes {', '.join(meta['sizes'])}; contexts {', '.join(meta['contexts'])}; presets "
        f"{', '.join(meta['presets'])})" + (
            f"; left out at the time limit of {meta['time_limit_min']:g} min (this machine's "
            f"load): {', '.join(meta['left_out'])}.\n" if meta.get("left_out") else ".\n"),
        f"Each training step (`training.make_train_step`: loss, backward, clipping, AdamW; the "
        f"configs' bfloat16 activations, float32 parameters and AdamW state) is compiled by "
        f"XLA:CPU from abstract arrays for a mesh of {meta['devices']} simulated devices "
        f"({meta['mesh_note']}); nothing is allocated. Memory: `compiled.memory_analysis()` per "
        f"device (argument + temp + output), XLA:CPU's buffer assignment: an estimate of an "
        f"accelerator's. FLOPs per token: XLA's count (`cost_analysis` of the per-device "
        f"program x devices; scan bodies counted once: an under-count for the SSM scans) and "
        f"the analytic 6N + attention (PaLM, appendix B; T = the keys in each attention "
        f"layer's memory). Compile: wall and CPU seconds on this machine, with "
        f"{meta['compiler_options']} (LLVM at -O0; the reported numbers do not depend on it).\n",
        "| config | params | d_ff | batch x context | tokens/device | argument GiB/device | "
        "temp GiB/device | total GiB/device | XLA GFLOP/token | 6N GFLOP/token | "
        "attention GFLOP/token | compile s (CPU s) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} |" + " |" * 10)
            continue
        m, f = r["memory"], r["flops_per_token"]
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['d_ff']} | "
            f"{r['batch_size']} x {r['seq_len']} | {r['tokens_per_device']} | "
            f"{m['argument'] / gib:.2f} | "
            f"{m['temp'] / gib:.2f} | {m['total'] / gib:.2f} | {f['xla'] / 1e9:.2f} | "
            f"{f['6N'] / 1e9:.2f} | {f['attention'] / 1e9:.2f} | "
            f"{r['compile_s']:.0f} ({r['compile_cpu_s']:.0f}) |")
    names = list(ACCELERATORS)
    lines += [
        "",
        f"## Implied step time on {meta['devices']} chips at {100 * meta['mfu']:.0f}% MFU\n",
        "Step time = analytic FLOPs per step / (chips x bf16 peak x MFU); training hours = "
        "num_steps (20 tokens per parameter of the rung, 0.5M tokens per step) x step time. "
        "\"OOM\": the per-device memory above exceeds the chip's HBM (rematerialisation, more "
        "chips or fewer tokens per chip needed).\n",
        "| accelerator | bf16 peak TFLOP/s | HBM GB | source |",
        "|---|---:|---:|---|",
        *[f"| {n} | {c.peak_flops / 1e12:.0f} | {c.hbm_bytes / 1e9:.0f} | {c.source} |"
          for n, c in ACCELERATORS.items()],
        "",
        "| config | steps | " + " | ".join(f"{n}: step ms (training h)" for n in names) + " |",
        "|---|---:|" + "---|" * len(names)]
    for r in rows:
        if "error" in r:
            continue
        cells = [f"{1e3 * v['step_s']:.0f} ({v['train_hours']:.2g})" + ("" if v["fits"] else " OOM")
                 for v in (r["implied"][n] for n in names)]
        lines.append(f"| {r['config']} | {r['num_steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main


def grid() -> list[str]:
    """The "PRESET:SIZE:CONTEXT" arguments asked for, smallest size first.

    Raises:
      ValueError: an unknown preset, size or context (`scale.parse`).
    """
    sizes = QUICK["sizes"] if FLAGS.quick else FLAGS.sizes
    contexts = QUICK["contexts"] if FLAGS.quick else FLAGS.contexts
    args = [f"{p}:{s}:{c}" for s in sizes for c in contexts for p in FLAGS.presets]
    for arg in args:
        scale.parse(arg)
    return args


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if not 0 < FLAGS.mfu <= 1:
            raise ValueError(f"--mfu={FLAGS.mfu}: must be in (0, 1].")
        args = grid()
        if not all(re.fullmatch(r"-?\d+", s) for s in FLAGS.mesh_shape):
            raise ValueError(f"--mesh_shape={','.join(FLAGS.mesh_shape)}: must be integers "
                             f"(data, fsdp, tensor[, sequence]), one of them may be -1.")
        mesh_shape = [int(s) for s in FLAGS.mesh_shape] or None
        devices = ensure_devices(FLAGS.devices)
        sharding.resolve_mesh_shape(mesh_shape, len(devices))  # a bad --mesh_shape fails now
    except ValueError as e:
        sys.exit(f"error: {e}")
    meta = harness.provenance(harness.command_line("benchmarks.scale_plan"))
    prefix = harness.output_prefix("scale_plan", out_dir=FLAGS.out_dir)
    meta.update(load_average_before=harness.load_average(), devices=FLAGS.devices, mfu=FLAGS.mfu,
                planned=len(args), presets=list(FLAGS.presets),
                sizes=list(QUICK["sizes"] if FLAGS.quick else FLAGS.sizes),
                contexts=list(QUICK["contexts"] if FLAGS.quick else FLAGS.contexts),
                mesh_note=(f"mesh_shape {','.join(FLAGS.mesh_shape)}" if mesh_shape else
                           "each config's mesh_shape: data parallel over all devices"),
                time_limit_min=FLAGS.time_limit_min, compiler_options=PLAN_COMPILER_OPTIONS,
                accelerators={n: c._asdict() for n, c in ACCELERATORS.items()})
    started, rows = time.time(), []
    for i, arg in enumerate(args):
        if FLAGS.time_limit_min and time.time() - started > 60 * FLAGS.time_limit_min:
            meta["left_out"] = args[i:]
            print(f"time limit: {len(args) - i} configs left out", flush=True)
            break
        try:
            row = plan_config(scale.get_config(arg), devices, mesh_shape)
            row["implied"] = implied(row, FLAGS.mfu)
        except ValueError as e:  # a config the mesh cannot take: recorded, the grid goes on
            row = dict(error=str(e))
        rows.append(dict(config=arg, **row))
        print(f"{arg}: " + (f"failed: {row['error']}" if "error" in row else
                            f"{row['memory']['total'] / 2**30:.2f} GiB/device, compiled in "
                            f"{row['compile_s']:.0f} s"), flush=True)
        meta.update(load_average_after=harness.load_average(), wall_s=time.time() - started)
        harness.write_report(prefix, dict(meta, rows=rows), markdown(meta, rows))
    if meta.get("left_out"):
        harness.write_report(prefix, dict(meta, rows=rows), markdown(meta, rows))


if __name__ == "__main__":
    define_flags()
    app.run(main)
