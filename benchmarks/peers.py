"""Our training step side by side with public implementations, at one set of shapes.

    python -m benchmarks.peers [--rounds=7] [--presets=transformer,mamba,bmojo,...] [--peers=...]
        [--venv_root=.peer_venvs] [--out_dir=DIR | --out=PATH_PREFIX]

Shapes: 2 layers, d_model 128, context 1024, batch 8, vocab 8192 (flags). One training step =
forward, next-token cross-entropy, backward, AdamW update (lr 1e-3, betas 0.9/0.95, weight decay
0.1), as in `benchmarks.train_throughput`. Peers, each installed from PyPI into its own virtual
environment under --venv_root (created on first use, reused after), each run by that venv's python
with a driver from `benchmarks/peer_drivers/`:

    mamba2-jax        `mamba2-jax` (JAX / Flax NNX Mamba-2), chunk 64 (ours) and 256 (its default)
    griffin, hawk     `recurrentgemma[jax]` (DeepMind's Griffin: RG-LRU + local attention; Hawk:
                      RG-LRU only), Flax linen
    ...+xla           the same, compiled with our XLA option (`training.compiler_options`, passed
                      as XLA_FLAGS): what the option alone buys a peer
    torch-sdpa        a causal Transformer written here in PyTorch (CPU wheel torch==2.13.0),
                      attention by F.scaled_dot_product_attention(is_causal=True), eager

Every driver compiles (JAX) and warms up once, then waits on stdin; `benchmarks.harness`
interleaves all variants, ours in-process and the peers' through their pipes (each peer times its
own step), one training step each per round, and we report the median and spread (min, max) of
tokens/s over rounds. A peer that cannot be installed or run gets a row saying why. Writes
OUT.json and OUT.md (default OUT: runs/peers-<timestamp>/peers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from typing import NamedTuple

from absl import app, flags

from benchmarks import harness, train_step

flags.DEFINE_list("presets", ["transformer", "swa", "mamba", "hybrid", "bmojo_f", "bmojo"],
                  "Our variants: presets, each optionally with ModelConfig overrides, "
                  "PRESET[/FIELD=VALUE]... (e.g. mamba/d_ff=0: the mixer alone, no MLP).")
flags.DEFINE_list("ratio_to", ["bmojo", "mamba", "transformer"],
                  "Our variants that get a ratio column (\"vs ours: ...\").")
flags.DEFINE_list("peers", ["mamba2-jax", "mamba2-jax+xla", "mamba2-jax-chunk256", "griffin",
                            "griffin+xla", "hawk", "torch-sdpa"],
                  "Peers (see the module docstring).")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds (one step per variant per round).")
flags.DEFINE_integer("n_layers", 2, "Layers.")
flags.DEFINE_integer("d_model", 128, "Model width.")
flags.DEFINE_integer("context", 1024, "Context length (tokens).")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size.")
flags.DEFINE_string("venv_root", ".peer_venvs", "Where the peers' virtual environments live.")
flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
flags.DEFINE_string("out", None, "Output path prefix (instead of --out_dir), e.g. "
                    "results/peers_focus.")
FLAGS = flags.FLAGS

DRIVERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_drivers")

class Peer(NamedTuple):
    venv: str
    requirements: list
    driver: str
    variant: str  # the driver's --variant
    what: str
    xla_flags: str = ""  # appended to the driver's XLA_FLAGS


# Our steps compile with `training.compiler_options()` (YNNPACK fusions for dots only); the "+xla"
# peers get the same option through XLA_FLAGS (where it is spelled "dot"), to separate what the
# option buys from what the implementation does.
_SAME_XLA = "--xla_cpu_experimental_ynn_fusion_type=dot"
_MAMBA2 = ("mamba2_jax", ["mamba2-jax==1.1.2"], "mamba2_jax_driver.py")
_RG = ("recurrentgemma", ["recurrentgemma[jax]==1.0.1"], "recurrentgemma_driver.py")
PEERS = {
    "mamba2-jax": Peer(*_MAMBA2, "64", "mamba2-jax 1.1.2 Mamba2ForCausalLM, chunk 64"),
    "mamba2-jax+xla": Peer(*_MAMBA2, "64", "mamba2-jax 1.1.2, chunk 64, with our XLA option",
                           _SAME_XLA),
    "mamba2-jax-chunk256": Peer(*_MAMBA2, "256",
                                "mamba2-jax 1.1.2 Mamba2ForCausalLM, chunk 256 (its default)"),
    "griffin": Peer(*_RG, "griffin", "recurrentgemma 1.0.1 Griffin, blocks (RG-LRU, local "
                    "attention)"),
    "griffin+xla": Peer(*_RG, "griffin", "recurrentgemma 1.0.1 Griffin, with our XLA option",
                        _SAME_XLA),
    "hawk": Peer(*_RG, "hawk", "recurrentgemma 1.0.1 Griffin, blocks (RG-LRU, RG-LRU) = Hawk"),
    "torch-sdpa": Peer("torch", ["torch==2.13.0", "numpy"], "torch_sdpa_driver.py", "",
                       "PyTorch 2.13 CPU causal Transformer, F.scaled_dot_product_attention, "
                       "eager"),
}


class PeerError(RuntimeError):
    pass


def ensure_venv(name: str, requirements: list[str]) -> str:
    """Python of the peer's venv, created and pip-installed on first use."""
    root = os.path.abspath(FLAGS.venv_root)
    path = os.path.join(root, name)
    python = os.path.join(path, "bin", "python")
    marker = os.path.join(path, ".installed")
    wanted = " ".join(requirements)
    if os.path.exists(marker) and open(marker).read() == wanted:
        return python
    print(f"installing {wanted} into {path} ...", flush=True)
    venv.create(path, with_pip=True, clear=True)
    result = subprocess.run([python, "-m", "pip", "install", "-q", *requirements],
                            capture_output=True, text=True)
    if result.returncode:
        raise PeerError(f"pip install {wanted} failed: " + _last_line(result.stderr))
    with open(marker, "w") as f:
        f.write(wanted)
    return python


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


