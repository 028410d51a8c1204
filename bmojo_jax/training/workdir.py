"""The training workdir's lock (`WorkdirLock`) and its errors (`WorkdirError`, `WorkdirLocked`).

One run at a time per workdir (our choice): a second run on the same workdir would interleave its
checkpoints and its metrics lines with the first one's. `train_and_evaluate` holds
`<workdir>/lock` for as long as it runs, with `fcntl.flock` (an advisory lock of the open file):

* a second start on the workdir fails at once with `WorkdirLocked`, naming the process that holds
  it (pid, host, start time and command, which the holder writes into the file);
* the kernel releases the lock when the holding process ends, however it ends (a crash, `kill -9`),
  so there is no stale lock to clear: the next start takes it (the file itself stays, holding the
  last holder's description, which is never trusted as a lock).

Evaluation and `load` only read a workdir and take no lock. Multi-host runs: process 0 alone takes
it. `flock` works on local file systems; on network file systems (NFS) it may not exclude a run on
another machine.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path

LOCK_NAME = "lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be used: it cannot be created or written (the message names the path and
    the reason)."""


class WorkdirLocked(WorkdirError):
    """Another process holds the workdir's lock (the message names it)."""


def prepare_workdir(workdir) -> Path:
    """`workdir` as a Path, created with its parents; raises `WorkdirError` (naming the path and
    the reason, e.g. permission denied, read-only file system, a file in the way) if it cannot be
    created or is not a directory."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise WorkdirError(f"workdir {workdir}: a file of that name is in the way ({e}); choose "
                           f"another --workdir.") from e
    except OSError as e:
        raise WorkdirError(f"cannot create the workdir {workdir}: {_reason(e)}; choose a writable "
                           f"--workdir.") from e
    return workdir


class WorkdirLock:
    """An exclusive lock of a workdir for the life of a run (module docstring).

    Use as a context manager: `with WorkdirLock(workdir): ...`. `enabled=False` makes it a no-op
    (multi-host processes other than 0).

    Raises (on entering):
      WorkdirLocked: another process holds it.
      WorkdirError: the lock file cannot be created or written (unwritable workdir, disk full).
    """

    def __init__(self, workdir, *, enabled: bool = True):
        self.path = Path(workdir) / LOCK_NAME
        self.enabled = enabled
        self._fd = None

    def acquire(self) -> None:
        if not self.enabled or self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot write in the workdir {self.path.parent}: {_reason(e)}; "
                               f"choose a writable --workdir.") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLocked(
                    f"the workdir {self.path.parent} is in use by {holder} (lock file "
                    f"{self.path}); wait for that run to end, stop it, or use another "
                    f"--workdir.") from None
            raise WorkdirError(f"cannot lock the workdir {self.path.parent}: {_reason(e)}.") from e
        try:
            holder = json.dumps(dict(
                pid=os.getpid(), host=socket.gethostname(), command=shlex.join(sys.argv),
                started=datetime.datetime.now().astimezone().isoformat(timespec="seconds")))
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise WorkdirError(f"cannot write in the workdir {self.path.parent}: "
                               f"{_reason(e)}.") from e
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (closing the file releases the flock); the file stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not written its description yet)"
    return (f"process {holder.get('pid')} on {holder.get('host')} (started "
            f"{holder.get('started')}: {holder.get('command')})")


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
