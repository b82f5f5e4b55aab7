"""Mistakes a framework user makes get messages that name the parameter and the cause, before
anything is sent; bfloat16 gradients (mixed precision) travel and are cast like float16."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from paramserver import optimizers, wire
from paramserver.client import Client, InvalidRequest

W0 = {"dense/kernel": np.zeros((2, 3), np.float32), "dense/bias": np.zeros(3, np.float32)}

transports = pytest.mark.parametrize("data_plane", [False, True], ids=["http", "data-plane"])


@transports
def test_a_none_gradient_is_refused_before_sending_naming_the_parameter(server, data_plane):
    with Client(server.url, data_plane=data_plane) as client:
        session = client.create_session(W0, "adam")
        with pytest.raises(
            TypeError, match=r"'dense/bias' is None: that parameter got no gradient"
        ):
            session.push({"dense/kernel": np.ones((2, 3), np.float32), "dense/bias": None})
        assert session.info().iterations == 0


@transports
@pytest.mark.parametrize("bad", [np.arange(3), np.array([None, 1, 2], dtype=object)])
def test_a_dtype_that_cannot_travel_is_named(server, data_plane, bad):
    with Client(server.url, data_plane=data_plane) as client:
        session = client.create_session(W0, "adam")
        with pytest.raises(wire.TensorError, match=r"'dense/bias'.*cannot travel") as err:
            session.push({"dense/kernel": np.ones((2, 3), np.float32), "dense/bias": bad})
        if bad.dtype == object:
            assert "None gradient" in str(err.value) and "IndexedSlices" in str(err.value)
        assert session.info().iterations == 0


@transports
def test_bfloat16_gradients_are_cast_to_the_parameters_dtype(server, data_plane):
    grads = {
        "dense/kernel": np.array([[1.5, -2.0, 0.25], [3.0, 0.0, -1.0]], ml_dtypes.bfloat16),
        "dense/bias": np.array([0.5, 1.0, -0.75], ml_dtypes.bfloat16),
    }
    as_f32 = {k: v.astype(np.float32) for k, v in grads.items()}
    with Client(server.url, data_plane=data_plane) as client:
        a = client.create_session(W0, "adam")
        b = client.create_session(W0, "adam")
        ours = a.push(grads)
        theirs = b.push(as_f32)
        assert all(ours[k].tobytes() == theirs[k].tobytes() for k in W0)
        assert ours["dense/kernel"].dtype == np.float32
        with pytest.raises(InvalidRequest) as err:  # weights stay float16/32/64
            client.create_session({"w": np.zeros(2, ml_dtypes.bfloat16)}, "sgd")
        assert err.value.code == "invalid_weights" and "bfloat16" in err.value.message


def test_bfloat16_round_trips_on_the_wire():
    x = np.array([1.0, -3.5, 65280.0], ml_dtypes.bfloat16)
    decoded = wire.unpack(wire.pack({"g": x}))
    back = wire.decode_tensor_map(decoded, field="t", limits=wire.DecodeLimits())
    assert back["g"].dtype == x.dtype and back["g"].tobytes() == x.tobytes()


def _foreign(module: str, name: str) -> object:
    cls = type(name, (), {})
    cls.__module__ = module
    return cls()


@pytest.mark.parametrize(
    ("module", "name", "hint"),
    [
        ("keras.src.optimizers.adam", "Adam", "paramserver.optimizers.Adam(...)"),
        ("tensorflow.python.training.adam", "AdamOptimizer", "TFOptimizer"),
        ("torch.optim.sgd", "SGD", "paramserver.client.torch"),
    ],
)
def test_a_framework_optimizer_object_points_to_what_to_use(module, name, hint):
    with pytest.raises(optimizers.InvalidOptimizerConfig) as err:
        optimizers.get(_foreign(module, name))  # type: ignore[arg-type]
    assert hint in str(err.value)


def test_float32_gradients_for_a_float64_session_warn_once(server):
    with Client(server.url) as client:
        session = client.create_session({"w": np.zeros(3)}, "sgd")  # numpy's default: float64
        with pytest.warns(
            UserWarning, match=r"float64 parameters \(w\) but gets float32 gradients"
        ):
            session.push({"w": np.ones(3, np.float32)})
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            session.push({"w": np.ones(3, np.float32)})  # once per handle
            plain = client.create_session({"w": np.zeros(3, np.float32)}, "sgd")
            plain.push({"w": np.ones(3, np.float32)})
