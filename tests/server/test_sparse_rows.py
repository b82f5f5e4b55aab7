"""Row-sparse gradients and partial pulls (``paramserver.sparse``) against real servers on
loopback: exact mode is the dense push of the same gradient with zeros elsewhere, bit for bit,
for every optimizer and option; duplicates are summed; lazy mode equals a numpy reference on
the touched rows and leaves the others alone; partial pulls and a push's ``return``; hostile
indices refused before any allocation; the journal replays sparse pushes bit for bit."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import messages, wire
from paramserver.client import Client, InvalidRequest, Rows, Sync
from paramserver.constraints import MaxNorm, NonNeg
from paramserver.sparse import densify
from tests.harness.http_api import MSGPACK
from tests.harness.servers import ServerThread, start_paramserver, start_server_thread

ROWS, WIDTH = 300, 8
WEIGHTS = {
    "emb": np.linspace(-1, 1, ROWS * WIDTH, dtype=np.float32).reshape(ROWS, WIDTH),
    "dense/kernel": np.linspace(1, -1, WIDTH * 3, dtype=np.float32).reshape(WIDTH, 3),
    "dense/bias": np.zeros(3, np.float32),
}
OPTIMIZERS = [
    {"class_name": "SGD", "config": {"lr": 0.1}},
    {"class_name": "SGD", "config": {"momentum": 0.9, "nesterov": True, "decay": 0.01}},
    {"class_name": "RMSprop", "config": {"clipvalue": 0.3}},
    {"class_name": "Adagrad", "config": {"clipnorm": 2.0}},
    {"class_name": "Adadelta", "config": {"clipnorm": 0.5}},
    {"class_name": "Adam", "config": {"amsgrad": True, "clipnorm": 3.0}},
    {"class_name": "Adam", "config": {"decay": 0.01, "clipvalue": 0.5}},
    {"class_name": "Adamax", "config": {}},
    {"class_name": "Nadam", "config": {"clipnorm": 1.0}},
]


def sparse_step(step: int, n: int = 40) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A push with a row-sparse "emb" (duplicate indices included) and its dense equivalent."""
    rng = np.random.default_rng(step)
    idx = rng.integers(0, ROWS, size=n)
    idx[:5] = idx[5:10]  # duplicates, summed
    vals = (rng.standard_normal((n, WIDTH)) * 2).astype(np.float32)
    dense_rest = {
        "dense/kernel": rng.standard_normal((WIDTH, 3)).astype(np.float32),
        "dense/bias": rng.standard_normal(3).astype(np.float32),
    }
    sparse = {"emb": Rows(idx, vals), **dense_rest}
    dense = {"emb": densify(idx, vals, (ROWS, WIDTH), np.dtype(np.float32)), **dense_rest}
    return sparse, dense


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    server = start_server_thread()
    yield server
    server.stop()


@pytest.fixture
def client(srv: ServerThread) -> Iterator[Client]:
    with Client(srv.url) as c:
        yield c


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: f"{o['class_name']}-{o['config']}")
def test_exact_rows_are_the_dense_push_bit_for_bit(
    client: Client, optimizer: dict[str, Any]
) -> None:
    constraints = {"emb": NonNeg(), "dense/kernel": MaxNorm(max_value=0.5)}
    sparse = client.create_session(WEIGHTS, optimizer, constraints=constraints)
    dense = client.create_session(WEIGHTS, optimizer, constraints=constraints)
    assert sparse.info().iterations == 0
    for step in range(4):
        s, d = sparse_step(step)
        same(sparse.push(s), dense.push(d))
    a, b = sparse.state(), dense.state()
    for slot in b.slots:
        same(a.slots[slot], b.slots[slot])
    assert a.scalars == b.scalars


