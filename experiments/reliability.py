"""Faults and bad inputs tried on tiny training runs, and the table of their outcomes
(results/reliability.md).

    python -m experiments.reliability                     # runs/reliability-<stamp>/reliability.md
    python -m experiments.reliability --out_dir=results   # the committed table

The cases are the tests of tests/test_faults.py (each test is one case: its docstring says what is
tried, its `record_property("outcome", ...)` what a user gets: "clear error", "correct" or "lost
nothing", and `record_property("observed", ...)` the message or the check): this command runs that
suite with pytest and writes one table row per test, with the command, the git commit and the
machine. A failing test is a row marked FAILED; a skipped one (e.g. no tmpfs can be mounted for
the disk-full cases) a row marked skipped, with the reason.

The fault machinery the tests use lives here too:

* `TINY`: the tiny run (a 1-layer transformer on MQAR, 8 steps, checkpoints at 4 and 8, training
  records every 3 steps) as `experiments.train` flags, and `tiny_config` the same config in Python;
* `train_command`: `experiments.train` run in a subprocess, optionally with a fault installed first
  (`install_fault`): SIGKILL right after the checkpoint of a step is written, while it is being
  written (after its parameters, before its commit), or while a resumed run rewrites its
  metrics.jsonl; or the free-space check off (so that a full disk fails inside orbax's write);
* `read_state`: a checkpoint's parameters and optimizer state, for bitwise comparisons;
* `flip_bit`, `overwrite_bytes`: damage a checkpoint's parameter data in place.
"""

from __future__ import annotations

import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

REPOSITORY = Path(__file__).resolve().parents[1]

# The tiny run of the fault tests: (field, value) overrides of experiments/configs/tiny.py.
TINY_CONFIG = "experiments/configs/tiny.py:transformer"
TINY = {"model.n_layers": 1, "model.d_model": 16, "model.n_heads": 1, "num_steps": 8,
        "checkpoint_every": 4, "eval_every": 4, "log_every": 3, "optimizer.warmup_steps": 1,
        "data.num_train": 32, "data.num_eval": 8, "max_to_keep": 3}


def tiny_flags(**changes) -> list[str]:
    """`experiments.train` flags of the tiny run with `changes` ({dotted field: value})."""
    return [f"--config={TINY_CONFIG}"] + [f"--config.{k}={v}"
                                          for k, v in {**TINY, **changes}.items()]


def tiny_config(**changes):
    """The tiny run's config (`training.default_config` schema) with `changes`."""
    from experiments.configs import tiny
    config = tiny.get_config("transformer")
    config.update_from_flattened_dict({**TINY, **changes})
    return config


def subprocess_env(cache_dir=None) -> dict:
    """The environment of a subprocess run: this one, the repository on PYTHONPATH, and a shared
    persistent JAX compilation cache in `cache_dir` (runs of one program compile it once)."""
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def train_command(workdir, *, fault: dict | None = None, changes: dict | None = None) -> list[str]:
    """The command line of `experiments.train` on the tiny run in `workdir`, with `fault`
    (`install_fault`) installed in that process first."""
    argv = ["experiments.train", *tiny_flags(**(changes or {})), f"--workdir={workdir}"]
    code = ("import runpy, sys\n"
            "from experiments import reliability\n"
            f"reliability.install_fault({fault or {}!r})\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)\n")
    return [sys.executable, "-c", code]


def run(command, *, env=None, timeout=600, cwd=REPOSITORY, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, **kwargs)


