"""One server per data directory: the lock on ``<dir>/LOCK`` is exclusive while it is held.

A second server process on a locked directory: ``tests/system/test_snapshots_across_restarts.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from paramserver.server.persistence import DirectoryLock, DirectoryLocked


def test_directory_lock_is_exclusive(tmp_path: Path) -> None:
    first = DirectoryLock(tmp_path)
    first.acquire()
    with pytest.raises(
        DirectoryLocked, match=f"in use by another paramserver \\(pid {os.getpid()}"
    ):
        DirectoryLock(tmp_path).acquire()
    first.release()
    again = DirectoryLock(tmp_path)
    again.acquire()
    again.release()