def test_duplicates_are_summed(client: Client) -> None:
    once = client.create_session(WEIGHTS, "adam")
    twice = client.create_session(WEIGHTS, "adam")
    vals = np.ones((2, WIDTH), np.float32)
    rest = {"dense/kernel": np.zeros((WIDTH, 3), np.float32), "dense/bias": np.zeros(3, np.float32)}
    same(
        once.push({"emb": Rows(np.array([7, 7]), vals), **rest}),
        twice.push({"emb": Rows(np.array([7]), vals[:1] * 2), **rest}),
    )


def _lazy_adam_reference(
    w: np.ndarray, m: np.ndarray, v: np.ndarray, idx: np.ndarray, g: np.ndarray, t: int
) -> None:
    """Keras 2.2.4's Adam on the rows ``idx`` only (float32, Keras's grouping), in place."""
    f = np.float32
    lr, b1, b2, eps = f(0.001), f(0.9), f(0.999), 1e-7
    t32 = f(t)
    lr_t = lr * (np.sqrt(f(1.0) - np.power(b2, t32)) / (f(1.0) - np.power(b1, t32)))
    m[idx] = (m[idx] * b1) + (g * (f(1.0) - b1))
    v[idx] = (v[idx] * b2) + ((g * g) * (f(1.0) - b2))
    w[idx] = w[idx] - ((m[idx] * lr_t) / (np.sqrt(v[idx]) + f(eps)))


def test_lazy_rows_update_only_the_rows_they_touch(client: Client) -> None:
    lazy = client.create_session(WEIGHTS, "adam", sparse_updates="lazy")
    assert lazy.info().sparse_updates == "lazy"
    w = WEIGHTS["emb"].copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    touched: set[int] = set()
    for step in range(3):
        s, _ = sparse_step(step)
        rows = s["emb"]
        before = lazy.pull()["emb"]
        after = lazy.push(s)["emb"]
        idx, summed = np.unique(rows.indices, return_inverse=True)
        touched.update(idx.tolist())
        g = np.zeros((idx.size, WIDTH), np.float32)
        np.add.at(g, summed, rows.values)
        _lazy_adam_reference(w, m, v, idx, g, step + 1)
        untouched = np.setdiff1d(np.arange(ROWS), idx)
        assert after[untouched].tobytes() == before[untouched].tobytes()
        np.testing.assert_allclose(after, w, rtol=2e-6, atol=1e-7)
    state = lazy.state()
    assert state.sparse_updates == "lazy"
    np.testing.assert_allclose(state.slots["m"]["emb"], m, rtol=2e-6, atol=1e-9)
    never = np.setdiff1d(np.arange(ROWS), sorted(touched))
    assert never.size and not state.slots["m"]["emb"][never].any()  # never touched: never moved
    assert state.weights["emb"][never].tobytes() == WEIGHTS["emb"][never].tobytes()