def install_fault(fault: dict) -> None:
    """Patches this process (a training subprocess) so that it fails as `fault` says:

      {"kill_after_checkpoint": s}: SIGKILL right after the checkpoint of step s is saved;
      {"kill_during_checkpoint": s}: SIGKILL while the checkpoint of step s is being written: its
        parameters are written (orbax renames their temporary directory) and the rest is not;
      {"no_space_check": True}: `Checkpoints` skips its free-space check, so that a full disk
        fails inside orbax's write;
      {"kill_during_metrics_rewrite": True}: SIGKILL while a resumed run rewrites metrics.jsonl
        (half of the new text in its temporary file, the rename not done).
    """
    from bmojo_jax.training import checkpoints

    if "kill_after_checkpoint" in fault:
        original = checkpoints.Checkpoints.save

        def save(self, step, *args, **kwargs):
            original(self, step, *args, **kwargs)
            if step == fault["kill_after_checkpoint"]:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoints.Checkpoints.save = save
    if "kill_during_checkpoint" in fault:
        from orbax.checkpoint._src.path import async_path
        rename = async_path.rename
        temporary = f"{fault['kill_during_checkpoint']}.orbax-checkpoint-tmp"

        async def killing_rename(source, target):
            await rename(source, target)
            if Path(str(target)).name == "params" and Path(str(target)).parent.name.startswith(
                    temporary):
                os.kill(os.getpid(), signal.SIGKILL)
        async_path.rename = killing_rename
    if fault.get("no_space_check"):
        checkpoints.Checkpoints._check_space = lambda self, step, trees: None
    if fault.get("kill_during_metrics_rewrite"):
        from bmojo_jax.training import metrics
        write = metrics._write_atomic

        def killing_write(path, text):
            if Path(path).name != "metrics.jsonl":
                return write(path, text)
            # half of the new file written to its temporary file, then the kill
            temporary = Path(path).with_name(f".{Path(path).name}.killed.tmp")
            temporary.write_text(text[:len(text) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        metrics._write_atomic = killing_write


def read_state(workdir, step: int):
    """(meta, params, opt_state) of the checkpoint of `step` in `workdir`, on the default device
    (verified, `Checkpoints.restore`)."""
    import jax
    import ml_collections
    from flax import nnx

    from bmojo_jax import training
    from bmojo_jax.config import ModelConfig

    with training.Checkpoints(Path(workdir) / "checkpoints", create=False) as checkpoints:
        meta = checkpoints.restore(step)[0]
        config = ml_collections.ConfigDict(meta["config"])
        params = nnx.split(training.abstract_model(ModelConfig(**meta["model"])), nnx.Param)[1]
        opt_state = jax.eval_shape(training.make_optimizer(config).init, params)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)  # noqa: E731
        return checkpoints.restore(step, jax.tree.map(place, params),
                                   jax.tree.map(place, opt_state))


def bitwise_equal(a, b) -> bool:
    """Same tree structure, shapes, dtypes and bytes (NaN payloads and the sign of zero count)."""
    import jax
    import numpy as np

    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).shape == np.asarray(y).shape
        and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(leaves_a, leaves_b))


