"""Pallas kernels vs the `xla` path: forward and forward+backward time over a registry of shapes.

    python -m benchmarks.kernels [--shapes=NAME,...] [--rounds=7] [--out_dir=DIR | --out=PATH.json]

Each (shape, implementation, pass) is timed with `benchmarks.harness`: compiled once
(`jit(...).lower().compile()`, recording `compiled.memory_analysis()`), warmed up, then all
variants are interleaved in rounds; we report the median and the spread (min, max) over rounds.
"fwd" times the op; "fwd+bwd" its outputs and the gradient of <cotangent, outputs> with respect
to every float input (cotangent: ones / size).

Every variant is also checked against the float32 reference (`implementation="reference"` on the
same inputs upcast to float32, matmuls at `precision="highest"`): the relative error
||out - ref|| / ||ref|| (Frobenius, float64 on the host) of each output and each gradient, the
largest reported as `relative_error`. It passes within `TOLERANCE[dtype]` (bfloat16 operands:
1e-3 to 1e-2 is normal; float32 on a GPU's matrix units runs at tf32, about 3e-4); a NaN never
passes. A variant that does not compile or run (or whose shape's reference does not) is recorded
with its error (`failure`) and the others still run. The command exits 1 after writing its report when any variant fails: this is how the
Pallas kernels are checked compiled on an accelerator, at sizes the unit tests cannot reach.

On GPU/TPU the kernels run compiled, and the JSON gives the model FLOPs (useful work: visible keys
only; backward counted as 2.5x the forward, as for FlashAttention-2) and bytes (inputs and outputs
read or written once), achieved FLOP/s and bandwidth, and their fraction of the chip's peak (dense
bf16 FLOP/s and HBM bandwidth from the vendor's data sheet, where the device kind is known).
On CPU only interpret mode runs: the timings measure the Pallas interpreter on tiny shapes, not a
kernel, and are labelled so; compare implementations only within one run.
Writes kernels_<backend>.json (default: under runs/kernels-<timestamp>/).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import harness
from bmojo_jax import ops
from pallas_kernels import config as cfg

# name: (op, sizes). Attention: b, t, h, e, window (None = full), fading, slots (m, 0 = none).
# Scans: ssd b, t, h, p, n; selective_scan b, t, d, n.
SHAPES = {
    "cpu": {
        "attention_full": ("attention", dict(b=1, t=64, h=2, e=16, window=None, fading=False,
                                             slots=0)),
        "attention_swa": ("attention", dict(b=1, t=64, h=2, e=16, window=16, fading=False,
                                            slots=0)),
        "attention_bmojo": ("attention", dict(b=1, t=64, h=2, e=16, window=16, fading=True,
                                              slots=4)),
        "ssd": ("ssd", dict(b=1, t=64, h=2, p=16, n=8)),
        "selective_scan": ("selective_scan", dict(b=1, t=64, d=32, n=8)),
    },
    "accelerator": {
        "attention_full_2k": ("attention", dict(b=4, t=2048, h=8, e=128, window=None,
                                                fading=False, slots=0)),
        "attention_swa_8k": ("attention", dict(b=2, t=8192, h=8, e=128, window=512,
                                               fading=False, slots=0)),
        "attention_bmojo_8k": ("attention", dict(b=2, t=8192, h=8, e=128, window=512,
                                                 fading=True, slots=128)),
        "ssd_8k": ("ssd", dict(b=2, t=8192, h=16, p=64, n=64)),
        "selective_scan_4k": ("selective_scan", dict(b=2, t=4096, d=1024, n=16)),
    },
}
# Largest relative error vs the float32 reference that passes, by input dtype (our choice, from
# the rounding of each dtype: bfloat16 has 8 significand bits, tf32 10).
TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2}
# What a variant that cannot be built raises (e.g. a kernel's tiles over the chip's shared memory:
# JaxRuntimeError RESOURCE_EXHAUSTED); it is recorded as a failed row and the run goes on.
COMPILE_FAILURES = (jax.errors.JaxRuntimeError, ValueError, NotImplementedError)
# Dense bf16 FLOP/s and HBM bytes/s by `device_kind` substring (vendor data sheets).
PEAKS = {
    "H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12),
    "TPU v4": (275e12, 1.2e12), "TPU v5 lite": (197e12, 0.82e12), "TPU v5e": (197e12, 0.82e12),
    "TPU v5p": (459e12, 2.76e12), "TPU v6": (918e12, 1.64e12),
}

def define_flags() -> None:
    """The command line's flags (defined only when this module is the program)."""
    flags.DEFINE_list("shapes", None, "Shape names to run (default: all for the backend).")
    flags.DEFINE_list("implementations", ["pallas", "xla"], "Implementations to compare.")
    flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")
    flags.DEFINE_enum("dtype", "bfloat16", list(TOLERANCE),
                      "Input dtype on accelerators (CPU: float32).")
    flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
    flags.DEFINE_string("out", None, "Output JSON path (instead of --out_dir), e.g. "
                        "results/kernels_cpu.json.")


