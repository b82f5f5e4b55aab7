"""Every state a session can reach round-trips through export, import, snapshots and journal
replay, bit for bit; the iteration bound is the same both ways; ``refuse_non_finite`` keeps a
session finite when asked to."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserver import messages, wire
from paramserver.codes import ErrorCode
from paramserver.messages import ANSWER_LIMITS, MAX_ITERATIONS
from paramserver.server.errors import ServiceError
from tests.harness.service import DurableService, opened_services


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., DurableService]]:
    with opened_services(tmp_path) as make:
        yield make


def state_of(server: DurableService, sid: str) -> messages.SessionState:
    return messages.decode_state(server.state(sid), ANSWER_LIMITS)


def load(server: DurableService, sid: str, body: bytes) -> dict[str, Any]:
    summary, _ = server.service.load_state(sid, body)
    return summary


def same_bits(a: messages.SessionState, b: messages.SessionState) -> None:
    assert a.iterations == b.iterations and a.scalars == b.scalars
    assert a.refuse_non_finite == b.refuse_non_finite
    pairs = [(a.weights, b.weights)] + [(a.slots[s], b.slots[s]) for s in a.slots]
    for x, y in pairs:
        assert list(x) == list(y)
        for name in x:
            assert x[name].tobytes() == y[name].tobytes(), name


#: Pushes that drive a state to inf: a finite float16 gradient whose square overflows Adam's
#: v, and an lr that sends SGD's weights to -inf.
DIVERGING = {
    "adam-float16-v-inf": (
        "adam",
        {"w": np.zeros(4, np.float16)},
        {"w": np.full(4, 300, np.float16)},
    ),
    "sgd-huge-lr": (
        {"class_name": "SGD", "config": {"lr": 1e30, "momentum": 0.9}},
        {"w": np.ones(4, np.float32)},
        {"w": np.full(4, 1e10, np.float32)},
    ),
}


@pytest.mark.parametrize("case", DIVERGING.values(), ids=DIVERGING.keys())
@pytest.mark.parametrize("durability", ["snapshot", "journal"])
def test_a_diverged_state_round_trips_everywhere(
    servers: Callable[..., DurableService], case: tuple[Any, Any, Any], durability: str
) -> None:
    optimizer, weights, grads = case
    first = servers(durability=durability)
    first.create("d", optimizer, weights)
    for _ in range(2):
        first.push("d", grads)
    reached = state_of(first, "d")
    values = [
        *reached.weights.values(),
        *(a for per in reached.slots.values() for a in per.values()),
    ]
    assert not all(np.isfinite(v).all() for v in values)  # the case really diverged
    # Export -> import, onto itself and as a new session: accepted, bit for bit.
    load(first, "d", first.state("d"))
    load(first, "copy", first.state("d"))
    same_bits(state_of(first, "copy"), reached)
    # The next step of the copy is the next step of the original.
    first.push("d", grads)
    first.push("copy", grads)
    same_bits(state_of(first, "copy"), state_of(first, "d"))
    after = state_of(first, "d")
    # A restart: snapshots (and the journal) bring back exactly that state.
    if durability == "journal":
        first.crash()
    else:
        first.close()
    second = servers(durability=durability)
    same_bits(state_of(second, "d"), after)
    same_bits(state_of(second, "copy"), after)


def test_creating_a_session_still_refuses_non_finite_weights(
    servers: Callable[..., DurableService],
) -> None:
    server = servers()
    with pytest.raises(ServiceError) as err:
        server.create("n", "sgd", {"w": np.array([1.0, np.nan], np.float32)})
    assert err.value.code is ErrorCode.INVALID_WEIGHTS
    assert server.service.store.find("n") is None


def test_the_iteration_bound_is_the_same_for_pushes_and_imports(
    servers: Callable[..., DurableService],
) -> None:
    server = servers(durability="journal")
    server.create("i", "sgd", {"w": np.zeros(2, np.float32)})
    state = state_of(server, "i")
    state.iterations = MAX_ITERATIONS - 1  # the largest count a state holds
    load(server, "i", messages.encode_state(state))
    before = server.state("i")
    with pytest.raises(ServiceError) as err:
        server.push("i", {"w": np.ones(2, np.float32)})
    assert err.value.code is ErrorCode.ITERATIONS_EXHAUSTED and err.value.status == 409
    assert server.state("i") == before  # nothing changed
    state.iterations = MAX_ITERATIONS
    with pytest.raises(ServiceError) as refused:
        load(server, "i", messages.encode_state(state))
    assert refused.value.code is ErrorCode.INVALID_STATE
    server.crash()
    again = servers(durability="journal")
    assert state_of(again, "i").iterations == MAX_ITERATIONS - 1


@pytest.mark.parametrize("durability", ["snapshot", "journal"])
def test_refuse_non_finite_keeps_the_session_as_it_was(
    servers: Callable[..., DurableService], durability: str
) -> None:
    server = servers(durability=durability)
    body = messages.encode_create(
        {"class_name": "SGD", "config": {"lr": 1e30, "momentum": 0.9}},
        {"w": np.ones(4, np.float32)},
        "f",
        refuse_non_finite=True,
    )
    summary = server.service.create(body, "msgpack")
    assert summary["refuse_non_finite"] is True
    small = {"w": np.full(4, 1e-32, np.float32)}  # lr * g = 0.01: a finite step
    server.push("f", small)
    before = server.state("f")
    with pytest.raises(ServiceError) as err:
        server.push("f", {"w": np.full(4, 1e10, np.float32)})
    assert err.value.code is ErrorCode.NON_FINITE_RESULT and err.value.status == 422
    assert server.state("f") == before  # weights, slots and iterations as they were
    server.push("f", small)  # and it goes on
    exported = state_of(server, "f")
    assert exported.iterations == 2 and exported.refuse_non_finite is True
    # The setting travels with the state, the snapshots and the journal.
    load(server, "g", server.state("f"))
    assert server.service.summary(server.service.store.get("g"))["refuse_non_finite"] is True
    if durability == "journal":
        server.crash()
    else:
        server.close()
    again = servers(durability=durability)
    for sid in ("f", "g"):
        same_bits(state_of(again, sid), exported)
        with pytest.raises(ServiceError):
            again.push(sid, {"w": np.full(4, 1e10, np.float32)})


def test_a_step_the_journal_could_not_log_is_rolled_back(
    servers: Callable[..., DurableService], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers(durability="journal")
    body = messages.encode_create(
        "adam", {"w": np.ones(3, np.float32)}, "r", refuse_non_finite=True
    )
    server.service.create(body, "msgpack")
    server.push("r", {"w": np.ones(3, np.float32)})
    before = server.state("r")
    journal = server.durability.journal
    assert journal is not None

    def disk_full(*args: Any, **kwargs: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal, "append", disk_full)
    with pytest.raises(OSError):
        server.push("r", {"w": np.ones(3, np.float32)})
    assert server.state("r") == before


def test_old_states_without_the_setting_still_load(servers: Callable[..., DurableService]) -> None:
    server = servers()
    server.create("o", "adam", {"w": np.ones(2, np.float32)})
    message = wire.unpack(server.state("o"))
    del message["refuse_non_finite"]  # a state exported by paramserver 0.1
    load(server, "o2", wire.pack(message))
    assert state_of(server, "o2").refuse_non_finite is False


def test_refuse_non_finite_is_refused_for_tfoptimizer(
    servers: Callable[..., DurableService],
) -> None:
    server = servers()
    body = messages.encode_create(
        {"class_name": "TFOptimizer", "config": {"optimizer": {"class_name": "SGD", "config": {}}}},
        {"w": np.ones(2, np.float32)},
        "tf",
        refuse_non_finite=True,
    )
    with pytest.raises(ServiceError) as err:
        server.service.create(body, "msgpack")
    assert err.value.code is ErrorCode.INVALID_WEIGHTS
    assert "refuse_non_finite is not available for TFOptimizer" in err.value.message
