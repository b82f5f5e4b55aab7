"""Connection guard: header-read and idle timeouts and a cap on open connections.

uvicorn closes a kept-alive connection that stays silent between two requests (its keep-alive
timeout), but not one that never finishes its request line and headers: a client that opens
connections and sends half a header holds a file descriptor each, for ever, and a thousand of
them lock every other client out. This module adds what servers such as nginx
(``client_header_timeout``) and hyper (``header_read_timeout``) have:

* **header timeout**: from the moment a connection is accepted (its TLS handshake included), or
  from the first byte of the next request on a kept-alive connection, the request line and
  headers must arrive within ``header_timeout``; else the connection is closed (with a 408 when
  part of a request had arrived);
* **idle timeout**: uvicorn's keep-alive timeout, between two requests;
* **send timeout**: an answer handed to the transport whole (uvicorn's ``send`` waits for a
  drain only before the next message) must keep being taken by the peer: when none of what
  is left of it leaves for ``send_timeout`` seconds, the connection is aborted. A close (the
  idle timeout's, or ``Connection: close``) waits for the buffer to drain, so a peer that
  stops reading would otherwise hold the answer's memory for as long as it likes;
* **connection cap**: at ``max_connections`` open connections a new one first closes the
  oldest connection that has not finished its headers, then the oldest idle kept-alive one;
  only when every connection is busy with a request is the new one refused (503, or a reset
  before a TLS handshake).

The request body is bounded by the app (``request_timeout_seconds``, 408). Everything here runs
on the event loop; :class:`ConnectionGuard` is per server.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from typing import Any, Protocol

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.server import ServerState

from paramserver.codes import ErrorCode, error_json

log = logging.getLogger("paramserver.connections")

#: How often, at most, the guard logs a summary of what it closed or refused.
REPORT_INTERVAL_SECONDS = 10.0
#: The most bytes of a request's line and header fields (its chunked trailers included), and
#: the most fields: each field costs about a hundred bytes of Python objects from four bytes
#: on the wire, and the header timeout alone bounds only how long they may keep coming.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_FIELDS = 256
#: How often, at most, a connection whose answer is still in its buffer looks at the buffer.
SEND_CHECK_SECONDS = 1.0


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops and uvicorn answers 400."""


