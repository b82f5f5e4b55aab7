"""The server's side of a sharded session (``paramserver.sharding``), against a real server:
a shard's session records which part it is; each part of a push carries the whole push's sum
of squares, and clipnorm clips with it, so two shards give the single server's bits; the
combinations a shard cannot do exactly are refused at creation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import messages, reductions
from paramserver.sharding import Shard, decode_shard
from tests.harness.http_api import MSGPACK, get_state
from tests.harness.servers import start_paramserver
from tests.server.test_dataplane import Frames, _body, _plane_port, _push_header, _weights

LAYOUT = "0123456789abcdef"
WEIGHTS = {
    "dense/kernel": np.linspace(-1, 1, 300, dtype=np.float32).reshape(20, 15),
    "dense/bias": np.linspace(0, 1, 15, dtype=np.float32),
    "out/kernel": np.linspace(1, -1, 45, dtype=np.float32).reshape(15, 3),
}
PARTS = ({"dense/kernel"}, {"dense/bias", "out/kernel"})


def create(api: httpx.Client, weights: dict[str, Any], optimizer: Any, **extra: Any):
    body = messages.wire.pack(
        {"optimizer": messages.optimizers.get(optimizer).to_dict(), "weights": weights, **extra}
    )
    return api.post("/sessions", content=body, headers=MSGPACK)


def shard_of(i: int) -> dict[str, Any]:
    return {"index": i, "count": 2, "layout": LAYOUT}


def grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {k: (rng.standard_normal(v.shape) * 3).astype(np.float32) for k, v in WEIGHTS.items()}


def push(api: httpx.Client, sid: str, g: dict[str, np.ndarray], squares: float | None = None):
    body = messages.encode_push(g, None, squares)
    r = api.post(f"/sessions/{sid}/gradients", content=body, headers=MSGPACK)
    assert r.status_code == 200, r.text
    _, weights = messages.decode_weights(r.content)
    assert weights is not None
    return weights


@pytest.mark.parametrize(
    "optimizer",
    [
        {"class_name": "SGD", "config": {"momentum": 0.9, "clipnorm": 2.0}},
        {"class_name": "Adam", "config": {"clipnorm": 5.0, "clipvalue": 0.5}},
        {"class_name": "Nadam", "config": {"clipnorm": 1.0}},
    ],
    ids=["sgd", "adam-clipvalue", "nadam"],
)
def test_two_shards_give_the_single_servers_bits_with_clipnorm(api, optimizer):
    whole = create(api, WEIGHTS, optimizer).json()["session_id"]
    shards = []
    for i, names in enumerate(PARTS):
        part = {k: WEIGHTS[k] for k in WEIGHTS if k in names}
        r = create(api, part, optimizer, shard=shard_of(i))
        assert r.status_code == 201, r.text
        assert r.json()["shard"] == shard_of(i)
        shards.append(r.json()["session_id"])
    for step in range(6):
        g = grads(step)
        expected = push(api, whole, g)
        squares = reductions.push_sum_squares(g[k] for k in WEIGHTS)  # the session's order
        got: dict[str, np.ndarray] = {}
        for sid, names in zip(shards, PARTS, strict=True):
            got.update(push(api, sid, {k: g[k] for k in g if k in names}, squares))
        for name in WEIGHTS:
            assert got[name].tobytes() == expected[name].tobytes(), (step, name)
    # without the sum, a shard clips with its own part's norm: not the single server's step
    g = grads(99)
    expected = push(api, whole, g)
    alone = push(api, shards[0], {k: g[k] for k in g if k in PARTS[0]})
    assert alone["dense/kernel"].tobytes() != expected["dense/kernel"].tobytes()


def test_the_data_plane_carries_sum_squares(server, api):
    optimizer = {"class_name": "SGD", "config": {"clipnorm": 1.0}}
    whole = create(api, WEIGHTS, optimizer).json()["session_id"]
    part = {k: WEIGHTS[k] for k in PARTS[0]}
    shard = create(api, part, optimizer, shard=shard_of(0)).json()["session_id"]
    g = grads(3)
    expected = push(api, whole, g)
    squares = reductions.push_sum_squares(g[k] for k in WEIGHTS)
    plane = Frames(_plane_port(server))
    try:
        assert plane.call({"op": "hello", "version": 1})[0]["status"] == 200
        sent = {k: g[k] for k in PARTS[0]}
        head, body = plane.call(_push_header(shard, sent, sum_squares=squares), _body(sent))
        assert head["status"] == 200, head
        assert _weights(head, body)["dense/kernel"].tobytes() == expected["dense/kernel"].tobytes()
        head, _ = plane.call(_push_header(shard, sent, sum_squares=-1.0), _body(sent))
        assert head["status"] == 422 and head["error"]["code"] == "invalid_request"
    finally:
        plane.close()


@pytest.mark.parametrize(
    ("extra", "optimizer", "code"),
    [
        ({"shard": {"index": 2, "count": 2, "layout": LAYOUT}}, "sgd", "invalid_request"),
        ({"shard": {"index": 0, "count": 0, "layout": LAYOUT}}, "sgd", "invalid_request"),
        ({"shard": {"index": 0, "count": 2, "layout": "XYZ"}}, "sgd", "invalid_request"),
        ({"shard": {"index": 0, "count": 2}}, "sgd", "invalid_request"),
        ({"shard": {"index": True, "count": 2, "layout": LAYOUT}}, "sgd", "invalid_request"),
        (
            {
                "shard": shard_of(0),
                "training": {"mode": "sync", "replicas_to_aggregate": 2, "total_num_replicas": 3},
            },
            "sgd",
            "invalid_training",
        ),
        (
            {"shard": shard_of(0), "training": {"mode": "sync", "replicas_to_aggregate": 2}},
            {"class_name": "SGD", "config": {"clipnorm": 1.0}},
            "invalid_training",
        ),
        (
            {"shard": shard_of(0)},
            {
                "class_name": "TFOptimizer",
                "config": {"optimizer": {"class_name": "Adam", "config": {"global_clipnorm": 1.0}}},
            },
            "invalid_optimizer",
        ),
    ],
    ids=[
        "index-out-of-range",
        "no-shards",
        "layout-not-hex",
        "no-layout",
        "bool-index",
        "sync-with-backups",
        "sync-with-clipnorm",
        "tf-global-clipnorm",
    ],
)
def test_what_a_shard_cannot_do_exactly_is_refused(api, extra, optimizer, code):
    r = create(api, {"w": np.zeros(3, np.float32)}, optimizer, **extra)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code


def test_sync_rounds_without_backups_and_clipnorm_are_allowed_on_a_shard(api):
    training = {"mode": "sync", "replicas_to_aggregate": 2}
    r = create(api, {"w": np.zeros(3, np.float32)}, "adam", shard=shard_of(1), training=training)
    assert r.status_code == 201 and r.json()["training"]["mode"] == "sync"


def test_sum_squares_only_where_it_means_something(api):
    g = {"w": np.ones(3, np.float32)}
    for extra, optimizer in (
        ({}, {"class_name": "SGD", "config": {"clipnorm": 1.0}}),  # not a shard
        ({"shard": shard_of(0)}, "sgd"),  # no clipnorm
    ):
        sid = create(api, {"w": np.zeros(3, np.float32)}, optimizer, **extra).json()["session_id"]
        r = api.post(
            f"/sessions/{sid}/gradients",
            content=messages.encode_push(g, None, 3.0),
            headers=MSGPACK,
        )
        assert r.status_code == 422 and "sum_squares" in r.json()["error"]["message"]
        assert api.get(f"/sessions/{sid}").json()["iterations"] == 0
    for bad in (-1.0, float("nan"), "3", True):
        body = messages.wire.pack({"gradients": g, "sum_squares": bad})
        r = api.post(f"/sessions/{sid}/gradients", content=body, headers=MSGPACK)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_the_shard_survives_state_export_import_and_the_journal(api, tmp_path: Path):
    r = create(api, {"w": np.zeros(3, np.float32)}, "sgd", shard=shard_of(1))
    sid = r.json()["session_id"]
    state = api.get(f"/sessions/{sid}/state").content
    assert messages.decode_state(state, messages.ANSWER_LIMITS).shard == Shard(1, 2, LAYOUT)
    copy = api.put(f"/sessions/{sid}-copy/state", content=state, headers=MSGPACK)
    assert copy.status_code == 201 and copy.json()["shard"] == shard_of(1)
    assert "shard" not in create(api, {"w": np.zeros(3, np.float32)}, "sgd").json()

    optimizer = {"class_name": "SGD", "config": {"clipnorm": 0.5}}
    args = ("--snapshot-dir", str(tmp_path / "data"), "--durability", "journal")
    srv = start_paramserver(tmp_path, *args)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as other:
            part = {k: WEIGHTS[k] for k in PARTS[0]}
            assert (
                create(other, part, optimizer, session_id="s", shard=shard_of(0)).status_code == 201
            )
            for step in range(3):
                g = grads(step)
                push(other, "s", {k: g[k] for k in PARTS[0]}, 1e4 * (step + 1))
        saved = get_state(srv.url, "s")
    finally:
        srv.kill()
    again = start_paramserver(tmp_path, *args)
    try:
        assert get_state(again.url, "s") == saved  # replayed with each push's sum_squares
        assert httpx.get(f"{again.url}/sessions/s", timeout=30).json()["shard"] == shard_of(0)
    finally:
        again.stop()


def _parts(**rows: Any) -> dict[str, Any]:
    """A shard record with parts for WEIGHTS' "dense/kernel" (20 x 15) and "dense/bias"."""
    return {
        **shard_of(0),
        "parts": {
            "dense/kernel": {"source": "dense/kernel", "position": 0, **rows},
            "dense/bias": {"source": "dense/bias", "position": 1},
        },
    }


