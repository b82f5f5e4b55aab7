"""Synchronous rounds: N gradients computed on the same weights, applied as their mean.

A sync session (:class:`paramserver.training.Sync`) owns one :class:`Round`. A push joins it
under the session's lock (its gradient checked and copied into the round's rows); the push
that brings the N-th gradient computes the mean, applies it as one step, journals it as one
record and answers every push of the round with the same weights. The others wait for that
answer on a :class:`Ticket`: over HTTP on the event loop (no thread held), on the data plane in
their connection's thread.

The mean is the same whatever order the gradients arrive in: the rows are summed in float64
in the order of their pushes' digests (xxh3-128 of the decoded gradients, a function of the
set of gradients, not of their arrival; equal digests are equal gradients, whose order does
not matter), divided by N once and rounded once to each parameter's dtype. A shard of a
sharded session orders by the ``round_order`` each part carries (the digest of the whole
push, computed by the client), so every shard sums in the order the single server would.
(TensorFlow's ``ConditionalAccumulator`` sums in float32 in arrival order, so its mean is not
reproducible this way.)

Locks: the round's own lock is held only for bookkeeping (never during a step or I/O), so a
waiter may take it from the event loop to expire its round at the deadline. The rows are
written and read only under the session's lock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserver.codes import ErrorCode
from paramserver.messages import decode_weights
from paramserver.training import Sync, Training

from .errors import ServiceError, ServiceUnavailable
from .training import Trainer

__all__ = ["Entry", "Round", "RoundResult", "Ticket", "held_bytes", "round_bytes"]

log = logging.getLogger("paramserver")

#: How long a push whose round was closed for completion at its deadline waits for the step
#: and the journal's commit before it gives up (a safety net: completion resolves every push
#: of the round, errors included).
COMPLETION_SECONDS = 120.0


def _unresolved() -> ServiceError:
    return ServiceError(
        "the round was being applied but its outcome did not arrive; check the server's log",
        code=ErrorCode.INTERNAL_ERROR,
    )


#: Elements per chunk of the mean: 256 KiB of float64 sums, within a core's L2 cache.
_CHUNK = 1 << 15


def round_bytes(training: Training, trainer: Trainer) -> int:
    """Bytes a sync round holds: one row of every parameter per gradient it waits for."""
    if not isinstance(training, Sync):
        return 0
    weights = sum(
        int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        for dtype, shape in trainer.parameters().values()
    )
    return training.replicas_to_aggregate * weights


def held_bytes(trainer: Trainer) -> int:
    """What a session with this trainer holds: weights, slots and its round's rows."""
    return trainer.nbytes() + round_bytes(trainer.training, trainer)


@dataclass
class RoundResult:
    """A completed round: the new iteration count and the answer with the new weights, encoded
    once for every push of the round (the data plane sends views of the same bytes)."""

    iterations: int
    body: bytes
    _weights: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def weights(self) -> dict[str, np.ndarray]:
        """The weights as read-only views of :attr:`body`."""
        if self._weights is None:
            _, weights = decode_weights(self.body)
            assert weights is not None
            self._weights = weights
        return self._weights


