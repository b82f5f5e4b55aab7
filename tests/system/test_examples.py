"""The worker examples run against the test server and actually train."""

from __future__ import annotations

import sys

import pytest

from tests.harness.examples import EXAMPLES, session_ids
from tests.harness.examples import load_example as load


def test_numpy_worker_loss_falls_tenfold(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = session_ids(base_url)
    history = load("numpy_worker").main(["--url", base_url])
    assert len(history) == 6  # before training, then five epochs
    assert history[-1] * 10 <= history[0], history
    out = capsys.readouterr().out
    assert "epoch 5: loss" in out and "loss fell" in out
    assert session_ids(base_url) == before  # the example cleans up


def test_numpy_worker_defaults_to_the_local_server() -> None:
    args = load("numpy_worker").parse_args([])
    assert args.url == "http://127.0.0.1:8000"


@pytest.mark.parametrize("extra", [[], ["--backups", "1"]], ids=["sync", "sync-with-backup"])
def test_sync_workers_train_in_rounds(base_url: str, extra: list[str]) -> None:
    """Four worker processes (spawned: run as a script, as a user would) train in sync mode
    against the test server; accuracy ends far above chance (25%)."""
    import subprocess

    before = session_ids(base_url)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "sync_workers.py"), "--url", base_url, *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if "accuracy" in line]
    assert len(lines) >= 2, done.stdout
    final = float(lines[-1].split("accuracy")[-1].strip(" :=%").split("%")[0].split()[0])
    assert final > 80, done.stdout
    assert session_ids(base_url) == before  # the example cleans up
