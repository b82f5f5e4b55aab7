"""Snapshots of a real server: written on SIGTERM, loaded by the next start; one server per
directory.

``python -m paramserver serve --snapshot-dir`` runs as a child process: SIGTERM writes the final
snapshots of the sessions that changed, and a restart loads every session byte for byte; a
second server on a directory in use refuses to start and names the process that holds it.
The snapshots in process: ``tests/persistence/test_snapshots.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.harness.http_api import HTTP, MSGPACK, create_session, get_state, push, session_ids
from tests.harness.servers import ServerProcess, start_paramserver

#: One of each optimizer, with the options that add state.
OPTIMIZERS: list[Any] = [
    "sgd",
    {"class_name": "SGD", "config": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "decay": 0.01}},
    {"class_name": "RMSprop", "config": {"decay": 0.001}},
    "adagrad",
    "adadelta",
    "adam",
    {"class_name": "Adam", "config": {"amsgrad": True, "decay": 0.001}},
    "adamax",
    "nadam",
]
RNG = np.random.default_rng(20240611)


def weights_of() -> dict[str, np.ndarray]:
    return {
        "p0": RNG.standard_normal((3, 4)).astype("float32"),
        "p1": RNG.standard_normal(5).astype("float32"),
    }


def grads_like(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: RNG.standard_normal(w.shape).astype(w.dtype) for n, w in weights.items()}


def test_second_server_on_the_same_directory_refuses_to_start(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    first = start_paramserver(tmp_path, "--snapshot-dir", str(directory))
    try:
        second = ServerProcess.paramserver(
            "--snapshot-dir", str(directory), log_dir=tmp_path, warm_up_kernels=False
        ).launch()
        code = second.wait_exit(timeout=60)
        assert code != 0, second.log
        assert f"cannot start: the snapshot directory {directory} is in use" in second.log
        assert f"pid {first.proc.pid}" in second.log
        assert HTTP.get(f"{first.url}/health").status_code == 200
    finally:
        assert first.terminate() == 0, first.log


def test_sigterm_writes_final_snapshots_that_a_restart_loads(tmp_path: Path) -> None:
    directory = tmp_path / "snaps"
    args = ("--snapshot-dir", str(directory), "--snapshot-interval-seconds", "3600")
    server = start_paramserver(tmp_path, *args)
    states = {}
    try:
        for index, optimizer in enumerate(OPTIMIZERS):
            sid = f"s{index}"
            weights = weights_of()
            create_session(server.url, optimizer, weights, session_id=sid)
            for _ in range(index + 1):
                r = push(server.url, sid, grads_like(weights))
                assert r.status_code == 200, r.text
            states[sid] = get_state(server.url, sid)
        r = HTTP.put(f"{server.url}/sessions/loaded/state", content=states["s3"], headers=MSGPACK)
        assert r.status_code == 201, r.text
        states["loaded"] = states["s3"]
    finally:
        code = server.terminate()
    assert code == 0, server.log
    # The nine pushed sessions; the one created by PUT was saved then and has not changed.
    assert "final snapshots written: 9 session(s)" in server.log, server.log

    restarted = start_paramserver(tmp_path, *args)
    try:
        assert session_ids(restarted.url) == sorted(states)
        for sid, saved in states.items():
            assert get_state(restarted.url, sid) == saved, sid
    finally:
        assert restarted.terminate() == 0, restarted.log
