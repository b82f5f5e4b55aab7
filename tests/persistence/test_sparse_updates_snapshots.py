"""``sparse_updates`` across restarts of a real server process: a lazy session's snapshot
(format 5) restores it lazy, and a snapshot of format 4 (before sparse rows) still loads, as an
exact session."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from paramserver.client import Client, Rows
from paramserver.server.persistence.snapshots import decode_snapshot, encode_snapshot
from tests.harness.servers import start_paramserver

WEIGHTS = {"emb": np.linspace(-1, 1, 40, dtype=np.float32).reshape(10, 4)}


def server(tmp_path: Path):
    return start_paramserver(
        tmp_path,
        "--snapshot-dir",
        str(tmp_path / "data"),
        "--durability",
        "snapshot",
        "--snapshot-interval-seconds",
        "3600",
    )


def test_a_lazy_session_comes_back_lazy_and_format_4_still_loads(tmp_path: Path) -> None:
    srv = server(tmp_path)
    try:
        with Client(srv.url) as client:
            lazy = client.create_session(WEIGHTS, "adam", "lazy", sparse_updates="lazy")
            exact = client.create_session(WEIGHTS, "adam", "exact")
            for s in (lazy, exact):
                s.push({"emb": Rows(np.array([2, 2, 7]), np.ones((3, 4), np.float32))})
                assert (
                    httpx.post(f"{srv.url}/sessions/{s.id}/snapshot", timeout=30).status_code == 200
                )
            saved = {s.id: s.state() for s in (lazy, exact)}
    finally:
        srv.stop()
    # the exact session's snapshot, rewritten as format 4 (its state body has no
    # sparse_updates: an exact state reads as before sparse rows)
    path = sorted((tmp_path / "data").glob("exact.*.snapshot"))[-1]
    header, body = decode_snapshot(path.read_bytes())
    assert header["format"] == 5
    path.write_bytes(b"".join(encode_snapshot({**header, "format": 4}, bytes(body))))
    again = server(tmp_path)
    try:
        with Client(again.url) as client:
            for sid, before in saved.items():
                session = client.session(sid)
                assert session.info().sparse_updates == sid
                after = session.state()
                assert after.sparse_updates == sid and after.iterations == 1
                for name in before.weights:
                    assert after.weights[name].tobytes() == before.weights[name].tobytes()
            # and lazy still means lazy: row 0 is untouched by a push of row 5
            lazy = client.session("lazy")
            before_row = lazy.pull()["emb"][0].copy()
            lazy.push({"emb": Rows(np.array([5]), np.ones((1, 4), np.float32))})
            assert lazy.pull()["emb"][0].tobytes() == before_row.tobytes()
    finally:
        again.stop()
