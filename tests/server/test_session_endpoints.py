"""Every endpoint of the service on its happy path, over real HTTP with raw msgpack bodies.

A real uvicorn server runs on a free loopback port (``tests/conftest.py``); bodies are built
with the reference ``msgpack`` package, not with our client or codec, so these tests check the
wire format as a third party would speak it. Trajectories are compared bit for bit with the
engine used directly (``paramserver.server.optim.KerasOptimizer``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from paramserver.server.optim import KerasOptimizer

from paramserver.optimizers import get as get_optimizer

MSGPACK = "application/msgpack"

# Keras 2.2.4's arguments and defaults (Nadam's schedule_decay is the project's documented 0.001).
DEFAULT_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {"lr": 0.01, "momentum": 0.0, "decay": 0.0, "nesterov": False}),
    "rmsprop": ("RMSprop", {"lr": 0.001, "rho": 0.9, "epsilon": 1e-07, "decay": 0.0}),
    "adagrad": ("Adagrad", {"lr": 0.01, "epsilon": 1e-07, "decay": 0.0}),
    "adadelta": ("Adadelta", {"lr": 1.0, "rho": 0.95, "epsilon": 1e-07, "decay": 0.0}),
    "adam": (
        "Adam",
        {
            "lr": 0.001,
            "beta_1": 0.9,
            "beta_2": 0.999,
            "epsilon": 1e-07,
            "decay": 0.0,
            "amsgrad": False,
        },
    ),
    "adamax": (
        "Adamax",
        {"lr": 0.002, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "decay": 0.0},
    ),
    "nadam": (
        "Nadam",
        {"lr": 0.002, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "schedule_decay": 0.001},
    ),
}


# --- helpers: raw msgpack, no client library ------------------------------------------------


def tensor(a: Any) -> dict[str, Any]:
    """A protocol tensor map for an array: little-endian C-order bytes in ``data``."""
    a = np.asarray(a)
    little = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": little.tobytes(order="C")}


def array(t: Mapping[str, Any]) -> np.ndarray:
    assert set(t) == {"dtype", "shape", "data"}
    dtype = np.dtype(t["dtype"]).newbyteorder("<")
    return np.frombuffer(t["data"], dtype=dtype).reshape(t["shape"])


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_response(r: httpx.Response) -> Any:
    assert r.headers["content-type"].split(";")[0] == MSGPACK, r.text
    return msgpack.unpackb(r.content, raw=False, strict_map_key=True)


def new_id(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create(
    http: httpx.Client,
    optimizer: Any,
    weights: Mapping[str, np.ndarray],
    *,
    session_id: str | None = None,
    content_type: str = MSGPACK,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "optimizer": optimizer,
        "weights": {n: tensor(w) for n, w in weights.items()},
    }
    if session_id is not None:
        body["session_id"] = session_id
    r = http.post("/sessions", content=packb(body), headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/json")
    summary: dict[str, Any] = r.json()
    return summary


def push(
    http: httpx.Client,
    session_id: str,
    grads: Mapping[str, np.ndarray],
    *,
    content_type: str = MSGPACK,
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    body = packb({"gradients": {n: tensor(g) for n, g in grads.items()}})
    r = http.post(
        f"/sessions/{session_id}/gradients",
        content=body,
        headers={"Content-Type": content_type},
        params=params,
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = unpack_response(r)
    return out


def weights_of(message: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {n: array(t) for n, t in message["weights"].items()}


def get_weights(http: httpx.Client, session_id: str) -> tuple[int, dict[str, np.ndarray]]:
    r = http.get(f"/sessions/{session_id}/weights")
    assert r.status_code == 200, r.text
    msg = unpack_response(r)
    assert set(msg) == {"iterations", "weights"}
    return msg["iterations"], weights_of(msg)


def get_state(http: httpx.Client, session_id: str) -> tuple[bytes, dict[str, Any]]:
    r = http.get(f"/sessions/{session_id}/state")
    assert r.status_code == 200, r.text
    return r.content, unpack_response(r)


def assert_bitwise_equal(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), (name, got[name], want[name])


def model(seed: int = 0, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "dense/kernel": rng.standard_normal((3, 4)).astype(dtype),
        "dense/bias": rng.standard_normal(4).astype(dtype),
        "scale": np.asarray(rng.standard_normal(), dtype=dtype),  # a 0-d parameter
    }


def gradient_sequence(
    weights: Mapping[str, np.ndarray], steps: int, seed: int = 1, dtype: Any = None
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            n: np.asarray(rng.standard_normal(w.shape), dtype=dtype or w.dtype)
            for n, w in weights.items()
        }
        for _ in range(steps)
    ]


def engine_trajectory(
    optimizer: Any, weights: Mapping[str, np.ndarray], grads: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """The weights after each step when the engine runs in this process, without HTTP."""
    params = {n: np.array(w, copy=True) for n, w in weights.items()}
    engine = KerasOptimizer(get_optimizer(optimizer), params)
    out = []
    for g in grads:
        engine.step(params, g)
        out.append({n: p.copy() for n, p in params.items()})
    assert engine.iterations == len(grads)
    return out


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


# --- health ---------------------------------------------------------------------------------


def test_health(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


# --- create ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEFAULT_CONFIGS))
def test_create_by_name_fills_in_every_default(http: httpx.Client, name: str) -> None:
    sid = new_id()
    weights = model()
    summary = create(http, name, weights, session_id=sid)
    class_name, config = DEFAULT_CONFIGS[name]
    assert summary == {
        "session_id": sid,
        "optimizer": {"class_name": class_name, "config": config},
        "iterations": 0,
        "parameters": {
            "dense/kernel": {"dtype": "float32", "shape": [3, 4]},
            "dense/bias": {"dtype": "float32", "shape": [4]},
            "scale": {"dtype": "float32", "shape": []},
        },
    }
    iterations, got = get_weights(http, sid)
    assert iterations == 0
    assert_bitwise_equal(got, weights)


def test_create_names_are_case_insensitive_and_configs_partial(http: httpx.Client) -> None:
    summary = create(http, "ADAM", model())
    assert summary["optimizer"]["class_name"] == "Adam"
    partial = {"class_name": "sgd", "config": {"momentum": 0.5, "nesterov": True}}
    summary = create(http, partial, model())
    assert summary["optimizer"] == {
        "class_name": "SGD",
        "config": {"lr": 0.01, "momentum": 0.5, "decay": 0.0, "nesterov": True},
    }
    summary = create(http, {"class_name": "Adam", "config": {"clipnorm": 1.0}}, model())
    assert summary["optimizer"]["config"]["clipnorm"] == 1.0
    assert summary["optimizer"]["config"]["lr"] == 0.001


def test_create_with_json(http: httpx.Client) -> None:
    sid = new_id()
    body = {
        "session_id": sid,
        "optimizer": {"class_name": "SGD", "config": {"lr": 0.5}},
        "weights": {
            "w": {"dtype": "float32", "shape": [2, 3], "data": [1, 2.5, -3, 0.1, 1e-3, 7]},
            "d": {"dtype": "float64", "shape": [2], "data": [0.1, -1e300]},
            "h": {"dtype": "float16", "shape": [], "data": [0.5]},
        },
    }
    r = http.post("/sessions", json=body)
    assert r.status_code == 201, r.text
    assert r.json() == {
        "session_id": sid,
        "optimizer": {
            "class_name": "SGD",
            "config": {"lr": 0.5, "momentum": 0.0, "decay": 0.0, "nesterov": False},
        },
        "iterations": 0,
        "parameters": {
            "w": {"dtype": "float32", "shape": [2, 3]},
            "d": {"dtype": "float64", "shape": [2]},
            "h": {"dtype": "float16", "shape": []},
        },
    }
    iterations, got = get_weights(http, sid)
    assert iterations == 0
    assert_bitwise_equal(
        got,
        {
            "w": np.array([[1, 2.5, -3], [0.1, 1e-3, 7]], dtype=np.float32),
            "d": np.array([0.1, -1e300], dtype=np.float64),
            "h": np.array(0.5, dtype=np.float16),
        },
    )
    # JSON and msgpack sessions then train alike.
    grads = {"w": np.ones((2, 3), np.float32), "d": np.ones(2), "h": np.array(1, np.float16)}
    after = weights_of(push(http, sid, grads))
    np.testing.assert_array_equal(after["w"], got["w"] - np.float32(0.5))
    np.testing.assert_array_equal(after["h"], np.array(0.0, dtype=np.float16))


@pytest.mark.parametrize("content_type", ["application/msgpack", "application/x-msgpack"])
def test_msgpack_content_types_are_accepted_everywhere(
    http: httpx.Client, content_type: str
) -> None:
    sid = new_id()
    weights = {"w": np.arange(4, dtype=np.float32)}
    create(http, "sgd", weights, session_id=sid, content_type=content_type)
    msg = push(http, sid, {"w": np.ones(4, np.float32)}, content_type=content_type)
    assert msg["iterations"] == 1
    state, _ = get_state(http, sid)
    r = http.put(
        f"/sessions/{new_id()}/state", content=state, headers={"Content-Type": content_type}
    )
    assert r.status_code == 201, r.text


def test_generated_session_ids_are_uuid4_hex(http: httpx.Client) -> None:
    ids = set()
    for _ in range(3):
        sid = create(http, "sgd", {"w": np.zeros(2, np.float32)})["session_id"]
        assert len(sid) == 32
        assert uuid.UUID(hex=sid).hex == sid
        assert uuid.UUID(hex=sid).version == 4
        assert http.get(f"/sessions/{sid}").status_code == 200
        ids.add(sid)
    assert len(ids) == 3


@pytest.mark.parametrize("sid", ["a", "A-z_0.9", "x" * 128, "...", "-"])
def test_session_id_alphabet(http: httpx.Client, sid: str) -> None:
    sid = sid if len(sid) == 128 else f"{sid}{uuid.uuid4().hex[:6]}"
    assert create(http, "sgd", {"w": np.zeros(1, np.float32)}, session_id=sid)["session_id"] == sid
    assert http.get(f"/sessions/{sid}").json()["session_id"] == sid
    assert http.delete(f"/sessions/{sid}").status_code == 204


def test_parameter_names_may_be_any_printable_text(http: httpx.Client) -> None:
    names = ["x" * 256, "conv2d_1/kernel:0", "weights with spaces", "\u00e9\u4e2d\U0001f600", "a"]
    weights = {n: np.full(2, i, dtype=np.float32) for i, n in enumerate(names)}
    sid = new_id()
    summary = create(http, "sgd", weights, session_id=sid)
    assert list(summary["parameters"]) == names
    _, got = get_weights(http, sid)
    assert_bitwise_equal(got, weights)


# --- push -----------------------------------------------------------------------------------


def test_push_applies_one_step_and_returns_the_weights(http: httpx.Client) -> None:
    sid = new_id()
    weights = model()
    create(http, {"class_name": "SGD", "config": {"lr": 0.25}}, weights, session_id=sid)
    grads = gradient_sequence(weights, 3)
    current = weights
    for step, g in enumerate(grads, start=1):
        msg = push(http, sid, g)
        assert set(msg) == {"iterations", "weights"}
        assert msg["iterations"] == step
        want = {n: (current[n] - np.float32(0.25) * g[n]).astype(np.float32) for n in current}
        got = weights_of(msg)
        assert_bitwise_equal(got, want)
        current = want
        iterations, pulled = get_weights(http, sid)
        assert iterations == step
        assert_bitwise_equal(pulled, got)


def test_push_without_returning_weights(http: httpx.Client) -> None:
    sid = new_id()
    weights = model()
    create(http, "adam", weights, session_id=sid)
    grads = gradient_sequence(weights, 2)
    msg = push(http, sid, grads[0], params={"return_weights": "false"})
    assert msg == {"iterations": 1}
    msg = push(http, sid, grads[1], params={"return_weights": "true"})
    assert msg["iterations"] == 2
    assert_bitwise_equal(weights_of(msg), engine_trajectory("adam", weights, grads)[-1])


@pytest.mark.parametrize("param_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("grad_dtype", [np.float16, np.float32, np.float64])
def test_gradients_are_cast_to_the_parameter_dtype(
    http: httpx.Client, param_dtype: Any, grad_dtype: Any
) -> None:
    sid = new_id()
    weights = model(seed=3, dtype=param_dtype)
    summary = create(http, "adam", weights, session_id=sid)
    assert {p["dtype"] for p in summary["parameters"].values()} == {np.dtype(param_dtype).name}
    grads = gradient_sequence(weights, 3, seed=4, dtype=grad_dtype)
    # The step sees the gradient cast to the parameter's dtype, exactly as astype would.
    cast = [{n: g.astype(param_dtype) for n, g in step.items()} for step in grads]
    want = engine_trajectory("adam", weights, cast)
    for step, g in enumerate(grads):
        got = weights_of(push(http, sid, g))
        assert_bitwise_equal(got, want[step])


def test_float64_parameters_stay_float64(http: httpx.Client) -> None:
    sid = new_id()
    weights = model(seed=5, dtype=np.float64)
    summary = create(http, "nadam", weights, session_id=sid)
    assert summary["parameters"]["dense/kernel"] == {"dtype": "float64", "shape": [3, 4]}
    grads = gradient_sequence(weights, 4, seed=6)
    want = engine_trajectory("nadam", weights, grads)
    for step, g in enumerate(grads):
        msg = push(http, sid, g)
        assert {t["dtype"] for t in msg["weights"].values()} == {"float64"}
        assert_bitwise_equal(weights_of(msg), want[step])


def test_mixed_dtype_model_matches_the_engine(http: httpx.Client) -> None:
    sid = new_id()
    weights = {
        "a": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        "b": np.linspace(0, 1, 3, dtype=np.float64),
        "c": np.linspace(1, 2, 4, dtype=np.float16),
    }
    config = {"class_name": "Adam", "config": {"lr": 0.01, "amsgrad": True, "clipnorm": 0.5}}
    create(http, config, weights, session_id=sid)
    grads = gradient_sequence(weights, 4, seed=9)
    want = engine_trajectory(config, weights, grads)
    for step, g in enumerate(grads):
        assert_bitwise_equal(weights_of(push(http, sid, g)), want[step])


def test_gradients_may_come_in_any_order(http: httpx.Client) -> None:
    weights = model(seed=13)
    sid = create(http, "adam", weights)["session_id"]
    grads = gradient_sequence(weights, 2, seed=14)
    want = engine_trajectory("adam", weights, grads)
    for step, g in enumerate(grads):
        reordered = dict(reversed(list(g.items())))
        assert list(reordered) != list(weights)
        got = weights_of(push(http, sid, reordered))
        assert_bitwise_equal({n: got[n] for n in weights}, want[step])


def test_zero_size_parameters(http: httpx.Client) -> None:
    sid = new_id()
    weights = {"empty": np.zeros((0, 3), np.float32), "w": np.ones(2, np.float32)}
    create(http, "sgd", weights, session_id=sid)
    msg = push(http, sid, {"empty": np.zeros((0, 3), np.float32), "w": np.ones(2, np.float32)})
    got = weights_of(msg)
    assert got["empty"].shape == (0, 3)
    np.testing.assert_array_equal(got["w"], np.float32(1) - np.float32(0.01))


# --- trajectories: by name, by config, and the engine directly --------------------------------


@pytest.mark.parametrize("name", sorted(DEFAULT_CONFIGS))
def test_by_name_by_config_and_engine_trajectories_are_identical(
    http: httpx.Client, name: str
) -> None:
    weights = model(seed=11)
    by_name = create(http, name, weights)
    class_name, config = DEFAULT_CONFIGS[name]
    by_config = create(http, {"class_name": class_name, "config": config}, weights)
    echoed = create(http, by_name["optimizer"], weights)  # the config the server reported
    assert by_config["optimizer"] == by_name["optimizer"] == echoed["optimizer"]
    grads = gradient_sequence(weights, 5, seed=12)
    want = engine_trajectory(name, weights, grads)
    for step, g in enumerate(grads):
        for summary in (by_name, by_config, echoed):
            got = weights_of(push(http, summary["session_id"], g))
            assert_bitwise_equal(got, want[step])


NON_DEFAULT_CONFIGS = [
    {"class_name": "SGD", "config": {"lr": 0.05, "momentum": 0.9, "decay": 0.1, "nesterov": True}},
    {"class_name": "SGD", "config": {"lr": 0.1, "momentum": 0.5, "clipvalue": 0.3}},
    {"class_name": "RMSprop", "config": {"lr": 0.01, "rho": 0.8, "epsilon": 1e-4, "decay": 0.05}},
    {"class_name": "Adagrad", "config": {"lr": 0.1, "clipnorm": 0.5}},
    {"class_name": "Adadelta", "config": {"lr": 0.5, "rho": 0.9, "epsilon": None}},
    {"class_name": "Adam", "config": {"lr": 0.01, "amsgrad": True, "decay": 0.01}},
    {"class_name": "Adam", "config": {"learning_rate": 0.02, "beta_1": 0.5, "clipnorm": 1.0}},
    {"class_name": "Adamax", "config": {"lr": 0.01, "beta_2": 0.99, "clipvalue": 0.5}},
    {"class_name": "Nadam", "config": {"lr": 0.01, "schedule_decay": 0.004}},
]


@pytest.mark.parametrize(
    "config", NON_DEFAULT_CONFIGS, ids=[str(c["config"]) for c in NON_DEFAULT_CONFIGS]
)
def test_configured_sessions_follow_the_engine(http: httpx.Client, config: dict[str, Any]) -> None:
    weights = model(seed=21)
    sid = create(http, config, weights)["session_id"]
    grads = gradient_sequence(weights, 6, seed=22)
    want = engine_trajectory(config, weights, grads)
    for step, g in enumerate(grads):
        assert_bitwise_equal(weights_of(push(http, sid, g)), want[step])


# --- state export and import ------------------------------------------------------------------

STATE_CASES = {
    "adam-decay": {"class_name": "Adam", "config": {"lr": 0.01, "decay": 0.05}},
    "amsgrad": {"class_name": "Adam", "config": {"lr": 0.01, "amsgrad": True}},
    "nadam": {"class_name": "Nadam", "config": {"lr": 0.01}},
    "sgd-nesterov": {
        "class_name": "SGD",
        "config": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "decay": 0.01},
    },
    "rmsprop": "rmsprop",
    "adagrad": "adagrad",
    "adadelta": "adadelta",
    "adamax": "adamax",
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_state_export_and_import_continue_bit_for_bit(
    http: httpx.Client, case: str, dtype: Any
) -> None:
    optimizer = STATE_CASES[case]
    weights = model(seed=31, dtype=dtype)
    grads = gradient_sequence(weights, 7, seed=32)
    original = create(http, optimizer, weights)["session_id"]
    for g in grads[:3]:
        push(http, original, g)
    exported, state = get_state(http, original)
    assert set(state) == {"iterations", "optimizer", "weights", "slots", "scalars"}
    assert state["iterations"] == 3
    summary = http.get(f"/sessions/{original}").json()
    assert state["optimizer"] == summary["optimizer"]
    for per_param in state["slots"].values():
        assert set(per_param) == set(weights)
        for name, t in per_param.items():
            assert array(t).shape == weights[name].shape
            assert array(t).dtype == weights[name].dtype
    if case == "nadam":
        assert set(state["scalars"]) == {"m_schedule"}

    # Into a free id: created (201).
    fresh = new_id("fresh")
    r = http.put(f"/sessions/{fresh}/state", content=exported, headers={"Content-Type": MSGPACK})
    assert r.status_code == 201, r.text
    imported = r.json()
    assert imported["session_id"] == fresh
    assert imported["iterations"] == 3
    assert imported["optimizer"] == state["optimizer"]
    assert imported["parameters"] == summary["parameters"]
    assert {"created_at", "updated_at"} <= set(imported)

    # Into a taken id whose session is entirely different: replaced (200).
    taken = create(http, "sgd", {"other": np.zeros(5, np.float16)})["session_id"]
    push(http, taken, {"other": np.ones(5, np.float16)})
    r = http.put(f"/sessions/{taken}/state", content=exported, headers={"Content-Type": MSGPACK})
    assert r.status_code == 200, r.text
    assert r.json()["session_id"] == taken
    assert r.json()["iterations"] == 3
    assert r.json()["parameters"] == summary["parameters"]

    # The imported state is exactly the exported one...
    for sid in (fresh, taken):
        assert get_state(http, sid)[1] == state
    # ... and all three continue identically, step after step.
    want = engine_trajectory(optimizer, weights, grads)
    for step, g in enumerate(grads[3:], start=3):
        answers = [push(http, sid, g) for sid in (original, fresh, taken)]
        for msg in answers:
            assert msg["iterations"] == step + 1
            assert_bitwise_equal(weights_of(msg), want[step])
    final = [get_state(http, sid)[1] for sid in (original, fresh, taken)]
    assert final[0] == final[1] == final[2]


def test_state_round_trip_is_idempotent(http: httpx.Client) -> None:
    weights = model(seed=41)
    sid = create(http, "nadam", weights)["session_id"]
    for g in gradient_sequence(weights, 2, seed=42):
        push(http, sid, g)
    exported, state = get_state(http, sid)
    r = http.put(f"/sessions/{sid}/state", content=exported, headers={"Content-Type": MSGPACK})
    assert r.status_code == 200, r.text
    assert get_state(http, sid)[1] == state


# --- list, summary, delete ------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    assert when.utcoffset() == timedelta(0), f"{text} is not UTC"
    return when


def test_list_and_summaries(server_factory: Callable[..., Any]) -> None:
    srv = server_factory()
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.get("/sessions")
        assert r.status_code == 200
        assert r.json() == {"sessions": []}

        before = datetime.now(timezone.utc)
        a = create(http, "adam", model(), session_id="a")
        b = create(http, "sgd", {"w": np.zeros(3, np.float64)}, session_id="b")
        after = datetime.now(timezone.utc)

        listed = http.get("/sessions").json()["sessions"]
        assert sorted(s["session_id"] for s in listed) == ["a", "b"]
        for created in (a, b):
            summary = http.get(f"/sessions/{created['session_id']}").json()
            assert set(summary) == set(created) | {"created_at", "updated_at"}
            assert {k: summary[k] for k in created} == created
            assert summary in listed
            created_at = parse_time(summary["created_at"])
            assert before - timedelta(seconds=1) <= created_at <= after + timedelta(seconds=1)
            assert parse_time(summary["updated_at"]) == created_at

        first = http.get("/sessions/b").json()
        push(http, "b", {"w": np.ones(3)})
        second = http.get("/sessions/b").json()
        assert second["iterations"] == 1
        assert second["created_at"] == first["created_at"]
        assert parse_time(second["updated_at"]) > parse_time(first["updated_at"])
        assert {
            s["session_id"]: s["iterations"] for s in http.get("/sessions").json()["sessions"]
        } == {
            "a": 0,
            "b": 1,
        }
        # Reading does not touch a session.
        get_weights(http, "b")
        get_state(http, "b")
        assert http.get("/sessions/b").json() == second


def test_delete_then_404_everywhere_and_the_id_is_free_again(http: httpx.Client) -> None:
    sid = new_id()
    create(http, "adam", model(), session_id=sid)
    push(http, sid, gradient_sequence(model(), 1)[0])
    r = http.delete(f"/sessions/{sid}")
    assert r.status_code == 204
    assert r.content == b""
    grads = packb(
        {"gradients": {n: tensor(g) for n, g in gradient_sequence(model(), 1)[0].items()}}
    )
    for method, path, kwargs in [
        ("GET", f"/sessions/{sid}", {}),
        ("GET", f"/sessions/{sid}/weights", {}),
        ("GET", f"/sessions/{sid}/state", {}),
        (
            "POST",
            f"/sessions/{sid}/gradients",
            {"content": grads, "headers": {"Content-Type": MSGPACK}},
        ),
        ("DELETE", f"/sessions/{sid}", {}),
    ]:
        r = http.request(method, path, **kwargs)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "session_not_found"
    assert sid not in [s["session_id"] for s in http.get("/sessions").json()["sessions"]]
    again = create(http, "sgd", {"w": np.zeros(2, np.float32)}, session_id=sid)
    assert again["iterations"] == 0
    assert again["optimizer"]["class_name"] == "SGD"