def _twice(kernel: dict[str, Any], bias: dict[str, Any]) -> dict[str, Any]:
    return {**shard_of(0), "parts": {"dense/kernel": kernel, "dense/bias": bias}}


def test_a_shards_parts_are_checked_against_its_parameters(api):
    part = {k: WEIGHTS[k] for k in ("dense/kernel", "dense/bias")}
    r = create(api, part, "adam", shard=_parts(rows=[40, 60]))  # 20 rows of a larger tensor
    assert r.status_code == 201, r.text
    assert r.json()["shard"]["parts"]["dense/kernel"] == {
        "source": "dense/kernel",
        "position": 0,
        "rows": [40, 60],
    }
    state = api.get(f"/sessions/{r.json()['session_id']}/state").content
    assert messages.decode_state(state, messages.ANSWER_LIMITS).shard == decode_shard(
        _parts(rows=[40, 60])
    )
    tf_adam = {"class_name": "TFOptimizer", "config": {"optimizer": {"class_name": "Adam"}}}
    for shard, optimizer, needle in (
        (_parts(rows=[0, 19]), "adam", "shape [20, 15]"),  # 19 rows for a 20-row parameter
        (
            {**shard_of(0), "parts": {"dense/kernel": {"source": "x", "position": 0}}},
            "adam",
            "order",
        ),
        (_parts(rows=[5, 5]), "adam", "start < stop"),
        (_parts(rows=[0, 20], extra=1), "adam", "source"),
        ({**shard_of(0), "parts": []}, "adam", "non-empty map"),
        (_parts(rows=[0, 20]), tf_adam, "cannot be split"),
        # two parts claiming one source: whole twice, overlapping slices, a position twice
        (_twice({"source": "a", "position": 0}, {"source": "a", "position": 0}), "adam", "holds"),
        (
            _twice(
                {"source": "a", "position": 0, "rows": [0, 20]},
                {"source": "a", "position": 0, "rows": [10, 13]},
            ),
            "adam",
            "holds already",
        ),
        (_twice({"source": "a", "position": 0}, {"source": "b", "position": 0}), "adam", "'a''s"),
        (
            _twice(
                {"source": "a", "position": 0, "rows": [0, 20]},
                {"source": "a", "position": 1, "rows": [20, 23]},
            ),
            "adam",
            "is at 0",
        ),
    ):
        r = create(api, part, optimizer, shard=shard)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_request"
        assert needle in r.json()["error"]["message"], r.json()


