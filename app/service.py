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
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from paramserver import wire
from paramserver.codes import ErrorCode, MessageError
from paramserver.messages import (
    MAX_ITERATIONS,
    BodyKind,
    decode_create,
    decode_query_message,
    decode_state,
    encode_state,
    encode_weights,
)
from paramserver.sparse import Rows
from paramserver.training import Sync

from .errors import (
    InvalidRequest,
    ServiceError,
    ServiceUnavailable,
    SessionNotFound,
    StaleGradient,
)
from .idempotency import (
    DeferredDigest,
    DigestPending,
    IdempotencyCache,
    KeysExhausted,
    push_digest,
)
from .optim import GradientError, PreparedGradients, SparseGradient, StateError
from .persistence import Durability, Journal, SnapshotInfo
from .protocol import decode_limits
from .rounds import Entry, Round, RoundResult, Ticket
from .sessions import Session, SessionStore, check_session_id
from .settings import Settings
from .training import Trainer, build_trainer, restore_trainer, with_sum_squares

__all__ = ["SessionService", "SnapshotsDisabled"]

log = logging.getLogger("paramserver")

T = TypeVar("T")


def trainer_specs(trainer: Trainer) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {name: (shape, dtype) for name, (dtype, shape) in trainer.parameters().items()}


def _key_reused(session: Session, key: str, iterations: int | None) -> InvalidRequest:
    where = "waiting in the open round" if iterations is None else f"applied as step {iterations}"
    return InvalidRequest(
        f"Idempotency-Key {key!r} was used on session {session.id!r} by an earlier push with "
        f"other gradients ({where}); a new push needs a new key",
        code=ErrorCode.IDEMPOTENCY_KEY_REUSED,
    )


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


def round_answer(
    result: RoundResult,
    return_weights: bool,
    returns: Mapping[str, np.ndarray | None] | None = None,
) -> bytes:
    """A sync push's answer: the round's weights (shared by every push of it), the subset
    its ``returns`` asked for, or only its iteration count."""
    if not return_weights:
        return encode_weights(result.iterations, None)
    if returns is not None:
        return encode_selection(result.iterations, select_weights(result.weights(), returns))
    return result.body


def check_selection(
    parameters: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    spec: Mapping[str, np.ndarray | None],
    max_bytes: int,
) -> None:
    """A partial pull's (or a push's ``return``) names and rows against the parameters
    (422 ``parameter_mismatch``), and the answer's size against ``max_bytes`` (the largest
    body: 422 ``invalid_request``), before anything is read or applied: a few bytes of
    repeated row numbers must not make the server build gigabytes."""
    total = 0
    for name, rows in spec.items():
        if name in parameters:
            dtype, shape = parameters[name]
            count = math.prod(shape) if rows is None else rows.size * math.prod(shape[1:])
            total += count * np.dtype(dtype).itemsize
    if total > max_bytes:
        raise InvalidRequest(
            f"the answer would hold {total} bytes of weights; at most {max_bytes} "
            "(max_body_bytes): ask for fewer rows"
        )
    for name, rows in spec.items():
        if name not in parameters:
            raise InvalidRequest(
                f"no parameter {name!r} in the session"[:300], code=ErrorCode.PARAMETER_MISMATCH
            )
        if rows is None:
            continue
        shape = parameters[name][1]
        if not shape:
            raise InvalidRequest(
                f"{name!r} is a scalar: it has no rows", code=ErrorCode.PARAMETER_MISMATCH
            )
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= shape[0]):
            raise InvalidRequest(
                f"rows of {name!r} must be in [0, {shape[0]})"[:300],
                code=ErrorCode.PARAMETER_MISMATCH,
            )


def select_weights(
    weights: Mapping[str, np.ndarray], spec: Mapping[str, np.ndarray | None]
) -> dict[str, Any]:
    """The weights ``spec`` asks for: whole tensors, or :class:`~paramserver.sparse.Rows` of
    the rows asked (copies: the answer outlives the session's lock)."""
    out: dict[str, Any] = {}
    for name, rows in spec.items():
        w = weights[name]
        out[name] = w if rows is None else Rows(rows, w[rows], tuple(w.shape))
    return out


