"""The timing harness and the provenance of every benchmark and reproduce table.

Method (docs/design.md section 8): every variant is compiled once (`compile_once`:
`jit(...).lower(...).compile()`, so that compilation is never timed and
`compiled.memory_analysis()` is available, `memory_bytes`), warmed up, then all variants run
interleaved in rounds in one process (`interleave`: machine noise hits every variant alike); we
report the median and the spread (min, max) over rounds (`spread`). Compare ratios within one run,
never absolute times across runs.

Output rule (our choice: results are never overwritten by accident): a run writes into
`runs/<name>-<YYYYmmdd-HHMMSS>/` under the current directory (`output_dir`) unless an output
directory (or, for the benchmarks that had it, an output path prefix `--out`) is given explicitly;
only an explicit `--out_dir=results` writes the committed results. Every output records
`provenance`: the exact command line (this process's argv), the git commit, the machine, the jax
version and the start time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Hashable, Mapping, NamedTuple, Optional

import jax
import numpy as np

from bmojo_jax.provenance import git_commit  # re-exported: the commit of every output

RUNS = Path("runs")  # default root of the outputs, relative to the current directory
OUT_DIR_HELP = ("Output directory (default: a new runs/NAME-YYYYmmdd-HHMMSS/; only an explicit "
                "--out_dir=results writes the committed results).")


# --------------------------------------------------------------------------------------------------
# Compilation and timing
# --------------------------------------------------------------------------------------------------


def compile_once(fn: Callable, *args, **jit_kwargs) -> jax.stages.Compiled:
    """`jax.jit(fn, **jit_kwargs).lower(*args).compile()`: compiled once, ahead of the timing.

    Call the result with arrays of the same shapes, dtypes and shardings as `args` (jit's static
    arguments are not supported: close over them)."""
    return jax.jit(fn, **jit_kwargs).lower(*args).compile()


def memory_bytes(compiled: jax.stages.Compiled) -> Optional[dict]:
    """`compiled.memory_analysis()` in bytes: {"temp", "argument", "output", "alias", "total"}
    (total = temp + argument + output: what one call needs; the aliased (donated) bytes are in
    both argument and output). None where the backend gives no analysis."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    out = {name: int(getattr(analysis, f"{name}_size_in_bytes"))
           for name in ("temp", "argument", "output", "alias")}
    out["total"] = out["temp"] + out["argument"] + out["output"]
    return out


class Spread(NamedTuple):
    """Median, min and max of a sample (same unit as the sample)."""
    median: float
    min: float
    max: float


def spread(values) -> Spread:
    """The median and the (min, max) of a non-empty sample.

    Raises:
      ValueError: `values` is empty.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("spread of an empty sample: time at least one round.")
    return Spread(float(np.median(values)), float(values.min()), float(values.max()))


class SelfTimed(NamedTuple):
    """A runner that measures itself: `run()` returns the seconds of its work (e.g. a subprocess
    timing its own step), which `interleave` records instead of the wall time of the call."""
    run: Callable[[], float]


class Timings(NamedTuple):
    """`interleave`'s result: seconds {variant: [one float per completed round]} and failures
    {variant: message} (a variant that raised one of the caught errors; it ran no further)."""
    seconds: dict
    failures: dict


def interleave(runners: Mapping[Hashable, Callable], rounds: int, *,
               warmup: int = 1, catch: tuple = (), before_round: Optional[Callable] = None,
               label: str = "") -> Timings:
    """Times every runner once per round, the variants interleaved in the order given.

    Args:
      runners: {variant: run}; `run()` does the work once and blocks until it is done
        (`jax.block_until_ready`); the wall time of the call is the measurement (its return
        value is ignored), or, for a `SelfTimed` runner, the seconds it returns.
      rounds: timed rounds (>= 1).
      warmup: untimed calls of every runner before the first round (caches, allocations).
      catch: exception types that mark a variant as failed (recorded with the message, skipped
        from then on) instead of ending the run.
      before_round: called with the round index before every round (e.g. a reference timing).
      label: progress lines "LABEL: round r/R done" go to stdout when given.

    Returns:
      `Timings`.

    Raises:
      ValueError: rounds < 1 or warmup < 0.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r}: must be an integer >= 1.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: must be an integer >= 0.")
    seconds = {key: [] for key in runners}
    failures = {}

    def call(key, run):
        try:
            if isinstance(run, SelfTimed):
                return float(run.run())
            start = time.perf_counter()
            run()
            return time.perf_counter() - start
        except catch as error:  # a failure ends that variant only
            failures[key] = f"{type(error).__name__}: {error}"
            return None

    for _ in range(warmup):
        for key, run in runners.items():
            if key not in failures:
                call(key, run)
    for r in range(rounds):
        if before_round is not None:
            before_round(r)
        for key, run in runners.items():
            if key not in failures:
                elapsed = call(key, run)
                if elapsed is not None:
                    seconds[key].append(elapsed)
        if label:
            print(f"{label}: round {r + 1}/{rounds} done", flush=True)
    return Timings(seconds, failures)


