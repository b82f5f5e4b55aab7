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

The step runs on the loop only while nobody else holds the session's lock and the session's
trainer, looked at again in its turn once the body is in, is still the one the push was planned
with (a state put while the body arrived may have replaced it, and a large state with it);
otherwise the push waits and steps in a worker thread as the route does, for example while a
data-plane connection or a snapshot holds the lock. Between that check and the step another
thread may still take the lock first: the loop then waits for that holder, a small session's
step or a data-plane answer sent under the lock for at most
:data:`~paramserver.server.dataplane.LOCKED_SEND_SECONDS`.

Two levels serve it. :class:`SmallPushes` is ASGI middleware: under any ASGI server it saves
the routing and the thread hop. Under ``paramserver serve`` the same push is served one level
lower, by the HTTP connection itself (:class:`DirectPushes`, asked by
:class:`~paramserver.server.connections.GuardedConnection`): no ASGI task, no
``receive``/``send`` messages, no middleware wrappers, the answer written in one piece. It
takes only what needs no wait (nobody holds or waits for the session, no sync round, no pending
key) and hands anything else, body already read, to the ASGI app and so to
:class:`SmallPushes`. Both give the same answers, fields, errors, metrics and access lines.

The middlewares around the app (request metrics and ``X-Request-ID``, tokens, the
concurrency limit) wrap :class:`SmallPushes` as they wrap the routes, so they see the push as
the route's: ``scope["route"]`` is the push route and ``scope["path_params"]`` holds the
session id. :class:`DirectPushes` does their part itself (its docstring).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Coroutine
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from paramserver.codes import ErrorCode, MessageError
from paramserver.wire import MSGPACK_CONTENT_TYPES, MSGPACK_MEDIA_TYPE

from ..auth import TokenTable
from ..errors import BadRequest, RequestTimeout, ServiceError, error_response
from ..idempotency import check_key
from ..observability import RequestRecord, current_request
from ..optim import default_backend
from ..rounds import Ticket
from ..service import SessionService
from ..sessions import Session
from ..training import KerasTrainer, Trainer
from .sessions import push_answer, push_gradients, router, turn

__all__ = ["MAX_BODY_BYTES", "MAX_SESSION_BYTES", "DirectPushes", "SmallPushes", "plan_push"]

