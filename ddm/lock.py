"""One writer per directory: an advisory ``fcntl`` lock on ``<folder>/.lock``.

Two jobs writing one run directory (or one prep folder) corrupt each other's checkpoints, shards and
exports. :class:`DirLock` takes an exclusive, non-blocking ``flock`` on ``<folder>/.lock`` and records the
holder (host, PID, command, time) in that file. A second writer gets :class:`DirLockedError` naming the
holder. The kernel drops a lock when its process dies, so a lock left by a killed job (``kill -9``, a
node crash on a local disk) is simply taken; when the file still names a holder that is dead on this
host, the takeover is logged.

``flock`` works on local disks and on most cluster file systems (Lustre and GPFS with ``flock``
mounts, NFSv4); where the file system ignores it, the lock is advisory only (documented in docs/slurm.md).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class DirLockedError(RuntimeError):
    """Another live process holds the directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_holder(folder: str | Path) -> dict:
    """What ``<folder>/.lock`` says about its last holder ({} when absent or unreadable)."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    """``host <h>, PID <p> (<command>) since <time>`` for error messages."""
    if not holder:
        return "an unknown process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')} "
            f"({holder.get('command', '?')}) since {since}")


class DirLock:
    """Exclusive advisory lock on a directory, held until :meth:`release` (or the process ends).

    ``what`` names the directory's role in messages ("run dir", "prep dir").
    Use as a context manager or call :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, folder: str | Path, what: str = "directory") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirLock:
        """Take the lock or raise :class:`DirLockedError` naming the holder. Re-entrant per object."""
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirLockedError(
                    f"{self.what} {self.folder} is in use by {describe_holder(read_holder(self.folder))}: "
                    "one writer per directory. Wait for that job, or stop it; a lock of a dead process is "
                    "released by the kernel and taken over automatically.") from None
            raise
        previous = read_holder(self.folder)
        if previous.get("pid") and previous.get("host") == socket.gethostname() \
                and previous.get("pid") != os.getpid() and not _pid_alive(int(previous["pid"])):
            log.warning("taking over the stale lock of %s %s (its holder, %s, is gone)", self.what, self.folder,
                        describe_holder(previous))
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; its content names the last holder)."""
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