def interleave_apart(runners: Mapping[Hashable, Callable], rounds: int, *,
                     group: Callable[[Hashable], Hashable], **kwargs) -> Timings:
    """`interleave` of each group of variants (`group(variant)`, groups in the order of their
    first variant) in rounds of its own, one group after the other; the `Timings` merged.
    With warmup >= 1, a variant is never timed right after a variant of another group: for work
    whose cost leaks into the next call's, as a decode timed right after a long prefill pays for
    the prefill's freed [L, vocab] logits (on CPU, 16 decode steps of a small B'MOJO took
    8.8-16.1 ms right after a prefill of 8,192 tokens against 3.1-9.2 ms alone; the long-context
    suite of docs/design.md section 7d measured it).

    Args:
      runners, rounds: as `interleave`.
      group: variant -> its group (any hashable).
      **kwargs: `interleave`'s other arguments, for every group (a `label` prints each group's
        rounds in turn).

    Returns:
      `Timings` of every variant.

    Raises:
      ValueError: as `interleave`.
    """
    groups = {}
    for key, run in runners.items():
        groups.setdefault(group(key), {})[key] = run
    parts = [interleave(members, rounds, **kwargs) for members in groups.values()]
    return Timings({k: v for part in parts for k, v in part.seconds.items()},
                   {k: v for part in parts for k, v in part.failures.items()})


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------


def machine() -> str:
    """"<CPU model>, <N> cores, jax <version> on <backend> [(<device kind> x <count>)], Python <v>"
    (the CPU model from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    backend = jax.default_backend()
    devices = "" if backend == "cpu" else (f" ({jax.devices()[0].device_kind} x "
                                           f"{jax.device_count()})")
    return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {backend}{devices}, "
            f"Python {platform.python_version()}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("n/a" where the OS has none)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def command_line(module: str, argv: Optional[list] = None) -> str:
    """The exact command of this process: "python -m MODULE" and every argument of `argv`
    (default `sys.argv`; its first entry, the program, is replaced by the module), shell-quoted."""
    argv = sys.argv if argv is None else argv
    return " ".join(["python", "-m", module] + [shlex.quote(a) for a in argv[1:]])


def provenance(command: str) -> dict:
    """{"command", "git_commit", "machine", "jax_version", "started_utc"} of a run starting now."""
    return dict(command=command, git_commit=git_commit(), machine=machine(),
                jax_version=jax.__version__,
                started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"))


def provenance_lines(record: Mapping) -> list:
    """Markdown lines (hard line breaks) for the command, commit, start time and machine of a
    record holding `provenance`'s fields."""
    return [f"Command: `{record['command']}`  ",
            f"Commit: {record['git_commit']}; started {record['started_utc']}  ",
            f"Machine: {record['machine']}  "]


# --------------------------------------------------------------------------------------------------
# Where outputs go
# --------------------------------------------------------------------------------------------------


def output_dir(name: str, out_dir=None) -> Path:
    """The directory a run writes into, created: `out_dir` when given (explicit; may exist), else a
    new `RUNS/<name>-<YYYYmmdd-HHMMSS>` (local time; "-2", "-3", ... appended if that exists, so
    that no earlier run is ever overwritten).

    Raises:
      ValueError: an empty `name`.
    """
    if not name:
        raise ValueError("output_dir: name must be a non-empty string (the benchmark or table).")
    if out_dir is not None and str(out_dir):
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RUNS.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = RUNS / (f"{name}-{stamp}" + (f"-{attempt}" if attempt > 1 else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"output_dir: 999 runs named {name}-{stamp} exist under {RUNS}.")


def output_prefix(stem: str, *, out_dir=None, out=None, name: Optional[str] = None) -> Path:
    """Path prefix of a benchmark's files (add ".json", ".md", ".png").

    Args:
      stem: file name without suffix, e.g. "decode".
      out_dir: explicit directory (the files are OUT_DIR/STEM.*).
      out: explicit path prefix (the benchmarks' older `--out` flag), e.g. "results/peers_focus".
      name: the run's name under runs/ when neither is given (default: stem).

    Raises:
      ValueError: both out_dir and out are given.
    """
    if out_dir and out:
        raise ValueError(f"--out_dir={out_dir} and --out={out}: give one of them (--out is a path "
                         f"prefix, --out_dir a directory for {stem}.*).")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return Path(out)
    return output_dir(name or stem, out_dir) / stem


def write_report(prefix, record: Mapping, markdown: Optional[str] = None) -> None:
    """Writes <prefix>.json (`record`, indented) and <prefix>.md (`markdown`, when given; also
    printed).

    Raises:
      TypeError: `record` is not JSON-serialisable.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(record, indent=1) + "\n")
    if markdown is not None:
        Path(f"{prefix}.md").write_text(markdown)
        print(markdown)
    print(f"wrote {prefix}.*", flush=True)