def test_sparse_updates_is_a_setting_of_the_session(client: Client, srv: ServerThread) -> None:
    lazy = client.create_session(WEIGHTS, "adam", sparse_updates="lazy")
    state = lazy.state()
    restored = client.restore_session(state)
    assert restored.info().sparse_updates == "lazy"
    assert client.create_session(WEIGHTS, "adam").info().sparse_updates == "exact"
    for bad, code in (
        ({"sparse_updates": "eager"}, "invalid_request"),
        (
            {"sparse_updates": "lazy", "constraints": {"emb": {"class_name": "MaxNorm"}}},
            "invalid_constraint",
        ),
    ):
        body = wire.pack(
            {"optimizer": {"class_name": "Adam", "config": {}}, "weights": WEIGHTS, **bad}
        )
        r = httpx.post(f"{srv.url}/sessions", content=body, headers=MSGPACK, timeout=30)
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def test_partial_pulls_and_a_pushs_return(client: Client, srv: ServerThread) -> None:
    s = client.create_session(WEIGHTS, "sgd")
    s.push(sparse_step(0)[0])
    full = s.pull()
    part = s.pull(rows={"emb": [5, 0, 299, 5], "dense/bias": None})
    assert set(part) == {"emb", "dense/bias"}
    assert isinstance(part["emb"], Rows) and part["emb"].shape == (ROWS, WIDTH)
    assert part["emb"].indices.tolist() == [5, 0, 299, 5]
    assert part["emb"].values.tobytes() == full["emb"][[5, 0, 299, 5]].tobytes()
    assert part["dense/bias"].tobytes() == full["dense/bias"].tobytes()
    answer = s.push(sparse_step(1)[0], returns={"emb": [1, 2]})
    assert set(answer) == {"emb"} and answer["emb"].indices.tolist() == [1, 2]
    assert answer["emb"].values.tobytes() == s.pull()["emb"][[1, 2]].tobytes()
    for bad in ({"nope": None}, {"emb": [ROWS]}, {"emb": [-1]}, {"dense/bias": [0]}):
        body = wire.pack({"tensors": messages.encode_query(bad)})
        r = httpx.post(f"{srv.url}/sessions/{s.id}/weights/query", content=body, headers=MSGPACK)
        if "dense/bias" in bad:  # a 1-D tensor has rows: its elements
            assert r.status_code == 200
            continue
        assert r.status_code == 422 and r.json()["error"]["code"] == "parameter_mismatch", r.text
    it = s.info().iterations
    with pytest.raises(InvalidRequest):  # a bad 'return' applies nothing
        s.push(sparse_step(2)[0], returns={"nope": None})
    assert s.info().iterations == it


def test_a_read_only_token_may_pull_rows(server_factory: Any) -> None:
    srv = server_factory(tokens="w:rw,r:ro")
    with Client(srv.url, token="w") as writer:
        sid = writer.create_session(WEIGHTS, "sgd").id
    with Client(srv.url, token="r") as reader:
        rows = reader.session(sid).pull(rows={"emb": [3]})
        assert rows["emb"].values.tobytes() == WEIGHTS["emb"][[3]].tobytes()
        with pytest.raises(Exception, match="read-only"):
            reader.session(sid).push(sparse_step(0)[0])


def _rows_body(**overrides: Any) -> bytes:
    tensor = {
        "dtype": "float32",
        "shape": [ROWS, WIDTH],
        "indices": np.array([1, 2], "<i8").tobytes(),
        "data": np.zeros((2, WIDTH), "<f4").tobytes(),
    }
    tensor.update(overrides)
    grads = {
        "emb": tensor,
        "dense/kernel": np.zeros((WIDTH, 3), np.float32),
        "dense/bias": np.zeros(3, np.float32),
    }
    return wire.pack({"gradients": grads})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"indices": np.array([-1, 2], "<i8").tobytes()}, "out of range"),
        ({"indices": np.array([1, ROWS], "<i8").tobytes()}, "out of range"),
        ({"indices": b"\x00" * 12}, "int64"),
        ({"indices": np.zeros(1 << 20, "<i8").tobytes()}, "need"),  # a million indices, 2 rows
        ({"data": np.zeros((2, WIDTH + 1), "<f4").tobytes()}, "need"),
        ({"shape": [ROWS, WIDTH + 1], "data": np.zeros((2, WIDTH + 1), "<f4").tobytes()}, "shape"),
        ({"dtype": "int8"}, "dtype"),
        ({"shape": []}, "at least one dimension"),
        ({"extra": b""}, "indices, data"),
    ],
)
def test_hostile_rows_are_refused_and_change_nothing(
    srv: ServerThread, overrides: dict[str, Any], needle: str
) -> None:
    with Client(srv.url) as c:
        s = c.create_session(WEIGHTS, "adam")
    r = httpx.post(
        f"{srv.url}/sessions/{s.id}/gradients", content=_rows_body(**overrides), headers=MSGPACK
    )
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"], r.json()
    assert "emb" in r.json()["error"]["message"]
    assert httpx.get(f"{srv.url}/sessions/{s.id}", timeout=30).json()["iterations"] == 0


