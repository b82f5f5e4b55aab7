"""Remembered pushes: an ``Idempotency-Key`` seen again replays the first answer.

A push may carry ``Idempotency-Key``. The first push with a key is applied and its answer is
remembered for ``window_seconds``; the same key on the same session within the window applies
nothing and gets that answer again. Keys are checked and recorded under the session's lock, so
two racing pushes with one key apply once.

A live key is never forgotten before its window ends, whatever other sessions do: each
session holds at most ``max_keys_per_session`` keys and all sessions together ``max_keys``;
at either bound a new keyed push is refused (:class:`KeysExhausted`, answered 503 with
``Retry-After`` until the oldest key of the session expires) rather than evicting a key a
client may still retry with. Only the answers' bytes shrink: at most ``max_body_bytes`` of them
in all (newest kept); a replay whose bytes were dropped answers ``{"iterations": N}`` alone (N
of the original step), which tells the client the push was applied; the client then pulls the
weights if it wanted them.

A key remembers the :func:`push_digest` of its push: a repeat whose gradients differ is not a
retry but a client reusing a key for another push, refused (``idempotency_key_reused``) rather
than answered with the first push's result. The digest is of the decoded gradients (names,
dtypes, shapes, bytes), not of the request body, so a retry framed differently still matches.
A large push on the data plane has its key remembered with the digest pending, computed right
after its answer has left (:class:`DeferredDigest`); whatever meets the key before that waits
for it, and nothing ever takes a pending digest for a missing one.

Snapshots and the journal carry a session's keys across a restart (:meth:`export_session`,
:meth:`restore`): restored keys keep their iterations, digest and expiry but not the answer's
bytes, so a retry after a restart gets ``{"iterations": N}``. Keys restored from a snapshot of
format 2 or older have no digest and match any push. Restored keys are never refused or
dropped for the bounds.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from paramserver.messages import push_digest

__all__ = [
    "DIGEST_WAIT_SECONDS",
    "DeferredDigest",
    "DigestPending",
    "IdempotencyCache",
    "KeysExhausted",
    "Remembered",
    "check_key",
    "push_digest",
]

_MAX_KEY_LENGTH = 255


def check_key(key: str) -> bool:
    """A key is 1-255 printable ASCII characters."""
    return 0 < len(key) <= _MAX_KEY_LENGTH and key.isascii() and key.isprintable()


#: How long a retry (or a snapshot) waits for the digest of a key whose push has just been
#: applied (:class:`DeferredDigest`: computed by that push's connection right after its
#: answer left, in milliseconds); past it the retry is answered 503 ``session_busy``.
DIGEST_WAIT_SECONDS = 5.0


class DigestPending(Exception):
    """The digest of a remembered key did not come within :data:`DIGEST_WAIT_SECONDS`."""


@dataclass(slots=True)
class Remembered:
    iterations: int
    body: bytes | None
    expires: float
    digest: bytes | None = None  # None: restored from a snapshot of format <= 2
    #: Set once the digest is known, for a key remembered before it (:class:`DeferredDigest`).
    pending: threading.Event | None = None

    def known_digest(self) -> bytes | None:
        """The digest, once known (waits for a deferred one; :class:`DigestPending`)."""
        pending = self.pending
        if pending is not None and not pending.wait(DIGEST_WAIT_SECONDS):
            raise DigestPending("the first push with this key is still being recorded")
        return self.digest

    def matches(self, digest: bytes) -> bool:
        known = self.known_digest()
        return known is None or known == digest


class DeferredDigest:
    """The digest of a keyed push, computed after its answer has left.

    The digest is compared only when the same key comes again, so a transport whose
    gradients stay valid after the step (the data plane's receive buffer, until the
    connection's next request) hands one of these to the step: the key is remembered with
    its digest pending, and :meth:`settle`, called by the transport as soon as the session's
    lock is released (before it waits on a slow reader), computes it. A retry or a snapshot
    that meets the key meanwhile waits for it (:meth:`Remembered.known_digest`).
    """

    def __init__(self, gradients: Mapping[str, Any]) -> None:
        self.gradients = gradients
        self.entry: Remembered | None = None  # set under the session's lock by remember()

    def settle(self) -> None:
        entry, self.entry = self.entry, None
        if entry is None:
            return
        assert entry.pending is not None
        try:
            entry.digest = push_digest(self.gradients)
        finally:
            # (should the digest fail, the key matches any push, as a key restored without
            # one does: a retry is answered, never applied twice)
            entry.pending.set()


class KeysExhausted(Exception):
    """No room for another live key; ``retry_after`` seconds until the session's oldest expires."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class IdempotencyCache:
    def __init__(
        self,
        *,
        window_seconds: float,
        max_keys: int,
        max_keys_per_session: int | None = None,
        max_body_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.window = window_seconds
        self.max_keys = max_keys
        self.max_keys_per_session = (
            max_keys if max_keys_per_session is None else max_keys_per_session
        )
        self.max_body_bytes = max_body_bytes
        # Per session, its keys in the order they were remembered: that is expiry order, as
        # every key lives one window (restored keys, which expire sooner, are checked one by
        # one in get()).
        self._sessions: dict[str, OrderedDict[str, Remembered]] = {}
        self._count = 0
        self._body_bytes = 0
        # Entries that still hold an answer, oldest first (stale ones are skipped when met):
        # shrinking answers to fit max_body_bytes never walks the bodiless entries.
        self._with_body: deque[Remembered] = deque()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.window > 0 and self.max_keys > 0 and self.max_keys_per_session > 0

    def get(self, session_id: str, key: str) -> Remembered | None:
        now = time.monotonic()
        with self._lock:
            keys = self._sessions.get(session_id)
            entry = None if keys is None else keys.get(key)
            if entry is None:
                return None
            if entry.expires <= now:
                self._drop(session_id, key)
                return None
            return entry

    def pending(self, session_id: str, key: str) -> bool:
        """Whether ``key`` is remembered with its digest still being computed (a push on the
        event loop that meets it goes to a worker thread: it would wait for the digest)."""
        with self._lock:
            keys = self._sessions.get(session_id)
            entry = None if keys is None else keys.get(key)
        return entry is not None and entry.pending is not None and not entry.pending.is_set()

    def check_room(self, session_id: str) -> None:
        """Raise :class:`KeysExhausted` unless a new key of ``session_id`` can be remembered
        without forgetting a live one. Call under the session's lock, before applying."""
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            self._expire(session_id, now)
            keys = self._sessions.get(session_id)
            held = 0 if keys is None else len(keys)
            if held < self.max_keys_per_session and self._count < self.max_keys:
                return
            if held >= self.max_keys_per_session:
                assert keys is not None
                oldest = next(iter(keys.values())).expires
                raise KeysExhausted(
                    f"session {session_id!r} holds {held} live Idempotency-Keys, its bound "
                    f"(idempotency_max_keys_per_session); retry when the oldest expires",
                    retry_after=max(1.0, math.ceil(oldest - now)),
                )
            for other in list(self._sessions):  # the global bound: expire everywhere first
                self._expire(other, now)
            if self._count < self.max_keys:
                return
            soonest = min(next(iter(k.values())).expires for k in self._sessions.values())
            raise KeysExhausted(
                f"the server holds {self._count} live Idempotency-Keys, its bound "
                "(idempotency_max_keys); retry when the oldest expires",
                retry_after=max(1.0, math.ceil(soonest - now)),
            )

    def remember(
        self,
        session_id: str,
        key: str,
        iterations: int,
        body: bytes | None,
        digest: bytes | None = None,
        *,
        later: DeferredDigest | None = None,
    ) -> None:
        """Remember a key whose push was applied (after :meth:`check_room` said yes), with
        its ``digest``, or with the digest that ``later`` will settle."""
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            self._drop(session_id, key)
            keep = body if body is not None and len(body) <= self.max_body_bytes else None
            entry = Remembered(iterations, keep, now + self.window, digest)
            if later is not None and digest is None:
                entry.pending = threading.Event()
                later.entry = entry
            self._add(session_id, key, entry)
            if keep is not None:
                self._body_bytes += len(keep)
                self._with_body.append(entry)
            self._shrink_bodies(now)

    def restore(
        self,
        session_id: str,
        key: str,
        iterations: int,
        expires_at: float,
        digest: bytes | None = None,
    ) -> None:
        """Remember a key from a snapshot or the journal; ``expires_at`` is unix time."""
        if not self.enabled:
            return
        now = time.monotonic()
        left = min(expires_at - time.time(), self.window)
        if left <= 0:
            return
        with self._lock:
            self._drop(session_id, key)
            # Appended like a new key although it may expire sooner: get() checks the expiry
            # of each key, and _expire() drops it once the keys before it are gone.
            self._add(session_id, key, Remembered(iterations, None, now + left, digest))

    def export_session(self, session_id: str) -> list[tuple[str, int, float, str | None]]:
        """``(key, iterations, expires_at, digest)`` of the session's live keys: unix time,
        the digest in hex (None for a key restored without one).

        Call under the session's lock, so that the keys match the state saved with them.
        """
        now = time.monotonic()
        wall = time.time()
        with self._lock:
            entries = list(self._sessions.get(session_id, {}).items())
        out = []
        for k, e in entries:
            if e.expires > now:
                digest = e.known_digest()  # a deferred one is waited for, never saved as None
                hexed = None if digest is None else digest.hex()
                out.append((k, e.iterations, wall + e.expires - now, hexed))
        return out

    def forget_session(self, session_id: str) -> None:
        with self._lock:
            keys = self._sessions.pop(session_id, None)
            if keys is None:
                return
            self._count -= len(keys)
            for entry in keys.values():
                self._release_body(entry)

    def keys_of(self, session_id: str) -> int:
        """How many keys the session holds (live or not yet swept)."""
        with self._lock:
            return len(self._sessions.get(session_id, ()))

    def __len__(self) -> int:
        return self._count

    def _add(self, session_id: str, key: str, entry: Remembered) -> None:
        self._sessions.setdefault(session_id, OrderedDict())[key] = entry
        self._count += 1

    def _drop(self, session_id: str, key: str) -> None:
        keys = self._sessions.get(session_id)
        entry = None if keys is None else keys.pop(key, None)
        if entry is None:
            return
        self._count -= 1
        if not keys:
            del self._sessions[session_id]
        self._release_body(entry)

    def _release_body(self, entry: Remembered) -> None:
        if entry.body is not None:
            self._body_bytes -= len(entry.body)
            entry.body = None  # so that its place in _with_body counts for nothing

    def _expire(self, session_id: str, now: float) -> None:
        keys = self._sessions.get(session_id)
        while keys:
            key, entry = next(iter(keys.items()))
            if entry.expires > now:
                break
            self._drop(session_id, key)
            keys = self._sessions.get(session_id)

    def _shrink_bodies(self, now: float) -> None:
        # Every entry here was remembered for one window, in order: the deque is in expiry
        # order, so an expired head goes with its body even while its session's keys are
        # not swept (a session that pushes no more would otherwise keep every later entry
        # of every other session behind it here, bodiless, for good).
        while self._with_body and (
            self._with_body[0].body is None or self._with_body[0].expires <= now
        ):
            self._release_body(self._with_body.popleft())  # dropped, expired: in order
        while self._body_bytes > self.max_body_bytes and self._with_body:
            entry = self._with_body.popleft()
            if entry.body is not None:  # None: dropped or already shrunk
                self._body_bytes -= len(entry.body)
                entry.body = None