class Direct(Protocol):
    """What serves a request on the connection itself, without the ASGI app
    (:class:`paramserver.server.api.fastpath.DirectPushes`)."""

    def plan(self, scope: Any) -> Any | None:
        """Once the headers are in: a plan to serve it directly, or None (the ASGI way)."""

    def serve(self, scope: Any, plan: Any, body: bytearray) -> Any | None:
        """Once the body is in: ``(status, fields, body)``, a coroutine giving them, or None
        (nothing done: the ASGI way)."""

    def body_timeout(self) -> float:
        """Seconds a planned request's body may take to arrive."""

    def late(self, scope: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The answer to a planned request whose body did not arrive in time."""


class Evictable(Protocol):
    """What the guard tracks: a connection it can close to make room."""

    def evict(self) -> None: ...


class ConnectionGuard:
    """Which connections are open and in what state, oldest first, for one server.

    A connection is *waiting* (accepted, or a kept-alive one whose next request started, and
    its headers not complete), *busy* (a request being read, run or answered) or *idle*
    (kept alive between requests). Each state keeps insertion order, so the oldest waiting and
    the oldest idle connection are the first of their dict.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        header_timeout: float,
        send_timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1; got {max_connections}")
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self._waiting: dict[Evictable, None] = {}
        self._idle: dict[Evictable, None] = {}
        self._busy: dict[Evictable, None] = {}
        self._where: dict[Evictable, dict[Evictable, None]] = {}  # each one's state
        self._clock = clock
        self._counts = dict.fromkeys(
            ("header_timeouts", "send_timeouts", "evicted_waiting", "evicted_idle", "refused"), 0
        )
        self._last_report = clock()

    @property
    def open_connections(self) -> int:
        return len(self._where)

    def admit(self, connection: Evictable) -> bool:
        """Make room for a new connection; False when every open connection is busy."""
        if self.open_connections >= self.max_connections:
            victim = next(iter(self._waiting), None)
            kind = "evicted_waiting"
            if victim is None:
                victim = next(iter(self._idle), None)
                kind = "evicted_idle"
            if victim is None:
                self._note("refused")
                return False
            self.forget(victim)
            victim.evict()
            self._note(kind)
        self._waiting[connection] = None
        self._where[connection] = self._waiting
        return True

    def waiting(self, connection: Evictable) -> None:
        self._move(connection, self._waiting)

    def busy(self, connection: Evictable) -> None:
        self._move(connection, self._busy)

    def idle(self, connection: Evictable) -> None:
        self._move(connection, self._idle)

    def is_waiting(self, connection: Evictable) -> bool:
        return self._where.get(connection) is self._waiting

    def is_busy(self, connection: Evictable) -> bool:
        return self._where.get(connection) is self._busy

    def is_idle(self, connection: Evictable) -> bool:
        return self._where.get(connection) is self._idle

    def is_open(self, connection: Evictable) -> bool:
        return connection in self._where

    def forget(self, connection: Evictable) -> None:
        group = self._where.pop(connection, None)
        if group is not None:
            del group[connection]

    def header_timed_out(self) -> None:
        self._note("header_timeouts")

    def send_timed_out(self) -> None:
        self._note("send_timeouts")

    def _move(self, connection: Evictable, target: dict[Evictable, None]) -> None:
        group = self._where.get(connection)
        if group is None:
            return  # closed (evicted) meanwhile
        del group[connection]
        target[connection] = None
        self._where[connection] = target

    def _note(self, event: str) -> None:
        self._counts[event] += 1
        now = self._clock()
        if now - self._last_report >= REPORT_INTERVAL_SECONDS:
            self._report(now)

    def _report(self, now: float) -> None:
        counts, self._counts = self._counts, dict.fromkeys(self._counts, 0)
        self._last_report = now
        log.warning(
            "connection guard (cap %d, %d open): in the last %.0f s closed %d connections whose "
            "headers took over %g s and %d whose peer took no byte of an answer for %g s, "
            "closed %d waiting and %d idle connections to make room, refused %d new ones "
            "(every connection busy)",
            self.max_connections,
            self.open_connections,
            REPORT_INTERVAL_SECONDS,
            counts["header_timeouts"],
            self.header_timeout,
            counts["send_timeouts"],
            self.send_timeout,
            counts["evicted_waiting"],
            counts["evicted_idle"],
            counts["refused"],
        )


def _raw_response(status: int, reason: str, code: ErrorCode, message: str, extra: bytes) -> bytes:
    body = error_json(code, message)
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n".encode("ascii")
        + extra
        + f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n".encode("ascii")
        + body
    )


