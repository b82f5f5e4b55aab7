"""The small push over HTTP without FastAPI's routing and without a thread hop.

``POST /sessions/{session_id}/gradients`` of a small session with a small body is served here,
on the event loop, by the same service call as the route in :mod:`.sessions`
(:meth:`~paramserver.server.service.SessionService.push`, then :func:`.sessions.push_answer`):
the same checks, idempotency, statistics and answer, so a small push behaves exactly as the
route does. What it saves is the route's machinery around that call: dependency resolution,
parameter parsing, Starlette's request and response objects and, above all, the hop to a
worker thread and back, which for a 10-element push costs several times the step itself.

Only the plain case is taken here; anything else goes, untouched, to the FastAPI app below,
which answers it as before (every error included):

* the request: one ``Content-Length`` of at most :data:`MAX_BODY_BYTES`, no
  ``Transfer-Encoding``, one msgpack ``Content-Type``, a valid ``Idempotency-Key`` if any, and a
  query string that is empty or one ``return_weights`` of ``true``/``false``/``1``/``0``;
* the session: it exists, its trainer is a Keras one (not ``TFOptimizer``) and holds at most
  :data:`MAX_SESSION_BYTES` (weights and slots), so its step is a few microseconds and never
  stalls the loop; a row-sparse push of a large table is a large session and goes by thread;
* the server: no journal (``--snapshot-dir`` unset: a journal append and its fsync must not
  run on the loop) and every numba kernel loaded, by the warm-up behind ``/ready``: a kernel
  compiled on first use takes seconds. With ``--no-warm-up-kernels`` that is once use has
  compiled all of them, which a workload of one optimizer and dtype never does: its small
  pushes then go by thread, as every push did before.

The step runs on the loop only while nobody else holds the session's lock and the session,
checked again in its turn once the body is in, is still small (a state put while the body
arrived may have replaced it); otherwise the push waits and steps in a worker thread as the
route does, for example while a data-plane connection or a snapshot holds the lock. Between
that check and the step another thread may still take the lock first: the loop then waits
for that holder, a small session's step or a data-plane answer sent under the lock for at
most :data:`~paramserver.server.dataplane.LOCKED_SEND_SECONDS`.

The middlewares around the app (request metrics and ``X-Request-ID``, tokens, the
concurrency limit) wrap this as they wrap the routes, so they see the push as the route's:
``scope["route"]`` is the push route and ``scope["path_params"]`` holds the session id.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from paramserver.codes import MessageError
from paramserver.wire import MSGPACK_CONTENT_TYPES, MSGPACK_MEDIA_TYPE

from ..errors import BadRequest, RequestTimeout, ServiceError, error_response
from ..idempotency import check_key
from ..optim import default_backend
from ..service import SessionService
from ..sessions import Session
from ..training import KerasTrainer
from .sessions import push_answer, push_gradients, router, turn

__all__ = ["MAX_BODY_BYTES", "MAX_SESSION_BYTES", "SmallPushes"]

#: The largest body served here (a push of up to about 16,000 float32 parameters).
MAX_BODY_BYTES = 64 * 1024
#: The largest session (weights and slots, as counted for its quota) stepped on the loop.
MAX_SESSION_BYTES = 1024 * 1024

_PATH = re.compile(r"/sessions/([^/]+)/gradients")
_RETURN_WEIGHTS = {
    b"": True,
    b"return_weights=true": True,
    b"return_weights=1": True,
    b"return_weights=false": False,
    b"return_weights=0": False,
}
_MSGPACK = frozenset(t.encode("latin-1") for t in MSGPACK_CONTENT_TYPES)


class SmallPushes:
    """ASGI middleware: serve small pushes of small sessions on the loop (module docstring),
    pass everything else to ``app``."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI) -> None:
        self.app = app
        self.fastapi = fastapi
        # what the router would put into the scope (the metrics label requests by its path)
        self.route = next(
            r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is push_gradients
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            matched = _PATH.fullmatch(scope["path"])
            if matched is not None:
                plan = self._plan(scope, matched.group(1))
                if plan is not None:
                    await self._push(scope, receive, send, *plan)
                    return
        await self.app(scope, receive, send)

    def _plan(self, scope: Scope, session_id: str) -> tuple[Session, int, bool, str | None] | None:
        """The session, body size, return_weights and key of a push served here, or None."""
        return_weights = _RETURN_WEIGHTS.get(scope["query_string"])
        if return_weights is None:
            return None
        state = self.fastapi.state
        service: SessionService | None = getattr(state, "service", None)
        if service is None or service.durability is not None:
            return None
        if not getattr(default_backend(), "loaded", True):  # numpy's: nothing to compile
            return None
        size: int | None = None
        key: str | None = None
        msgpack = content_type = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                if size is not None or not value.isdigit():
                    return None
                size = int(value)
            elif name == b"content-type":
                if content_type:  # the route reads the first of two: let it answer
                    return None
                content_type = True
                msgpack = value.split(b";", 1)[0].strip().lower() in _MSGPACK
            elif name == b"idempotency-key":
                if key is not None:
                    return None
                key = value.decode("latin-1")
                if not check_key(key):
                    return None
            elif name == b"transfer-encoding":
                return None
        if size is None or size > min(MAX_BODY_BYTES, service.settings.max_body_bytes):
            return None
        if not msgpack:
            return None
        session = service.store.find(session_id)
        if session is None or not _small(session):
            return None
        return session, size, return_weights, key

    async def _push(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        session: Session,
        size: int,
        return_weights: bool,
        key: str | None,
    ) -> None:
        scope["route"] = self.route
        scope["path_params"] = {"session_id": session.id}
        service: SessionService = self.fastapi.state.service
        try:
            body = await _read(receive, size, service.settings.request_timeout_seconds)
            async with turn(session, service):
                # Its lock held by a data-plane connection or a threaded request (a snapshot,
                # an export): wait for it in a worker thread, never on the loop. Or a state
                # put while the body arrived made the session large: step it there too. So
                # does a retry of a data-plane push whose digest is still being computed.
                if (
                    session.lock.locked()
                    or not _small(session)
                    or (key is not None and service.idempotency.pending(session.id, key))
                ):
                    outcome = await run_in_threadpool(
                        service.push,
                        session,
                        body,
                        return_weights=return_weights,
                        idempotency_key=key,
                    )
                else:
                    outcome = service.push(
                        session, body, return_weights=return_weights, idempotency_key=key
                    )
            del body  # not kept while the push waits in a sync round (as in the route)
            content, replayed = await push_answer(session, outcome, return_weights)
        except (ServiceError, MessageError) as exc:
            if isinstance(exc, ServiceError):
                response = error_response(
                    exc.status, exc.code, exc.message, exc.headers, exc.details
                )
            else:
                response = error_response(exc.status, exc.code, exc.message)
            await response(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = [
            (b"content-length", str(len(content)).encode("latin-1")),
            (b"content-type", MSGPACK_MEDIA_TYPE.encode("latin-1")),
        ]
        if replayed:
            headers.append((b"idempotent-replayed", b"true"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def _small(session: Session) -> bool:
    """A Keras session of at most :data:`MAX_SESSION_BYTES`: a step of microseconds."""
    trainer = session.trainer
    return isinstance(trainer, KerasTrainer) and trainer.nbytes() <= MAX_SESSION_BYTES


async def _read(receive: Receive, size: int, timeout: float) -> bytearray:
    """The body of ``size`` bytes (its ``Content-Length``) within ``timeout`` seconds: the
    same errors as :func:`.bodies.read_body` (400 for a short, long or abandoned body, 408
    past the timeout).

    The deadline is asyncio's own (``asyncio.timeout``, 3.11+): 5 us where anyio's cancel
    scope costs 10 us, a tenth of a small push's request on the loop; on 3.10 anyio's."""
    try:
        if _timeout is not None:
            async with _timeout(timeout):
                body = await _receive(receive, size)
        else:  # pragma: no cover - Python 3.10
            with anyio.fail_after(timeout):
                body = await _receive(receive, size)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g} s",
            headers={"Connection": "close"},
        ) from None
    if len(body) != size:
        raise BadRequest("the body is shorter than its Content-Length")
    return body


_timeout = getattr(asyncio, "timeout", None) if sys.version_info >= (3, 11) else None


async def _receive(receive: Receive, size: int) -> bytearray:
    body = bytearray()
    while True:
        message: dict[str, Any] = await receive()  # type: ignore[assignment]
        if message["type"] == "http.disconnect":
            raise BadRequest("the client disconnected before the body was complete")
        body += message.get("body", b"")
        if len(body) > size:
            raise BadRequest("the body is longer than its Content-Length")
        if not message.get("more_body", False):
            return body
