"""Optimizer sessions held in memory, and the store that names them.

A :class:`Session` wraps one :class:`~paramserver.server.training.Trainer` with a lock: pushes to
one session are applied one at a time and a reader never sees a half-applied step, while sessions
are independent of each other (the numba kernels release the GIL, so steps of different sessions run
in parallel threads).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from paramserver.codes import SESSION_ID_RULE, ErrorCode, is_session_id
from paramserver.messages import PushLayouts, WeightsAnswers
from paramserver.training import Sync

from .errors import (
    InsufficientStorage,
    InvalidRequest,
    ServiceError,
    ServiceUnavailable,
    SessionExists,
    SessionNotFound,
)
from .observability import SessionStats, WorkerPoints
from .rounds import Round, held_bytes
from .training import Trainer

__all__ = ["Session", "SessionStore", "check_session_id"]


def check_session_id(session_id: Any) -> str:
    """``session_id`` if it is valid (:data:`paramserver.codes.SESSION_ID_PATTERN`), else 422."""
    if not is_session_id(session_id):
        raise InvalidRequest(
            f"session_id must be {SESSION_ID_RULE}", code=ErrorCode.INVALID_SESSION_ID
        )
    return str(session_id)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Locked:
    """:meth:`Session.locked`: a class, not a generator (one per push)."""

    __slots__ = ("session", "wait")

    def __init__(self, session: Session, wait: float | None) -> None:
        self.session, self.wait = session, wait

    def __enter__(self) -> Trainer:
        session, wait = self.session, self.wait
        if wait is None:
            session.lock.acquire()
        elif not session.lock.acquire(timeout=wait):
            raise ServiceUnavailable(
                f"session {session.id!r} stayed busy for {wait:g} s; retry",
                code=ErrorCode.SESSION_BUSY,
                headers={"Retry-After": "1"},
            )
        return session.trainer

    def __exit__(self, *exc: object) -> None:
        self.session.lock.release()


class Session:
    """One named trainer, its lock and its timestamps."""

    def __init__(self, session_id: str, trainer: Trainer) -> None:
        self.id = session_id
        self.trainer = trainer
        self.lock = threading.Lock()
        # Requests queue here, on the event loop, before taking a worker thread: a busy
        # session then holds one thread, not one per waiting request, and turns are FIFO.
        self.turn = asyncio.Lock()
        self.created_at = _now()
        self._touched = 0.0
        self._updated_at: datetime | None = self.created_at
        self.deleted = False
        #: Set once the session is durable (its create record written, with the journal): a
        #: push journaled before that record could be acknowledged and then lost with it.
        self.persisted = threading.Event()
        self.persisted.set()
        #: Called after every change of the iteration count (a step, a state load, a delete):
        #: what wakes pulls waiting for an iteration (``min_iterations``).
        self._watchers: set[Callable[[], None]] = set()
        self._watch_lock = threading.Lock()
        self._round: Round | None = None
        self._new_round()
        #: Counters for /metrics and /stats, and the points workers report with pushes.
        self.stats = SessionStats()
        self.points = WorkerPoints()
        #: The layouts of its workers' plain pushes and of its answers, kept to decode and
        #: encode the next ones fast.
        self.push_layouts = PushLayouts()
        self.answers = WeightsAnswers()

    def held_bytes(self) -> int:
        """What the session holds: weights, slots, a sync round's rows, reported points."""
        return held_bytes(self.trainer) + self.points.nbytes

    def _new_round(self) -> None:
        """A round of its own for a sync session (made with the trainer, under the lock or
        before the session is shared, never lazily by a reader)."""
        training = self.trainer.training
        self._round = Round(training) if isinstance(training, Sync) else None

    @property
    def round(self) -> Round | None:
        """The open round of a sync session (None for an async one); hold the lock to join."""
        return self._round

    def abort_round(self, error: ServiceError) -> None:
        """End the open round without applying it (a state import, a delete): its waiting
        pushes get ``error``, and a new round begins. Call with the lock held."""
        current = self._round
        if current is None:
            return
        for entry in current.close():
            entry.resolve(None, error)
        current.forget_rows()
        self._new_round()

    def changed(self) -> None:
        """Wake every pull waiting on this session (cheap: each watcher sets an event)."""
        with self._watch_lock:
            watchers = list(self._watchers)
        for wake in watchers:
            wake()

    def _reached(self, iterations: int) -> bool:
        return self.deleted or self.trainer.iterations >= iterations

    def wait_for(self, iterations: int, seconds: float) -> None:
        """Block (a thread) until the session reaches ``iterations``, is deleted, or
        ``seconds`` pass; the caller then reads what it has."""
        if seconds <= 0 or self._reached(iterations):
            return
        event = threading.Event()
        deadline = time.monotonic() + seconds
        with self._watching(event.set):
            while True:
                event.clear()
                remaining = deadline - time.monotonic()
                if self._reached(iterations) or remaining <= 0:
                    return
                event.wait(remaining)

    async def wait_for_async(self, iterations: int, seconds: float) -> None:
        """:meth:`wait_for` on the event loop: a waiting request holds no thread."""
        if seconds <= 0 or self._reached(iterations):
            return
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        deadline = loop.time() + seconds

        def wake() -> None:
            loop.call_soon_threadsafe(event.set)

        with self._watching(wake):
            while True:
                event.clear()
                remaining = deadline - loop.time()
                if self._reached(iterations) or remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except asyncio.TimeoutError:
                    return

    @contextmanager
    def _watching(self, wake: Callable[[], None]) -> Iterator[None]:
        with self._watch_lock:
            self._watchers.add(wake)
        try:
            yield
        finally:
            with self._watch_lock:
                self._watchers.discard(wake)

    def locked(self, wait: float | None = None) -> _Locked:
        """Hold the session's lock (``with session.locked() as trainer``): yields the current
        trainer. With ``wait``, a lock not free within that many seconds is 503
        ``session_busy`` (nothing done)."""
        return _Locked(self, wait)

    @property
    def updated_at(self) -> datetime:
        """When the session last changed (UTC); a step stores only the time, made a datetime
        when asked (a datetime per step costs a small push a few microseconds)."""
        at = self._updated_at
        if at is None:
            at = self._updated_at = datetime.fromtimestamp(self._touched, timezone.utc)
        return at

    @updated_at.setter
    def updated_at(self, value: datetime) -> None:
        self._updated_at = value

    def touch(self) -> None:
        self._touched = time.time()
        self._updated_at = None

    def summary(self, *, timestamps: bool = True) -> dict[str, Any]:
        """The JSON summary of the protocol (call with the lock held or accept a racy read)."""
        trainer = self.trainer
        out: dict[str, Any] = {
            "session_id": self.id,
            "optimizer": trainer.optimizer.to_dict(),
            "iterations": trainer.iterations,
            "refuse_non_finite": trainer.refuse_non_finite,
            "training": trainer.training.to_dict(),
            "sparse_updates": trainer.sparse_updates,
            "constraints": {name: c.to_dict() for name, c in trainer.constraints.items()},
            "parameters": {
                name: {"dtype": str(dtype), "shape": list(shape)}
                for name, (dtype, shape) in trainer.parameters().items()
            },
        }
        if trainer.shard is not None:
            out["shard"] = trainer.shard.to_dict()
        current = self.round
        if current is not None:
            out["round"] = current.summary()
        if timestamps:
            out["created_at"] = self.created_at.isoformat()
            out["updated_at"] = self.updated_at.isoformat()
        return out