class PeerProcess:
    """A driver subprocess that runs one timed step per request (see peer_drivers/__init__)."""

    def __init__(self, name: str):
        if name not in PEERS:
            raise PeerError(f"unknown peer; choose from {', '.join(PEERS)}")
        peer = PEERS[name]
        self.description = peer.what
        python = ensure_venv(peer.venv, peer.requirements)
        command = [python, os.path.join(DRIVERS, peer.driver), f"--layers={FLAGS.n_layers}",
                   f"--d_model={FLAGS.d_model}", f"--context={FLAGS.context}",
                   f"--batch={FLAGS.batch_size}", f"--vocab={FLAGS.vocab_size}",
                   f"--variant={peer.variant}"]
        self.stderr = open(_stderr_path(name), "w")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, bufsize=1,
                                        env=_driver_env(peer.xla_flags))
        self.info = self._read()
        if not self.info.get("ready"):
            raise PeerError(f"driver did not start: {self.info}")

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.stderr.flush()
            with open(self.stderr.name) as f:
                raise PeerError(f"driver exited ({self.process.returncode}): "
                                + _last_line(f.read()))
        return json.loads(line)

    def step(self) -> float:
        """One training step in the driver; returns the seconds the driver measured."""
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return float(self._read()["seconds"])

    def close(self):
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        self.stderr.close()