def _parameter_bytes(workdir, step: int) -> tuple[Path, int]:
    """(file, offset) of the bytes of the largest parameter array of a checkpoint inside its
    stored data, or of the middle of the largest data file when the bytes are not stored raw."""
    import jax
    import numpy as np

    params = read_state(workdir, step)[1]
    largest = max(jax.tree.leaves(params), key=lambda x: x.size)
    raw = np.asarray(largest).tobytes()
    files = sorted((p for p in (Path(workdir) / "checkpoints" / str(step) / "params").rglob("*")
                    if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    for path in reversed(files):
        offset = path.read_bytes().find(raw)
        if offset >= 0:
            return path, offset + len(raw) // 2
    return files[-1], files[-1].stat().st_size // 2


def flip_bit(workdir, step: int, bit: int = 3) -> str:
    """Flips one bit inside the stored bytes of a parameter array of the checkpoint of `step`;
    returns where."""
    path, offset = _parameter_bytes(workdir, step)
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    return f"{path} byte {offset} bit {bit}"


def overwrite_bytes(workdir, step: int, value: bytes = b"\xde\xad\xbe\xef") -> str:
    """Overwrites 4 bytes inside the stored bytes of a parameter array; returns where."""
    path, offset = _parameter_bytes(workdir, step)
    data = bytearray(path.read_bytes())
    data[offset:offset + len(value)] = value
    path.write_bytes(bytes(data))
    return f"{path} bytes {offset}..{offset + len(value) - 1}"


def can_mount_tmpfs() -> bool:
    """Whether this process can mount a tmpfs in a private mount namespace (`unshare -rm`)."""
    try:
        return run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                   timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def on_tmpfs(command: list[str], mount: Path, size: str) -> list[str]:
    """`command` run with a fresh tmpfs of `size` (e.g. "100k") mounted at `mount`, in a private
    mount namespace that ends with it (`unshare -rm`)."""
    return ["unshare", "-rm", "sh", "-c",
            f"mkdir -p {shlex.quote(str(mount))} && mount -t tmpfs -o size={size} tmpfs "
            f"{shlex.quote(str(mount))} && exec {shlex.join(command)}"]


# --------------------------------------------------------------------------------------------------
# The report: tests/test_faults.py run with pytest, one row per test
# --------------------------------------------------------------------------------------------------

def _define_flags() -> None:
    """The command's flags, defined only when it runs (the tests import this module)."""
    flags.DEFINE_string("out_dir", None, "Output directory (default: a new "
                        "runs/reliability-YYYYmmdd-HHMMSS/; only an explicit --out_dir=results "
                        "writes the committed table).")
    flags.DEFINE_list("pytest_args", [], "Extra pytest arguments (e.g. -k=disk).")


class _Collector:
    """A pytest plugin that keeps, per test, its outcome, docstring and recorded properties."""

    def __init__(self):
        self.rows = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            tried = " ".join((getattr(item.function, "__doc__", None) or item.name).split())
            if hasattr(item, "callspec"):  # a parametrized test: one row per value
                tried += " " + ", ".join(f"{k}={v!r}" for k, v in item.callspec.params.items())
            self.rows[item.nodeid] = {"test": item.name, "tried": tried, "result": "not run",
                                      "properties": {}}

    def pytest_runtest_logreport(self, report):
        row = self.rows.get(report.nodeid)
        if row is None:
            return
        row["properties"].update(dict(report.user_properties))
        row["seconds"] = row.get("seconds", 0.0) + report.duration
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
                row["result"] = f"skipped ({reason.removeprefix('Skipped: ')})"
            else:
                row["result"] = report.outcome
            if report.failed:
                row["properties"]["observed"] = str(report.longrepr).strip().splitlines()[-1]


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(rows: list[dict], record: dict) -> str:
    from benchmarks import harness

    counts = {}
    for row in rows:
        counts[row["result"].split(" ")[0]] = counts.get(row["result"].split(" ")[0], 0) + 1
    lines = ["# Reliability: faults and bad inputs tried", "",
             *harness.provenance_lines(record),
             f"Suite: tests/test_faults.py ({', '.join(f'{n} {k}' for k, n in counts.items())}; "
             f"{record['seconds']:.0f} s)", "",
             "Each row is one test of tests/test_faults.py on tiny runs (a 1-layer transformer on "
             "MQAR, 8 steps, checkpoints at steps 4 and 8). Outcome: *clear error* (one line "
             "naming the cause and what to do, non-zero exit from the command-line tools, nothing "
             "deleted), *correct* (the run does the right thing on its own), *lost nothing* (after "
             "the fault, the run resumes to exactly, bitwise, the state of an uninterrupted "
             "run).", "",
             "| kind | tried | outcome | result | observed |",
             "|---|---|---|---|---|"]
    for row in rows:
        props = row["properties"]
        result = "passed" if row["result"] == "passed" else f"**{row['result']}**"
        lines.append(f"| {_cell(props.get('kind', ''))} | {_cell(row['tried'])} | "
                     f"{_cell(props.get('outcome', ''))} | {_cell(result)} | "
                     f"{_cell(props.get('observed', ''))} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import pytest

    from benchmarks import harness

    record = harness.provenance(harness.command_line("experiments.reliability"))
    collector = _Collector()
    tic = time.perf_counter()
    code = pytest.main([str(REPOSITORY / "tests" / "test_faults.py"), "-p", "no:cacheprovider",
                        "-q", *flags.FLAGS.pytest_args], plugins=[collector])
    record["seconds"] = time.perf_counter() - tic
    record["pytest_exit_code"] = int(code)
    record["python"] = platform.python_version()
    rows = list(collector.rows.values())
    record["rows"] = rows
    out = harness.output_dir("reliability", flags.FLAGS.out_dir)
    harness.write_report(out / "reliability", record, markdown(rows, record))
    if code not in (0, 5):
        sys.exit(f"tests/test_faults.py failed (pytest exit code {int(code)}); the table marks "
                 f"the failed rows.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
