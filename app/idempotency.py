"""Remembered pushes: an ``Idempotency-Key`` seen again replays the first answer.

A push may carry ``Idempotency-Key``. The first push with a key is applied and its answer is
remembered for ``window_seconds``; the same key on the same session within the window applies
nothing and gets that answer again. Keys are checked and recorded under the session's lock, so
two racing pushes with one key apply once.

Memory stays bounded: at most ``max_keys`` keys, and the answers' bytes up to
``max_body_bytes`` in all (newest kept). A replay whose bytes were dropped to keep that bound
answers ``{"iterations": N}`` alone (N of the original step), which tells the client the push
was applied; the client then pulls the weights if it wanted them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
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
        self._body_bytes = 0
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
            self._entries[(session_id, key)] = Remembered(iterations, keep, now + self.window)
            if keep is not None:
                self._body_bytes += len(keep)
            self._trim(now)

    def forget_session(self, session_id: str) -> None:
        with self._lock:
            for k in [k for k in self._entries if k[0] == session_id]:
                self._drop(k)

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, k: tuple[str, str]) -> None:
        entry = self._entries.pop(k, None)
        if entry is not None and entry.body is not None:
            self._body_bytes -= len(entry.body)

    def _trim(self, now: float) -> None:
        # Oldest first: expired entries, then whatever exceeds the key bound.
        while self._entries:
            k, entry = next(iter(self._entries.items()))
            if entry.expires <= now or len(self._entries) > self.max_keys:
                self._drop(k)
            else:
                break
        if self._body_bytes > self.max_body_bytes:
            for entry in self._entries.values():
                if self._body_bytes <= self.max_body_bytes:
                    break
                if entry.body is not None:
                    self._body_bytes -= len(entry.body)
                    entry.body = None