class Entry:
    """One gradient of a round, and the pushes waiting for its outcome (a push and its retries
    with the same Idempotency-Key)."""

    def __init__(
        self,
        digest: bytes,
        key: str | None,
        remember: Callable[..., bytes | None],
        *,
        order: str | None = None,
    ) -> None:
        self.digest = digest
        #: What the round's sum orders this gradient by: the push's ``round_order`` (a
        #: sharded push's whole digest) or its own digest, as hex.
        self.order = digest.hex() if order is None else order
        #: When the push arrived (monotonic), its gradients' bytes and the metrics it
        #: reports: recorded once the round is applied.
        self.arrived = time.monotonic()
        self.nbytes = 0
        self.metrics: Mapping[str, float] | None = None
        #: The row indices of each gradient it sent as rows (a lazy session's round steps
        #: the union of them).
        self.sparse_rows: dict[str, np.ndarray] = {}
        self.key = key
        self.remember = remember
        self.result: RoundResult | None = None
        self.error: ServiceError | None = None
        self.done = False
        self._wakers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def resolve(self, result: RoundResult | None, error: ServiceError | None = None) -> None:
        with self._lock:
            if self.done:
                return
            self.result, self.error, self.done = result, error, True
            wakers = list(self._wakers)
        for wake in wakers:
            try:
                wake()
            except Exception:  # e.g. the event loop of a waiter is gone: wake the others
                log.exception("waking a push waiting for its round failed")

    def watch(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if not self.done:
                self._wakers.append(wake)
                return
        wake()

    def unwatch(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if wake in self._wakers:
                self._wakers.remove(wake)


class Round:
    """The open round of one sync session (see the module docstring)."""

    def __init__(self, training: Sync) -> None:
        self.training = training
        self.lock = threading.Lock()
        self.serial = 0  # grows when a round closes (completed, expired, aborted)
        self.entries: list[Entry] = []
        self.by_key: dict[str, Entry] = {}
        self.started = 0.0  # monotonic time of the round's first gradient
        #: Pushes that arrived for the round completed last (its N, then stale ones): past
        #: total_num_replicas, a push for it is ``round_full``, not ``stale_gradient``.
        self.previous_arrivals = 0
        self._rows: dict[str, np.ndarray] = {}

    # -- under the session's lock ----------------------------------------------------------

    def add(self, entry: Entry, flat: Mapping[str, np.ndarray]) -> tuple[int, list[Entry] | None]:
        """Copy a checked gradient (flat arrays in the parameters' dtypes) into the next row.
        Returns the round's serial and, when this gradient fills it, its entries: the round
        is then closed (no deadline can expire it) and the caller completes it."""
        n = self.training.replicas_to_aggregate
        with self.lock:
            row = len(self.entries)
            assert row < n
            for name, grad in flat.items():
                rows = self._rows.get(name)
                if rows is None or rows.dtype != grad.dtype or rows.shape[1] != grad.size:
                    rows = self._rows[name] = np.empty((n, grad.size), grad.dtype)
                np.copyto(rows[row], grad.reshape(-1))
            if not self.entries:
                self.started = time.monotonic()
            self.entries.append(entry)
            serial = self.serial
            if len(self.entries) < n:
                if entry.key is not None:
                    self.by_key[entry.key] = entry
                return serial, None
            entries, self.entries, self.by_key = self.entries, [], {}
            self.serial += 1
            return serial, entries

    def waiting(self, key: str) -> tuple[Entry, int] | None:
        """The open round's entry pushed with Idempotency-Key ``key``, and the round's serial."""
        with self.lock:
            entry = self.by_key.get(key)
            return None if entry is None else (entry, self.serial)

    def mean(
        self, entries: list[Entry], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        """The mean gradient of a full round (``entries`` as :meth:`add` returned them, the
        rows not yet reused): rows summed in float64 in digest order, divided once, rounded
        once (identical for any arrival order)."""
        n = len(entries)
        order = sorted(range(n), key=lambda i: entries[i].order)
        out: dict[str, np.ndarray] = {}
        for name, rows in self._rows.items():
            size = rows.shape[1]
            mean = np.empty(size, rows.dtype)
            acc = np.empty(min(size, _CHUNK), np.float64)
            # In chunks that stay in cache: the rows are read once, the float64 sums never
            # travel to memory. Starting from the first row (not from 0.0) keeps a sum of
            # negative zeros negative, as numpy's own reductions do.
            for start in range(0, size, _CHUNK):
                stop = min(start + _CHUNK, size)
                part = acc[: stop - start]
                np.copyto(part, rows[order[0], start:stop])
                for i in order[1:]:
                    np.add(part, rows[i, start:stop], out=part)
                np.divide(part, n, out=part)
                np.copyto(mean[start:stop], part, casting="same_kind")
            out[name] = mean.reshape(shapes[name])
        return out

    def close(self) -> list[Entry]:
        """End the open round unapplied; returns its entries for the caller to resolve."""
        with self.lock:
            entries, self.entries, self.by_key = self.entries, [], {}
            self.serial += 1
            return entries

    def forget_rows(self) -> None:
        """Drop the rows' memory (the session is gone or no longer sync)."""
        self._rows = {}

    # -- from any thread or the event loop -------------------------------------------------

    def deadline(self) -> float:
        return self.started + self.training.round_timeout_seconds

    def expire(self, serial: int) -> None:
        """At the deadline of round ``serial``: if it is still open, close it and answer its
        pushes 503 ``round_timeout`` (nothing of it is applied). A round being completed
        meanwhile was closed already: its pushes get its answer instead."""
        with self.lock:
            if self.serial != serial or not self.entries:
                return
            entries, self.entries, self.by_key = self.entries, [], {}
            self.serial += 1
        timeout = self.training.round_timeout_seconds
        error = ServiceUnavailable(
            f"the round did not get its {self.training.replicas_to_aggregate} gradients "
            f"within {timeout:g} s (round_timeout_seconds; it had {len(entries)}); nothing "
            "was applied: pull the weights and push again",
            code=ErrorCode.ROUND_TIMEOUT,
            headers={"Retry-After": "1"},
        )
        for entry in entries:
            entry.resolve(None, error)

    def summary(self) -> dict[str, Any]:
        with self.lock:
            received = len(self.entries)
            age = time.monotonic() - self.started if received else 0.0
        return {
            "received": received,
            "needed": self.training.replicas_to_aggregate,
            "age_seconds": round(age, 3),
        }


@dataclass
class Ticket:
    """A push waiting in a round: :meth:`wait` (a thread) or :meth:`wait_async` (the event
    loop) returns the round's result or raises its error."""

    round: Round
    entry: Entry
    serial: int
    deadline: float  # monotonic
    #: The push's ``return`` (the weights its answer carries), for the transport.
    returns: Any = None

    def _outcome(self) -> RoundResult:
        if self.entry.error is not None:
            raise self.entry.error
        assert self.entry.result is not None
        return self.entry.result

    def wait(self) -> RoundResult:
        event = threading.Event()
        self.entry.watch(event.set)
        try:
            if not event.wait(max(0.0, self.deadline - time.monotonic())):
                self.round.expire(self.serial)
                # Expired now, or being completed (the step and the journal's commit): it is
                # resolved either way; the bound is a safety net, never the normal path.
                if not event.wait(COMPLETION_SECONDS):
                    raise _unresolved()
        finally:
            self.entry.unwatch(event.set)
        return self._outcome()

    async def wait_async(self) -> RoundResult:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(event.set)

        self.entry.watch(wake)
        try:
            try:
                await asyncio.wait_for(event.wait(), max(0.0, self.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.round.expire(self.serial)
                try:
                    await asyncio.wait_for(event.wait(), COMPLETION_SECONDS)
                except asyncio.TimeoutError:
                    raise _unresolved() from None
        finally:
            self.entry.unwatch(wake)
        return self._outcome()