log = logging.getLogger("paramserver")

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
        self.route = _push_route()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            matched = _PATH.fullmatch(scope["path"])
            if matched is not None:
                service: SessionService | None = getattr(self.fastapi.state, "service", None)
                if service is not None:
                    plan = plan_push(service, scope, matched.group(1))
                    if plan is not None:
                        await self._push(scope, receive, send, service, *plan)
                        return
        await self.app(scope, receive, send)

    async def _push(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        service: SessionService,
        session: Session,
        trainer: Trainer,
        size: int,
        return_weights: bool,
        key: str | None,
    ) -> None:
        scope["route"] = self.route
        scope["path_params"] = {"session_id": session.id}
        try:
            body = await _read(receive, size, service.settings.request_timeout_seconds)
            async with turn(session, service):
                # Its lock held by a data-plane connection or a threaded request (a snapshot,
                # an export): wait for it in a worker thread, never on the loop. Or a state
                # put while the body arrived made the session large: step it there too. So
                # does a retry of a data-plane push whose digest is still being computed.
                if (
                    session.lock.locked()
                    or session.trainer is not trainer
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
        headers = answer_headers(content, replayed)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


#: What :meth:`DirectPushes.serve` gives the connection to write: status, fields, body.
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


class DirectPushes:
    """The small push served by the HTTP connection itself, without the ASGI app.

    :class:`SmallPushes` saves FastAPI's routing and the thread hop; what is left of a
    10-element push's time on the loop is then mostly ASGI's: a task per request, the
    ``receive``/``send`` messages, and every middleware's wrapper. Here uvicorn's protocol
    (:class:`~paramserver.server.connections.GuardedConnection`) asks :meth:`plan` once a
    request's headers are in, keeps the body as it always does, and once the body is complete
    asks :meth:`serve` for the whole answer, which it writes in one piece.

    What the middlewares do is done here the same way, or the request goes the ASGI way:

    * request metrics, ``X-Request-ID`` and the access line: the same
      :class:`~paramserver.server.observability.RequestRecord`;
    * tokens: a request without a token that may write is left to the ASGI app, whose
      middleware answers its 401 or 403;
    * the concurrency limit (``--limit-concurrency``): with a limit set, nothing is served
      here (a request counts against it while its body arrives);
    * errors: the same error bodies, from the same :func:`~paramserver.server.errors
      .error_response`; an unexpected exception is logged and answered 500, as the app does.

    :meth:`serve` steps only when the step needs no wait: nobody holds or waits for the
    session's turn or lock, the session is still small and not a sync one, and the key is not
    pending. Otherwise it answers None, having done nothing, and the connection hands the
    request, its body already in, to the ASGI app, where :class:`SmallPushes` waits as before.
    """

    def __init__(self, fastapi: FastAPI) -> None:
        state = fastapi.state
        self.fastapi = fastapi
        self.record: RequestRecord = state.request_record
        self.tokens: TokenTable | None = state.tokens or None
        self.enabled = state.settings.limit_concurrency is None
        self.template = _push_route().path

    def plan(self, scope: Scope) -> Plan | None:
        """What :func:`plan_push` says of this request, if it may be served here at all."""
        if not self.enabled or scope["method"] != "POST" or scope["root_path"]:
            return None
        matched = _PATH.fullmatch(scope["path"])
        if matched is None:
            return None
        service: SessionService | None = getattr(self.fastapi.state, "service", None)
        if service is None:
            return None
        if self.tokens is not None and not _may_write(self.tokens, scope):
            return None
        return plan_push(service, scope, matched.group(1))

    def body_timeout(self) -> float:
        """Seconds a planned push's body may take to arrive (408 after)."""
        service: SessionService = self.fastapi.state.service
        return service.settings.request_timeout_seconds

    def late(self, scope: Scope) -> Answer:
        """The answer to a planned push whose body did not arrive in time: the app's 408."""
        timeout = self.body_timeout()
        return self._refused(
            scope,
            RequestTimeout(
                f"the request body did not arrive within {timeout:g} s",
                headers={"Connection": "close"},
            ),
        )

    def _refused(self, scope: Scope, exc: ServiceError) -> Answer:
        started = time.perf_counter()
        info, token = self.record.begin(scope)
        status, headers, content = _error_answer(exc)
        info["status"], info["bytes"] = status, len(content)
        headers.append((b"x-request-id", info["request_id"].encode("latin-1")))
        matched = _PATH.fullmatch(scope["path"])
        self.record.end(
            info,
            token,
            started=started,
            template=self.template,
            session_id=None if matched is None else matched.group(1),
            error_code=exc.code.value,
        )
        return status, headers, content

    def serve(
        self,
        scope: Scope,
        plan: Plan,
        body: bytearray,
    ) -> Answer | Coroutine[Any, Any, Answer] | None:
        """The answer to a planned push whose body is in; None when it must go the ASGI way
        (nothing done); a coroutine to await in the rare case the push joined a sync round."""
        session, trainer, size, return_weights, key = plan
        service: SessionService = self.fastapi.state.service
        if (
            len(body) != size
            or session.turn.locked()
            or session.lock.locked()
            or session.round is not None
            or session.trainer is not trainer  # a state put replaced it while the body came
            or (key is not None and service.idempotency.pending(session.id, key))
        ):
            return None
        started = time.perf_counter()
        info, token = self.record.begin(scope)
        error_code: str | None = None
        try:
            outcome = service.push(
                session, body, return_weights=return_weights, idempotency_key=key
            )
            if isinstance(outcome, Ticket):  # a state put made it a sync session: wait
                current_request.reset(token)
                return self._in_round(info, started, session, outcome, return_weights)
            content, replayed = outcome
            status, headers = 200, answer_headers(content, replayed)
        except (ServiceError, MessageError) as exc:
            error_code = exc.code.value
            status, headers, content = _error_answer(exc)
        except Exception:
            log.exception("unexpected error on POST %s", scope["path"])
            error_code = ErrorCode.INTERNAL_ERROR.value
            status, headers, content = _error_answer(None)
        info["status"], info["bytes"] = status, len(content)
        headers.append((b"x-request-id", info["request_id"].encode("latin-1")))
        self.record.end(
            info,
            token,
            started=started,
            template=self.template,
            session_id=session.id,
            error_code=error_code,
        )
        return status, headers, content

    async def _in_round(
        self,
        info: dict[str, Any],
        started: float,
        session: Session,
        ticket: Ticket,
        return_weights: bool,
    ) -> Answer:
        token = current_request.set(info)
        metrics = self.record.metrics
        metrics.in_flight.inc()
        error_code: str | None = None
        try:
            content, _ = await push_answer(session, ticket, return_weights)
            status, headers = 200, answer_headers(content, False)
        except (ServiceError, MessageError) as exc:
            error_code = exc.code.value
            status, headers, content = _error_answer(exc)
        except Exception:
            log.exception("unexpected error on POST %s", info["path"])
            error_code = ErrorCode.INTERNAL_ERROR.value
            status, headers, content = _error_answer(None)
        finally:
            metrics.in_flight.dec()
        info["status"], info["bytes"] = status, len(content)
        headers.append((b"x-request-id", info["request_id"].encode("latin-1")))
        self.record.end(
            info,
            token,
            started=started,
            template=self.template,
            session_id=session.id,
            error_code=error_code,
        )
        return status, headers, content


def _may_write(tokens: TokenTable, scope: Scope) -> bool:
    """Whether the request carries a token that may write (as :class:`AuthMiddleware` reads
    it: the first ``Authorization`` field, ``Bearer <token>``)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            token = credentials.strip()
            return scheme.lower() == "bearer" and bool(token) and tokens.lookup(token) is True
    return False


def _error_answer(exc: ServiceError | MessageError | None) -> Answer:
    """The route's error answer for ``exc`` (None: an unexpected error, 500)."""
    if exc is None:
        response = error_response(500, ErrorCode.INTERNAL_ERROR, "internal server error")
    elif isinstance(exc, ServiceError):
        response = error_response(exc.status, exc.code, exc.message, exc.headers, exc.details)
    else:
        response = error_response(exc.status, exc.code, exc.message)
    return response.status_code, list(response.raw_headers), bytes(response.body)


def answer_headers(content: bytes, replayed: bool) -> list[tuple[bytes, bytes]]:
    """The header fields of a push's 200 (the route's, with ``Idempotent-Replayed``)."""
    headers = [(b"content-length", b"%d" % len(content)), (b"content-type", _MSGPACK_MEDIA)]
    if replayed:
        headers.append((b"idempotent-replayed", b"true"))
    return headers


_MSGPACK_MEDIA = MSGPACK_MEDIA_TYPE.encode("latin-1")


#: A push served on the loop: its session, the session's trainer then (small: a state put
#: may replace it before the body is in), the body's size, return_weights and key.
Plan = tuple[Session, Trainer, int, bool, str | None]


def plan_push(service: SessionService, scope: Scope, session_id: str) -> Plan | None:
    """The :data:`Plan` of a push of ``scope`` (a ``POST`` to the push route of
    ``session_id``) served on the loop (module docstring), or None."""
    return_weights = _RETURN_WEIGHTS.get(scope["query_string"])
    if return_weights is None:
        return None
    if service.durability is not None:
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
    if session is None:
        return None
    trainer = session.trainer
    if not _small(trainer):
        return None
    return session, trainer, size, return_weights, key


def _push_route() -> APIRoute:
    return next(
        r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is push_gradients
    )


def _small(trainer: Trainer) -> bool:
    """A Keras trainer of at most :data:`MAX_SESSION_BYTES`: a step of microseconds."""
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