def _driver_env(xla_flags: str) -> dict:
    """This process's environment, with `xla_flags` appended to XLA_FLAGS."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    return dict(os.environ, XLA_FLAGS=f"{flags_now} {xla_flags}".strip())


def _stderr_path(name: str) -> str:
    os.makedirs(os.path.abspath(FLAGS.venv_root), exist_ok=True)
    return os.path.join(os.path.abspath(FLAGS.venv_root), f"{name}.stderr.log")


class OurPreset:
    """One of our presets, compiled in this process (`benchmarks.train_step.compile_step`);
    warmed up by `harness.interleave`."""

    def __init__(self, preset: str):
        config = train_step.variant_config(preset, d_model=FLAGS.d_model,
                                           n_layers=FLAGS.n_layers, n_heads=4, window=64,
                                           vocab_size=FLAGS.vocab_size, implementation="xla")
        self.compiled, self.state = train_step.compile_step(config, FLAGS.batch_size,
                                                            FLAGS.context)
        self.description = (f"bmojo_jax `{preset}` (layers {config.layer_mixers}, d_ff "
                            f"{config.hidden_dim}), implementation xla")
        self.info = dict(params=self.state[3])

    def step(self) -> None:
        """One training step in place (timed by `harness.interleave`)."""
        train_step.run_step(self.compiled, self.state)

    def close(self):
        pass


def main(argv):
    del argv
    meta = harness.provenance(harness.command_line("benchmarks.peers"))
    prefix = harness.output_prefix("peers", out_dir=FLAGS.out_dir, out=FLAGS.out)
    load_before = harness.load_average()
    variants, failures = {}, {}
    for preset in FLAGS.presets:
        variants[f"ours: {preset}"] = OurPreset(preset)
        print(f"ready: ours {preset}", flush=True)
    for name in FLAGS.peers:
        try:
            variants[name] = PeerProcess(name)
            print(f"ready: {name} {variants[name].info}", flush=True)
        except (PeerError, OSError, ValueError) as error:
            failures[name] = str(error)
            print(f"peer {name} unavailable: {error}", flush=True)
    tokens = FLAGS.batch_size * FLAGS.context
    try:
        runners = {name: harness.SelfTimed(v.step) if isinstance(v, PeerProcess) else v.step
                   for name, v in variants.items()}
        timings = harness.interleave(runners, FLAGS.rounds,
                                     catch=(PeerError, OSError, ValueError), label="peers")
    finally:
        for variant in variants.values():
            variant.close()
    failures.update({name: f"failed during timing: {error}"
                     for name, error in timings.failures.items()})
    rows = []
    for name, variant in variants.items():
        if name in failures or not timings.seconds[name]:
            continue
        step = harness.spread(timings.seconds[name])
        rows.append(dict(name=name, what=variant.description, params=variant.info.get("params"),
                         info={k: v for k, v in variant.info.items() if k != "ready"},
                         tokens_per_s=tokens / step.median, tokens_per_s_min=tokens / step.max,
                         tokens_per_s_max=tokens / step.min,
                         rounds=len(timings.seconds[name])))
    for name, reason in failures.items():
        rows = [r for r in rows if r["name"] != name]
        rows.append(dict(name=name, what=PEERS[name].what if name in PEERS else "",
                         unavailable=reason))
    ref = {r["name"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    meta.update(load_average_before=load_before, load_average_after=harness.load_average())
    harness.write_report(prefix, dict(meta, tokens_per_step=tokens, rows=rows),
                         markdown(meta, rows, ref))


def markdown(meta, rows, ref) -> str:
    """The report: provenance, shapes and one row per variant (OUT.json's rows; `ref`: tokens/s
    by variant name, for the ratio columns)."""
    lines = [
        "# Training step vs public implementations\n",
        *harness.provenance_lines(meta),
        f"Load average before: {meta['load_average_before']}, after: "
        f"{meta['load_average_after']}  ",
        f"Shapes: {FLAGS.n_layers} layers, d_model {FLAGS.d_model}, context {FLAGS.context}, "
        f"batch {FLAGS.batch_size}, vocab {FLAGS.vocab_size}; one step = forward + "
        "cross-entropy + backward + AdamW. Tokens/s: median over interleaved rounds (min-max).\n",
        "| variant | what | params | tokens/s | "
        + " | ".join(f"vs ours: {name}" for name in FLAGS.ratio_to) + " |",
        "|---|---|---:|---|" + "---:|" * len(FLAGS.ratio_to)]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['name']} | {r['what']} | - | unavailable: {r['unavailable']} "
                         "|" + " - |" * len(FLAGS.ratio_to))
            continue
        ratios = [f"{r['tokens_per_s'] / ref[k]:.2f}x" if k in ref else "-"
                  for k in (f"ours: {name}" for name in FLAGS.ratio_to)]
        lines.append(f"| {r['name']} | {r['what']} | {r['params']:,} | {r['tokens_per_s']:.0f} "
                     f"({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}) | "
                     + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(app.run(main))
