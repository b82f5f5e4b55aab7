"""One server per data directory: an ``fcntl.flock`` on ``<dir>/LOCK`` held for the server's life.

A second server on the same directory would load the same snapshots, append to the same journal
and overwrite the first one's files: both would then lose work. The lock is taken before
anything is read and refused at once (no waiting) when another process holds it. The kernel
drops a ``flock`` when its holder dies, even by SIGKILL, so a crash never leaves a stale lock;
the pid written into the file is only for the error message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["DirectoryLock", "DirectoryLocked"]

LOCK_NAME = "LOCK"


class DirectoryLocked(RuntimeError):
    """Another process holds the directory's lock."""


class DirectoryLock:
    """An exclusive, non-blocking lock on a directory; :meth:`release` (or exit) drops it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryLocked(
                f"the snapshot directory {self.directory} is in use by another paramserver "
                f"(pid {holder}; lock file {self.path}); stop it or choose another "
                "--snapshot-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None
