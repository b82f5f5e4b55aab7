"""Sharded sessions (``Client([urls])``, ``paramserver.client.sharded``) against real servers
on loopback: the same weights as one server, bit for bit, for every optimizer and option;
layouts that do not match refused; a shard down, then a retry with the push's key; shards
that diverged detected; states moved across shard counts; sync rounds on shards."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import messages
from paramserver.client import (
    AsyncClient,
    AsyncShardedClient,
    Client,
    LayoutMismatch,
    PushIncomplete,
    SessionExists,
    SessionNotFound,
    ShardedClient,
    ShardedSession,
    ShardsDiverged,
    Sync,
    urls_from_env,
)
from paramserver.constraints import MaxNorm, NonNeg
from tests.harness.http_api import MSGPACK
from tests.harness.optional import installed
from tests.harness.servers import ServerThread, free_port, start_paramserver, start_server_thread

#: Small slices, so that "emb" (16 KiB) is split into 4 slices over the 3 shards.
SLICE = 4096
WEIGHTS = {
    "emb": np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64),
    "dense/kernel": np.linspace(1, -1, 64 * 8, dtype=np.float32).reshape(64, 8),
    "dense/bias": np.linspace(0, 0.5, 8, dtype=np.float32),
    "out/kernel": np.linspace(-0.5, 0.5, 24, dtype=np.float32).reshape(8, 3),
}

OPTIMIZERS = [
    {"class_name": "SGD", "config": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "decay": 0.01}},
    {"class_name": "SGD", "config": {"lr": 0.1, "clipnorm": 1.5}},
    {"class_name": "RMSprop", "config": {"clipvalue": 0.3, "decay": 0.001}},
    {"class_name": "Adagrad", "config": {"clipnorm": 2.0}},
    {"class_name": "Adadelta", "config": {"clipnorm": 0.5, "clipvalue": 0.2}},
    {"class_name": "Adam", "config": {"amsgrad": True, "clipnorm": 3.0}},
    {"class_name": "Adam", "config": {"decay": 0.01, "clipvalue": 0.5}},
    {"class_name": "Adamax", "config": {"clipnorm": 1.0}},
    {"class_name": "Nadam", "config": {"schedule_decay": 0.01, "clipnorm": 2.0}},
]


def gradients(step: int, scale: float = 3.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return {
        k: (rng.standard_normal(v.shape) * scale).astype(np.float32) for k, v in WEIGHTS.items()
    }


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def shards() -> Iterator[list[ServerThread]]:
    servers = [start_server_thread() for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def single() -> Iterator[ServerThread]:
    server = start_server_thread()
    yield server
    server.stop()


@pytest.fixture
def sharded(shards: list[ServerThread]) -> Iterator[ShardedClient]:
    with Client([s.url for s in shards], slice_bytes=SLICE) as client:
        assert isinstance(client, ShardedClient)
        yield client


@pytest.fixture
def plain(single: ServerThread) -> Iterator[Client]:
    with Client(single.url) as client:
        yield client


def new_id() -> str:
    return f"s-{np.random.default_rng().integers(1 << 60):x}"


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: f"{o['class_name']}-{o['config']}")
def test_a_sharded_session_gives_the_single_servers_bits(
    sharded: ShardedClient, plain: Client, optimizer: dict[str, Any]
) -> None:
    sid = new_id()
    s = sharded.create_session(WEIGHTS, optimizer, sid)
    one = plain.create_session(WEIGHTS, optimizer, sid)
    assert [p.rows is not None for p in s.layout.pieces].count(True) == 4  # emb in 4 slices
    assert {p.shard for p in s.layout.pieces} == {0, 1, 2}
    for step in range(4):
        assert_same(s.push(gradients(step)), one.push(gradients(step)))
    assert_same(s.pull(), one.pull())
    info = s.info()
    assert info.iterations == 4 and info.names == tuple(WEIGHTS)
    assert {n: p.shape for n, p in info.parameters.items()} == {
        n: w.shape for n, w in WEIGHTS.items()
    }
    mine, theirs = s.state(), one.state()
    assert_same(mine.weights, theirs.weights)
    assert mine.slots.keys() == theirs.slots.keys()
    for slot in theirs.slots:
        assert_same(mine.slots[slot], theirs.slots[slot])
    assert mine.scalars == theirs.scalars and mine.iterations == theirs.iterations
    s.delete()
    one.delete()


def test_constraints_on_shards_keep_norm_constrained_tensors_whole(
    sharded: ShardedClient, plain: Client
) -> None:
    constraints = {"emb": NonNeg(), "dense/kernel": MaxNorm(max_value=0.5)}
    opt = {"class_name": "Adam", "config": {"clipnorm": 1.0}}
    s = sharded.create_session(WEIGHTS, opt, constraints=constraints)
    one = plain.create_session(WEIGHTS, opt, constraints=constraints)
    pieces = {p.source: p for p in s.layout.pieces}
    assert pieces["dense/kernel"].rows is None  # MaxNorm's norm spans the rows
    assert sum(p.source == "emb" for p in s.layout.pieces) == 4  # NonNeg is elementwise
    for step in range(3):
        assert_same(s.push(gradients(step)), one.push(gradients(step)))
    assert s.info().constraints == one.info().constraints


def test_out_and_list_form(sharded: ShardedClient, plain: Client) -> None:
    weights = list(WEIGHTS.values())
    s = sharded.create_session(weights, "adam")
    one = plain.create_session(weights, "adam")
    out = [np.zeros_like(w) for w in weights]
    got = s.push(list(gradients(0).values()), out=out)
    assert got is out
    expected = one.push(list(gradients(0).values()))
    for a, b in zip(out, expected, strict=True):
        assert a.tobytes() == b.tobytes()
    pulled = s.pull()
    assert isinstance(pulled, list) and len(pulled) == 4
    before = pulled[0].copy()
    s.push(list(gradients(1).values()))
    assert pulled[0].tobytes() == before.tobytes()  # what a call returned belongs to the caller


def test_bad_gradients_are_refused_before_anything_is_sent(sharded: ShardedClient) -> None:
    s = sharded.create_session(WEIGHTS, "sgd")
    g = gradients(0)
    with pytest.raises(ValueError, match="missing"):
        s.push({k: v for k, v in g.items() if k != "dense/bias"})
    with pytest.raises(ValueError, match="shape"):
        s.push({**g, "emb": np.zeros((63, 64), np.float32)})
    with pytest.raises(ValueError, match="does not have"):
        s.push({**g, "other": np.zeros(3, np.float32)})
    assert s.info().iterations == 0


def test_joining_by_id_checks_the_servers_and_their_order(
    sharded: ShardedClient, shards: list[ServerThread]
) -> None:
    urls = [s.url for s in shards]
    s = sharded.create_session(WEIGHTS, "adam")
    s.push(gradients(0))
    with Client(urls) as again:
        joined = again.session(s.id)
        assert isinstance(joined, ShardedSession) and joined.layout == s.layout
        assert joined.base_iterations is None
        assert_same(joined.pull(), s.pull())
        assert joined.base_iterations == 1
    with Client(urls[::-1]) as reordered, pytest.raises(LayoutMismatch, match="shard order"):
        reordered.session(s.id)
    with Client(urls[:2]) as fewer, pytest.raises(LayoutMismatch):
        fewer.session(s.id)
    with Client(urls[0]) as one, pytest.raises(LayoutMismatch, match="shard 0 of 3"):
        one.session(s.id)
    with Client(urls) as again, pytest.raises(SessionNotFound):
        again.session("no-such-session")
    httpx.delete(f"{urls[2]}/sessions/{s.id}", timeout=30)
    with Client(urls) as again, pytest.raises(LayoutMismatch, match=r"not on \[2\]"):
        again.session(s.id)
    with Client(urls[2]) as one:
        one.create_session({"w": np.zeros(3, np.float32)}, "sgd", s.id)
    with Client(urls) as again, pytest.raises(LayoutMismatch, match="ordinary session"):
        again.session(s.id)


def test_a_sharded_session_with_too_few_pieces_is_refused(sharded: ShardedClient) -> None:
    with pytest.raises(ValueError, match="at most 2 shards"):
        sharded.create_session({"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}, "sgd")


def test_a_refused_create_leaves_no_shard_behind(
    sharded: ShardedClient, shards: list[ServerThread]
) -> None:
    sid = new_id()
    with Client(shards[1].url) as one:  # shard 1 already has a session of that id
        one.create_session({"w": np.zeros(3, np.float32)}, "sgd", sid)
    with pytest.raises(SessionExists):
        sharded.create_session(WEIGHTS, "sgd", sid)
    for i in (0, 2):
        assert httpx.get(f"{shards[i].url}/sessions/{sid}", timeout=30).status_code == 404
    assert httpx.get(f"{shards[1].url}/sessions/{sid}", timeout=30).status_code == 200


def test_a_state_moves_across_shard_counts(
    sharded: ShardedClient, shards: list[ServerThread], plain: Client
) -> None:
    opt = {"class_name": "Nadam", "config": {"clipnorm": 2.0}}
    s = sharded.create_session(WEIGHTS, opt)
    one = plain.create_session(WEIGHTS, opt)
    for step in range(2):
        s.push(gradients(step))
        one.push(gradients(step))
    state = s.state()
    assert state.shard is None and list(state.weights) == list(WEIGHTS)
    with Client([shards[0].url, shards[2].url], slice_bytes=SLICE) as two:
        moved = two.restore_session(state)
        assert moved.layout.count == 2
        restored_single = plain.restore_session(state)
        for step in range(2, 4):
            a, b, c = (
                moved.push(gradients(step)),
                restored_single.push(gradients(step)),
                one.push(gradients(step)),
            )
            assert_same(a, c)
            assert_same(b, c)
    # load_state replaces every shard's part (and its layout follows the state's model)
    s.load_state(one.state())
    assert_same(s.pull(), one.pull())
    assert s.info().iterations == 4


def test_a_shard_restored_from_an_older_state_is_detected_on_pull(
    shards: list[ServerThread],
) -> None:
    with Client([s.url for s in shards], slice_bytes=SLICE, catch_up_seconds=0.5) as client:
        s = client.create_session(WEIGHTS, "adam")
        old = httpx.get(f"{shards[1].url}/sessions/{s.id}/state", timeout=30).content
        s.push(gradients(0))
        s.push(gradients(1))
        put = httpx.put(
            f"{shards[1].url}/sessions/{s.id}/state", content=old, headers=MSGPACK, timeout=30
        )
        assert put.status_code in (200, 201)
        with pytest.raises(ShardsDiverged) as caught:
            s.pull()
        assert caught.value.iterations == {0: 2, 1: 0, 2: 2}
        assert "shard 1: 0" in str(caught.value)
        with pytest.raises(ShardsDiverged):
            s.info()
        with pytest.raises(ShardsDiverged):
            s.state()


def _shard_process(tmp_path: Path, name: str, port: int, plane: int) -> Any:
    import tests.harness.servers as servers

    real = servers.free_port
    servers.free_port = lambda: port  # the same URL after a restart
    try:
        return start_paramserver(
            tmp_path,
            "--snapshot-dir",
            str(tmp_path / name),
            "--durability",
            "journal",
            data_plane_port=plane,
        )
    finally:
        servers.free_port = real


def test_a_shard_down_raises_push_incomplete_and_a_retry_with_the_key_completes(
    tmp_path: Path, single: ServerThread
) -> None:
    port, plane = free_port(), free_port()
    down = _shard_process(tmp_path, "s1", port, plane)
    others = [start_server_thread(), start_server_thread()]
    urls = [others[0].url, down.url, others[1].url]
    opt = {"class_name": "Adam", "config": {"clipnorm": 1.0}}
    try:
        with (
            Client(urls, slice_bytes=SLICE, retries=1, deadline=10) as client,
            Client(single.url) as plain,
        ):
            s = client.create_session(WEIGHTS, opt)
            one = plain.create_session(WEIGHTS, opt)
            down.kill()
            with pytest.raises(PushIncomplete) as caught:
                s.push(gradients(0))
            err = caught.value
            assert err.applied == [0, 2] and list(err.failed) == [1]
            assert down.url in str(err) and err.idempotency_key in str(err)
            down = _shard_process(tmp_path, "s1", port, plane)  # recovers from its journal
            weights = s.push(gradients(0), idempotency_key=err.idempotency_key)
            assert_same(weights, one.push(gradients(0)))
            assert s.info().iterations == 1  # no shard stepped twice
            assert_same(s.push(gradients(1)), one.push(gradients(1)))
    finally:
        down.stop()
        for server in others:
            server.stop()


def _cancelling(step: int) -> list[dict[str, np.ndarray]]:
    """Three workers' gradients whose sum depends on the order it is taken in: each element
    is 1e20, 1 and -1e20 spread over the three in a random permutation ((1e20 + 1) - 1e20 is
    0 in float64, (1e20 - 1e20) + 1 is 1)."""
    rng = np.random.default_rng(step)
    out: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for name, w in WEIGHTS.items():
        values = np.array([1e20, 1.0, -1e20], np.float32)
        picks = np.argsort(rng.random((3, *w.shape)), axis=0)
        for worker in range(3):
            out[worker][name] = values[picks[worker]]
    return out


def _round(sessions: list[Any], grads: list[dict[str, np.ndarray]]) -> list[Any]:
    results: list[Any] = [None] * 3

    def work(i: int) -> None:
        try:
            results[i] = sessions[i].push(grads[i])
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [r for r in results if not isinstance(r, dict)]
    assert not errors, errors
    return results


def test_sync_rounds_on_shards_give_the_single_servers_bits(
    sharded: ShardedClient, plain: Client
) -> None:
    training = Sync(replicas_to_aggregate=3, round_timeout_seconds=60)
    opt = {"class_name": "SGD", "config": {"lr": 1.0}}
    s = sharded.create_session(WEIGHTS, opt, training=training)
    one = plain.create_session(WEIGHTS, opt, training=training)
    workers = [s, sharded.session(s.id), sharded.session(s.id)]
    singles = [one, plain.session(one.id), plain.session(one.id)]
    for session in workers[1:] + singles[1:]:
        session.pull()
    for step in range(2):
        grads = _cancelling(step)
        mine, theirs = _round(workers, grads), _round(singles, grads)
        for a, b in zip(mine, theirs, strict=True):
            assert_same(a, b)
        if step == 0:  # the mean really depends on the order: some elements 0, others 1/3
            d = WEIGHTS["emb"] - mine[0]["emb"]
            assert (np.abs(d) < 1e-6).any() and (np.abs(d - 1 / 3) < 1e-6).any()
    assert_same(s.pull(), one.pull())
    assert s.info().iterations == 2


def test_a_round_applied_on_some_shards_only_raises_shards_diverged(
    shards: list[ServerThread],
) -> None:
    with Client([s.url for s in shards], slice_bytes=SLICE) as client:
        training = Sync(replicas_to_aggregate=2, round_timeout_seconds=1.5)
        s = client.create_session(WEIGHTS, "sgd", training=training)
        other = gradients(1)
        parts = s.layout.split(other)
        order = messages.push_digest(other).hex()
        result: dict[str, Any] = {}

        def first() -> None:
            try:
                s.push(gradients(0))
            except BaseException as exc:
                result["error"] = exc

        worker = threading.Thread(target=first)
        worker.start()
        # a second worker whose push reaches shards 0 and 1 only
        for i in (0, 1):
            body = messages.encode_push(parts[i], 0, None, order)
            r = httpx.post(
                f"{shards[i].url}/sessions/{s.id}/gradients",
                content=body,
                headers=MSGPACK,
                timeout=30,
            )
            assert r.status_code == 200, r.text
        worker.join(30)
        error = result["error"]
        assert isinstance(error, ShardsDiverged), error
        assert error.iterations == {0: 1, 1: 1, 2: None}
        assert "RoundTimeout" in str(error)


def test_async_twin(shards: list[ServerThread], plain: Client) -> None:
    one = plain.create_session(WEIGHTS, "adamax")

    async def main() -> dict[str, np.ndarray]:
        async with AsyncClient([s.url for s in shards], slice_bytes=SLICE) as client:
            assert isinstance(client, AsyncShardedClient)
            s = await client.create_session(WEIGHTS, "adamax")
            await s.push(gradients(0))
            weights = await s.push(gradients(1))
            joined = await client.session(s.id)
            assert_same(await joined.pull(), weights)
            assert (await s.info()).iterations == 2
            health = await client.health()
            assert health["status"] == "ok" and len(health["shards"]) == 3
            await s.delete()
            with pytest.raises(SessionNotFound):
                await s.delete()
            await s.delete(missing_ok=True)
            return weights

    weights = asyncio.run(main())
    one.push(gradients(0))
    assert_same(weights, one.push(gradients(1)))


def test_urls_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARAMSERVER_URLS", "http://ps-0.ps:8000, http://ps-1.ps:8000")
    assert urls_from_env() == ["http://ps-0.ps:8000", "http://ps-1.ps:8000"]
    monkeypatch.setenv("PARAMSERVER_URLS", " ")
    with pytest.raises(ValueError, match="PARAMSERVER_URLS"):
        urls_from_env()
    with pytest.raises(ValueError, match="twice"):
        Client(["http://a:1", "http://a:1"])


@pytest.mark.skipif(not installed("tensorflow"), reason="needs tensorflow")
def test_a_tfoptimizer_session_keeps_every_tensor_whole(
    sharded: ShardedClient, plain: Client
) -> None:
    opt = {
        "class_name": "TFOptimizer",
        "config": {"optimizer": {"class_name": "Adam", "config": {"learning_rate": 0.01}}},
    }
    s = sharded.create_session(WEIGHTS, opt)
    one = plain.create_session(WEIGHTS, opt)
    assert all(p.rows is None for p in s.layout.pieces)
    for step in range(2):
        assert_same(s.push(gradients(step)), one.push(gradients(step)))


def test_reads_while_other_workers_push_are_not_divergence(
    sharded: ShardedClient, shards: list[ServerThread]
) -> None:
    """Pushes in flight carry some shards ahead for a moment: a pull, a summary and the list
    wait for the others to catch up instead of calling it divergence."""
    s = sharded.create_session(WEIGHTS, "adam")
    stop = threading.Event()
    pushed = [0, 0, 0]

    def worker(i: int) -> None:
        with Client([u.url for u in shards], slice_bytes=SLICE) as own:
            session = own.session(s.id)
            while not stop.is_set():
                session.push(gradients(i, scale=0.01))
                pushed[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 3
        reads = 0
        while time.monotonic() < deadline:
            s.pull()
            assert s.info().iterations >= 0
            assert s.id in {info.session_id for info in sharded.sessions()}
            reads += 1
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert reads > 3 and sum(pushed) > 10
    assert s.info().iterations == sum(pushed)
    assert s.state().iterations == sum(pushed)  # at rest: one iteration on every shard


def test_partial_pulls_while_sync_rounds_complete_are_not_divergence(
    sharded: ShardedClient, shards: list[ServerThread]
) -> None:
    """A round completes on one shard a moment before the others: a partial pull asks the
    shards again until they are at one iteration instead of calling it divergence."""
    s = sharded.create_session(WEIGHTS, "adam", training=Sync(replicas_to_aggregate=3))
    rounds = 12
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with Client([u.url for u in shards], slice_bytes=SLICE) as own:
                session = own.session(s.id)
                session.pull()  # a sync push names the iteration it was computed on
                for step in range(rounds):
                    session.push(gradients(10 * step + i, scale=0.01))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    reads = 0
    try:
        while any(t.is_alive() for t in threads):
            got = s.pull(rows={"emb": [0, 20, 40, 63], "dense/bias": None})
            assert got["emb"].values.shape == (4, 64)
            reads += 1
    finally:
        for t in threads:
            t.join(60)
    assert not failures, failures
    assert reads > 3
    assert s.info().iterations == rounds
    whole = s.pull()
    assert s.pull(rows={"emb": [5]})["emb"].values.tobytes() == whole["emb"][5:6].tobytes()


def test_row_sparse_pushes_and_partial_pulls_over_shards(
    sharded: ShardedClient, plain: Client
) -> None:
    from paramserver.client import Rows

    opt = {"class_name": "Adam", "config": {"clipnorm": 1.0}}
    s = sharded.create_session(WEIGHTS, opt, sparse_updates="lazy")
    one = plain.create_session(WEIGHTS, opt, sparse_updates="lazy")
    assert s.info().sparse_updates == "lazy"
    rng = np.random.default_rng(3)
    for step in range(3):
        idx = rng.integers(0, 64, size=30)
        rows = Rows(idx, rng.standard_normal((30, 64)).astype(np.float32))
        g = {**gradients(step), "emb": rows}  # "emb" is split into 4 slices
        assert_same(s.push(g), one.push(g))
    asked = [63, 0, 17, 17, 40]
    mine = s.pull(rows={"emb": asked, "dense/bias": None})
    theirs = one.pull(rows={"emb": asked, "dense/bias": None})
    assert mine["emb"].indices.tolist() == asked
    assert mine["emb"].values.tobytes() == theirs["emb"].values.tobytes()
    assert mine["dense/bias"].tobytes() == theirs["dense/bias"].tobytes()
    assert s.state().sparse_updates == "lazy"


def test_a_sharded_push_may_answer_only_some_rows(sharded: ShardedClient, plain: Client) -> None:
    from paramserver.client import Rows

    s = sharded.create_session(WEIGHTS, "sgd")
    one = plain.create_session(WEIGHTS, "sgd")
    g = {**gradients(0), "emb": Rows(np.array([3, 60]), np.ones((2, 64), np.float32))}
    mine = s.push(g, returns={"emb": [60, 3, 3], "out/kernel": None})
    theirs = one.push(g, returns={"emb": [60, 3, 3], "out/kernel": None})
    assert set(mine) == {"emb", "out/kernel"}
    assert mine["emb"].indices.tolist() == [60, 3, 3]
    assert mine["emb"].values.tobytes() == theirs["emb"].values.tobytes()
    assert mine["out/kernel"].tobytes() == theirs["out/kernel"].tobytes()
    assert s.info().iterations == 1