FLAGS = flags.FLAGS


def make_inputs(op: str, s: dict, dtype):
    """Random inputs and the op's call for one shape: (args tuple, fn(*args) -> outputs)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    normal = lambda k, shape: jax.random.normal(k, shape).astype(dtype)  # noqa: E731
    if op == "attention":
        shape = (s["b"], s["t"], s["h"], s["e"])
        args = [normal(k, shape) for k in keys[:5]]
        if not s["fading"]:
            args[3:] = [None, None]
        memory = None
        if s["slots"]:
            scores = jax.random.normal(keys[5], (s["b"], s["t"]))
            memory = ops.select_eidetic(scores, window=s["window"], per_chunk=s["slots"] // 4,
                                        slots=s["slots"])

        def call(q, k, v, kf, vf, implementation):
            return ops.memory_attention(q, k, v, window=s["window"], k_fading=kf, v_fading=vf,
                                        memory_positions=memory, implementation=implementation)
        return tuple(args), call
    b, t, n = s["b"], s["t"], s["n"]
    if op == "ssd":
        fn, channels = ops.ssd, (s["h"], s["p"])
        a = -jnp.exp(jax.random.normal(keys[2], (s["h"],)))
    else:
        fn, channels = ops.selective_scan, (s["d"],)
        a = -jnp.exp(jax.random.normal(keys[2], (s["d"], n)))
    x = normal(keys[0], (b, t) + channels)
    dt = jax.nn.softplus(jax.random.normal(keys[1], (b, t, channels[0])) - 2.0)
    args = (x, dt, a, normal(keys[3], (b, t, n)), normal(keys[4], (b, t, n)))

    def call(x, dt, a, B, C, implementation):
        return fn(x, dt, a, B, C, implementation=implementation)
    return args, call


def work(op: str, s: dict, itemsize: int):
    """(forward FLOPs, forward bytes) of useful work for one shape (see module docstring)."""
    if op == "attention":
        t, w = s["t"], s["window"]
        keys = (t + 1) / 2 if w is None else (min(w, t) + (w if s["fading"] else 0) + s["slots"])
        tokens = s["b"] * s["h"] * t
        groups = 5 if s["fading"] else 3  # q, k, v (+ kf, vf) read
        return 4.0 * tokens * keys * s["e"], (groups * itemsize + 4) * tokens * s["e"]
    b, t, n = s["b"], s["t"], s["n"]
    if op == "ssd":
        h, p = s["h"], s["p"]
        q = cfg.ScanBlocks.default().chunk
        flops = 2.0 * b * h * t * (q * (n + p) + 3 * p * n)  # C B^T, (.) x, state in/out
        return flops, (2 * b * t * h * p + 2 * b * t * n) * itemsize + 4 * b * t * h
    d = s["d"]
    return 6.0 * b * t * d * n, (2 * b * t * d + 2 * b * t * n) * itemsize + 4 * b * t * d


def _is_float(a) -> bool:
    return a is not None and jnp.issubdtype(a.dtype, jnp.floating)


def compile_variant(call, args, implementation, backward):
    """A compiled zero-argument runner and its `compiled.memory_analysis()` (None where the
    backend has none)."""
    live = [i for i, a in enumerate(args) if _is_float(a)]

    def forward(*values):
        full = list(args)
        for i, value in zip(live, values):
            full[i] = value
        return call(*full, implementation=implementation)

    values = [args[i] for i in live]
    if backward:
        cotangents = jax.tree.map(lambda o: jnp.ones_like(o) / o.size,
                                  jax.eval_shape(forward, *values))

        def fn(*values):
            outputs, vjp = jax.vjp(forward, *values)
            return outputs, vjp(cotangents)
    else:
        fn = forward
    compiled = harness.compile_once(fn, *values)
    memory = harness.memory_bytes(compiled)
    if memory is not None:  # this benchmark's JSON names (results/kernels_cpu.json)
        memory = {f"{key}_size_in_bytes": memory[key] for key in ("argument", "output", "temp")}
    return (lambda: jax.block_until_ready(compiled(*values))), memory


def relative_error(actual, expected) -> Optional[float]:
    """The largest ||a - e|| / ||e|| (Frobenius, float64) over the leaves of two pytrees of
    arrays of the same structure; None (never within a tolerance) where any leaf of either is not
    finite."""
    worst = 0.0
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if not (np.isfinite(a).all() and np.isfinite(e).all()):
            return None
        worst = max(worst, float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)))
    return worst


def reference_results(call, args, backward):
    """The float32 reference's outputs (and gradients) on `args` upcast to float32, matmuls at
    `precision="highest"`."""
    upcast = tuple(a.astype(jnp.float32) if _is_float(a) else a for a in args)
    with jax.default_matmul_precision("highest"):
        run, _ = compile_variant(call, upcast, "reference", backward)
        return run()


def check_variant(call, args, implementation, backward, expected, tolerance):
    """Compiles one variant and checks it against the reference's `expected` results.

    Returns (run, fields): `run` as from `compile_variant`, and the row's `memory_analysis`,
    `relative_error` and `within_tolerance`; or (None, fields with the `failure` message) where it
    does not build (`COMPILE_FAILURES`)."""
    try:
        run, memory = compile_variant(call, args, implementation, backward)
        outputs = run()
    except COMPILE_FAILURES as failure:
        return None, _failed(failure)
    error = relative_error(outputs, expected)  # outside: a mismatch is a bug, not a build failure
    return run, dict(memory_analysis=memory, relative_error=error,
                     within_tolerance=error is not None and error <= tolerance)


def _failed(failure, what: str = "") -> dict:
    """A row's fields for a variant that did not build or run (`what`: which step failed)."""
    return dict(failure=f"{what}{type(failure).__name__}: {failure}", relative_error=None,
                within_tolerance=False)