def test_huge_row_counts_are_refused_before_allocation(server_factory: Any) -> None:
    srv = server_factory(max_elements=1000)
    with Client(srv.url) as c:
        s = c.create_session({"emb": np.zeros((100, 8), np.float32)}, "sgd")
    tensor = {
        "dtype": "float32",
        "shape": [100, 8],
        "indices": np.zeros(200, "<i8").tobytes(),  # 200 rows of 8: 1,600 elements
        "data": np.zeros((200, 8), "<f4").tobytes(),
    }
    r = httpx.post(
        f"{srv.url}/sessions/{s.id}/gradients",
        content=wire.pack({"gradients": {"emb": tensor}}),
        headers=MSGPACK,
    )
    assert r.status_code == 422 and "at most 1000 elements" in r.json()["error"]["message"]


def test_sync_rounds_take_rows_as_their_dense_equivalent(client: Client) -> None:
    import threading

    training = Sync(replicas_to_aggregate=2)
    sparse = client.create_session(WEIGHTS, "adam", training=training)
    dense = client.create_session(WEIGHTS, "adam", training=training)
    results: dict[str, Any] = {}

    def run(name: str, session: Any, grads: Any) -> None:
        results[name] = session.push(grads)

    (s0, d0), (s1, d1) = sparse_step(0), sparse_step(1)
    other_sparse, other_dense = client.session(sparse.id), client.session(dense.id)
    other_sparse.pull()
    other_dense.pull()
    threads = [
        threading.Thread(target=run, args=("a", sparse, s0)),
        threading.Thread(target=run, args=("b", other_sparse, s1)),
        threading.Thread(target=run, args=("c", dense, d0)),
        threading.Thread(target=run, args=("d", other_dense, d1)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    same(results["a"], results["c"])
    same(results["b"], results["d"])


def test_the_journal_replays_sparse_pushes_bit_for_bit(tmp_path: Path) -> None:
    args = ("--snapshot-dir", str(tmp_path / "data"), "--durability", "journal")
    first = start_paramserver(tmp_path, *args)
    try:
        with Client(first.url) as c:
            exact = c.create_session(
                WEIGHTS, {"class_name": "Adam", "config": {"clipnorm": 1.0}}, "exact"
            )
            lazy = c.create_session(WEIGHTS, "adam", "lazy", sparse_updates="lazy")
            for step in range(3):
                exact.push(sparse_step(step)[0])
                lazy.push(sparse_step(step)[0])
            saved = {sid: c.session(sid).state() for sid in ("exact", "lazy")}
    finally:
        first.kill()
    again = start_paramserver(tmp_path, *args)
    try:
        with Client(again.url) as c:
            for sid, before in saved.items():
                after = c.session(sid).state()
                assert after.iterations == before.iterations == 3
                assert after.sparse_updates == before.sparse_updates
                same(after.weights, before.weights)
                for slot in before.slots:
                    same(after.slots[slot], before.slots[slot])
    finally:
        again.stop()


def test_sum_of_squares_of_rows_is_the_dense_ones() -> None:
    from paramserver import reductions, sparse

    rng = np.random.default_rng(5)
    for shape in [(1000, 64), (37, 5), (130, 7), (3,), (65,)]:
        idx = np.unique(rng.integers(0, shape[0], size=min(20, shape[0])))
        rows = rng.standard_normal((idx.size, *shape[1:])).astype(np.float32)
        dense = densify(idx, rows, shape, np.dtype(np.float32))
        assert sparse.sum_squares(idx, rows, shape) == reductions.sum_squares(dense)
    assert math.isfinite(sparse.sum_squares(np.array([0]), np.ones((1, 3), np.float32), (4, 3)))


def test_a_small_query_cannot_ask_for_a_huge_answer(server_factory: Any) -> None:
    """Row numbers repeat freely, so the answer's size is bounded by the largest body, checked
    before the session is read (found in review: 1.6 KB of [0]*200 answered 839 MB)."""
    srv = server_factory(max_body_bytes=2 << 20)
    with Client(srv.url) as c:
        s = c.create_session({"wide": np.zeros((4, 1 << 16), np.float32)}, "sgd")  # 256 KiB rows
        assert s.pull(rows={"wide": [0, 0, 1]})["wide"].values.shape == (3, 1 << 16)
        body = wire.pack({"tensors": messages.encode_query({"wide": [0] * 200})})
        r = httpx.post(f"{srv.url}/sessions/{s.id}/weights/query", content=body, headers=MSGPACK)
        assert r.status_code == 422 and "max_body_bytes" in r.json()["error"]["message"], r.text
        with pytest.raises(InvalidRequest, match="max_body_bytes"):
            s.push({"wide": np.ones((4, 1 << 16), np.float32)}, returns={"wide": [0] * 200})
        assert s.info().iterations == 0  # a refused 'return' applied nothing


def test_rows_of_a_zero_width_parameter(client: Client) -> None:
    for mode in ("exact", "lazy"):
        s = client.create_session({"e": np.zeros((5, 0), np.float32)}, "adam", sparse_updates=mode)
        s.push({"e": Rows(np.array([1, 1]), np.zeros((2, 0), np.float32))})
        assert s.info().iterations == 1


def test_a_lazy_sync_round_steps_the_union_of_its_rows_and_replays(tmp_path: Path) -> None:
    """In a lazy session a sync round's mean (rows a push did not send counted as zeros)
    steps only the rows some push of the round sent: the same as one lazy push of those rows
    of the mean; every other row keeps its weights and slots; the journal replays it so."""
    import threading

    def mean_of(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            k: ((a[k].astype(np.float64) + b[k].astype(np.float64)) / 2).astype(np.float32)
            for k in a
        }

    def round_of(first: Any, second: Any, g0: Any, g1: Any) -> Any:
        done: dict[str, Any] = {}
        threads = [
            threading.Thread(target=lambda: done.update(a=first.push(g0))),
            threading.Thread(target=lambda: done.update(b=second.push(g1))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(done) == {"a", "b"}
        return done["a"]

    args = ("--snapshot-dir", str(tmp_path / "data"), "--durability", "journal")
    first = start_paramserver(tmp_path, *args)
    _, dense_a = sparse_step(5)  # a first, dense round: every row's slots become non-zero
    _, dense_b = sparse_step(6)
    (s0, d0), (s1, d1) = sparse_step(0), sparse_step(1)
    mean = mean_of(d0, d1)
    union = np.unique(np.concatenate([s0["emb"].indices, s1["emb"].indices]))
    untouched = np.setdiff1d(np.arange(ROWS), union)
    try:
        with Client(first.url) as c:
            sync = c.create_session(
                WEIGHTS,
                "adam",
                "sync",
                training=Sync(replicas_to_aggregate=2),
                sparse_updates="lazy",
            )
            one = c.create_session(WEIGHTS, "adam", "one", sparse_updates="lazy")
            other = c.session("sync")
            other.pull()
            same(round_of(sync, other, dense_a, dense_b), one.push(mean_of(dense_a, dense_b)))
            before = sync.state()
            want = one.push({**mean, "emb": Rows(union, mean["emb"][union])})
            same(round_of(sync, other, s0, s1), want)
            state = sync.state()
            got, start = state.weights["emb"], before.weights["emb"]
            assert np.array_equal(got[untouched], start[untouched])
            assert not np.array_equal(got[union], start[union])
            for slot in state.slots:
                now, then = state.slots[slot]["emb"], before.slots[slot]["emb"]
                assert then[untouched].any()  # an exact step would have decayed these
                assert np.array_equal(now[untouched], then[untouched])
    finally:
        first.kill()
    again = start_paramserver(tmp_path, *args)
    try:
        with Client(again.url) as c:
            after = c.session("sync").state()
            assert after.iterations == state.iterations == 2
            assert after.sparse_updates == "lazy"
            same(after.weights, state.weights)
            for slot in state.slots:
                same(after.slots[slot], state.slots[slot])
    finally:
        again.stop()
