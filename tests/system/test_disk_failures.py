"""A full disk under a real server process: the snapshot endpoint answers 503, and a shutdown
that cannot write its final snapshots says so and exits non-zero.

The snapshot directory is a tmpfs of 1 MiB mounted for the test (so the disk really fills up:
ENOSPC from the kernel, no injected fault). Mounting needs root, which CI has.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from paramserver import wire
from tests.harness.http_api import HTTP, create_session, push
from tests.harness.servers import start_paramserver


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until the disk is full; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return filler


WEIGHTS = {"w": np.zeros(16, np.float32)}
GRADS = {"w": np.ones(16, np.float32)}


def iterations(url: str, session_id: str) -> int:
    r = HTTP.get(f"{url}/sessions/{session_id}")
    assert r.status_code == 200, r.text
    return int(r.json()["iterations"])


def test_a_full_disk_answers_the_snapshot_endpoint_with_503(
    small_disk: Path, tmp_path: Path
) -> None:
    snapshots = small_disk / "snapshots"
    server = start_paramserver(tmp_path, "--snapshot-dir", str(snapshots))
    try:
        create_session(server.url, "sgd", WEIGHTS, session_id="a")  # its first snapshot fits
        assert push(server.url, "a", GRADS).status_code == 200
        fill(small_disk)
        r = HTTP.post(f"{server.url}/sessions/a/snapshot")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "snapshot_failed"
        assert "No space left" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "5"
        assert iterations(server.url, "a") == 1  # nothing changed
        assert push(server.url, "a", GRADS).status_code == 200  # and it keeps serving
    finally:
        server.kill()


def test_a_shutdown_that_cannot_write_its_final_snapshots_exits_non_zero(
    small_disk: Path, tmp_path: Path
) -> None:
    snapshots = small_disk / "snapshots"
    server = start_paramserver(
        tmp_path, "--snapshot-dir", str(snapshots), "--snapshot-interval-seconds", "3600"
    )
    try:
        create_session(server.url, "sgd", WEIGHTS, session_id="a")
        for _ in range(3):
            assert push(server.url, "a", GRADS).status_code == 200
        filler = fill(small_disk)
        code = server.terminate()
    finally:
        server.kill()
    assert code == 4, server.log
    assert "ERROR" in server.log and "final snapshots of 1 session(s)" in server.log
    assert "'a'" in server.log and "LOST" in server.log
    # What was lost is what the ERROR said: with room again, the session is back at its last
    # snapshot (the one taken when it was created).
    filler.unlink()
    again = start_paramserver(tmp_path, "--snapshot-dir", str(snapshots))
    try:
        assert iterations(again.url, "a") == 0
    finally:
        assert again.terminate() == 0, again.log


def test_a_clean_shutdown_with_room_exits_zero(small_disk: Path, tmp_path: Path) -> None:
    snapshots = small_disk / "snapshots"
    server = start_paramserver(
        tmp_path, "--snapshot-dir", str(snapshots), "--snapshot-interval-seconds", "3600"
    )
    create_session(server.url, "sgd", WEIGHTS, session_id="a")
    body = wire.pack({"gradients": GRADS})
    r = HTTP.post(
        f"{server.url}/sessions/a/gradients",
        content=body,
        headers={"content-type": wire.MSGPACK_MEDIA_TYPE},
    )
    assert r.status_code == 200
    assert server.terminate() == 0, server.log
    again = start_paramserver(tmp_path, "--snapshot-dir", str(snapshots))
    try:
        assert iterations(again.url, "a") == 1
    finally:
        again.kill()
