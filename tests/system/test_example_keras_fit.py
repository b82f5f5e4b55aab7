"""``examples/keras_fit.py`` runs as a user runs it (a script, its workers spawned) against the
test server: tf.keras ``model.fit`` through a session, with one worker and with four worker
processes in sync rounds, reaches its accuracy target on held-out data and cleans up.

CI installs the ``tensorflow`` extra and sets ``CI=true``: there these tests fail loudly when
TensorFlow is missing. Elsewhere they are skipped without it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.examples import session_ids
from tests.harness.optional import requires

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "keras_fit.py"


pytestmark = [pytest.mark.tensorflow, requires("tensorflow")]


@pytest.mark.parametrize(
    "extra", [[], ["--workers", "4"]], ids=["one-worker", "four-worker-processes"]
)
def test_keras_fit_reaches_its_held_out_accuracy(base_url: str, extra: list[str]) -> None:
    before = session_ids(base_url)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--url", base_url, "--epochs", "3", *extra],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    epochs = re.findall(r"^epoch (\d+) \(step (\d+)\).*held-out accuracy +([\d.]+)%$", out, re.M)
    assert [int(e) for e, _, _ in epochs] == [1, 2, 3], out
    steps_per_epoch = 125 if not extra else 32  # 4000 training points, batch 32 (per worker)
    assert [int(s) for _, s, _ in epochs] == [steps_per_epoch * e for e in (1, 2, 3)], out
    final = re.search(r"^final: held-out accuracy ([\d.]+)%", out, re.M)
    assert final is not None, out
    assert float(final.group(1)) >= 90.0, out
    assert float(final.group(1)) == float(epochs[-1][2])
    if extra:
        workers = re.findall(r"^worker (\d): (\d+) steps", out, re.M)
        assert workers == [(str(i), str(3 * steps_per_epoch)) for i in range(4)], out
        assert "Sync(replicas_to_aggregate=4" in out
    assert session_ids(base_url) == before  # the example deletes its session