class GuardedConnection(HttpToolsProtocol):
    """uvicorn's httptools protocol, reporting its state to a :class:`ConnectionGuard` and
    closing itself when its headers are late.

    ``tcp_connected`` runs when the TCP connection is accepted: at once for plain HTTP, and
    before the TLS handshake (by :class:`GuardedTLSProtocol`) for https, so the handshake
    counts in the header timeout and in the cap.
    """

    guard: ConnectionGuard  # set on the subclass made by :func:`protocol_factory`
    direct: Direct | None = None  # likewise

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._raw_transport: asyncio.BaseTransport | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_started = False
        self._refused = False
        self._head_bytes = 0
        self._head_fields = 0
        self._head_too_large = False
        self._in_head = False  # from a request's first byte to the end of its header fields
        self._head_chunks = 0  # bytes of the chunks that came whole inside the current head
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_left = 0  # bytes of answers still in the transport's buffer at the last look
        self._send_since = 0.0  # when the buffer last shrank (loop time)
        self._lost = False
        self._taking = False  # in on_headers_complete: a request direct may take
        self._direct_plan: tuple[RequestResponseCycle, Any] | None = None
        self._body_timer: asyncio.TimerHandle | None = None  # its body's deadline

    # -- the guard's side ----------------------------------------------------------------------

    def tcp_connected(self, raw_transport: asyncio.BaseTransport) -> bool:
        """Register with the guard; False when the cap refuses the connection."""
        self._raw_transport = raw_transport
        if not self.guard.admit(self):
            self._refused = True
            return False
        self._start_header_timer()
        return True

    def evict(self) -> None:
        """Closed by the guard to make room for a new connection."""
        self._cancel_header_timer()
        if self._raw_transport is not None:
            self._raw_transport.abort()  # type: ignore[attr-defined]

    def _start_header_timer(self) -> None:
        self._cancel_header_timer()
        self._request_started = False
        self._header_timer = self.loop.call_later(self.guard.header_timeout, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.guard.is_waiting(self):
            return
        self.guard.header_timed_out()
        self.guard.forget(self)
        transport = self.transport
        if self._request_started and transport is not None and not transport.is_closing():
            # Part of a request arrived: say why before closing, as Apache does.
            transport.write(
                _raw_response(
                    408,
                    "Request Timeout",
                    ErrorCode.REQUEST_TIMEOUT,
                    f"the request line and headers did not arrive within "
                    f"{self.guard.header_timeout:g} s",
                    b"",
                )
            )
            transport.close()
        elif self._raw_transport is not None:
            self._raw_transport.abort()  # type: ignore[attr-defined]

    def tcp_lost(self) -> None:
        self._lost = True
        self._cancel_header_timer()
        self._cancel_body_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self.guard.forget(self)

    def _watch_send(self) -> None:
        """An answer is complete but not all sent: look at the buffer until it drains, and
        abort the connection once none of it has left for the guard's ``send_timeout``."""
        if self._send_timer is not None or self._lost or self.transport is None:
            return
        left = self.transport.get_write_buffer_size()
        if not left:
            return
        self._send_left, self._send_since = left, self.loop.time()
        self._send_timer = self.loop.call_later(self._send_interval(), self._check_send)

    def _send_interval(self) -> float:
        return min(SEND_CHECK_SECONDS, self.guard.send_timeout)

    def _check_send(self) -> None:
        self._send_timer = None
        transport = self.transport
        if self._lost or transport is None:
            return
        left = transport.get_write_buffer_size()
        if not left:
            return  # drained: uvicorn's own close or keep-alive timer goes on from here
        now = self.loop.time()
        if left < self._send_left:
            self._send_left, self._send_since = left, now
        elif now - self._send_since >= self.guard.send_timeout:
            self.guard.send_timed_out()
            self.guard.forget(self)
            transport.abort()
            return
        self._send_timer = self.loop.call_later(self._send_interval(), self._check_send)

    # -- uvicorn's protocol, extended ----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._raw_transport is not None:
            return  # TLS: registered before the handshake
        if not self.tcp_connected(transport):
            transport.write(
                _raw_response(
                    503,
                    "Service Unavailable",
                    ErrorCode.SERVICE_UNAVAILABLE,
                    f"the server holds {self.guard.max_connections} connections, all busy; "
                    "retry later",
                    b"retry-after: 1\r\n",
                )
            )
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tcp_lost()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # _is_idle first: it is false for every chunk of a body (this runs per chunk)
        if self._is_idle() and not self.guard.is_waiting(self) and self.guard.is_open(self):
            # The next request on a kept-alive connection: its headers are timed from here.
            self.guard.waiting(self)
            self._start_header_timer()
        self._request_started = True
        in_head = self._in_head
        super().data_received(data)
        if self._direct_plan is not None and self._body_timer is None and self.direct is not None:
            # A direct request whose body is still coming: it has the app's body timeout
            # (most come whole in the read that brought their headers, and need no timer).
            self._body_timer = self.loop.call_later(self.direct.body_timeout(), self._body_late)
        if in_head and self._in_head and not self.transport.is_closing():
            # A chunk that came whole inside one head: a field too long to be handed to
            # on_header yet (httptools keeps it, and copies it for every piece) is bounded
            # here. (The chunk that began the request is not counted: at most one read.)
            self._head_chunks += len(data)
            if self._head_chunks > MAX_HEAD_BYTES:
                self._head_too_large = True
                self.send_400_response("")

    def on_message_begin(self) -> None:
        self._head_bytes = self._head_fields = self._head_chunks = 0
        self._in_head = True
        if self.guard.is_idle(self):
            # The next request, pipelined behind one answered directly (inside this same
            # read, so data_received saw the connection busy): timed as a new request's head.
            self._unset_keepalive_if_required()
            self.guard.waiting(self)
            self._start_header_timer()
            self._request_started = True
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4, 1)  # ": " and CRLF
        super().on_header(name, value)

    def _count_head(self, size: int, fields: int) -> None:
        self._head_bytes += size
        self._head_fields += fields
        if self._head_bytes > MAX_HEAD_BYTES or self._head_fields > MAX_HEADER_FIELDS:
            self._head_too_large = True
            raise _HeadTooLarge

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._head_too_large = False
            self.transport.write(
                _raw_response(
                    400,
                    "Bad Request",
                    ErrorCode.BAD_REQUEST,
                    f"the request line and header fields exceed {MAX_HEAD_BYTES} bytes or "
                    f"{MAX_HEADER_FIELDS} fields",
                    b"",
                )
            )
            self.transport.close()
            return
        super().send_400_response(msg)

    def _is_idle(self) -> bool:
        return self.cycle is None or (self.cycle.response_complete and not self.pipeline)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_header_timer()
        self.guard.busy(self)
        self._taking = self.direct is not None and not self.expect_100_continue
        try:
            super().on_headers_complete()
        finally:
            self._taking = False

    # -- requests served directly (``direct``), without the ASGI app ---------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # uvicorn calls this from on_headers_complete for a request it starts at once (not one
        # queued behind another, nor one refused by its own concurrency limit): the direct
        # server may take it, and then the ASGI task is never started.
        if self._taking and app is self.app and self.direct is not None:
            if not (_access_line(cycle) and _forwarded(cycle.scope)):
                plan = self.direct.plan(cycle.scope)
                if plan is not None:
                    self._direct_plan = (cycle, plan)
                    return
        super()._start_asgi_task(cycle, app)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_late(self) -> None:
        """The body of a direct request did not arrive in time: 408 and close, as the app
        answers one (nothing was done with it)."""
        self._body_timer = None
        pending, self._direct_plan = self._direct_plan, None
        if pending is None or self.direct is None:
            return
        cycle, _ = pending
        if cycle is self.cycle and not cycle.disconnected and not cycle.response_complete:
            self._answer_directly(cycle, *self.direct.late(cycle.scope))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        pending = self._direct_plan
        if pending is None:
            return
        self._direct_plan = None
        self._cancel_body_timer()
        cycle, plan = pending
        if cycle is not self.cycle or cycle.disconnected or cycle.response_complete:
            return
        assert self.direct is not None
        try:
            answer = self.direct.serve(cycle.scope, plan, cycle.body)
        except Exception:  # a bug must not surface as httptools' "invalid request" 400
            self.logger.error("Exception in the direct push", exc_info=True)
            answer = (
                500,
                [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", b"21"),
                    (b"connection", b"close"),
                ],
                b"Internal Server Error",
            )
        if answer is None:  # the ASGI way after all: its body is in the cycle already
            super()._start_asgi_task(cycle, self.app)
            return
        cycle.body = bytearray()
        if isinstance(answer, tuple):
            self._answer_directly(cycle, *answer)
            return
        task = self.loop.create_task(self._answer_later(cycle, answer))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer_later(self, cycle: RequestResponseCycle, answer: Any) -> None:
        status, fields, body = await answer
        if not cycle.disconnected:
            self._answer_directly(cycle, status, fields, body)

    def _answer_directly(
        self,
        cycle: RequestResponseCycle,
        status: int,
        fields: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        """Write the whole answer at once, as uvicorn's ``send`` writes an ASGI one (its
        default fields first, ``connection: close`` when the connection will close), then
        finish the cycle as uvicorn does."""
        parts = [STATUS_LINE[status]]
        for name, value in cycle.default_headers:
            parts += (name, b": ", value, b"\r\n")
        closing = False
        for name, value in fields:
            if name == b"connection" and b"close" in value.lower():
                cycle.keep_alive = False
                closing = True
            parts += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive and not closing:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        if _access_line(cycle):
            scope = cycle.scope
            cycle.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(scope),
                scope["method"],
                get_path_with_query_string(scope),
                scope["http_version"],
                status,
            )
        cycle.response_started = cycle.response_complete = True
        cycle.waiting_for_100_continue = False
        cycle.message_event.set()
        self.transport.write(b"".join(parts))
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:
            if self._in_head:
                # The next request began with this one's bytes and its headers are not all
                # in: it is timed by the header timeout (408), not closed silently as idle.
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None
                self.guard.waiting(self)
                self._start_header_timer()
                self._request_started = True
            else:
                # Nothing pipelined: idle until the next request (uvicorn's keep-alive timeout).
                self.guard.idle(self)
        if self.transport.get_write_buffer_size():
            self._watch_send()  # also when closing: a close waits for the buffer to drain


