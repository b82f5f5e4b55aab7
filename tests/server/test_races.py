"""Races found by reading the code: the memory quota and the insertion of a session under one
lock; the cast buffers counted in a session's bytes; no push journaled before its session."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserver import optimizers, wire
from paramserver.server.errors import InsufficientStorage
from paramserver.server.persistence import JournalReader
from paramserver.server.sessions import SessionStore
from paramserver.server.training import KerasTrainer, Trainer
from tests.harness.service import DurableService, opened_services


def test_racing_creates_cannot_both_pass_the_memory_quota() -> None:
    weights = {"w": np.zeros(1000, np.float32)}  # 4 kB of weights, 4 kB of SGD moment
    store = SessionStore(max_sessions=10, max_total_bytes=12_000)  # room for one
    both_built = threading.Barrier(2)

    def build() -> Trainer:
        trainer = KerasTrainer(optimizers.SGD(), weights)
        both_built.wait(timeout=10)  # both builds finish before either is inserted
        return trainer

    results: list[str] = []

    def create(sid: str) -> None:
        try:
            store.add(sid, build)
            results.append("created")
        except InsufficientStorage:
            results.append("refused")

    threads = [threading.Thread(target=create, args=(sid,)) for sid in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == ["created", "refused"]
    assert len(store) == 1 and store.total_bytes() <= 12_000


def test_cast_buffers_count_in_the_session_bytes() -> None:
    trainer = KerasTrainer(optimizers.Adam(), {"w": np.zeros(1000, np.float32)})
    before = trainer.nbytes()
    assert before == 3 * 4000  # weights, m, v
    trainer.apply(trainer.check_gradients({"w": np.ones(1000, np.float64)}))
    assert trainer.nbytes() == before + 4000  # the float32 buffer float64 gradients cast into


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., DurableService]]:
    with opened_services(tmp_path) as make:
        yield make


def test_a_push_waits_for_its_sessions_create_record(
    servers: Callable[..., DurableService], tmp_path: Path
) -> None:
    server = servers(durability="journal")
    durability = server.durability
    created = durability.created
    in_created = threading.Event()
    go_on = threading.Event()

    def slow_created(session: Any) -> None:
        in_created.set()
        assert go_on.wait(timeout=30)
        created(session)

    durability.created = slow_created  # type: ignore[method-assign]
    body = wire.pack({"session_id": "s", "optimizer": "sgd", "weights": {"w": np.zeros(2)}})
    creating = threading.Thread(target=server.service.create, args=(body, "msgpack"))
    creating.start()
    assert in_created.wait(timeout=30)  # the session is in the store, its record not yet written
    pushed: list[Any] = []
    pushing = threading.Thread(target=lambda: pushed.append(server.push("s", {"w": np.ones(2)})))
    pushing.start()
    pushing.join(timeout=0.5)
    assert pushing.is_alive() and not pushed  # the push waits for the create record
    go_on.set()
    creating.join(timeout=30)
    pushing.join(timeout=30)
    assert pushed and pushed[0][0]["iterations"] == 1
    records = [(r.op, r.lsn) for r in JournalReader(tmp_path / "snapshots" / "journal").records()]
    assert [op for op, _ in records] == ["create", "push"]
