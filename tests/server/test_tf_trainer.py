"""TFOptimizer sessions: a native TensorFlow optimizer as a session's update rule.

A session's trajectory over 20 pushes must equal what the same TensorFlow optimizer gives when
the test applies it directly to ``tf.Variable``s (eagerly), to float32 tolerance; an exported
state imported mid-run must continue bit for bit; unknown names and bad arguments get 422;
importing the app never imports TensorFlow (and a server that cannot import it answers how to
install it: ``tests/system/test_server_without_tensorflow.py``).

CI installs the ``tensorflow`` extra and sets ``CI=true``: there the TensorFlow tests fail
loudly when TensorFlow is missing. Elsewhere they are skipped without it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import optimizers, wire
from tests.harness import http_api
from tests.harness.http_api import (
    arrays,
    assert_error,
    get_state,
    post_session,
    push,
    put_state,
    unpackb,
)
from tests.harness.optional import import_or_skip

pytestmark = pytest.mark.tensorflow

STEPS = 20
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tf() -> Any:
    return import_or_skip("tensorflow")  # under CI a missing TensorFlow fails instead


# --- talking to the server --------------------------------------------------------------------


def create(
    api: httpx.Client,
    optimizer: optimizers.Optimizer,
    weights: dict[str, np.ndarray],
    session_id: str,
) -> httpx.Response:
    return post_session(api, optimizer.to_dict(), weights, session_id=session_id)


def pushed(
    api: httpx.Client, session_id: str, grads: dict[str, np.ndarray]
) -> tuple[int, dict[str, np.ndarray]]:
    """Push and return ``(iterations, weights)`` from the answer."""
    answer = http_api.pushed(api, session_id, grads)
    return answer["iterations"], arrays(answer["weights"])


def decode_state(body: bytes) -> dict[str, Any]:
    obj = unpackb(body)
    return {
        "iterations": obj["iterations"],
        "optimizer": obj["optimizer"],
        "weights": arrays(obj["weights"]),
        "slots": {s: arrays(per) for s, per in obj["slots"].items()},
        "scalars": obj["scalars"],
    }


# --- models and gradients ---------------------------------------------------------------------


def initial_weights(seed: int, *, float64_bias: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "dense/kernel": rng.standard_normal((5, 4)).astype(np.float32),
        "dense/bias": rng.standard_normal(4).astype(np.float64 if float64_bias else np.float32),
        "embedding": rng.standard_normal((3, 2, 2)).astype(np.float32),
    }


def gradient_stream(
    seed: int, weights: dict[str, np.ndarray], n: int
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {k: (0.5 * rng.standard_normal(w.shape)).astype(w.dtype) for k, w in weights.items()}
        for _ in range(n)
    ]


class Reference:
    """The same TensorFlow optimizer applied eagerly to ``tf.Variable``s in this process."""

    def __init__(self, tf: Any, optimizer: Any, weights: dict[str, np.ndarray]) -> None:
        self.tf = tf
        self.optimizer = optimizer
        self.variables = {k: tf.Variable(w) for k, w in weights.items()}

    def step(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = [(self.tf.constant(grads[k]), v) for k, v in self.variables.items()]
        self.optimizer.apply_gradients(pairs)
        return {k: v.numpy() for k, v in self.variables.items()}


def assert_float32_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        np.testing.assert_allclose(actual[name], value, rtol=2e-6, atol=2e-6, err_msg=name)


# Each case: (the session's TFOptimizer, a fresh native optimizer for the reference, whether the
# model has a float64 parameter). The tf.keras cases build the config from an instance, as a
# worker with TensorFlow would.
Case = Callable[[Any], tuple[optimizers.TFOptimizer, Any, bool]]


def _adam_v1(tf: Any) -> tuple[optimizers.TFOptimizer, Any, bool]:
    args = {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6}
    return (
        optimizers.TFOptimizer("AdamOptimizer", **args),
        tf.compat.v1.train.AdamOptimizer(**args),
        False,
    )


def _momentum_nesterov_v1(tf: Any) -> tuple[optimizers.TFOptimizer, Any, bool]:
    args = {"learning_rate": 0.05, "momentum": 0.9, "use_nesterov": True}
    return (
        optimizers.TFOptimizer("MomentumOptimizer", **args),
        tf.compat.v1.train.MomentumOptimizer(**args),
        True,
    )


def _ftrl_v1(tf: Any) -> tuple[optimizers.TFOptimizer, Any, bool]:
    args = {
        "learning_rate": 0.1,
        "learning_rate_power": -0.5,
        "initial_accumulator_value": 0.2,
        "l1_regularization_strength": 0.01,
        "l2_regularization_strength": 0.001,
    }
    return (
        optimizers.TFOptimizer("FtrlOptimizer", **args),
        tf.compat.v1.train.FtrlOptimizer(**args),
        False,
    )


def _keras_adam(tf: Any) -> tuple[optimizers.TFOptimizer, Any, bool]:
    instance = tf.keras.optimizers.Adam(learning_rate=0.01, amsgrad=True, clipnorm=1.0)
    return (
        optimizers.TFOptimizer(instance),
        tf.keras.optimizers.Adam.from_config(instance.get_config()),
        False,
    )


def _keras_sgd_schedule(tf: Any) -> tuple[optimizers.TFOptimizer, Any, bool]:
    schedule = tf.keras.optimizers.schedules.ExponentialDecay(
        initial_learning_rate=0.05, decay_steps=5, decay_rate=0.5
    )
    instance = tf.keras.optimizers.SGD(learning_rate=schedule, momentum=0.9, nesterov=True)
    return (
        optimizers.TFOptimizer(instance),
        tf.keras.optimizers.SGD.from_config(instance.get_config()),
        False,
    )


def _keras_nadam(tf: Any) -> tuple[optimizers.TFOptimizer, Any, bool]:
    return (
        optimizers.TFOptimizer("Nadam", learning_rate=0.01),
        tf.keras.optimizers.Nadam(learning_rate=0.01),
        False,
    )


CASES: dict[str, Case] = {
    "AdamOptimizer": _adam_v1,
    "MomentumOptimizer-nesterov": _momentum_nesterov_v1,
    "FtrlOptimizer": _ftrl_v1,
    "keras-Adam-instance": _keras_adam,
    "keras-SGD-schedule": _keras_sgd_schedule,
    "keras-Nadam": _keras_nadam,
}


@pytest.fixture
def session_ids() -> Iterator[Callable[[str], str]]:
    count = iter(range(1_000_000))

    def make(prefix: str) -> str:
        return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}-{next(count)}"

    yield make


# --- trajectories -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_trajectory_equals_tensorflow_applied_directly(
    tf: Any, api: httpx.Client, session_ids: Callable[[str], str], case: str
) -> None:
    config, native, float64_bias = CASES[case](tf)
    weights = initial_weights(1, float64_bias=float64_bias)
    sid = session_ids("traj")
    r = create(api, config, weights, sid)
    assert r.status_code == 201, r.text
    summary = r.json()
    assert summary["optimizer"] == config.to_dict()
    assert summary["iterations"] == 0
    assert summary["parameters"]["dense/bias"]["dtype"] == str(weights["dense/bias"].dtype)

    reference = Reference(tf, native, weights)
    for step, grads in enumerate(gradient_stream(2, weights, STEPS), start=1):
        iterations, got = pushed(api, sid, grads)
        assert iterations == step
        assert_float32_close(got, reference.step(grads))


def test_state_holds_the_optimizers_variables(
    tf: Any, api: httpx.Client, session_ids: Callable[[str], str]
) -> None:
    """v1: get_slot(var, name) per slot name and the non-slot beta powers; tf.keras: the
    ``<param>_<slot>`` variables and the scalars (iteration counter, learning rate)."""
    weights = initial_weights(3)
    grads = gradient_stream(4, weights, 3)

    config, native, _ = _adam_v1(tf)
    sid = session_ids("state-v1")
    assert create(api, config, weights, sid).status_code == 201
    reference = Reference(tf, native, weights)
    for g in grads:
        pushed(api, sid, g)
        reference.step(g)
    state = decode_state(get_state(api, sid))
    assert state["iterations"] == 3
    assert state["optimizer"] == config.to_dict()
    assert set(state["slots"]) == {"m", "v"}
    for slot, per in state["slots"].items():
        assert set(per) == set(weights)
        for name, value in per.items():
            expected = native.get_slot(reference.variables[name], slot).numpy()
            np.testing.assert_allclose(value, expected, rtol=2e-6, atol=2e-6)
    beta1_power, beta2_power = native._get_beta_accumulators()
    assert state["scalars"] == pytest.approx(
        {"beta1_power": float(beta1_power.numpy()), "beta2_power": float(beta2_power.numpy())}
    )

    config, native, _ = _keras_adam(tf)
    sid = session_ids("state-keras")
    assert create(api, config, weights, sid).status_code == 201
    for g in grads:
        pushed(api, sid, g)
    state = decode_state(get_state(api, sid))
    assert set(state["slots"]) == {"momentum", "velocity", "velocity_hat"}
    assert all(set(per) == set(weights) for per in state["slots"].values())
    assert state["scalars"] == pytest.approx({"iterations": 3.0, "learning_rate": 0.01})


@pytest.mark.parametrize(
    "case", ["AdamOptimizer", "FtrlOptimizer", "keras-Nadam", "keras-SGD-schedule"]
)
def test_export_import_mid_run_continues_identically(
    tf: Any, api: httpx.Client, session_ids: Callable[[str], str], case: str
) -> None:
    config, _native, _ = CASES[case](tf)
    weights = initial_weights(5)
    grads = gradient_stream(6, weights, 12)
    original = session_ids("orig")
    assert create(api, config, weights, original).status_code == 201
    for g in grads[:7]:
        pushed(api, original, g)
    exported = get_state(api, original)

    expected = [pushed(api, original, g) for g in grads[7:]]

    copy = session_ids("copy")
    r = put_state(api, copy, exported)
    assert r.status_code == 201, r.text
    assert r.json()["iterations"] == 7
    assert_bitwise_equal([pushed(api, copy, g) for g in grads[7:]], expected)

    r = put_state(api, original, exported)  # rewind the original: replace in place
    assert r.status_code == 200, r.text
    assert r.json()["iterations"] == 7
    assert_bitwise_equal([pushed(api, original, g) for g in grads[7:]], expected)
    assert get_state(api, original) == get_state(api, copy)


def assert_bitwise_equal(
    actual: list[tuple[int, dict[str, np.ndarray]]],
    expected: list[tuple[int, dict[str, np.ndarray]]],
) -> None:
    """Same iterations, and every weight of the same dtype, shape and bytes, at every step."""
    assert len(actual) == len(expected)
    for (it_a, w_a), (it_b, w_b) in zip(actual, expected, strict=True):
        assert it_a == it_b
        assert set(w_a) == set(w_b)
        for name in w_a:
            assert (w_a[name].dtype, w_a[name].shape) == (w_b[name].dtype, w_b[name].shape)
            assert w_a[name].tobytes() == w_b[name].tobytes(), (it_a, name)


def test_state_that_does_not_fit_is_refused(
    tf: Any, api: httpx.Client, session_ids: Callable[[str], str]
) -> None:
    config, _native, _ = _adam_v1(tf)
    weights = initial_weights(7)
    sid = session_ids("badstate")
    assert create(api, config, weights, sid).status_code == 201
    pushed(api, sid, gradient_stream(8, weights, 1)[0])
    state = wire.unpack(get_state(api, sid))

    missing_slot = dict(state, slots={"m": state["slots"]["m"]})
    message = assert_error(put_state(api, sid, wire.pack(missing_slot)), 422, "invalid_state")
    assert "slots" in message

    wrong_shape = dict(state)
    wrong_shape["slots"] = dict(state["slots"])
    wrong_shape["slots"]["v"] = dict(state["slots"]["v"], embedding=np.zeros(3, np.float32))
    assert_error(put_state(api, sid, wire.pack(wrong_shape)), 422, "invalid_state")

    no_scalars = dict(state, scalars={})
    message = assert_error(put_state(api, sid, wire.pack(no_scalars)), 422, "invalid_state")
    assert "beta1_power" in message

    # Refused states changed nothing.
    assert api.get(f"/sessions/{sid}").json()["iterations"] == 1


# --- errors -----------------------------------------------------------------------------------


def test_unknown_name_lists_the_valid_ones(
    tf: Any, api: httpx.Client, session_ids: Callable[[str], str]
) -> None:
    r = create(api, optimizers.TFOptimizer("AdamOptimzer"), initial_weights(0), session_ids("x"))
    message = assert_error(r, 422, "unknown_optimizer")
    assert "'AdamOptimzer'" in message
    for name in ("GradientDescentOptimizer", "ProximalGradientDescentOptimizer", "Adam", "SGD"):
        assert name in message


@pytest.mark.parametrize(
    ("config", "weights_dtype", "fragment"),
    [
        (
            optimizers.TFOptimizer("AdamOptimizer", lr=0.1),
            np.float32,
            "unexpected keyword argument 'lr'",
        ),
        (optimizers.TFOptimizer("MomentumOptimizer", learning_rate=0.1), np.float32, "momentum"),
        (optimizers.TFOptimizer("Adam", decay=0.1), np.float32, "decay"),
        (
            optimizers.TFOptimizer("SGD", gradient_accumulation_steps=1),
            np.float32,
            "gradient_accumulation_steps",
        ),
        (
            optimizers.TFOptimizer("AdamOptimizer", learning_rate="fast"),
            np.float32,
            "'learning_rate'",
        ),
        (optimizers.TFOptimizer("Adam", epsilon=[1e-7]), np.float32, "'epsilon'"),
        (
            optimizers.TFOptimizer(
                "Adam",
                learning_rate={"class_name": "Dense", "module": "keras.layers", "config": {}},
            ),
            np.float32,
            "'Dense'",
        ),
        (
            optimizers.TFOptimizer("ProximalAdagradOptimizer", learning_rate=0.1),
            np.float64,
            "float64",
        ),
        (optimizers.TFOptimizer("Adafactor"), np.float32, "not supported"),
    ],
    ids=[
        "v1-unknown-arg",
        "v1-missing-arg",
        "keras-unknown-arg",
        "keras-bad-value",
        "string-lr",
        "list-epsilon",
        "not-a-schedule",
        "dtype",
        "state-does-not-fit",
    ],
)
def test_bad_arguments_get_tensorflows_message(
    tf: Any,
    api: httpx.Client,
    session_ids: Callable[[str], str],
    config: optimizers.TFOptimizer,
    weights_dtype: type,
    fragment: str,
) -> None:
    weights = {k: w.astype(weights_dtype) for k, w in initial_weights(0).items()}
    sid = session_ids("badarg")
    message = assert_error(create(api, config, weights, sid), 422, "invalid_optimizer")
    assert fragment in message
    assert api.get(f"/sessions/{sid}").status_code == 404


def test_bad_gradients_change_nothing(
    tf: Any, api: httpx.Client, session_ids: Callable[[str], str]
) -> None:
    config, _native, _ = _keras_adam(tf)
    weights = initial_weights(9)
    sid = session_ids("badgrad")
    assert create(api, config, weights, sid).status_code == 201
    good = gradient_stream(10, weights, 1)[0]
    before = get_state(api, sid)

    missing = {k: v for k, v in good.items() if k != "embedding"}
    assert "embedding" in assert_error(push(api, sid, missing), 422, "parameter_mismatch")
    shape = dict(good, embedding=np.zeros((2, 2, 3), np.float32))
    assert_error(push(api, sid, shape), 422, "parameter_mismatch")
    nan = dict(good, embedding=np.full((3, 2, 2), np.nan, np.float32))
    assert_error(push(api, sid, nan), 422, "non_finite_gradient")
    assert get_state(api, sid) == before

    # Gradients of another float dtype are cast to the parameter's.
    iterations, got = pushed(api, sid, {k: v.astype(np.float64) for k, v in good.items()})
    assert iterations == 1
    assert all(got[k].dtype == weights[k].dtype for k in weights)


def test_a_dropped_trainer_frees_its_graph(tf: Any) -> None:
    """Tracing a step must leave nothing behind that keeps the graph (and with it the
    variables it captured) alive: Keras's optimizers trace a ``tf.custom_gradient``, which TF
    registers process-wide unless the trainer removes it."""
    from paramserver.server.tf_trainer import TFTrainer

    def graphs() -> int:
        gc.collect()
        # Walking every object may touch other libraries' lazy attributes (torch, imported by
        # other tests, warns on some): their warnings are not this test's business.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(issubclass(type(o), tf.Graph) for o in gc.get_objects())

    weights = initial_weights(13)
    grads = gradient_stream(14, weights, 1)[0]
    before = graphs()
    for name in ("AdamOptimizer", "Adam", "Nadam"):
        trainer = TFTrainer(optimizers.TFOptimizer(name), weights)
        trainer.apply(trainer.check_gradients(grads))
        del trainer
    assert graphs() == before


# --- the client and the wire ------------------------------------------------------------------


def test_client_reads_a_keras_instance_and_the_server_accepts_it(
    tf: Any, api: httpx.Client, session_ids: Callable[[str], str]
) -> None:
    instance = tf.keras.optimizers.AdamW(
        learning_rate=0.003, weight_decay=0.01, global_clipnorm=2.0
    )
    config = optimizers.TFOptimizer(instance)
    inner = config.get_config()["optimizer"]
    assert inner["class_name"] == "AdamW"
    assert inner["config"]["weight_decay"] == pytest.approx(0.01)
    assert {"name", "clipnorm", "use_ema", "gradient_accumulation_steps"} <= set(inner["config"])
    json.dumps(config.to_dict())  # plain JSON: numpy scalars were turned into numbers
    assert optimizers.deserialize(config.to_dict()) == config

    # The JSON create body works too.
    weights = initial_weights(11)
    sid = session_ids("json")
    body = {
        "session_id": sid,
        "optimizer": config.to_dict(),
        "weights": {
            k: {"dtype": str(w.dtype), "shape": list(w.shape), "data": w.ravel().tolist()}
            for k, w in weights.items()
        },
    }
    r = api.post("/sessions", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["optimizer"] == config.to_dict()
    reference = Reference(tf, tf.keras.optimizers.AdamW.from_config(instance.get_config()), weights)
    for grads in gradient_stream(12, weights, 3):
        assert_float32_close(pushed(api, sid, grads)[1], reference.step(grads))


def test_the_client_library_drives_a_tfoptimizer_session(
    tf: Any, base_url: str, session_ids: Callable[[str], str]
) -> None:
    """Same client, same protocol: create from a tf.keras instance, push, export, restore."""
    from paramserver.client import Client, InvalidRequest

    instance = tf.keras.optimizers.RMSprop(learning_rate=0.01, momentum=0.5, centered=True)
    weights = initial_weights(15)
    grads = gradient_stream(16, weights, 8)
    with Client(base_url) as client:
        session = client.create_session(weights, optimizers.TFOptimizer(instance), session_ids("c"))
        for g in grads[:4]:
            session.push(g)
        state = session.state()
        assert set(state.slots) == {"average_gradient", "momentum", "velocity"}
        expected = [(i, session.push(g)) for i, g in enumerate(grads[4:])]
        copy = client.restore_session(state, session_ids("c-copy"))
        assert copy.info().iterations == 4
        assert_bitwise_equal([(i, copy.push(g)) for i, g in enumerate(grads[4:])], expected)

        with pytest.raises(InvalidRequest) as caught:
            client.create_session(weights, optimizers.TFOptimizer("NoSuchOptimizer"))
        assert caught.value.code == "unknown_optimizer"


# --- without TensorFlow -----------------------------------------------------------------------


def test_importing_the_app_does_not_import_tensorflow() -> None:
    code = (
        "import sys, paramserver.server.main, paramserver.server.training\n"
        "import paramserver.server.service\n"
        "loaded = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# --- training modes -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["AdamOptimizer", "keras-Nadam"])
def test_a_sync_round_is_the_tensorflow_step_on_the_mean(
    tf: Any, server: Any, api: httpx.Client, session_ids: Callable[[str], str], case: str
) -> None:
    """A TFOptimizer session in sync mode: each round of 3 gradients is one native step on
    their mean; an async session with max_staleness refuses a stale gradient."""
    from tests.server.test_training_modes import exact_mean, push_in_order

    config, native, float64_bias = CASES[case](tf)
    weights = initial_weights(3, float64_bias=float64_bias)
    sid = session_ids("sync")
    body = wire.pack(
        {
            "session_id": sid,
            "optimizer": config.to_dict(),
            "weights": weights,
            "training": {"mode": "sync", "replicas_to_aggregate": 3},
        }
    )
    r = api.post("/sessions", content=body, headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 201, r.text
    assert r.json()["training"]["mode"] == "sync"
    reference = Reference(tf, native, weights)
    stream = gradient_stream(4, weights, 9)
    for step in range(3):
        grads = stream[3 * step : 3 * step + 3]
        answers = push_in_order(server.url, api, sid, grads, step)
        assert all(a.status_code == 200 for a in answers), answers[0].text
        answer = unpackb(answers[0].content)
        assert answer["iterations"] == step + 1
        assert_float32_close(arrays(answer["weights"]), reference.step(exact_mean(grads)))