def encode_selection(iterations: int, selected: Mapping[str, Any]) -> bytes:
    return wire.pack({"iterations": iterations, "weights": selected})


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
        #: Set by :meth:`end_rounds`: a sync push is refused (503) rather than left waiting.
        self.closing = False

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
                    training=message.training,
                    constraints=message.constraints,
                    shard=message.shard,
                    sparse_updates=message.sparse_updates,
                )
            except (StateError, GradientError) as exc:
                code = getattr(exc, "code", None) or ErrorCode.INVALID_WEIGHTS
                if isinstance(exc, GradientError):
                    code = ErrorCode.INVALID_WEIGHTS
                raise InvalidRequest(str(exc), code=code) from None

        session = self.store.add(session_id, build, persisted=self.journal is None)
        self._persist_new(session)
        return session.summary(timestamps=False)

    def end_rounds(self) -> None:
        """The server is shutting down: every open sync round ends unapplied, its waiting
        pushes answered 503 (retry: their keys are not remembered), and no new one opens."""
        self.closing = True
        error = ServiceUnavailable(
            "the server is shutting down; nothing of this push's round was applied: retry",
            headers={"Retry-After": "5"},
        )
        for session in self.store.list():
            with session.lock:
                session.abort_round(error)

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
    ) -> tuple[bytes, bool] | Ticket:
        """Apply one step; returns the answer and whether it is a replay of an earlier push.

        With an ``idempotency_key`` already seen on this session (within the window), nothing
        is applied and the first answer is returned again. In a sync session the push joins
        the open round: a :class:`Ticket` is returned, whose result :func:`round_answer`
        turns into the answer.
        """
        message = _decoded(session.push_layouts.decode, body, self.limits)
        grads = message.gradients
        returns = message.returns
        if returns is not None:
            check_selection(session.trainer.parameters(), returns, self.settings.max_body_bytes)

        def answer(trainer: Trainer) -> bytes:
            if returns is not None and return_weights:
                return encode_selection(
                    trainer.iterations, select_weights(trainer.weights(), returns)
                )
            if return_weights:
                return session.answers.encode(trainer.iterations, trainer.weights())
            return encode_weights(trainer.iterations, None)

        outcome = self.push_gradients(
            session,
            grads,
            journal_body=lambda: body,
            idempotency_key=idempotency_key,
            answer=answer,
            remember=lambda encoded: encoded,
            round_remember=lambda result: round_answer(result, return_weights, returns),
            base_iterations=message.base_iterations,
            sum_squares=message.sum_squares,
            round_order=message.round_order,
            metrics=message.metrics,
        )
        if isinstance(outcome, Ticket):
            outcome.returns = returns
            return outcome
        if outcome.replayed:
            content = outcome.remembered
            if content is None:
                content = encode_weights(outcome.iterations, None)
            session.stats.sent(len(content))
            return content, True
        assert outcome.value is not None
        session.stats.sent(len(outcome.value))
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
        round_remember: Callable[[RoundResult], bytes | None] = lambda result: None,
        base_iterations: int | None = None,
        sum_squares: float | None = None,
        round_order: str | None = None,
        metrics: Mapping[str, float] | None = None,
        wait: float | None = None,
        digest_later: DeferredDigest | None = None,
    ) -> PushOutcome[T] | Ticket:
        """One step of decoded gradients, for every transport: checks, idempotency, journal.

        ``answer(trainer)`` runs under the session's lock right after the step and builds what
        the transport sends (it may copy the weights, never keep references to them);
        ``remember(answer)`` is the answer's bytes kept for a replay of the key (None: a replay
        answers the iterations alone). ``journal_body()`` is the push as a msgpack body, asked
        only in journal mode. ``wait`` bounds the wait for the session's lock (503
        ``session_busy`` past it); the HTTP layer queues requests before that instead.

        ``base_iterations``: the iteration count of the weights the gradient was computed on
        (required by sync sessions and ``max_staleness``). In a sync session the push joins
        the open round and a :class:`~paramserver.server.rounds.Ticket` is returned: the
        transport waits on it (outside the session's lock) for the round's result, whose
        bytes ``round_remember(result)`` keeps for a replay of the key.

        ``sum_squares``: the whole push's sum of squares, sent with each shard's part of a
        sharded push; clipnorm clips with it (:func:`with_sum_squares`). ``round_order``: the
        key a sync round orders this gradient by (a sharded push's whole digest), by default
        its own digest. ``metrics``: what the worker reports with the push, recorded once the
        push is applied (:class:`~paramserver.server.observability.WorkerPoints`).

        ``digest_later``: a keyed push whose key may be remembered before its digest (see
        :class:`~paramserver.server.idempotency.DeferredDigest`: the transport settles it as
        soon as this returns or raises, and the gradients stay valid until then). Taken only
        where nothing needs the digest before the answer: no journal, no sync round, no
        earlier push with the key.
        """
        started = time.monotonic()
        nbytes = sum(g.nbytes for g in grads.values())
        try:
            outcome = self._push(
                session,
                grads,
                journal_body=journal_body,
                idempotency_key=idempotency_key,
                answer=answer,
                remember=remember,
                round_remember=round_remember,
                base_iterations=base_iterations,
                sum_squares=sum_squares,
                round_order=round_order,
                metrics=metrics,
                wait=wait,
                started=started,
                nbytes=nbytes,
                digest_later=digest_later,
            )
        except StaleGradient:
            session.stats.refused_stale()
            raise
        if isinstance(outcome, PushOutcome):
            session.stats.pushed(time.monotonic() - started, nbytes, replayed=outcome.replayed)
            if metrics and not outcome.replayed:
                self._record_points(session, metrics, outcome.iterations)
        return outcome

    def _record_points(
        self, session: Session, metrics: Mapping[str, float], iterations: int
    ) -> None:
        """Record an applied push's points; never fails the push (it is applied already)."""
        try:
            session.points.add(metrics, iterations, budget=self.store.points_budget(session))
        except Exception:  # pragma: no cover - a bug here must not turn an applied push into 500
            log.exception("recording the points of a push to session %r failed", session.id)

    def _push(
        self,
        session: Session,
        grads: dict[str, np.ndarray],
        *,
        journal_body: Callable[[], bytes | bytearray | memoryview],
        idempotency_key: str | None,
        answer: Callable[[Trainer], T],
        remember: Callable[[T], bytes | None],
        round_remember: Callable[[RoundResult], bytes | None],
        base_iterations: int | None,
        sum_squares: float | None,
        round_order: str | None,
        metrics: Mapping[str, float] | None,
        wait: float | None,
        started: float,
        nbytes: int,
        digest_later: DeferredDigest | None,
    ) -> PushOutcome[T] | Ticket:
        later = digest_later if self.journal is None else None  # the journal records it
        digest = None if idempotency_key is None or later is not None else push_digest(grads)
        if not session.persisted.is_set():
            # Created a moment ago and its create record is being written: a push journaled
            # before that record could be acknowledged and then lost with the session.
            if not session.persisted.wait(self.settings.request_timeout_seconds):
                raise ServiceUnavailable(
                    f"session {session.id!r} is still being created; retry",
                    code=ErrorCode.SESSION_BUSY,
                    headers={"Retry-After": "1"},
                )
        completing: tuple[list[Entry], RoundResult, int] | None = None
        round_started = 0.0
        with session.locked(wait) as trainer:
            if session.deleted:  # deleted while this push waited for the lock
                raise SessionNotFound(f"no session {session.id!r}")
            if self.journal is not None:
                # A failed journal acknowledges nothing, replays included: the first answer of
                # a replayed key may be one whose fsync failed.
                self.journal.check()
            current = session.round
            if idempotency_key is not None:
                seen = self.idempotency.get(session.id, idempotency_key)
                if digest is None and (seen is not None or current is not None):
                    digest, later = push_digest(grads), None  # wanted now
                if seen is not None:
                    assert digest is not None
                    try:
                        matched = seen.matches(digest)
                    except DigestPending as exc:
                        raise ServiceUnavailable(
                            f"{exc}; retry",
                            code=ErrorCode.SESSION_BUSY,
                            headers={"Retry-After": "1"},
                        ) from None
                    if not matched:
                        raise _key_reused(session, idempotency_key, seen.iterations)
                    return PushOutcome(None, seen.iterations, True, seen.body)
            if current is not None and idempotency_key is not None:
                waiting = current.waiting(idempotency_key)
                if waiting is not None:  # a retry of a push waiting in the open round
                    entry, serial = waiting
                    if entry.digest != digest:
                        raise _key_reused(session, idempotency_key, None)
                    return Ticket(current, entry, serial, current.deadline())
            if idempotency_key is not None:
                try:
                    self.idempotency.check_room(session.id)
                except KeysExhausted as exc:
                    raise ServiceUnavailable(
                        exc.message,
                        code=ErrorCode.TOO_MANY_IDEMPOTENCY_KEYS,
                        headers={"Retry-After": str(int(exc.retry_after))},
                    ) from None
            self._check_base(session, trainer, base_iterations)
            if metrics and not session.points.fits(metrics):
                raise InvalidRequest(
                    f"session {session.id!r} already has {len(session.points.names)} metric "
                    f"names, at most {session.points.MAX_NAMES}; report fewer distinct names",
                    code=ErrorCode.INVALID_METRICS,
                )
            if trainer.iterations >= MAX_ITERATIONS - 1:
                raise IterationsExhausted(
                    f"session {session.id!r} is at iteration {trainer.iterations}, the most a "
                    "session can count (2**53 - 1, exact as a float); export its state and "
                    "start a new session",
                )
            try:
                prepared = with_sum_squares(trainer, trainer.check_gradients(grads), sum_squares)
            except GradientError as exc:
                raise InvalidRequest(str(exc), code=exc.code) from None
            if current is not None:
                if self.closing:
                    raise ServiceUnavailable(
                        "the server is shutting down; retry", headers={"Retry-After": "5"}
                    )
                entry = Entry(
                    push_digest(grads) if digest is None else digest,
                    idempotency_key,
                    round_remember,
                    order=round_order,
                )
                entry.arrived, entry.nbytes, entry.metrics = started, nbytes, metrics
                entry.sparse_rows = {
                    name: g.indices
                    for name, g in prepared.flat.items()
                    if isinstance(g, SparseGradient)
                }
                # a round's rows are dense: a row-sparse gradient is written out whole
                serial, full = current.add(entry, prepared.dense(trainer_specs(trainer)))
                ticket = Ticket(current, entry, serial, current.deadline())
                if full is None:
                    return ticket
                round_started = current.started
                completing = self._complete_round(session, trainer, current, full)
            else:
                lsn = self._step(session, trainer, prepared, journal_body, idempotency_key, digest)
                value = answer(trainer)
                iterations = trainer.iterations
                if idempotency_key is not None:
                    self.idempotency.remember(
                        session.id,
                        idempotency_key,
                        iterations,
                        remember(value),
                        digest,
                        later=later,
                    )
        if completing is not None:
            entries, result, lsn = completing
            try:
                if self.journal is not None:
                    self.journal.commit(lsn)
            except BaseException as exc:
                error = (
                    exc
                    if isinstance(exc, ServiceError)
                    else ServiceError("internal server error", code=ErrorCode.INTERNAL_ERROR)
                )
                for waiter in entries:
                    waiter.resolve(None, error)
                raise
            now = time.monotonic()
            session.stats.round_applied(now - round_started)
            for waiter in entries:  # the round is durable: answer every push of it
                session.stats.pushed(now - waiter.arrived, waiter.nbytes)
                waiter.resolve(result)
            for waiter in entries:
                if waiter.metrics:
                    self._record_points(session, waiter.metrics, result.iterations)
            return ticket
        if self.journal is not None:
            self.journal.commit(lsn)  # outside the lock: one fsync serves pushes of many sessions
        return PushOutcome(value, iterations, False, None)

    def _step(
        self,
        session: Session,
        trainer: Trainer,
        prepared: PreparedGradients,
        journal_body: Callable[[], bytes | bytearray | memoryview],
        key: str | None,
        digest: bytes | None,
        *,
        op: str = "push",
        keys: list[list[str]] | None = None,
    ) -> int:
        """Apply checked gradients as one step, journaled first; returns the record's LSN (0
        without a journal). Raises ``InvalidRequest`` (``non_finite_result``) or the journal's
        error, and then nothing changed. Call with the session's lock held."""
        journal = self.journal
        lsn = 0
        try:
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
                    op,
                    session.id,
                    body=journal_body(),
                    iterations=trainer.iterations + (0 if trainer.refuse_non_finite else 1),
                    key=key,
                    digest=None if digest is None else digest.hex(),
                    keys=keys,
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
        return lsn

    def _complete_round(
        self, session: Session, trainer: Trainer, current: Round, entries: list[Entry]
    ) -> tuple[list[Entry], RoundResult, int]:
        """The step of a full round (its mean), journaled as one record; the entries' keys are
        remembered with the round's answer. On an error every push of the round gets it."""
        try:
            shapes = {name: shape for name, (_, shape) in trainer.parameters().items()}
            mean: dict[str, Any] = dict(current.mean(entries, shapes))
            if trainer.sparse_updates == "lazy":
                mean.update(_sparse_means(entries, mean))
            try:
                prepared = trainer.check_gradients(mean)
            except GradientError as exc:
                raise InvalidRequest(str(exc), code=exc.code) from None
            keyed = [[e.key, e.digest.hex()] for e in entries if e.key is not None]
            lsn = self._step(
                session,
                trainer,
                prepared,
                lambda: wire.pack({"gradients": mean}),
                None,
                None,
                op="round",
                keys=keyed or None,
            )
            current.previous_arrivals = len(entries)
            iterations = trainer.iterations
            result = RoundResult(iterations, encode_weights(iterations, trainer.weights()))
            for entry in entries:
                if entry.key is not None:
                    self.idempotency.remember(
                        session.id, entry.key, iterations, entry.remember(result), entry.digest
                    )
        except ServiceError as exc:
            for entry in entries:
                entry.resolve(None, exc)
            raise
        except BaseException:
            # Anything else (a MemoryError, a TensorFlow runtime error, a bug): every push of
            # the round is answered, none is left waiting.
            log.exception("a round of session %r could not be completed", session.id)
            failed = ServiceError("internal server error", code=ErrorCode.INTERNAL_ERROR)
            for entry in entries:
                entry.resolve(None, failed)
            raise
        return entries, result, lsn

    def _check_base(self, session: Session, trainer: Trainer, base: int | None) -> None:
        """The push's ``base_iterations`` against the session's training mode."""
        training = trainer.training
        now = trainer.iterations
        if base is None:
            if training.needs_base:
                what = "sync sessions" if isinstance(training, Sync) else "max_staleness"
                raise InvalidRequest(
                    f"session {session.id!r} needs 'base_iterations' in every push ({what}): "
                    "the iteration count of the weights the gradient was computed on",
                    code=ErrorCode.MISSING_BASE_ITERATIONS,
                )
            return
        if not training.needs_base:
            return  # a plain async session: every push is a step, whatever weights it used
        if base > now:
            raise InvalidRequest(
                f"base_iterations {base} is ahead of session {session.id!r}, which is at "
                f"iteration {now}",
                code=ErrorCode.INVALID_BASE_ITERATIONS,
            )
        if isinstance(training, Sync):
            if base == now:
                return
            current = session.round
            assert current is not None
            if base == now - 1:
                if current.previous_arrivals >= (training.total_num_replicas or 0):
                    raise ServiceUnavailable(
                        f"round {base} of session {session.id!r} already had "
                        f"{current.previous_arrivals} pushes, total_num_replicas="
                        f"{training.total_num_replicas}: a worker pushed twice without its "
                        "Idempotency-Key, or more workers push than the session counts",
                        code=ErrorCode.ROUND_FULL,
                        headers={"Retry-After": "1"},
                    )
                current.previous_arrivals += 1
            raise StaleGradient(
                f"the gradient was computed on the weights of iteration {base}; session "
                f"{session.id!r} is at {now} (sync: a round takes gradients of the current "
                "weights only): pull and compute again",
                iterations=now,
            )
        staleness = training.max_staleness
        if staleness is not None and now - base > staleness:
            raise StaleGradient(
                f"the gradient is {now - base} steps stale (computed on iteration {base}, "
                f"session {session.id!r} is at {now}); max_staleness is {staleness}: pull "
                "and compute again",
                iterations=now,
            )

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
            content = encode_weights(trainer.iterations, trainer.weights())
        session.stats.sent(len(content))
        return content

    def query(self, session: Session, body: bytes | bytearray | memoryview) -> bytes:
        """``POST /sessions/{id}/weights/query``: the tensors (and rows) the body names, of
        one consistent view of the weights."""
        spec = _decoded(decode_query_message, body, self.limits)
        limit = self.settings.max_body_bytes
        check_selection(session.trainer.parameters(), spec, limit)  # before the lock
        with session.locked() as trainer:
            if session.deleted:
                raise SessionNotFound(f"no session {session.id!r}")
            check_selection(trainer.parameters(), spec, limit)  # a state import meanwhile
            content = encode_selection(trainer.iterations, select_weights(trainer.weights(), spec))
        session.stats.sent(len(content))
        return content

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
        except DigestPending as exc:  # a key whose digest has not come in DIGEST_WAIT_SECONDS
            raise ServiceUnavailable(
                f"{exc}; the session is unchanged: retry the snapshot",
                code=ErrorCode.SESSION_BUSY,
                headers={"Retry-After": "1"},
            ) from None
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


def _sparse_means(entries: list[Entry], mean: Mapping[str, np.ndarray]) -> dict[str, Rows]:
    """A lazy session's round mean, as rows, of each tensor every push of the round sent as
    rows: the union of their rows (a row a push did not send counted as zeros in the mean),
    so that the step updates only those rows, as the pushes would one by one; the journal
    records the rows, and a replay steps the same rows."""
    names = set(entries[0].sparse_rows)
    for entry in entries[1:]:
        names &= set(entry.sparse_rows)
    out: dict[str, Rows] = {}
    for name in names:
        union = np.unique(np.concatenate([e.sparse_rows[name] for e in entries]))
        dense = mean[name]
        out[name] = Rows(union, dense[union], tuple(dense.shape))
    return out
