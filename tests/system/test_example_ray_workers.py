"""examples/ray_workers.py trains through a sharded session with workers as Ray actors.

The servers are two real ``paramserver serve`` processes; Ray is one local instance for the
module (started with the example's own ``ray_instance``, which the example then reuses and
leaves running), shut down and its files removed when the module ends, whatever happened.
The Ray actors run in Ray's worker processes and reach the servers over loopback.

CI installs the ``ray`` extra (through ``dev``) and sets ``CI=true``: there a missing Ray fails
these tests. Elsewhere they are skipped without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver.client import Client
from tests.harness.examples import load_example, session_ids
from tests.harness.optional import requires
from tests.harness.servers import ServerProcess

needs_ray = requires("ray")

#: Held-out accuracy the runs must reach: chance is 25%, the example reaches about 94%.
TARGET = 0.85
WORKERS = 2
EPOCHS = 3
PARAMETERS = {"w1", "b1", "w2", "b2"}


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example("ray_workers")


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two server processes, the shards of the example's sessions (started side by side)."""
    logs = tmp_path_factory.mktemp("servers")
    servers = [ServerProcess.paramserver(log_dir=logs, warm_up_kernels=False) for _ in range(2)]
    try:
        for server in servers:
            server.launch()
        for server in servers:
            if not server.wait_ready():  # its port was taken meanwhile: another one
                server.start()
        yield [s.url for s in servers]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def local_ray(example: ModuleType) -> Iterator[None]:
    """One local Ray instance for the module, its files under a short directory of /tmp (Ray's
    Unix socket paths under it must stay within 107 bytes), removed afterwards. What
    ``ray.init`` changes in this process (a SIGTERM handler, environment variables) is put
    back, so that the tests after these run as before."""
    import ray

    sigterm = signal.getsignal(signal.SIGTERM)
    environ = dict(os.environ)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray's processes inherit it
        with example.ray_instance(address="local", num_cpus=WORKERS, temp_dir=temp_dir):
            yield
    finally:
        if ray.is_initialized():  # the block above shuts it down; make sure of it
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, sigterm)
        for name in set(os.environ) | set(environ):
            if name not in environ:
                del os.environ[name]
            elif os.environ.get(name) != environ[name]:
                os.environ[name] = environ[name]


def _check_run(run: Any, *, sync: bool) -> None:
    """Loss down, accuracy up, every worker's pushes applied, in processes of their own."""
    evaluations = run.evaluations
    assert [e.epoch for e in evaluations] == list(range(EPOCHS + 1))
    first, last = evaluations[0], evaluations[-1]
    assert first.accuracy < 0.4 and last.accuracy > TARGET, evaluations
    assert last.loss * 4 < first.loss, evaluations
    steps = run.steps_per_epoch
    assert steps == (4000 // WORKERS) // 32
    assert run.pushes == [EPOCHS * steps] * WORKERS
    # async: every push one step; sync: one step per round of one push from each worker
    assert last.iterations == EPOCHS * steps * (1 if sync else WORKERS)
    pids = {r.pid for epochs in run.reports for r in epochs}
    assert len(pids) == WORKERS and os.getpid() not in pids  # Ray worker processes


@needs_ray
def test_async_actors_train_a_session_sharded_over_two_servers(
    example: ModuleType,
    shard_urls: list[str],
    local_ray: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The servers from $PARAMSERVER_URLS; the session kept, to look at its shards."""
    import ray

    monkeypatch.setenv("PARAMSERVER_URLS", ",".join(shard_urls))
    args = ["--workers", str(WORKERS), "--epochs", str(EPOCHS), "--keep-session"]
    run = example.main(args)
    try:
        assert run.urls == shard_urls and not run.sync
        _check_run(run, sync=False)
        expected = run.evaluations[-1].iterations
        # Each server holds one shard of the session, every push applied on each.
        layouts, sources = set(), []
        with httpx.Client(timeout=30) as http:
            for index, url in enumerate(shard_urls):
                reply = http.get(f"{url}/sessions/{run.session_id}")
                assert reply.status_code == 200, reply.text
                summary = reply.json()
                assert summary["iterations"] == expected, summary
                shard = summary["shard"]
                assert shard["index"] == index and shard["count"] == 2, shard
                assert shard["parts"] and set(shard["parts"]) == set(summary["parameters"])
                layouts.add(shard["layout"])
                sources += [part["source"] for part in shard["parts"].values()]
        assert len(layouts) == 1  # one partition
        assert sorted(sources) == sorted(PARAMETERS)  # each parameter on exactly one shard
        with Client(shard_urls) as client:  # joined by id, as the workers did
            session = client.session(run.session_id)
            assert session.info().iterations == expected
            session.delete()
    finally:
        for url in shard_urls:  # whatever failed above: leave no shard behind
            httpx.delete(f"{url}/sessions/{run.session_id}", timeout=30)
    assert ray.is_initialized()  # the module's instance: the example left it running
    out = capsys.readouterr().out
    assert f"epoch {EPOCHS} (iteration {expected})" in out and "final: test loss" in out, out
    assert f"session {run.session_id} kept" in out


@needs_ray
def test_sync_rounds_of_every_workers_gradient(
    example: ModuleType, shard_urls: list[str], local_ray: None
) -> None:
    """``--sync``: one step per round of ``WORKERS`` gradients; the session deleted after."""
    before = [session_ids(url) for url in shard_urls]
    args = ["--urls", ",".join(shard_urls), "--sync", "--quiet"]
    run = example.main([*args, "--workers", str(WORKERS), "--epochs", str(EPOCHS)])
    assert run.sync
    _check_run(run, sync=True)
    assert [session_ids(url) for url in shard_urls] == before  # the example cleans up


def test_the_gradients_are_the_derivatives_of_the_loss(example: ModuleType) -> None:
    """The backpropagation against central differences, in float64 (no Ray needed)."""
    rng = np.random.default_rng(7)
    weights = {k: v.astype(np.float64) for k, v in example.init_weights(3, 5, 4, rng).items()}
    weights["b1"] += rng.normal(size=5)
    weights["b2"] += rng.normal(size=4)
    x = rng.normal(size=(9, 3))
    y = rng.integers(0, 4, size=9)
    grads, loss = example.gradients(weights, x, y)
    assert loss == pytest.approx(example.loss_and_accuracy(weights, x, y)[0])
    eps = 1e-6
    for name, w in weights.items():
        numeric = np.empty_like(w)
        for i in np.ndindex(w.shape):
            saved = w[i]
            w[i] = saved + eps
            up = example.loss_and_accuracy(weights, x, y)[0]
            w[i] = saved - eps
            down = example.loss_and_accuracy(weights, x, y)[0]
            w[i] = saved
            numeric[i] = (up - down) / (2 * eps)
        assert grads[name].dtype == np.float64
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_without_ray_it_says_so(
    example: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(example, "ray", None)
    assert example.main(["--urls", "http://127.0.0.1:1"]) is None
    assert "pip install 'paramserver[ray]'" in capsys.readouterr().out
