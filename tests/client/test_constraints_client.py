"""The client passes constraints at creation and reads them back, on a real server."""

from __future__ import annotations

import numpy as np

from paramserver.client import Client
from paramserver.constraints import MaxNorm, NonNeg


def test_create_session_with_constraints(server) -> None:
    class KerasLike:  # what a Keras 3 layer's kernel_constraint looks like
        def get_config(self):
            return {"max_value": 1.0, "axis": 0}

    KerasLike.__name__ = "MaxNorm"
    weights = {"k": np.full((2, 2), 3.0, np.float32), "b": np.zeros(2, np.float32)}
    with Client(server.url) as client:
        session = client.create_session(
            weights, "sgd", constraints={"k": KerasLike(), "b": {"class_name": "NonNeg"}}
        )
        assert session.info().constraints == {"k": MaxNorm(1.0, axis=0), "b": NonNeg()}
        new = session.push({"k": np.zeros((2, 2), np.float32), "b": np.ones(2, np.float32)})
        np.testing.assert_allclose(np.sqrt((new["k"] ** 2).sum(axis=0)), 1.0, rtol=1e-6)
        # -0.01 masked to zero; as in Keras 2.2.4 (w * 0.0), a negative weight becomes -0.0
        assert (new["b"] == 0).all() and np.signbit(new["b"]).all()
        plain = client.create_session(weights, "sgd")
        assert plain.info().constraints == {}


def test_a_constraint_this_client_does_not_know_leaves_the_summary_readable() -> None:
    from paramserver.client import SessionInfo

    info = SessionInfo.from_json(
        {
            "session_id": "s",
            "optimizer": {"class_name": "SGD", "config": {}},
            "iterations": 0,
            "parameters": {
                "k": {"dtype": "float32", "shape": [2]},
                "b": {"dtype": "float32", "shape": [2]},
            },
            "constraints": {
                "k": {"class_name": "FutureNorm", "config": {}},
                "b": {"class_name": "NonNeg", "config": {}},
            },
        }
    )
    assert info.constraints == {"b": NonNeg()}
