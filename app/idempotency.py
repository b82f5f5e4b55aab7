"""Remembered pushes: an ``Idempotency-Key`` seen again replays the first answer.

A push may carry ``Idempotency-Key``. The first push with a key is applied and its answer is
remembered for ``window_seconds``; the same key on the same session within the window applies
nothing and gets that answer again. Keys are checked and recorded under the session's lock, so
two racing pushes with one key apply once.

Memory stays bounded: at most ``max_keys`` keys, and the answers' bytes up to
``max_body_bytes`` in all (newest kept). A replay whose bytes were dropped to keep that bound
answers ``{"iterations": N}`` alone (N of the original step), which tells the client the push
was applied; the client then pulls the weights if it wanted them.

Snapshots and the journal carry a session's keys across a restart (:meth:`export_session`,
:meth:`restore`): restored keys keep their iterations and expiry but not the answer's bytes, so
a retry after a restart gets ``{"iterations": N}``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

__all__ = ["IdempotencyCache", "Remembered", "check_key"]

_MAX_KEY_LENGTH = 255


def check_key(key: str) -> bool:
    """A key is 1-255 printable ASCII characters."""
    return 0 < len(key) <= _MAX_KEY_LENGTH and key.isascii() and key.isprintable()


@dataclass
class Remembered:
    iterations: int
    body: bytes | None
    expires: float


class IdempotencyCache:
    def __init__(
        self, *, window_seconds: float, max_keys: int, max_body_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self.window = window_seconds
        self.max_keys = max_keys
        self.max_body_bytes = max_body_bytes
        self._entries: OrderedDict[tuple[str, str], Remembered] = OrderedDict()
        self._by_session: dict[str, set[str]] = {}  # session id -> its keys in _entries
        self._body_bytes = 0
        # Entries that still hold an answer, oldest first (stale ones are skipped when met):
        # shrinking answers to fit max_body_bytes never walks the bodiless entries.
        self._with_body: deque[Remembered] = deque()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.window > 0 and self.max_keys > 0

    def get(self, session_id: str, key: str) -> Remembered | None:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get((session_id, key))
            if entry is None:
                return None
            if entry.expires <= now:
                self._drop((session_id, key))
                return None
            return entry

    def remember(self, session_id: str, key: str, iterations: int, body: bytes | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            self._drop((session_id, key))
            keep = body if body is not None and len(body) <= self.max_body_bytes else None
            self._add(session_id, key, Remembered(iterations, keep, now + self.window))
            if keep is not None:
                self._body_bytes += len(keep)
                self._with_body.append(self._entries[(session_id, key)])
            self._trim(now)

    def restore(self, session_id: str, key: str, iterations: int, expires_at: float) -> None:
        """Remember a key from a snapshot or the journal; ``expires_at`` is unix time."""
        if not self.enabled:
            return
        now = time.monotonic()
        left = min(expires_at - time.time(), self.window)
        if left <= 0:
            return
        with self._lock:
            self._drop((session_id, key))
            # Appended like a new key although it expires sooner: get() checks the expiry of
            # each key, and _trim() drops it once the keys before it are gone.
            self._add(session_id, key, Remembered(iterations, None, now + left))
            self._trim(now)

    def export_session(self, session_id: str) -> list[tuple[str, int, float]]:
        """``(key, iterations, expires_at)`` of the session's live keys, unix time.

        Call under the session's lock, so that the keys match the state saved with them.
        """
        now = time.monotonic()
        wall = time.time()
        with self._lock:
            keys = self._by_session.get(session_id, ())
            entries = [(k, self._entries[(session_id, k)]) for k in keys]
        return [(k, e.iterations, wall + e.expires - now) for k, e in entries if e.expires > now]

    def forget_session(self, session_id: str) -> None:
        with self._lock:
            for key in list(self._by_session.get(session_id, ())):
                self._drop((session_id, key))

    def __len__(self) -> int:
        return len(self._entries)

    def _add(self, session_id: str, key: str, entry: Remembered) -> None:
        self._entries[(session_id, key)] = entry
        self._by_session.setdefault(session_id, set()).add(key)

    def _drop(self, k: tuple[str, str]) -> None:
        entry = self._entries.pop(k, None)
        if entry is None:
            return
        keys = self._by_session[k[0]]
        keys.discard(k[1])
        if not keys:
            del self._by_session[k[0]]
        if entry.body is not None:
            self._body_bytes -= len(entry.body)
            entry.body = None  # so that its place in _with_body counts for nothing

    def _trim(self, now: float) -> None:
        # Oldest first: expired entries, then whatever exceeds the key bound.
        while self._entries:
            k, entry = next(iter(self._entries.items()))
            if entry.expires <= now or len(self._entries) > self.max_keys:
                self._drop(k)
            else:
                break
        while self._with_body and self._with_body[0].body is None:
            self._with_body.popleft()  # dropped or expired: forget them in order
        while self._body_bytes > self.max_body_bytes and self._with_body:
            entry = self._with_body.popleft()
            if entry.body is not None:  # None: dropped or already shrunk
                self._body_bytes -= len(entry.body)
                entry.body = None
