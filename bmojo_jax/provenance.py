"""Where a result came from: the git commit of the code, the jax version and the devices
(`provenance`), recorded in every training workdir's `config.json` and, through
`benchmarks/harness.py`, in every benchmark and reproduce table."""

from __future__ import annotations

import datetime
import shlex
import subprocess
import sys
from pathlib import Path

import jax

REPOSITORY = Path(__file__).resolve().parents[1]  # the checkout of an editable install


def git_commit() -> str:
    """HEAD of the repository holding this code, "+dirty" when tracked files differ from it;
    "unknown" outside a git checkout (e.g. a non-editable install)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no")
                         else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def devices() -> str:
    """The devices of this job, e.g. "cpu (cpu) x 8 in 1 process" or "gpu (NVIDIA H100 80GB HBM3)
    x 16 in 2 processes"."""
    kinds = sorted({d.device_kind for d in jax.devices()})
    processes = jax.process_count()
    return (f"{jax.default_backend()} ({', '.join(kinds)}) x {jax.device_count()} in {processes} "
            f"process{'es' if processes > 1 else ''}")


def provenance() -> dict:
    """{"command": this process's command line as the interpreter received it (`sys.orig_argv`,
    e.g. "python -m experiments.train --config=..."), shell-quoted, "git_commit", "jax_version",
    "devices", "started_utc"} of a job starting now."""
    return dict(command=shlex.join(sys.orig_argv), git_commit=git_commit(),
                jax_version=jax.__version__, devices=devices(),
                started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"))
