"""Pushing gradients over real HTTP: one step per push, compared bit for bit with the engine.

Every answer is checked against ``paramserver.server.optim.KerasOptimizer`` run in this process
on the same gradients (:func:`tests.harness.models.engine_trajectory`): by name, by config,
with the server's own echo of the config, for non-default configurations, gradients of another
float dtype (cast to the parameter's), float64 and mixed-dtype models, gradients in any order
and zero-size parameters.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness.http_api import arrays, create_session, new_id, pull, pushed
from tests.harness.models import (
    DEFAULT_CONFIGS,
    assert_bitwise_equal,
    engine_trajectory,
    gradient_sequence,
    model,
)


def test_push_applies_one_step_and_returns_the_weights(api: httpx.Client) -> None:
    sid = new_id()
    weights = model()
    create_session(api, {"class_name": "SGD", "config": {"lr": 0.25}}, weights, session_id=sid)
    grads = gradient_sequence(weights, 3)
    current = weights
    for step, g in enumerate(grads, start=1):
        msg = pushed(api, sid, g)
        assert set(msg) == {"iterations", "weights"}
        assert msg["iterations"] == step
        want = {n: (current[n] - np.float32(0.25) * g[n]).astype(np.float32) for n in current}
        got = arrays(msg["weights"])
        assert_bitwise_equal(got, want)
        current = want
        iterations, pulled = pull(api, sid)
        assert iterations == step
        assert_bitwise_equal(pulled, got)


def test_push_without_returning_weights(api: httpx.Client) -> None:
    sid = new_id()
    weights = model()
    create_session(api, "adam", weights, session_id=sid)
    grads = gradient_sequence(weights, 2)
    msg = pushed(api, sid, grads[0], return_weights=False)
    assert msg == {"iterations": 1}
    msg = pushed(api, sid, grads[1], return_weights=True)
    assert msg["iterations"] == 2
    assert_bitwise_equal(arrays(msg["weights"]), engine_trajectory("adam", weights, grads)[-1])


@pytest.mark.parametrize("param_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("grad_dtype", [np.float16, np.float32, np.float64])
def test_gradients_are_cast_to_the_parameter_dtype(
    api: httpx.Client, param_dtype: Any, grad_dtype: Any
) -> None:
    sid = new_id()
    weights = model(seed=3, dtype=param_dtype)
    summary = create_session(api, "adam", weights, session_id=sid)
    assert {p["dtype"] for p in summary["parameters"].values()} == {np.dtype(param_dtype).name}
    grads = gradient_sequence(weights, 3, seed=4, dtype=grad_dtype)
    # The step sees the gradient cast to the parameter's dtype, exactly as astype would.
    cast = [{n: g.astype(param_dtype) for n, g in step.items()} for step in grads]
    want = engine_trajectory("adam", weights, cast)
    for step, g in enumerate(grads):
        got = arrays(pushed(api, sid, g)["weights"])
        assert_bitwise_equal(got, want[step])


def test_float64_parameters_stay_float64(api: httpx.Client) -> None:
    sid = new_id()
    weights = model(seed=5, dtype=np.float64)
    summary = create_session(api, "nadam", weights, session_id=sid)
    assert summary["parameters"]["dense/kernel"] == {"dtype": "float64", "shape": [3, 4]}
    grads = gradient_sequence(weights, 4, seed=6)
    want = engine_trajectory("nadam", weights, grads)
    for step, g in enumerate(grads):
        msg = pushed(api, sid, g)
        assert {t["dtype"] for t in msg["weights"].values()} == {"float64"}
        assert_bitwise_equal(arrays(msg["weights"]), want[step])


def test_mixed_dtype_model_matches_the_engine(api: httpx.Client) -> None:
    sid = new_id()
    weights = {
        "a": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        "b": np.linspace(0, 1, 3, dtype=np.float64),
        "c": np.linspace(1, 2, 4, dtype=np.float16),
    }
    config = {"class_name": "Adam", "config": {"lr": 0.01, "amsgrad": True, "clipnorm": 0.5}}
    create_session(api, config, weights, session_id=sid)
    grads = gradient_sequence(weights, 4, seed=9)
    want = engine_trajectory(config, weights, grads)
    for step, g in enumerate(grads):
        assert_bitwise_equal(arrays(pushed(api, sid, g)["weights"]), want[step])


def test_gradients_may_come_in_any_order(api: httpx.Client) -> None:
    weights = model(seed=13)
    sid = create_session(api, "adam", weights)["session_id"]
    grads = gradient_sequence(weights, 2, seed=14)
    want = engine_trajectory("adam", weights, grads)
    for step, g in enumerate(grads):
        reordered = dict(reversed(list(g.items())))
        assert list(reordered) != list(weights)
        got = arrays(pushed(api, sid, reordered)["weights"])
        assert_bitwise_equal({n: got[n] for n in weights}, want[step])


def test_zero_size_parameters(api: httpx.Client) -> None:
    sid = new_id()
    weights = {"empty": np.zeros((0, 3), np.float32), "w": np.ones(2, np.float32)}
    create_session(api, "sgd", weights, session_id=sid)
    msg = pushed(api, sid, {"empty": np.zeros((0, 3), np.float32), "w": np.ones(2, np.float32)})
    got = arrays(msg["weights"])
    assert got["empty"].shape == (0, 3)
    np.testing.assert_array_equal(got["w"], np.float32(1) - np.float32(0.01))


@pytest.mark.parametrize("name", sorted(DEFAULT_CONFIGS))
def test_by_name_by_config_and_engine_trajectories_are_identical(
    api: httpx.Client, name: str
) -> None:
    weights = model(seed=11)
    by_name = create_session(api, name, weights)
    class_name, config = DEFAULT_CONFIGS[name]
    by_config = create_session(api, {"class_name": class_name, "config": config}, weights)
    echoed = create_session(api, by_name["optimizer"], weights)  # the config the server reported
    assert by_config["optimizer"] == by_name["optimizer"] == echoed["optimizer"]
    grads = gradient_sequence(weights, 5, seed=12)
    want = engine_trajectory(name, weights, grads)
    for step, g in enumerate(grads):
        for summary in (by_name, by_config, echoed):
            got = arrays(pushed(api, summary["session_id"], g)["weights"])
            assert_bitwise_equal(got, want[step])


# The math of every option (clipnorm, clipvalue, decay, ...) is tests/server/optim's; here, that
# a configuration sent over HTTP reaches the engine whole.
NON_DEFAULT_CONFIGS = [
    {"class_name": "SGD", "config": {"lr": 0.05, "momentum": 0.9, "decay": 0.1, "nesterov": True}},
    {"class_name": "SGD", "config": {"lr": 0.1, "momentum": 0.5, "clipvalue": 0.3}},
    {"class_name": "RMSprop", "config": {"lr": 0.01, "rho": 0.8, "epsilon": 1e-4, "decay": 0.05}},
    {"class_name": "Adadelta", "config": {"lr": 0.5, "rho": 0.9, "epsilon": None}},
    {"class_name": "Adam", "config": {"lr": 0.01, "amsgrad": True, "decay": 0.01}},
    {"class_name": "Adam", "config": {"learning_rate": 0.02, "beta_1": 0.5, "clipnorm": 1.0}},
    {"class_name": "Adamax", "config": {"lr": 0.01, "beta_2": 0.99, "clipvalue": 0.5}},
    {"class_name": "Nadam", "config": {"lr": 0.01, "schedule_decay": 0.004}},
]


@pytest.mark.parametrize(
    "config", NON_DEFAULT_CONFIGS, ids=[str(c["config"]) for c in NON_DEFAULT_CONFIGS]
)
def test_configured_sessions_follow_the_engine(api: httpx.Client, config: dict[str, Any]) -> None:
    weights = model(seed=21)
    sid = create_session(api, config, weights)["session_id"]
    grads = gradient_sequence(weights, 6, seed=22)
    want = engine_trajectory(config, weights, grads)
    for step, g in enumerate(grads):
        assert_bitwise_equal(arrays(pushed(api, sid, g)["weights"]), want[step])
