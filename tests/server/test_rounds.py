"""A sync round in process (:mod:`paramserver.server.rounds`): the mean is a function of the set
of gradients, not of their arrival; a round closes exactly once (completed, expired or
aborted) and every waiting push gets that outcome. The service around it: test_training_modes."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import numpy as np
import pytest

from paramserver.server.errors import ServiceError
from paramserver.server.idempotency import push_digest
from paramserver.server.rounds import Entry, Round, RoundResult, Ticket
from paramserver.training import Sync


def _entry(grads: dict[str, np.ndarray], key: str | None = None) -> Entry:
    return Entry(push_digest(grads), key, lambda result: None)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_arrival_order_gives_the_same_bits(dtype) -> None:
    rng = np.random.default_rng(3)
    n = 4
    grads = [
        {
            "a": (rng.standard_normal(50) * 10.0 ** rng.integers(-3, 4, 50)).astype(dtype),
            "b": rng.standard_normal((2, 3)).astype(dtype),
        }
        for _ in range(n)
    ]
    shapes = {"a": (50,), "b": (2, 3)}
    results = set()
    for order in itertools.permutations(range(n)):
        current = Round(Sync(n))
        full = None
        for i in order:
            flat = {k: v.reshape(-1) for k, v in grads[i].items()}
            _, full = current.add(_entry(grads[i]), flat)
        assert full is not None and len(full) == n
        mean = current.mean(full, shapes)
        assert mean["a"].dtype == dtype and mean["b"].shape == (2, 3)
        results.add(b"".join(m.tobytes() for m in mean.values()))
    assert len(results) == 1
    # and it is the float64 mean rounded once (float64 gradients: up to an ulp of summation
    # order, the one thing a float64 accumulator cannot make exact)
    expected = {
        k: (np.sum([g[k].astype(np.float64) for g in grads], axis=0) / n).astype(dtype)
        for k in shapes
    }
    for k in shapes:
        if dtype == np.float64:
            np.testing.assert_allclose(mean[k], expected[k], rtol=4 * np.finfo(dtype).eps)
        else:
            np.testing.assert_array_equal(mean[k], expected[k])


def test_a_round_closes_once_and_the_next_starts_empty() -> None:
    current = Round(Sync(2, round_timeout_seconds=30))
    g = {"w": np.ones(3, np.float32)}
    serial, full = current.add(_entry(g, "k1"), g)
    assert full is None and current.waiting("k1") is not None
    assert current.summary()["received"] == 1
    _, full = current.add(_entry(g), g)
    assert full is not None and current.serial == serial + 1
    assert current.waiting("k1") is None and current.summary()["received"] == 0
    current.expire(serial)  # the closed round cannot expire any more
    assert all(not e.done for e in full)


def test_expiry_answers_every_waiting_push_and_only_once() -> None:
    current = Round(Sync(3, round_timeout_seconds=0.2))
    g = {"w": np.ones(3, np.float32)}
    entries = []
    tickets = []
    for _ in range(2):
        entry = _entry(g)
        serial, _ = current.add(entry, g)
        entries.append(entry)
        tickets.append(Ticket(current, entry, serial, current.deadline()))
    outcomes: list[BaseException] = []

    def wait(ticket: Ticket) -> None:
        try:
            ticket.wait()
        except ServiceError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=wait, args=(t,)) for t in tickets]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert 0.15 < time.monotonic() - started < 5
    assert [getattr(e, "code", None) for e in outcomes] == ["round_timeout"] * 2
    assert current.summary()["received"] == 0


def test_a_waiter_past_the_deadline_of_a_completing_round_gets_its_result() -> None:
    """The round was closed for completion just before a waiter's deadline: expiring it does
    nothing and the waiter waits for the result (the step and the journal commit)."""
    current = Round(Sync(2, round_timeout_seconds=0.05))
    g = {"w": np.ones(3, np.float32)}
    first = _entry(g)
    serial, _ = current.add(first, g)
    ticket = Ticket(current, first, serial, current.deadline())
    _, full = current.add(_entry(g), g)
    assert full is not None
    result = RoundResult(1, b"\x81\xaaiterations\x01")

    def complete_late() -> None:
        time.sleep(0.3)
        for entry in full:
            entry.resolve(result)

    threading.Thread(target=complete_late).start()
    assert ticket.wait() is result

    async def on_the_loop() -> RoundResult:
        entry = _entry(g)
        other = Round(Sync(1, round_timeout_seconds=0.01))
        s, closed = other.add(entry, g)
        assert closed is not None
        threading.Timer(0.2, entry.resolve, args=(result,)).start()
        return await Ticket(other, entry, s, other.deadline()).wait_async()

    assert asyncio.run(on_the_loop()) is result


def test_the_mean_of_a_large_parameter_spans_chunks_exactly() -> None:
    """A parameter larger than the mean's chunk (and not a multiple of it), and a sum of
    negative zeros: the same as one float64 sum over whole rows, rounded once."""
    rng = np.random.default_rng(5)
    size = 100_003
    grads = [{"w": rng.standard_normal(size).astype(np.float32)} for _ in range(3)]
    for g in grads:
        g["w"][:10] = -0.0
    current = Round(Sync(3))
    full = None
    for g in grads:
        _, full = current.add(_entry(g), g)
    assert full is not None
    mean = current.mean(full, {"w": (size,)})["w"]
    expected = (np.sum([g["w"].astype(np.float64) for g in grads], axis=0) / 3).astype(np.float32)
    np.testing.assert_array_equal(mean, expected)
    assert np.signbit(mean[:10]).all()