class SessionStore:
    """The sessions of one server, by id, with a bound on their number and their memory."""

    def __init__(
        self,
        *,
        max_sessions: int,
        max_session_bytes: int | None = None,
        max_total_bytes: int | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_session_bytes = max_session_bytes
        self.max_total_bytes = max_total_bytes
        self._sessions: dict[str, Session] = {}
        self._reserved: set[str] = set()  # ids whose session is being built
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def find(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return session

    def list(self) -> list[Session]:
        with self._lock:
            return sorted(self._sessions.values(), key=lambda s: s.created_at)

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def total_bytes(self) -> int:
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(s.held_bytes() for s in sessions)

    def points_budget(self, session: Session) -> int | None:
        """Bytes the session's reported points may take: what its quota and the server's
        leave (None: no limit)."""
        budgets = []
        if self.max_session_bytes is not None:
            budgets.append(self.max_session_bytes - held_bytes(session.trainer))
        if self.max_total_bytes is not None:
            budgets.append(self.max_total_bytes - self.total_bytes())
        return None if not budgets else max(0, min(budgets))

    def add(
        self, session_id: str, build: Callable[[], Trainer], *, persisted: bool = True
    ) -> Session:
        """Create a session from ``build()`` under ``session_id``; 409 if the id is taken.

        The id is reserved before the (possibly slow) build so that two racing creates of the
        same id cannot both succeed; the memory quota is checked and the session inserted under
        one lock, so that two racing creates cannot both pass it. ``persisted=False``: the
        session's :attr:`Session.persisted` is clear until the caller sets it.
        """
        check_session_id(session_id)
        with self._lock:
            if session_id in self._sessions or session_id in self._reserved:
                raise SessionExists(f"session {session_id!r} already exists")
            if len(self._sessions) + len(self._reserved) >= self.max_sessions:
                raise InsufficientStorage(
                    f"the server holds its maximum of {self.max_sessions} sessions; "
                    "delete one first",
                    code=ErrorCode.TOO_MANY_SESSIONS,
                )
            self._reserved.add(session_id)
        try:
            trainer = build()
            session = Session(session_id, trainer)
            if not persisted:
                session.persisted.clear()
            with self._lock:
                self._check_memory(held_bytes(trainer), 0)
                self._sessions[session_id] = session
            return session
        finally:
            with self._lock:
                self._reserved.discard(session_id)

    def check_memory(self, needed: int, *, replacing: int = 0) -> None:
        """507 if a session of ``needed`` bytes (replacing one of ``replacing``) would not fit."""
        with self._lock:
            self._check_memory(needed, replacing)

    def _check_memory(self, needed: int, replacing: int) -> None:
        if self.max_session_bytes is not None and needed > self.max_session_bytes:
            raise InsufficientStorage(
                f"the session needs {needed} bytes of weights and optimizer state; the "
                f"per-session limit is {self.max_session_bytes}",
                code=ErrorCode.MEMORY_QUOTA_EXCEEDED,
            )
        if self.max_total_bytes is None:
            return
        used = sum(s.held_bytes() for s in self._sessions.values()) - replacing
        if used + needed > self.max_total_bytes:
            raise InsufficientStorage(
                f"the session needs {needed} bytes; the server holds {used} of its "
                f"{self.max_total_bytes}-byte limit",
                code=ErrorCode.MEMORY_QUOTA_EXCEEDED,
            )

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        session.deleted = True
        session.abort_round(SessionNotFound(f"session {session_id!r} was deleted"))
        session.changed()

    def replace(self, session: Session, trainer: Trainer) -> None:
        """Swap in a new trainer (a loaded state); the caller holds ``session.lock``. An open
        round ends unapplied: its pushes get 409 ``round_aborted``."""
        session.abort_round(
            ServiceError(
                f"the state of session {session.id!r} was replaced while this push waited "
                "for its round; nothing of the round was applied",
                code=ErrorCode.ROUND_ABORTED,
            )
        )
        session.trainer = trainer
        session._new_round()  # the new state's training mode
        session.touch()
        session.changed()

    def replace_checked(
        self, session: Session, trainer: Trainer, before: Callable[[], None] = lambda: None
    ) -> None:
        """:meth:`check_memory` for ``trainer`` in place of the session's, ``before()``, then
        :meth:`replace`, under one lock (so racing imports cannot both pass the quota)."""
        with self._lock:
            self._check_memory(held_bytes(trainer), held_bytes(session.trainer))
            before()
            self.replace(session, trainer)
