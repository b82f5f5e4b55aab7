"""Keras 2.2.4 constraints of a session, against a real server: given at creation
(``"constraints"``), applied after every step, shown in the summary, carried by the state,
the snapshots and the journal; invalid ones refused with 422 ``invalid_constraint``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import messages
from paramserver.constraints import MaxNorm, MinMaxNorm, NonNeg, UnitNorm
from paramserver.server.training import KerasTrainer
from tests.harness.http_api import MSGPACK, get_state
from tests.harness.servers import start_paramserver

WEIGHTS = {
    "dense/kernel": np.linspace(-2, 2, 12, dtype=np.float32).reshape(4, 3),
    "dense/bias": np.array([0.5, -0.5, 0.1], np.float32),
}
CONSTRAINTS = {"dense/kernel": MinMaxNorm(0.5, 1.0, rate=0.5), "dense/bias": NonNeg()}


def create(api: httpx.Client, constraints: Any, optimizer: Any = "adam", **extra: Any):
    body = messages.wire.pack(
        {
            "optimizer": messages.optimizers.get(optimizer).to_dict(),
            "weights": WEIGHTS,
            "constraints": constraints,
            **extra,
        }
    )
    return api.post("/sessions", content=body, headers=MSGPACK)


def grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in WEIGHTS.items()}


def push(api: httpx.Client, sid: str, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    r = api.post(f"/sessions/{sid}/gradients", content=messages.encode_push(g), headers=MSGPACK)
    assert r.status_code == 200, r.text
    _, weights = messages.decode_weights(r.content)
    assert weights is not None
    return weights


def test_constraints_apply_after_every_step_and_show_in_the_summary(api):
    wire_form = {name: c.to_dict() for name, c in CONSTRAINTS.items()}
    r = create(api, wire_form)
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    assert r.json()["constraints"] == {
        "dense/kernel": {
            "class_name": "MinMaxNorm",
            "config": {"min_value": 0.5, "max_value": 1.0, "rate": 0.5, "axis": 0},
        },
        "dense/bias": {"class_name": "NonNeg", "config": {}},
    }
    assert api.get(f"/sessions/{sid}").json()["constraints"] == r.json()["constraints"]
    local = KerasTrainer(messages.optimizers.get("adam"), WEIGHTS, constraints=CONSTRAINTS)
    for step in range(5):
        g = grads(step)
        ours = push(api, sid, g)
        local.apply(local.check_gradients(g))
        for name in WEIGHTS:
            assert ours[name].tobytes() == local.weights()[name].tobytes(), name
    assert (ours["dense/bias"] >= 0).all()
    norms = np.sqrt(np.sum(np.square(ours["dense/kernel"]), axis=0))
    assert (norms < 1.3).all()  # moved half-way into [0.5, 1] each step


def test_a_session_without_constraints_shows_none(api):
    r = create(api, {})
    assert r.status_code == 201 and r.json()["constraints"] == {}


def test_a_json_create_takes_constraints_by_name_and_alias(api):
    r = api.post(
        "/sessions",
        json={
            "optimizer": "sgd",
            "weights": {"w": {"dtype": "float32", "shape": [2, 2], "data": [3, 4, 0, 0]}},
            "constraints": {"w": {"class_name": "max_norm", "config": {"max_value": 1}}},
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["constraints"]["w"] == {
        "class_name": "MaxNorm",
        "config": {"max_value": 1, "axis": 0},
    }


@pytest.mark.parametrize(
    "constraints",
    [
        {"dense/kernel": {"class_name": "L1L2"}},
        {"dense/kernel": {"class_name": "MaxNorm", "config": {"m": 2}}},
        {"dense/kernel": {"class_name": "MaxNorm", "config": {"max_value": "big"}}},
        {"dense/kernel": {"class_name": "MaxNorm", "config": {"max_value": float("nan")}}},
        {"dense/kernel": {"class_name": "UnitNorm", "config": {"axis": 2}}},
        {"dense/kernel": {"class_name": "UnitNorm", "config": {"axis": [0, 0]}}},
        {"dense/kernel": {"class_name": "UnitNorm", "config": {"axis": []}}},
        {"dense/kernel": {"class_name": "UnitNorm", "config": {"axis": 1.5}}},
        {"dense/bias": {"class_name": "MaxNorm", "config": {"axis": -2}}},
        {"missing": {"class_name": "NonNeg"}},
        {"dense/kernel": {"class_name": "NonNeg", "extra": 1}},
        {"dense/kernel": 3},
        [],
    ],
)
def test_an_invalid_constraint_is_refused_and_creates_nothing(api, constraints):
    before = len(api.get("/sessions").json()["sessions"])
    r = create(api, constraints)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_constraint"
    assert len(api.get("/sessions").json()["sessions"]) == before


def test_a_tfoptimizer_session_refuses_constraints(api):
    tf_opt = {
        "class_name": "TFOptimizer",
        "config": {"optimizer": {"class_name": "AdamOptimizer", "config": {}}},
    }
    body = messages.wire.pack(
        {"optimizer": tf_opt, "weights": WEIGHTS, "constraints": {"dense/bias": "NonNeg"}}
    )
    r = api.post("/sessions", content=body, headers=MSGPACK)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_constraint"
    assert "TFOptimizer" in r.json()["error"]["message"]


def test_the_state_carries_the_constraints(api):
    sid = create(api, {"dense/kernel": UnitNorm().to_dict()}).json()["session_id"]
    push(api, sid, grads(1))
    state = api.get(f"/sessions/{sid}/state").content
    decoded = messages.decode_state(state, messages.ANSWER_LIMITS)
    assert decoded.constraints == {"dense/kernel": UnitNorm()}
    copy = api.put(f"/sessions/{sid}-copy/state", content=state, headers=MSGPACK)
    assert copy.status_code == 201 and copy.json()["constraints"]["dense/kernel"]["class_name"]
    a, b = push(api, sid, grads(2)), push(api, f"{sid}-copy", grads(2))
    assert all(a[n].tobytes() == b[n].tobytes() for n in WEIGHTS)
    norms = np.sqrt(np.sum(np.square(a["dense/kernel"]), axis=0))
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_constraints_survive_the_journal_and_snapshots(tmp_path: Path):
    srv = start_paramserver(
        tmp_path, "--snapshot-dir", str(tmp_path / "data"), "--durability", "journal"
    )
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as api:
            r = create(api, {"dense/kernel": MaxNorm(0.5, axis=1).to_dict()}, session_id="c")
            assert r.status_code == 201, r.text
            for step in range(3):
                push(api, "c", grads(step))
        saved = get_state(srv.url, "c")
    finally:
        srv.kill()
    again = start_paramserver(
        tmp_path, "--snapshot-dir", str(tmp_path / "data"), "--durability", "journal"
    )
    try:
        assert get_state(again.url, "c") == saved
        with httpx.Client(base_url=again.url, timeout=30) as api:
            summary = api.get("/sessions/c").json()
            assert summary["constraints"]["dense/kernel"]["config"] == {"max_value": 0.5, "axis": 1}
            after = push(api, "c", grads(9))
        norms = np.sqrt(np.sum(np.square(after["dense/kernel"]), axis=1))
        assert (norms <= 0.5 + 1e-6).all()
    finally:
        again.stop()


def test_a_huge_json_number_in_a_constraint_is_422_not_500(api):
    body = (
        '{"optimizer": "sgd", "weights": {"k": {"dtype": "float32", "shape": [2], "data": [1, 2]}},'
        ' "constraints": {"k": {"class_name": "MaxNorm", "config": {"max_value": '
        + "9" * 400
        + "}}}}"
    )
    r = api.post("/sessions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_constraint"