class GuardedTLSProtocol(sslproto.SSLProtocol):
    """asyncio's TLS layer, registering its HTTP connection with the guard before the
    handshake, so that a client that never completes one is timed and capped too."""

    _app: GuardedConnection

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_protocol: GuardedConnection,
        context: ssl.SSLContext,
        handshake_timeout: float,
    ) -> None:
        super().__init__(
            loop,
            app_protocol,
            context,
            None,  # type: ignore[arg-type]  # no waiter: nobody awaits the handshake
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,  # type: ignore[arg-type]  # float works
        )
        self._app = app_protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._app.tcp_connected(transport):
            transport.abort()  # type: ignore[attr-defined]
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._app.tcp_lost()
        super().connection_lost(exc)


def _access_line(cycle: RequestResponseCycle) -> bool:
    """Whether uvicorn's access logger writes this request's line (``access_log`` on and the
    logger enabled for INFO): its fields are not even gathered otherwise."""
    return bool(cycle.access_log) and cycle.access_logger.isEnabledFor(logging.INFO)


def _forwarded(scope: Any) -> bool:
    """An ``X-Forwarded-For`` field: uvicorn's proxy middleware may change the client that its
    access line names; such a request goes the ASGI way when the access log is on."""
    return any(name == b"x-forwarded-for" for name, _ in scope["headers"])


def protocol_factory(
    guard: ConnectionGuard, tls: ssl.SSLContext | None, direct: Direct | None = None
) -> Callable[..., asyncio.BaseProtocol]:
    """What uvicorn's ``Config(http=...)`` calls for every accepted connection; ``direct``
    serves what it plans to on the connection itself (:class:`Direct`)."""
    protocol = type("GuardedConnection", (GuardedConnection,), {"guard": guard, "direct": direct})

    def create(
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.BaseProtocol:
        connection = protocol(config, server_state, app_state, _loop)
        if tls is None:
            return connection
        return GuardedTLSProtocol(connection.loop, connection, tls, guard.header_timeout)

    return create
