"""A keyed push's digest left for after its answer (``idempotency.DeferredDigest``, what the
data plane does for pushes over 64 KiB): a retry or a snapshot that meets the key before
the digest is in waits for it; the digest is the one computed up front; nothing that needs it
earlier (a retry of the key, a sync round, the journal) defers it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserver import wire
from paramserver.codes import ErrorCode
from paramserver.messages import push_digest
from paramserver.server import idempotency
from paramserver.server.errors import ServiceError
from paramserver.server.idempotency import DeferredDigest, DigestPending, IdempotencyCache
from paramserver.server.persistence.snapshots import decode_snapshot
from paramserver.server.service import SessionService
from tests.harness.service import DurableService, plain_service

WEIGHTS = {"w": np.zeros(40_000, np.float32), "b": np.zeros(3, np.float32)}


def _grads(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(w.shape, value, np.float32) for name, w in WEIGHTS.items()}


def _create(service: SessionService, sid: str, **extra: Any) -> Any:
    body = wire.pack({"session_id": sid, "optimizer": "sgd", "weights": WEIGHTS, **extra})
    service.create(body, "msgpack")
    return service.store.get(sid)


def _push(
    service: SessionService,
    session: Any,
    grads: dict[str, np.ndarray],
    key: str,
    later: DeferredDigest | None = None,
    **kw: Any,
) -> Any:
    return service.push_gradients(
        session,
        grads,
        journal_body=lambda: wire.pack({"gradients": grads}),
        idempotency_key=key,
        answer=lambda trainer: trainer.iterations,
        remember=lambda value: None,
        digest_later=later,
        **kw,
    )


# --- the cache's side ----------------------------------------------------------------------


def test_a_deferred_digest_is_the_digest_and_a_match_waits_for_it():
    cache = IdempotencyCache(window_seconds=60, max_keys=10)
    grads = _grads(1.0)
    later = DeferredDigest(grads)
    cache.remember("s", "k", 1, None, later=later)
    entry = cache.get("s", "k")
    assert entry is not None and entry.digest is None and later.entry is entry
    verdicts: list[bool] = []
    waiting = threading.Thread(target=lambda: verdicts.append(entry.matches(push_digest(grads))))
    waiting.start()
    time.sleep(0.2)
    assert verdicts == []  # still waiting: the digest is not in
    later.settle()
    waiting.join(5)
    assert verdicts == [True] and entry.digest == push_digest(grads)
    assert not entry.matches(push_digest(_grads(2.0)))
    later.settle()  # a second settle does nothing
    assert cache.export_session("s")[0][3] == push_digest(grads).hex()


def test_a_digest_that_never_comes_is_digest_pending_not_a_match(monkeypatch):
    monkeypatch.setattr(idempotency, "DIGEST_WAIT_SECONDS", 0.05)
    cache = IdempotencyCache(window_seconds=60, max_keys=10)
    cache.remember("s", "k", 1, None, later=DeferredDigest(_grads(1.0)))
    entry = cache.get("s", "k")
    assert entry is not None
    with pytest.raises(DigestPending):
        entry.matches(push_digest(_grads(1.0)))
    with pytest.raises(DigestPending):  # never saved as "no digest" (which matches any push)
        cache.export_session("s")


def test_a_digest_given_up_front_is_not_deferred():
    cache = IdempotencyCache(window_seconds=60, max_keys=10)
    later = DeferredDigest(_grads(1.0))
    cache.remember("s", "k", 1, None, b"d" * 16, later=later)
    entry = cache.get("s", "k")
    assert later.entry is None and entry is not None and entry.pending is None
    assert entry.matches(b"d" * 16)


# --- the service's side --------------------------------------------------------------------


def test_a_retry_that_comes_before_the_digest_waits_for_it_then_replays_or_is_refused():
    service = plain_service()
    session = _create(service, "later")
    first = _grads(1.0)
    later = DeferredDigest(first)
    outcome = _push(service, session, first, "k", later)
    assert outcome.iterations == 1 and not outcome.replayed and later.entry is not None
    results: list[Any] = []

    def retry(grads: dict[str, np.ndarray]) -> None:
        try:
            results.append(_push(service, session, grads, "k"))
        except ServiceError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=retry, args=(g,)) for g in (first, _grads(3.0))]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    assert results == []  # both wait for the first push's digest
    later.settle()
    for thread in threads:
        thread.join(10)
    replays = [r for r in results if not isinstance(r, ErrorCode)]
    assert len(replays) == 1 and replays[0].replayed and replays[0].iterations == 1
    assert ErrorCode.IDEMPOTENCY_KEY_REUSED in results
    assert session.trainer.iterations == 1  # applied once


def test_a_retry_of_the_key_computes_its_digest_up_front():
    service = plain_service()
    session = _create(service, "retry")
    grads = _grads(1.0)
    _push(service, session, grads, "k")
    later = DeferredDigest(grads)
    outcome = _push(service, session, grads, "k", later)
    assert outcome.replayed and later.entry is None


def test_a_sync_round_does_not_defer():
    service = plain_service()
    session = _create(service, "round", training={"mode": "sync", "replicas_to_aggregate": 1})
    later = DeferredDigest(_grads(1.0))
    ticket = _push(service, session, _grads(1.0), "k", later, base_iterations=0)
    assert ticket.wait().iterations == 1
    assert later.entry is None
    entry = service.idempotency.get(session.id, "k")
    assert entry is not None and entry.pending is None and entry.digest is not None


@pytest.mark.parametrize("durability", ["journal", "snapshot"])
def test_what_a_restart_keeps_is_the_digest(
    durable_services: Callable[..., DurableService], durability: str
):
    first = durable_services(durability=durability)
    first.create("s", "sgd", WEIGHTS)
    session = first.service.store.get("s")
    grads = _grads(1.0)
    later = DeferredDigest(grads)
    _push(first.service, session, grads, "k", later)
    assert (later.entry is None) == (durability == "journal")  # the journal records it first
    later.settle()
    first.close()
    snapshots = sorted(Path(first.settings.snapshot_dir).glob("*.snapshot"))  # type: ignore[arg-type]
    header, _ = decode_snapshot(snapshots[-1].read_bytes())
    (entry,) = header["idempotency"]
    assert entry[0] == "k" and entry[3] == push_digest(grads).hex()
    second = durable_services(durability=durability)
    with pytest.raises(ServiceError) as info:
        second.push("s", _grads(2.0), key="k")
    assert info.value.code is ErrorCode.IDEMPOTENCY_KEY_REUSED
    answer, replayed = second.push("s", grads, key="k")
    assert replayed and answer == {"iterations": 1}


def test_a_snapshot_asked_while_a_digest_never_comes_is_503_and_saves_nothing(
    durable_services: Callable[..., DurableService], monkeypatch: pytest.MonkeyPatch
):
    """``POST /sessions/{id}/snapshot`` meeting a key whose digest is not in within
    DIGEST_WAIT_SECONDS: 503 ``session_busy`` (retry), no snapshot without the digest; once
    the digest is in, the snapshot holds it."""
    monkeypatch.setattr(idempotency, "DIGEST_WAIT_SECONDS", 0.05)
    durable = durable_services(durability="snapshot")
    durable.create("s", "sgd", WEIGHTS)
    session = durable.service.store.get("s")
    grads = _grads(1.0)
    later = DeferredDigest(grads)
    _push(durable.service, session, grads, "k", later)
    directory = Path(durable.settings.snapshot_dir)  # type: ignore[arg-type]
    before = sorted(directory.glob("*.snapshot"))
    with pytest.raises(ServiceError) as info:
        durable.service.snapshot(session)
    assert info.value.code is ErrorCode.SESSION_BUSY and info.value.status == 503
    assert info.value.headers == {"Retry-After": "1"}
    assert sorted(directory.glob("*.snapshot")) == before
    later.settle()
    saved = durable.service.snapshot(session)
    assert saved["iterations"] == 1
    header, _ = decode_snapshot(sorted(directory.glob("*.snapshot"))[-1].read_bytes())
    (entry,) = header["idempotency"]
    assert entry[0] == "k" and entry[3] == push_digest(grads).hex()
