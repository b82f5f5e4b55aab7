"""An optimizer that cannot be built gets 422 and creates no session.

An unknown name gets ``unknown_optimizer`` with the valid names listed; a configuration
``paramserver.optimizers`` refuses gets ``invalid_optimizer`` naming the argument. Over real HTTP:
the refusals themselves, argument by argument, are ``tests/protocol/test_optimizer_config.py``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from paramserver.server.errors import ServiceError
from tests.harness.http_api import MSGPACK, assert_error, create_body, new_id
from tests.harness.refusals import WEIGHTS, assert_absent
from tests.harness.service import plain_service

OPTIMIZER_NAMES = ["SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "Adamax", "Nadam"]


@pytest.mark.parametrize(
    "optimizer", ["foo", "", "adamw", {"class_name": "Foo"}, {"class_name": "Adam2", "config": {}}]
)
def test_422_unknown_optimizer_lists_the_valid_names(api: httpx.Client, optimizer: Any) -> None:
    sid = new_id()
    r = api.post("/sessions", content=create_body(sid, optimizer, WEIGHTS), headers=MSGPACK)
    message = assert_error(r, 422, "unknown_optimizer")
    for name in OPTIMIZER_NAMES:
        assert name in message
    assert_absent(api, sid)


# Each kind of refusal once: the refusals argument by argument (clips, betas, types, ...) are
# tests/protocol/test_optimizer_config.py's; here, that each reaches the client as a 422.
BAD_CONFIGS = {
    "negative-lr": {"class_name": "Adam", "config": {"lr": -1}},
    "nan-lr": {"class_name": "Adam", "config": {"lr": float("nan")}},
    "inf-lr": {"class_name": "SGD", "config": {"lr": float("inf")}},
    "beta1-one": {"class_name": "Adam", "config": {"beta_1": 1.0}},
    "beta2-negative": {"class_name": "Adamax", "config": {"beta_2": -0.1}},
    "rho-above-one": {"class_name": "RMSprop", "config": {"rho": 1.5}},
    "momentum-string": {"class_name": "SGD", "config": {"momentum": "0.9"}},
    "nesterov-string": {"class_name": "SGD", "config": {"nesterov": "yes"}},
    "amsgrad-int": {"class_name": "Adam", "config": {"amsgrad": 1}},
    "lr-bool": {"class_name": "SGD", "config": {"lr": True}},
    "lr-null": {"class_name": "SGD", "config": {"lr": None}},
    "unknown-argument": {"class_name": "Adam", "config": {"foo": 1}},
    "nadam-decay": {"class_name": "Nadam", "config": {"decay": 0.1}},
    "lr-and-alias": {"class_name": "SGD", "config": {"lr": 0.1, "learning_rate": 0.2}},
    "config-not-a-map": {"class_name": "SGD", "config": [0.1]},
    "extra-key": {"class_name": "SGD", "config": {}, "other": 1},
    "no-class-name": {"config": {"lr": 0.1}},
    "class-name-int": {"class_name": 3},
    "optimizer-int": 5,
    "optimizer-list": ["sgd"],
    "optimizer-null": None,
}


@pytest.mark.parametrize("optimizer", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_422_bad_optimizer_config(api: httpx.Client, optimizer: Any) -> None:
    sid = new_id()
    r = api.post("/sessions", content=create_body(sid, optimizer, WEIGHTS), headers=MSGPACK)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in {"invalid_optimizer", "unknown_optimizer"}
    assert_error(r, 422, r.json()["error"]["code"])
    assert_absent(api, sid)


def test_422_bad_config_message_names_the_argument(api: httpx.Client) -> None:
    r = api.post(
        "/sessions",
        content=create_body(None, {"class_name": "Adam", "config": {"beta_1": 1.5}}, WEIGHTS),
        headers=MSGPACK,
    )
    assert "beta_1" in assert_error(r, 422, "invalid_optimizer")


# --- in process -------------------------------------------------------------------------------


def test_a_json_learning_rate_beyond_float64_is_refused() -> None:
    """Once a 500: a JSON number that float64 cannot hold (1e400 here) is an invalid config."""
    body = '{"optimizer": {"class_name": "sgd", "config": {"lr": 1%s}}, "weights": {}}' % (
        "0" * 400
    )
    service = plain_service()
    with pytest.raises(ServiceError) as refused:
        service.create(body.encode(), "json")
    assert (refused.value.status, refused.value.code) == (422, "invalid_optimizer")
    assert service.list() == []
