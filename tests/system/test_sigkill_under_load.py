"""The crash test of issue 8: a server under push load is SIGKILLed at a random moment, five
times in a row, and restarted on the same snapshot directory.

Four client threads (two per session) push the same gradient to their session over raw HTTP,
each push with its own Idempotency-Key. Because every push of a session carries the same
gradient, the state after N pushes is known exactly whatever the order: the test steps a local
trainer N times and compares its ``encode_state`` with ``GET /state`` byte for byte (weights,
slots, scalars, iterations), so a torn snapshot or a half-replayed journal cannot pass.

* ``durability=snapshot``: after each restart every session loads, its state is exactly the
  state after some N pushes with N between the previous restart's count and the pushes
  applied, and when N is a count some push was answered with, the weights equal that answer.
* ``durability=journal``: nothing acknowledged is lost. N is the acknowledged pushes plus those
  of the pushes in flight at the kill that reached the journal; retrying each in-flight push
  with its key tells which: a replayed answer means it was in, so N must equal the
  acknowledged count plus the replays. After the retries every push counts exactly once.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import wire
from paramserver.messages import decode_optimizer, encode_state
from paramserver.server.training import build_trainer
from tests.harness.http_api import HTTP, MSGPACK, create_session, get_state, session_ids
from tests.harness.servers import start_paramserver

ROUNDS = 5
CLIENTS_PER_SESSION = 2
MAX_PUSHES_PER_CLIENT = 5000  # a bound, far above what a round sends
SESSIONS: dict[str, Any] = {
    "amsgrad": {"class_name": "Adam", "config": {"amsgrad": True, "decay": 0.001}},
    "nadam": "nadam",
}


@dataclass
class Model:
    """One session: its optimizer, initial weights and the gradient every push carries."""

    session_id: str
    optimizer: Any
    weights: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    body: bytes = b""
    answered: dict[int, bytes] = field(default_factory=dict)  # iterations -> weights["w"] bytes
    acknowledged: int = 0  # pushes answered 200 (counted exactly once)
    _trainer: Any = None

    def __post_init__(self) -> None:
        self.body = wire.pack({"gradients": self.grads})
        self.answered[0] = self.weights["w"].tobytes()

    def expected_state(self, iterations: int) -> bytes:
        """``encode_state`` after ``iterations`` pushes, from a local trainer."""
        if self._trainer is None or self._trainer.iterations > iterations:
            self._trainer = build_trainer(decode_optimizer(self.optimizer), self.weights)
        while self._trainer.iterations < iterations:
            self._trainer.apply(self._trainer.check_gradients(self.grads))
        return encode_state(self._trainer.state())


@dataclass
class Client:
    """A thread pushing to one session until stopped or the server goes away."""

    model: Model
    name: str
    url: str
    stop: threading.Event
    in_flight: str | None = None  # the key of a push sent but not answered
    thread: threading.Thread | None = None
    answers: list[tuple[int, bytes]] = field(default_factory=list)
    failure: str | None = None
    sent: int = 0

    def run(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(10.0, connect=2.0)) as http:
            while not self.stop.is_set() and self.sent < MAX_PUSHES_PER_CLIENT:
                key = f"{self.name}-{time.monotonic_ns()}"
                self.in_flight = key
                self.sent += 1
                try:
                    r = http.post(
                        f"{self.url}/sessions/{self.model.session_id}/gradients",
                        content=self.model.body,
                        headers={**MSGPACK, "Idempotency-Key": key},
                    )
                except httpx.TransportError:
                    return  # killed: the push stays in flight
                if r.status_code != 200:
                    self.failure = f"{r.status_code} {r.text}"
                    return
                answer = wire.unpack(r.content)
                self.answers.append((answer["iterations"], bytes(answer["weights"]["w"]["data"])))
                self.in_flight = None


def run_load(url: str, models: list[Model], rng: random.Random) -> list[Client]:
    """Start every client and return after a random moment (the caller then kills)."""
    stop = threading.Event()
    clients = [
        Client(model, f"{model.session_id}-{i}", url, stop)
        for model in models
        for i in range(CLIENTS_PER_SESSION)
    ]
    for client in clients:
        client.thread = threading.Thread(target=client.run, daemon=True)
        client.thread.start()
    deadline = time.monotonic() + 30  # until every client is under way (kernels loaded)
    while time.monotonic() < deadline and not all(c.answers or c.failure for c in clients):
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.8))
    return clients


def collect(clients: list[Client]) -> None:
    for client in clients:
        client.stop.set()
    for client in clients:
        assert client.thread is not None
        client.thread.join(timeout=30)  # the kill breaks its connection at once
        assert not client.thread.is_alive(), f"{client.name} is stuck"
        assert client.failure is None, client.failure
        for iterations, weights in client.answers:
            client.model.answered[iterations] = weights
        client.model.acknowledged += len(client.answers)


def server_args(data: Path, mode: str, round_: int) -> list[str]:
    args = ["--snapshot-dir", str(data), "--log-level", "warning"]
    if mode == "snapshot":
        return [*args, "--snapshot-interval-seconds", "0.1"]
    fsync = "always" if round_ % 2 == 0 else "interval"
    return [
        *args,
        "--durability",
        "journal",
        "--journal-fsync",
        fsync,
        "--journal-fsync-interval-seconds",
        "0.05",
        "--snapshot-interval-seconds",
        "0.3",
    ]


def check_snapshot_mode(url: str, model: Model, floor: int, clients: list[Client]) -> int:
    """The state is the state after N pushes, N within what can have been saved."""
    saved = get_state(url, model.session_id)
    n = wire.unpack(saved)["iterations"]
    applied = model.acknowledged + sum(c.in_flight is not None for c in clients if c.model is model)
    assert floor <= n <= applied, (model.session_id, floor, n, applied)
    assert saved == model.expected_state(n), f"{model.session_id}: torn or wrong state at {n}"
    if n in model.answered:
        weights = wire.unpack(saved)["weights"]["w"]["data"]
        assert bytes(weights) == model.answered[n]
    model.acknowledged = n  # what the server now holds is the count to build on
    return n


def check_journal_mode(url: str, model: Model, clients: list[Client]) -> int:
    """Every acknowledged push is there; in-flight pushes count once after their retry."""
    n = wire.unpack(get_state(url, model.session_id))["iterations"]
    replays = 0
    retries = 0
    for client in clients:
        if client.model is not model or client.in_flight is None:
            continue
        retries += 1
        r = HTTP.post(
            f"{url}/sessions/{model.session_id}/gradients",
            content=model.body,
            headers={**MSGPACK, "Idempotency-Key": client.in_flight},
        )
        assert r.status_code == 200, r.text
        replays += r.headers.get("idempotent-replayed") == "true"
        client.in_flight = None
    assert n == model.acknowledged + replays, (model.session_id, n, model.acknowledged, replays)
    model.acknowledged += retries
    saved = get_state(url, model.session_id)
    assert wire.unpack(saved)["iterations"] == model.acknowledged
    assert saved == model.expected_state(model.acknowledged), model.session_id
    return model.acknowledged


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["snapshot", "journal"])
def test_sigkill_under_push_load_five_times(tmp_path: Path, mode: str) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    data = tmp_path / "data"
    gen = np.random.default_rng(seed)
    models = [
        Model(
            sid,
            optimizer,
            {"w": gen.standard_normal(64).astype(np.float32)},
            {"w": gen.standard_normal(64).astype(np.float32)},
        )
        for sid, optimizer in SESSIONS.items()
    ]
    floors = {m.session_id: 0 for m in models}
    clients: list[Client] = []
    for round_ in range(ROUNDS + 1):
        server = start_paramserver(tmp_path, *server_args(data, mode, round_))
        try:
            if round_ == 0:
                for model in models:
                    create_session(
                        server.url, model.optimizer, model.weights, session_id=model.session_id
                    )
            else:
                assert session_ids(server.url) == sorted(SESSIONS), server.log
                for model in models:
                    if mode == "snapshot":
                        floor = floors[model.session_id]
                        floors[model.session_id] = check_snapshot_mode(
                            server.url, model, floor, clients
                        )
                    else:
                        check_journal_mode(server.url, model, clients)
            if round_ == ROUNDS:
                break
            clients = run_load(server.url, models, rng)
            server.kill()
            collect(clients)
            assert all(c.answers for c in clients), f"seed {seed}: a client got no answer"
        except BaseException:
            print(f"seed {seed}, round {round_}; server output:\n{server.log}")
            raise
        finally:
            server.kill()
    assert sum(m.acknowledged for m in models) > 0