def test_round_order_is_a_hex_key(api):
    training = {"mode": "sync", "replicas_to_aggregate": 2}
    sid = create(api, {"w": np.zeros(3, np.float32)}, "sgd", training=training).json()["session_id"]
    g = {"w": np.ones(3, np.float32)}
    for bad in ("XYZ", "", "a" * 129, 12, b"\x01"):
        body = messages.wire.pack({"gradients": g, "base_iterations": 0, "round_order": bad})
        r = api.post(f"/sessions/{sid}/gradients", content=body, headers=MSGPACK)
        assert r.status_code == 422 and "round_order" in r.json()["error"]["message"]
    assert api.get(f"/sessions/{sid}").json()["round"]["received"] == 0


def test_a_sync_round_sums_in_the_order_of_its_pushes_round_order(api):
    """Three gradients whose float64 sum depends on its order ((1e20 + 1) - 1e20 is 0,
    (1e20 - 1e20) + 1 is 1): the round orders them by round_order, whatever their digests."""
    training = {"mode": "sync", "replicas_to_aggregate": 3}
    values = [np.float32(1e20), np.float32(1.0), np.float32(-1e20)]
    results = []
    for orders in (["01", "02", "03"], ["01", "03", "02"]):
        sid = create(
            api,
            {"w": np.zeros(1, np.float32)},
            {"class_name": "SGD", "config": {"lr": 1.0}},
            training=training,
        ).json()["session_id"]
        answers: list[Any] = [None] * 3

        def send(
            i: int, sid: str = sid, orders: list[str] = orders, out: list[Any] = answers
        ) -> None:
            body = messages.encode_push({"w": np.array([values[i]])}, 0, None, orders[i])
            out[i] = api.post(
                f"/sessions/{sid}/gradients", content=body, headers=MSGPACK, timeout=60
            )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        _, weights = messages.decode_weights(answers[0].content)
        results.append(float(weights["w"][0]))
    # 1e20, 1, -1e20 in that order: 0; 1e20, -1e20, 1: 1 (mean -1/3, so w = -1/3 after SGD lr 1)
    assert results[0] == 0.0 and results[1] == pytest.approx(-1 / 3)


def test_a_sum_of_squares_that_overflows_is_refused_on_every_shard(api):
    """One server refuses float64 gradients whose global norm overflows (422
    non_finite_gradient); a shard told the whole push's sum is inf refuses it the same way,
    so no shard applies what one server would not (found in review)."""
    sid = create(
        api,
        {"w": np.zeros(2, np.float64)},
        {"class_name": "SGD", "config": {"momentum": 0.9, "clipnorm": 1.0}},
        shard=shard_of(0),
    ).json()["session_id"]
    body = messages.encode_push({"w": np.full(2, 1.2e154)}, None, float("inf"))
    r = api.post(f"/sessions/{sid}/gradients", content=body, headers=MSGPACK)
    assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite_gradient", r.text
    assert api.get(f"/sessions/{sid}").json()["iterations"] == 0
