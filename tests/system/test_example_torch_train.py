"""examples/torch_train.py trains a PyTorch model through a session with the torch adapter.

CI installs the ``torch`` extra and sets ``CI=true``: there a missing torch fails these tests.
Elsewhere they are skipped without it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness.examples import load_example, session_ids
from tests.harness.optional import requires

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torch_train.py"

needs_torch = requires("torch")

#: Held-out accuracy the example must reach (chance is 25%, a linear model about 70%).
TARGET = 0.88


def load() -> ModuleType:
    return load_example("torch_train")


@needs_torch
def test_one_worker_reaches_the_accuracy_target(
    base_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = session_ids(base_url)
    history = load().main(["--url", base_url])
    assert [e.epoch for e in history] == [0, 1, 2, 3, 4, 5]
    assert history[0].accuracy < 0.4 and history[-1].accuracy > TARGET, history
    assert history[-1].loss * 4 < history[0].loss, history
    assert history[-1].iterations == 5 * -(-5000 // 32)  # one push per minibatch
    out = capsys.readouterr().out
    assert "epoch 5: train loss" in out and "final: test loss" in out
    assert session_ids(base_url) == before  # the example cleans up


@needs_torch
def test_four_worker_processes_with_its_own_server_reach_the_accuracy_target() -> None:
    """One command, as a user runs it: no --url, so the example starts a server; four worker
    processes (spawned) join the session by id and train on their shards."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--workers", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 worker processes" in done.stdout, done.stdout
    assert len(re.findall(r"^epoch \d+ \(iteration \d+\)", done.stdout, re.M)) == 5, done.stdout
    final = re.search(r"^final: .* accuracy ([\d.]+)%", done.stdout, re.M)
    assert final is not None, done.stdout
    assert float(final.group(1)) > TARGET * 100, done.stdout


def test_without_torch_it_says_so(
    base_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load()
    monkeypatch.setattr(module, "torch", None)
    assert module.main(["--url", base_url]) == []
    assert "pip install 'paramserver[torch]'" in capsys.readouterr().out
