"""The operations of the protocol, free of HTTP: what each endpoint does to the sessions.

Every method here is synchronous and may be CPU-heavy (decoding, an optimizer step, encoding
megabytes of weights); the HTTP layer runs them in a worker thread, never on the event loop.
Each method validates everything before it changes anything, so an error leaves every session
as it was.

With a :class:`~paramserver.server.persistence.Durability` (``--snapshot-dir``), a change is made
durable before it is answered: with the journal, a push or a state load is validated, appended under
the session's lock and only then applied (write-ahead), and the record is committed (fsynced) before
the answer; without it, creating a session or loading a state writes a snapshot at once (pushes wait
for the periodic snapshot).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from paramserver import wire
from paramserver.codes import ErrorCode, MessageError
from paramserver.messages import (
    MAX_ITERATIONS,
    BodyKind,
    decode_create,
    decode_push,
    decode_state,
    encode_state,
    encode_weights,
)

from .errors import InvalidRequest, ServiceError, ServiceUnavailable, SessionNotFound
from .idempotency import IdempotencyCache, KeysExhausted, push_digest
from .optim import GradientError, StateError
from .persistence import Durability, Journal, SnapshotInfo
from .protocol import decode_limits
from .sessions import Session, SessionStore, check_session_id
from .settings import Settings
from .training import Trainer, build_trainer, restore_trainer

__all__ = ["SessionService", "SnapshotsDisabled"]

log = logging.getLogger("paramserver")

T = TypeVar("T")


def _decoded(decode: Callable[..., T], *args: Any) -> T:
    """``decode(*args)`` with a message that cannot be read as the service's error (its code
    and status): the operations here raise :class:`ServiceError` only."""
    try:
        return decode(*args)
    except MessageError as exc:
        raise ServiceError.of(exc) from None


@dataclass(frozen=True)
class PushOutcome(Generic[T]):
    """What :meth:`SessionService.push_gradients` did: the transport's ``value`` built after
    the step at ``iterations``, or, for a replayed key, the ``remembered`` answer (if kept)."""

    value: T | None
    iterations: int
    replayed: bool
    remembered: bytes | None


class IterationsExhausted(ServiceError):
    """A push onto a session at the largest iteration count a state can hold (HTTP 409)."""

    code = ErrorCode.ITERATIONS_EXHAUSTED


class SnapshotsDisabled(ServiceError):
    """A snapshot was asked of a server started without ``--snapshot-dir`` (HTTP 409)."""

    code = ErrorCode.SNAPSHOTS_DISABLED


class SessionService:
    """The protocol's operations over one :class:`SessionStore`."""

    def __init__(
        self, store: SessionStore, settings: Settings, durability: Durability | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.durability = durability
        self.limits: wire.DecodeLimits = decode_limits(settings)
        self.idempotency = IdempotencyCache(
            window_seconds=settings.idempotency_window_seconds,
            max_keys=settings.idempotency_max_keys,
            max_keys_per_session=settings.idempotency_max_keys_per_session,
            max_body_bytes=settings.idempotency_max_bytes,
        )

    def create(self, body: bytes | bytearray | memoryview, kind: BodyKind) -> dict[str, Any]:
        message = _decoded(decode_create, body, kind, self.limits)
        session_id = (
            self.store.new_id()
            if message.session_id is None
            else check_session_id(message.session_id)
        )

        def build() -> Trainer:
            try:
                return build_trainer(
                    message.optimizer,
                    message.weights,
                    refuse_non_finite=message.refuse_non_finite,
                )
            except (StateError, GradientError) as exc:
                raise InvalidRequest(str(exc), code=ErrorCode.INVALID_WEIGHTS) from None

        session = self.store.add(session_id, build, persisted=self.journal is None)
        self._persist_new(session)
        return session.summary(timestamps=False)

    @property
    def journal(self) -> Journal | None:
        """The write-ahead journal, with ``durability="journal"``."""
        return None if self.durability is None else self.durability.journal

    def _persist_new(self, session: Session) -> None:
        """Make a new session durable; if that fails it is removed again and 503 answered."""
        if self.durability is None:
            return
        try:
            self.durability.created(session)
        except (OSError, ServiceUnavailable) as exc:
            session.persisted.set()  # waiting pushes go on, and find it deleted
            with session.lock:
                if not session.deleted:
                    self.idempotency.forget_session(session.id)
                    self.store.delete(session.id)
            if isinstance(exc, ServiceUnavailable):
                raise
            raise ServiceUnavailable(
                f"the session could not be saved ({exc}); it was not created",
                code=ErrorCode.SNAPSHOT_FAILED,
            ) from None
        session.persisted.set()

    def push(
        self,
        session: Session,
        body: bytes | bytearray | memoryview,
        *,
        return_weights: bool,
        idempotency_key: str | None = None,
    ) -> tuple[bytes, bool]:
        """Apply one step; returns the answer and whether it is a replay of an earlier push.

        With an ``idempotency_key`` already seen on this session (within the window), nothing
        is applied and the first answer is returned again.
        """
        grads = _decoded(decode_push, body, self.limits)

        def answer(trainer: Trainer) -> bytes:
            return encode_weights(trainer.iterations, trainer.weights() if return_weights else None)

        outcome = self.push_gradients(
            session,
            grads,
            journal_body=lambda: body,
            idempotency_key=idempotency_key,
            answer=answer,
            remember=lambda encoded: encoded,
        )
        if outcome.replayed:
            if outcome.remembered is not None:
                return outcome.remembered, True
            return encode_weights(outcome.iterations, None), True
        assert outcome.value is not None
        return outcome.value, False

    def push_gradients(
        self,
        session: Session,
        grads: dict[str, np.ndarray],
        *,
        journal_body: Callable[[], bytes | bytearray | memoryview],
        idempotency_key: str | None,
        answer: Callable[[Trainer], T],
        remember: Callable[[T], bytes | None],
        wait: float | None = None,
    ) -> PushOutcome[T]:
        """One step of decoded gradients, for every transport: checks, idempotency, journal.

        ``answer(trainer)`` runs under the session's lock right after the step and builds what
        the transport sends (it may copy the weights, never keep references to them);
        ``remember(answer)`` is the answer's bytes kept for a replay of the key (None: a replay
        answers the iterations alone). ``journal_body()`` is the push as a msgpack body, asked
        only in journal mode. ``wait`` bounds the wait for the session's lock (503
        ``session_busy`` past it); the HTTP layer queues requests before that instead.
        """
        digest = None if idempotency_key is None else push_digest(grads)
        journal = self.journal
        lsn = 0
        if not session.persisted.is_set():
            # Created a moment ago and its create record is being written: a push journaled
            # before that record could be acknowledged and then lost with the session.
            if not session.persisted.wait(self.settings.request_timeout_seconds):
                raise ServiceUnavailable(
                    f"session {session.id!r} is still being created; retry",
                    code=ErrorCode.SESSION_BUSY,
                    headers={"Retry-After": "1"},
                )
        with session.locked(wait) as trainer:
            if session.deleted:  # deleted while this push waited for the lock
                raise SessionNotFound(f"no session {session.id!r}")
            if journal is not None:
                # A failed journal acknowledges nothing, replays included: the first answer of
                # a replayed key may be one whose fsync failed.
                journal.check()
            if idempotency_key is not None and digest is not None:
                seen = self.idempotency.get(session.id, idempotency_key)
                if seen is not None:
                    if not seen.matches(digest):
                        raise InvalidRequest(
                            f"Idempotency-Key {idempotency_key!r} was used on session "
                            f"{session.id!r} by an earlier push with other gradients (applied "
                            f"as step {seen.iterations}); a new push needs a new key",
                            code=ErrorCode.IDEMPOTENCY_KEY_REUSED,
                        )
                    return PushOutcome(None, seen.iterations, True, seen.body)
                try:
                    self.idempotency.check_room(session.id)
                except KeysExhausted as exc:
                    raise ServiceUnavailable(
                        exc.message,
                        code=ErrorCode.TOO_MANY_IDEMPOTENCY_KEYS,
                        headers={"Retry-After": str(int(exc.retry_after))},
                    ) from None
            if trainer.iterations >= MAX_ITERATIONS - 1:
                raise IterationsExhausted(
                    f"session {session.id!r} is at iteration {trainer.iterations}, the most a "
                    "session can count (2**53 - 1, exact as a float); export its state and "
                    "start a new session",
                )
            try:
                prepared = trainer.check_gradients(grads)
                if trainer.refuse_non_finite:
                    # The step is tried first (it saves what it changes): a refused result
                    # is never logged, and one that cannot be logged is rolled back.
                    trainer.apply(prepared)
            except GradientError as exc:
                raise InvalidRequest(str(exc), code=exc.code) from None
            if journal is not None:
                # Write-ahead: validate, log, then apply (a validated step cannot fail), so a
                # push that could not be logged changes nothing.
                try:
                    lsn = journal.append(
                        "push",
                        session.id,
                        body=journal_body(),
                        iterations=trainer.iterations + (0 if trainer.refuse_non_finite else 1),
                        key=idempotency_key,
                        digest=None if digest is None else digest.hex(),
                        time=time.time(),
                    )
                except BaseException:
                    if trainer.refuse_non_finite:
                        trainer.rollback()
                    raise
            if not trainer.refuse_non_finite:
                trainer.apply(prepared)
            session.touch()
            session.changed()  # wake the pulls waiting for this iteration
            value = answer(trainer)
            iterations = trainer.iterations
            if idempotency_key is not None:
                self.idempotency.remember(
                    session.id, idempotency_key, iterations, remember(value), digest
                )
        if journal is not None:
            journal.commit(lsn)  # outside the lock: one fsync serves pushes of many sessions
        return PushOutcome(value, iterations, False, None)

    def read_weights(
        self, session: Session, answer: Callable[[Trainer], T], *, wait: float | None = None
    ) -> T:
        """``answer(trainer)`` under the session's lock: a consistent view of the weights."""
        with session.locked(wait) as trainer:
            if session.deleted:
                raise SessionNotFound(f"no session {session.id!r}")
            return answer(trainer)

    def weights(self, session: Session) -> bytes:
        with session.locked() as trainer:
            if session.deleted:  # deleted while the pull waited
                raise SessionNotFound(f"no session {session.id!r}")
            return encode_weights(trainer.iterations, trainer.weights())

    def check_wait(self, min_iterations: int | None, wait_seconds: float) -> None:
        """A pull may wait at most the request timeout for ``min_iterations``."""
        limit = self.settings.request_timeout_seconds
        if not 0 <= wait_seconds <= limit:
            raise InvalidRequest(
                f"wait_seconds must be in [0, {limit:g}] (request_timeout_seconds), "
                f"got {wait_seconds:g}"
            )
        if min_iterations is not None and (
            isinstance(min_iterations, bool)
            or not isinstance(min_iterations, int)
            or min_iterations < 0
        ):
            raise InvalidRequest(f"min_iterations must be an integer >= 0, got {min_iterations!r}")

    def state(self, session: Session) -> bytes:
        with session.locked() as trainer:
            return encode_state(trainer.state())

    def load_state(
        self, session_id: str, body: bytes | bytearray | memoryview
    ) -> tuple[dict[str, Any], bool]:
        """Replace a session's state, or create the session from it; returns (summary, created)."""
        check_session_id(session_id)
        state = _decoded(decode_state, body, self.limits)

        def restore() -> Trainer:
            try:
                return restore_trainer(state)
            except (StateError, GradientError) as exc:
                raise InvalidRequest(str(exc), code=ErrorCode.INVALID_STATE) from None

        session = self.store.find(session_id)
        if session is not None:
            trainer = restore()  # built outside the lock: the session keeps serving meanwhile
            journal = self.journal
            lsn = 0
            summary: dict[str, Any] = {}
            with session.lock:
                replaced = not session.deleted  # if it was deleted meanwhile: create it below
                if replaced:
                    if journal is not None:
                        journal.check()
                    appended: list[int] = []

                    def log_it() -> None:  # write-ahead: logged before it takes effect
                        if journal is not None:
                            appended.append(
                                journal.append("state", session.id, body=body, time=time.time())
                            )

                    self.store.replace_checked(session, trainer, log_it)
                    lsn = appended[0] if appended else 0
                    summary = session.summary()
            if replaced:
                if journal is not None:
                    journal.commit(lsn)
                elif self.durability is not None:
                    self._snapshot_now(session)
                return summary, False
        created = self.store.add(session_id, restore, persisted=self.journal is None)
        self._persist_new(created)
        return created.summary(), True

    def _snapshot_now(self, session: Session) -> None:
        """Snapshot a loaded state at once; if the disk fails, the periodic pass retries."""
        assert self.durability is not None
        try:
            self.durability.snapshot(session)
        except OSError as exc:
            log.error("snapshot of session %r after loading its state failed: %s", session.id, exc)

    def delete(self, session_id: str) -> None:
        session = self.store.get(session_id)
        with session.lock:
            if session.deleted:
                raise SessionNotFound(f"no session {session_id!r}")
            if self.durability is not None:
                self.durability.deleting(session)  # journal it, remove its snapshots
            self.idempotency.forget_session(session_id)
            self.store.delete(session_id)

    def snapshot(self, session: Session) -> dict[str, Any]:
        """Save the session now (``POST /sessions/{id}/snapshot``)."""
        if self.durability is None:
            raise SnapshotsDisabled("this server keeps no snapshots: start it with --snapshot-dir")
        try:
            info: SnapshotInfo | None = self.durability.snapshot(session)
        except OSError as exc:
            # The disk failed (ENOSPC, EIO, a read-only remount): nothing was saved, the session
            # is unchanged, and the periodic pass retries. 503: the request was not carried out.
            log.error("snapshot of session %r failed: %s", session.id, exc)
            raise ServiceUnavailable(
                f"the snapshot could not be written ({exc.strerror or exc}); the session is "
                "unchanged and the server retries periodically",
                code=ErrorCode.SNAPSHOT_FAILED,
                headers={"Retry-After": "5"},
            ) from None
        if info is None:
            raise SessionNotFound(f"no session {session.id!r}")
        return info.to_dict()

    def summary(self, session: Session) -> dict[str, Any]:
        with session.locked():
            return session.summary()

    def list(self) -> list[dict[str, Any]]:
        # Without the sessions' locks: a summary holds no arrays (iterations is read once), and
        # a busy session must not hold up the listing of all the others.
        return [s.summary() for s in self.store.list()]
