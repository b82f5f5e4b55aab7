"""The operations of the protocol, free of HTTP: what each endpoint does to the sessions.

Every method here is synchronous and may be CPU-heavy (decoding, an optimizer step, encoding
megabytes of weights); the HTTP layer runs them in a worker thread, never on the event loop.
Each method validates everything before it changes anything, so an error leaves every session
as it was.
"""

from __future__ import annotations

from typing import Any

from client import wire

from .errors import InvalidRequest
from .idempotency import IdempotencyCache
from .optim import GradientError, StateError
from .protocol import (
    decode_limits,
    parse_create,
    parse_gradients,
    parse_state,
    state_message,
    weights_message,
)
from .sessions import Session, SessionStore, check_session_id
from .settings import Settings
from .training import build_trainer, restore_trainer

__all__ = ["SessionService"]


class SessionService:
    """The protocol's operations over one :class:`SessionStore`."""

    def __init__(self, store: SessionStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.limits: wire.DecodeLimits = decode_limits(settings)
        self.idempotency = IdempotencyCache(
            window_seconds=settings.idempotency_window_seconds,
            max_keys=settings.idempotency_max_keys,
            max_body_bytes=settings.idempotency_max_bytes,
        )

    def create(self, body: bytes | bytearray, kind: str) -> dict[str, Any]:
        session_id, optimizer, weights = parse_create(body, kind, self.limits)
        session_id = self.store.new_id() if session_id is None else check_session_id(session_id)

        def build() -> Any:
            try:
                return build_trainer(optimizer, weights)
            except (StateError, GradientError) as exc:
                raise InvalidRequest(str(exc), code="invalid_weights") from None

        session = self.store.add(session_id, build)
        return session.summary(timestamps=False)

    def push(
        self,
        session: Session,
        body: bytes | bytearray,
        *,
        return_weights: bool,
        idempotency_key: str | None = None,
    ) -> tuple[bytes, bool]:
        """Apply one step; returns the answer and whether it is a replay of an earlier push.

        With an ``idempotency_key`` already seen on this session (within the window), nothing
        is applied and the first answer is returned again.
        """
        grads = parse_gradients(body, self.limits)
        with session.locked() as trainer:
            if idempotency_key is not None:
                seen = self.idempotency.get(session.id, idempotency_key)
                if seen is not None:
                    if seen.body is not None:
                        return seen.body, True
                    return weights_message(seen.iterations, None), True
            try:
                trainer.apply(grads)
            except GradientError as exc:
                raise InvalidRequest(str(exc), code=exc.code) from None
            session.touch()
            answer = weights_message(
                trainer.iterations, trainer.weights() if return_weights else None
            )
            if idempotency_key is not None:
                self.idempotency.remember(session.id, idempotency_key, trainer.iterations, answer)
            return answer, False

    def weights(self, session: Session) -> bytes:
        with session.locked() as trainer:
            return weights_message(trainer.iterations, trainer.weights())

    def state(self, session: Session) -> bytes:
        with session.locked() as trainer:
            return state_message(trainer.state())

    def load_state(self, session_id: str, body: bytes | bytearray) -> tuple[dict[str, Any], bool]:
        """Replace a session's state, or create the session from it; returns (summary, created)."""
        check_session_id(session_id)
        state = parse_state(body, self.limits)

        def restore() -> Any:
            try:
                return restore_trainer(state)
            except (StateError, GradientError) as exc:
                raise InvalidRequest(str(exc), code="invalid_state") from None

        session = self.store.find(session_id)
        if session is None:
            created = self.store.add(session_id, restore)
            return created.summary(), True
        trainer = restore()  # built outside the lock: the session keeps serving meanwhile
        with session.lock:
            self.store.check_memory(trainer.nbytes(), replacing=session.trainer.nbytes())
            self.store.replace(session, trainer)
            return session.summary(), False

    def delete(self, session_id: str) -> None:
        self.store.delete(session_id)
        self.idempotency.forget_session(session_id)

    def summary(self, session: Session) -> dict[str, Any]:
        with session.locked():
            return session.summary()

    def list(self) -> list[dict[str, Any]]:
        return [self.summary(s) for s in self.store.list()]