def main(argv):
    del argv
    meta = harness.provenance(harness.command_line("benchmarks.kernels"))
    backend = cfg.backend()
    stem = f"kernels_{backend}"
    if FLAGS.out and not FLAGS.out.endswith(".json"):
        raise ValueError(f"--out={FLAGS.out}: must be a .json path, e.g. results/{stem}.json.")
    prefix = harness.output_prefix(stem, out_dir=FLAGS.out_dir,
                                   out=FLAGS.out and FLAGS.out[:-len(".json")], name="kernels")
    interpret = cfg.interpret(backend)
    table = SHAPES["cpu" if interpret else "accelerator"]
    names = FLAGS.shapes or list(table)
    dtype = jnp.float32 if interpret else jnp.dtype(FLAGS.dtype)
    tolerance = TOLERANCE[jnp.dtype(dtype).name]  # --dtype is one of its keys
    device_kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAKS.items() if k.lower() in device_kind.lower()), None)

    runners, rows = {}, []
    for name in names:
        op, sizes = table[name]
        args, call = make_inputs(op, sizes, dtype)
        flops, nbytes = work(op, sizes, jnp.dtype(dtype).itemsize)
        try:  # outputs and gradients; the forward's results are its outputs
            outputs_and_grads = reference_results(call, args, backward=True)
            expected = {True: outputs_and_grads, False: outputs_and_grads[0]}
        except COMPILE_FAILURES as failure:
            expected = _failed(failure, "the reference: ")
        for implementation in FLAGS.implementations:
            for backward in (False, True):
                row = dict(shape=name, op=op, sizes=sizes, implementation=implementation,
                           passes="fwd+bwd" if backward else "fwd",
                           model_flops=flops * (3.5 if backward else 1.0),
                           model_bytes=nbytes * (3 if backward else 1))
                if "failure" in expected:
                    rows.append(dict(row, **expected))
                    continue
                run, fields = check_variant(call, args, implementation, backward,
                                            expected[backward], tolerance)
                if run is not None:
                    runners[len(rows)] = run
                rows.append(dict(row, **fields))
        del expected
    timings = harness.interleave(runners, FLAGS.rounds, catch=COMPILE_FAILURES)
    for index, seconds in timings.seconds.items():
        rows[index]["times_s"] = seconds
    for index, message in timings.failures.items():
        rows[index].update(failure=f"while timed: {message}", within_tolerance=False)

    last = FLAGS.implementations[-1]
    timed = [row for row in rows if "failure" not in row]
    for row in timed:
        median, low, high = harness.spread(row["times_s"])
        row.update(median_ms=1e3 * median, spread_ms=[1e3 * low, 1e3 * high])
        if not interpret:
            row.update(achieved_flops_per_s=row["model_flops"] / median,
                       achieved_bytes_per_s=row["model_bytes"] / median)
            if peak:
                row.update(fraction_of_peak_flops=row["achieved_flops_per_s"] / peak[0],
                           fraction_of_peak_bandwidth=row["achieved_bytes_per_s"] / peak[1])
    for row in timed:
        reference = next((r for r in timed if r["shape"] == row["shape"]
                          and r["passes"] == row["passes"] and r["implementation"] == last), None)
        row["time_vs_" + last] = reference and row["median_ms"] / reference["median_ms"]

    report = dict(
        meta, backend=backend, device_kind=device_kind, dtype=jnp.dtype(dtype).name,
        mode=("interpret (CPU): Pallas interpreter on tiny shapes; these times say nothing about "
              "kernel speed on an accelerator" if interpret else "compiled"),
        peak_bf16_flops_per_s=peak[0] if peak else None,
        peak_hbm_bytes_per_s=peak[1] if peak else None,
        tolerance=tolerance, all_within_tolerance=all(r["within_tolerance"] for r in rows),
        results=rows)
    harness.write_report(prefix, report)
    print(f"mode: {report['mode']}")
    print(f"{'shape':<22}{'impl':<8}{'pass':<9}{'median ms':>11}{'(min, max)':>22}"
          f"{'vs ' + last:>10}{'rel. error':>12}")
    for row in rows:
        line = f"{row['shape']:<22}{row['implementation']:<8}{row['passes']:<9}"
        if "failure" in row:
            print(f"{line}  FAILED: {row['failure'][:200]}")
            continue
        ratio, error = row["time_vs_" + last], row["relative_error"]
        print(f"{line}{row['median_ms']:>11.2f}   "
              f"({row['spread_ms'][0]:8.2f}, {row['spread_ms'][1]:8.2f})"
              f"{'-' if ratio is None else f'{ratio:.2f}':>10}"
              f"{'not finite' if error is None else f'{error:.2e}':>12}"
              f"{'' if row['within_tolerance'] else '  FAILED'}")
    if not report["all_within_tolerance"]:
        raise SystemExit(f"relative error vs the float32 reference above {tolerance} "
                         f"({report['dtype']}), or no compiled program, in the rows marked "
                         "FAILED.")

if __name__ == "__main__":
    define_flags()
    app.run(main)
