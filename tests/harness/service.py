"""The service in process, without HTTP: what the app's lifespan builds, driven directly.

:func:`plain_service` is a :class:`SessionService` without durability, for the tests of what the
service decides where HTTP is not the point. :class:`DurableService` adds durability on a
directory, so that tests can restart it many times per second; :func:`opened_services` is a
factory of them, each closed on exit unless the test closed or crashed it.
:meth:`DurableService.crash` drops it as a killed process would: no final snapshot (what was
written stays written).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from paramserver import wire
from paramserver.server.persistence import Durability
from paramserver.server.service import SessionService
from paramserver.server.sessions import SessionStore
from paramserver.server.settings import Settings

__all__ = ["DurableService", "opened_services", "plain_service"]


def plain_service(**overrides: Any) -> SessionService:
    """A service without durability; ``overrides`` are :class:`Settings` fields."""
    settings = Settings(warm_up_kernels=False, **overrides)
    store = SessionStore(
        max_sessions=settings.max_sessions,
        max_session_bytes=settings.max_session_bytes,
        max_total_bytes=settings.max_total_bytes,
    )
    return SessionService(store, settings)


class DurableService:
    """A service with durability on ``directory``, without HTTP: what the lifespan builds."""

    def __init__(self, directory: Path, **overrides: Any) -> None:
        overrides.setdefault("snapshot_interval_seconds", 3600)
        self.settings = Settings(snapshot_dir=directory, warm_up_kernels=False, **overrides)
        self.durability = Durability(self.settings)
        self.service = SessionService(
            SessionStore(max_sessions=self.settings.max_sessions), self.settings, self.durability
        )
        self.durability.open(self.service.store, self.service.idempotency)
        self.closed = False

    def create(self, session_id: str, optimizer: Any, weights: dict[str, np.ndarray]) -> None:
        body = wire.pack({"session_id": session_id, "optimizer": optimizer, "weights": weights})
        self.service.create(body, "msgpack")

    def push(self, session_id: str, grads: dict[str, np.ndarray], key: str | None = None) -> Any:
        session = self.service.store.get(session_id)
        answer, replayed = self.service.push(
            session, wire.pack({"gradients": grads}), return_weights=True, idempotency_key=key
        )
        return wire.unpack(answer), replayed

    def state(self, session_id: str) -> bytes:
        return self.service.state(self.service.store.get(session_id))

    def snapshot(self, session_id: str) -> dict[str, Any]:
        return self.service.snapshot(self.service.store.get(session_id))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.durability.close()

    def crash(self) -> None:
        """Stop without the final snapshot, as SIGKILL would (the kernel keeps what was written)."""
        if not self.closed:
            self.closed = True
            if self.durability.journal is not None:
                self.durability.journal.close()
            self.durability.lock.release()


@contextmanager
def opened_services(tmp_path: Path) -> Iterator[Callable[..., DurableService]]:
    """A factory of services (on ``tmp_path / "snapshots"`` by default), closed on exit."""
    opened: list[DurableService] = []

    def make(directory: Path | None = None, **overrides: Any) -> DurableService:
        server = DurableService(directory or tmp_path / "snapshots", **overrides)
        opened.append(server)
        return server

    try:
        yield make
    finally:
        for server in opened:
            server.close()
