"""A state that does not fit gets 422 (or 400), into an existing session or a free id alike.

Each edit of a real exported state (iterations, optimizer, weights, slots, scalars) is refused
over real HTTP; the session the state was meant for is unchanged and still takes a push, and
no session is created under the free id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from paramserver.server.errors import ServiceError
from tests.harness.http_api import (
    MSGPACK,
    assert_error,
    create_body,
    gradients_body,
    new_id,
    packb,
    tensor,
    unpackb,
)
from tests.harness.models import ones
from tests.harness.refusals import assert_absent, assert_unchanged, snapshot
from tests.harness.service import plain_service


def _state_edits() -> dict[str, Callable[[dict[str, Any]], None]]:
    def set_(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda s: s.__setitem__(key, value)

    def slot(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        return lambda s: edit(s["slots"])

    return {
        "negative-iterations": set_("iterations", -1),
        "bool-iterations": set_("iterations", True),
        "float-iterations": set_("iterations", 1.5),
        "other-optimizer": set_("optimizer", "sgd"),
        "unknown-optimizer": set_("optimizer", "nope"),
        "bad-config": set_("optimizer", {"class_name": "Adam", "config": {"lr": -1}}),
        "missing-slot": slot(lambda sl: sl.pop("v")),
        "extra-slot": slot(lambda sl: sl.__setitem__("extra", {})),
        "slot-missing-parameter": slot(lambda sl: sl["m"].pop("b")),
        "slot-wrong-shape": slot(
            lambda sl: sl["m"].__setitem__("b", tensor(np.zeros(4, np.float32)))
        ),
        "slot-wrong-dtype": slot(
            lambda sl: sl["m"].__setitem__("b", tensor(np.zeros(3, np.float64)))
        ),
        "slot-bad-data": slot(
            lambda sl: sl["m"].__setitem__("b", {"dtype": "float32", "shape": [3], "data": b""})
        ),
        "slots-not-a-map": set_("slots", [1]),
        "scalars-not-a-map": set_("scalars", [1]),
        "scalar-nan": set_("scalars", {"x": float("nan")}),
        "unexpected-scalar": set_("scalars", {"m_schedule": 1.0}),
        "no-weights": set_("weights", {}),
        "iterations-at-the-bound": set_("iterations", 2**53),
        "refuse-non-finite-not-a-bool": set_("refuse_non_finite", 1),
    }


STATE_EDITS = _state_edits()


@pytest.mark.parametrize("edit", STATE_EDITS.values(), ids=STATE_EDITS.keys())
def test_422_invalid_state(
    api: httpx.Client, adam_session: str, edit: Callable[[dict[str, Any]], None]
) -> None:
    state = msgpack.unpackb(api.get(f"/sessions/{adam_session}/state").content)
    edit(state)
    body = packb(state)
    before = snapshot(api, adam_session)
    fresh = new_id()
    for target in (adam_session, fresh):
        r = api.put(f"/sessions/{target}/state", content=body, headers=MSGPACK)
        assert r.status_code == 422, r.text
        assert_error(r, 422, r.json()["error"]["code"])
    assert_unchanged(api, adam_session, before)
    assert_absent(api, fresh)


@pytest.mark.parametrize("key", ["iterations", "optimizer", "weights", "slots", "scalars"])
def test_state_missing_a_key_is_refused(api: httpx.Client, adam_session: str, key: str) -> None:
    state = msgpack.unpackb(api.get(f"/sessions/{adam_session}/state").content)
    del state[key]
    before = snapshot(api, adam_session)
    r = api.put(f"/sessions/{adam_session}/state", content=packb(state), headers=MSGPACK)
    assert r.status_code in (400, 422), r.text
    assert_error(r, r.status_code, r.json()["error"]["code"])
    assert_unchanged(api, adam_session, before)


# --- in process -------------------------------------------------------------------------------


def test_an_iteration_count_beyond_2_53_is_refused() -> None:
    """Once a 500: a count the state cannot hold exactly is invalid, not an internal error."""
    service = plain_service()
    service.create(create_body("iters", "adam", {"w": np.ones(3, np.float32)}), "msgpack")
    session = service.store.get("iters")
    state = unpackb(service.state(session))
    for bad in (2**53, 2**64 - 1):
        state["iterations"] = bad
        with pytest.raises(ServiceError) as refused:
            service.load_state("iters", packb(state))
        assert (refused.value.status, refused.value.code) == (422, "invalid_state")
    assert service.summary(session)["iterations"] == 0
    answer, _ = service.push(session, gradients_body(ones(3)), return_weights=False)
    assert unpackb(answer) == {"iterations": 1}
