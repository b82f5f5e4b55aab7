"""The idempotency store's own bookkeeping, in process (``idempotency.IdempotencyCache``):
what it holds is bounded by the live keys, whichever sessions stop pushing."""

from __future__ import annotations

import time

from paramserver.server.idempotency import IdempotencyCache


def _push(cache: IdempotencyCache, session: str, key: str, body: bytes | None) -> None:
    """What the service does for a keyed push: room first, then remember."""
    cache.check_room(session)
    cache.remember(session, key, 1, body, b"d" * 16)


def test_an_idle_sessions_answer_does_not_keep_later_entries_forever() -> None:
    """One kept answer of a session that pushes no more used to stay at the head of the
    answers' queue, and every later entry of every session behind it, bodiless, for good."""
    window = 0.05
    cache = IdempotencyCache(window_seconds=window, max_keys=10**6, max_body_bytes=1 << 20)
    _push(cache, "a", "head", b"x" * 100)  # then session a is quiet
    for round_ in range(4):
        for i in range(500):
            _push(cache, "b", f"{round_}-{i}", b"y" * 10 if i % 2 else None)
        time.sleep(window * 2)  # every key so far has expired
    _push(cache, "b", "last", b"z" * 10)
    # only the last push's entry is left in the queue of answers, and its bytes counted
    assert len(cache._with_body) == 1
    assert cache._body_bytes == 10
    # b's expired keys were swept by its own pushes; a's expired key waits for a's next one
    assert cache.keys_of("b") == 1
    assert cache.get("a", "head") is None
    _push(cache, "a", "next", None)
    assert cache.keys_of("a") == 1 and len(cache) == 2


def test_live_answers_stay_and_their_bytes_stay_bounded() -> None:
    cache = IdempotencyCache(window_seconds=60, max_keys=10**6, max_body_bytes=1000)
    for i in range(50):
        _push(cache, "s", f"k{i}", b"a" * 100)
    assert cache._body_bytes <= 1000
    kept = [e for e in cache._with_body if e.body is not None]
    assert len(kept) == 10 and sum(len(e.body or b"") for e in kept) == cache._body_bytes
    entry = cache.get("s", "k49")
    assert entry is not None and entry.body == b"a" * 100  # the newest answers are kept
    old = cache.get("s", "k0")
    assert old is not None and old.body is None  # an old key replays its iterations alone
