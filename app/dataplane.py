"""The data plane: push and pull on a TCP port of their own, at the speed of the wire.

HTTP through the ASGI server costs 2.3-3.3x a TCP echo of the same bytes before any work is
done (docs/performance.md). This listener moves the bytes as the echo does: one thread per
connection, blocking ``recv_into`` straight into a buffer the connection keeps, numpy views of
it handed to the same :class:`~paramserver.server.service.SessionService` step as REST (limits,
idempotency, journal, error codes: one implementation), and ``sendmsg`` of the answer's
buffer. Frames are :mod:`paramserver.frames`; the REST protocol stays complete.

Every guarantee of the HTTP side holds here: TLS (Python's ``ssl``) when the server has a
certificate; the token checked in the ``hello`` before any body byte is read, and a push's
right to write before its body; the header timeout from the accept (handshake included) or
from the first byte of the next request, the idle timeout between requests, the body timeout
(``request_timeout_seconds``); and a connection cap that closes the oldest connection still
sending its headers, then the oldest idle one, before it refuses a new one. A refusal that
comes before a request's body is read closes the connection (the body cannot be skipped); any
other error answers and the connection goes on.

Requests on one connection are answered in order (a client keeps one connection per call in
flight). Each connection keeps its last receive and answer buffers for reuse: bounded by
``max_body_bytes`` and the session's size, and connections by the cap.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from paramserver import frames, messages, wire
from paramserver.codes import STATUS, ErrorCode, MessageError, error_body
from paramserver.messages import base_iterations
from paramserver.sharding import decode_round_order, decode_sum_squares

from .auth import TokenTable
from .connections import ConnectionGuard
from .errors import ServiceError
from .idempotency import DeferredDigest, check_key
from .rounds import Ticket
from .service import SessionService
from .settings import Settings
from .training import Trainer

log = logging.getLogger("paramserver.dataplane")

#: Bytes one receive asks for while a request's prefix and header are read: a small push
#: (prefix, header and body) comes in one system call, not one for each part.
READ_AHEAD = 16 * 1024

#: How long an answer is sent from the weights' own memory under the session's lock before the
#: rest is copied and sent after the lock (loopback sends 4 MB in about 1 ms).
LOCKED_SEND_SECONDS = 0.02


class _Closed(Exception):
    """The peer closed, or the guard evicted the connection."""


class _Timeout(Exception):
    """A deadline passed; ``started`` says whether part of a request had arrived."""

    def __init__(self, started: bool) -> None:
        self.started = started


class _Refusal(Exception):
    """An error answer; ``close`` when the request's body was not read."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        close: bool,
        retry_after: str | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.close = close
        self.retry_after = retry_after


class DataPlane:
    """The listener and its connection threads; :meth:`start`, then :meth:`stop`."""

    def __init__(
        self,
        service: SessionService,
        settings: Settings,
        tokens: TokenTable,
        tls: ssl.SSLContext | None,
        *,
        max_connections: int,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - the frames are little-endian views
            raise RuntimeError("the data plane needs a little-endian machine")
        self.service = service
        self.settings = settings
        self.tokens = tokens
        self.tls = tls
        self.guard = ConnectionGuard(
            max_connections=max_connections, header_timeout=settings.header_timeout_seconds
        )
        self._guard_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._stopping = threading.Event()
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=1024)
        listener.settimeout(0.25)  # accept() wakes up to see a stop
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._accepting = threading.Thread(
            target=self._accept_loop, name="paramserver-dataplane-accept", daemon=True
        )
        self._accepting.start()
        log.info(
            "data plane on %s:%d (%s)", host, self.port, "TLS" if self.tls is not None else "TCP"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, close idle connections, let requests in flight finish."""
        self._stopping.set()
        if self._accepting is not None:
            self._accepting.join(timeout)
        if self._listener is not None:
            self._listener.close()
        with self._guard_lock:
            connections = list(self._connections)
            idle = [c for c in connections if not self.guard.is_busy(c)]
        for connection in idle:
            connection.evict()
        deadline = time.monotonic() + timeout
        for connection in connections:
            connection.thread.join(max(0.0, deadline - time.monotonic()))
        for connection in connections:
            connection.evict()

    def announcement(self) -> dict[str, Any]:
        """What ``GET /data-plane`` answers: where and how to connect."""
        return {"port": self.port, "tls": self.tls is not None, "version": frames.VERSION}

    # -- connections ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # out of descriptors, or the listener closed at stop
                if self._stopping.is_set():
                    return
                log.warning("data plane: accept failed: %s", exc)
                time.sleep(0.1)
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, sock)
            with self._guard_lock:
                admitted = self.guard.admit(connection)
                if admitted:
                    self._connections.add(connection)
            if not admitted:
                connection.refuse_full()
            else:
                connection.thread.start()
            # not kept until the next accept: a closed connection's buffers go with it
            del connection, sock

    def _forget(self, connection: _Connection) -> None:
        with self._guard_lock:
            self.guard.forget(connection)
            self._connections.discard(connection)

    def _state(self, connection: _Connection, state: str) -> None:
        with self._guard_lock:
            getattr(self.guard, state)(connection)


class _Connection:
    """One data-plane connection, served by its own thread."""

    def __init__(self, plane: DataPlane, sock: socket.socket) -> None:
        self.plane = plane
        self.sock: socket.socket = sock
        self.accepted = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="paramserver-dataplane", daemon=True)
        self._evicted = False
        # What the last receive brought beyond what was asked for: bytes [_start, _end) of
        # _ahead, the start of a request's header or body (or of the next request).
        self._ahead = bytearray(READ_AHEAD)
        self._start = self._end = 0
        self._recv: memoryview = memoryview(bytearray())
        self._send = bytearray()
        self._authenticated = not plane.tokens
        self._can_write = not plane.tokens
        self._pending: memoryview | None = None
        self._failed: OSError | None = None
        self._sent_locked = 0  # the body bytes of the last answer sent under the lock
        self._direct_send = plane.tls is None  # a TLS socket has no non-blocking sendmsg
        self._layouts = frames.LayoutCache(field="tensors", limits=plane.service.limits)
        most = plane.service.limits.max_tensors
        self._containers = (
            frames.MAX_HEADER_CONTAINERS if most is None else frames.header_containers(most)
        )

    # -- the guard's side ----------------------------------------------------------------------

    def evict(self) -> None:
        self._evicted = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def refuse_full(self) -> None:
        """The cap is reached and every connection is busy: say so and close."""
        try:
            self.sock.settimeout(1.0)
            self._send_error(
                0,
                ErrorCode.SERVICE_UNAVAILABLE,
                f"the data plane holds {self.plane.guard.max_connections} connections, all "
                "busy; retry later",
                retry_after="1",
            )
        except OSError:
            pass
        self.sock.close()

    # -- serving -------------------------------------------------------------------------------

    def _run(self) -> None:
        settings = self.plane.settings
        try:
            if self.plane.tls is not None:
                self.sock.settimeout(settings.header_timeout_seconds)
                self.sock = self.plane.tls.wrap_socket(
                    self.sock, server_side=True, do_handshake_on_connect=False
                )
                self.sock.do_handshake()
            deadline = self.accepted + settings.header_timeout_seconds
            while not self.plane._stopping.is_set():
                prefix, header, request_id = self._read_request(deadline)
                self.plane._state(self, "busy")
                keep_open = self._handle(prefix, header, request_id)
                if not keep_open:
                    break
                self.plane._state(self, "idle")
                deadline = 0.0  # the next request: its header timeout starts at its first byte
        except (_Closed, OSError):  # ssl.SSLError included
            pass
        except _Timeout as exc:
            with self.plane._guard_lock:
                self.plane.guard.header_timed_out()
            if exc.started:
                try:
                    self._send_error(
                        0,
                        ErrorCode.REQUEST_TIMEOUT,
                        f"the frame prefix and header did not arrive within "
                        f"{settings.header_timeout_seconds:g} s",
                    )
                except OSError:
                    pass
        except Exception:  # pragma: no cover - a bug: logged, the connection closed
            log.exception("data plane: unexpected error; connection closed")
        finally:
            self.plane._forget(self)
            self._recv = memoryview(bytearray())  # its buffers go now, whoever holds it
            self._send = bytearray()
            self._pending = None
            try:
                self.sock.close()
            except OSError:
                pass

    def _read_request(self, deadline: float) -> tuple[frames.Prefix, Any, int]:
        settings = self.plane.settings
        size = frames.PREFIX.size
        if deadline == 0.0:
            # idle between requests: wait for the first byte up to the idle timeout
            if self._start == self._end:
                self._start = self._end = 0
                got = self._recv_some(
                    memoryview(self._ahead)[: len(self._ahead) if self._authenticated else size],
                    time.monotonic() + settings.idle_timeout_seconds,
                )
                if got == 0:
                    raise _Closed
                self._end = got
            deadline = time.monotonic() + settings.header_timeout_seconds
            self.plane._state(self, "waiting")
        self._buffer(size, deadline, started=self._end > self._start)
        try:
            prefix = frames.unpack_prefix(
                self._ahead[self._start : self._start + size], expect=frames.REQUEST
            )
        except frames.FrameError as exc:
            self._send_error(0, ErrorCode.BAD_REQUEST, str(exc))
            raise _Closed from None
        self._start += size
        if not self._authenticated and prefix.header_len > frames.HELLO_HEADER_BYTES:
            # not a hello, whatever it says: none of its header is received
            self._send_error(
                prefix.request_id,
                ErrorCode.UNAUTHORIZED,
                "a valid token is required: the first request is a hello, its header at most "
                f"{frames.HELLO_HEADER_BYTES} bytes",
            )
            raise _Closed
        if prefix.header_len <= len(self._ahead):
            self._buffer(prefix.header_len, deadline, started=True)
            header_bytes = memoryview(self._ahead)[self._start : self._start + prefix.header_len]
            self._start += prefix.header_len
        else:
            # np.empty: pages are only touched as bytes arrive, so a prefix that claims a
            # large header costs memory only for what is really sent (within the header
            # timeout).
            header_bytes = np.empty(prefix.header_len, np.uint8).data
            self._recv_exact(header_bytes, self._take_ahead(header_bytes), deadline, started=True)
        try:
            header = frames.unpack_header(header_bytes, max_containers=self._containers)
        except frames.FrameError as exc:
            self._send_error(prefix.request_id, ErrorCode.BAD_REQUEST, str(exc))
            raise _Closed from None
        finally:
            header_bytes.release()
        return prefix, header, prefix.request_id

    def _buffer(self, least: int, deadline: float, *, started: bool) -> None:
        """At least ``least`` bytes (at most ``READ_AHEAD``) in ``_ahead`` from ``_start``,
        receiving as many as come, by ``deadline``."""
        if self._end - self._start >= least:
            return
        if self._start + least > len(self._ahead):  # move what is there to the front
            kept = self._end - self._start
            self._ahead[:kept] = self._ahead[self._start : self._end]
            self._start, self._end = 0, kept
        # Before the hello has passed, nothing beyond what is asked for: no body byte of an
        # unauthenticated request is received.
        view = memoryview(self._ahead)[
            : len(self._ahead) if self._authenticated else self._start + least
        ]
        while self._end - self._start < least:
            if self._evicted:
                raise _Closed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout(started or self._end > self._start)
            self.sock.settimeout(remaining)
            try:
                n = self.sock.recv_into(view[self._end :])
            except TimeoutError:
                raise _Timeout(started or self._end > self._start) from None
            if n == 0:
                raise _Closed
            self._end += n

    def _take_ahead(self, view: memoryview) -> int:
        """Copy into ``view`` what of it came ahead; the number of bytes copied."""
        came = min(self._end - self._start, len(view))
        if came:
            view[:came] = self._ahead[self._start : self._start + came]
            self._start += came
        return came

    def _recv_some(self, view: memoryview, deadline: float) -> int:
        """Up to ``len(view)`` bytes, at least one, by ``deadline``; 0 at EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout(False)
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv_into(view)
        except TimeoutError:
            raise _Timeout(False) from None

    def _recv_exact(self, view: memoryview, pos: int, deadline: float, *, started: bool) -> None:
        while pos < len(view):
            if self._evicted:
                raise _Closed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout(started or pos > 0)
            self.sock.settimeout(remaining)
            try:
                n = self.sock.recv_into(view[pos:])
            except TimeoutError:
                raise _Timeout(started or pos > 0) from None
            if n == 0:
                raise _Closed
            pos += n

    def _handle(self, prefix: frames.Prefix, header: Any, request_id: int) -> bool:
        """Serve one request; False when the connection must close."""
        try:
            op = header.get("op") if isinstance(header, dict) else None
            if not isinstance(op, str) or op not in frames.OPS:
                raise _Refusal(
                    ErrorCode.INVALID_REQUEST,
                    f"a request header is a map with 'op' one of {', '.join(frames.OPS)}",
                    close=True,
                )
            unknown = set(header) - frames.OPS[op] - {"op"}
            if unknown:
                raise _Refusal(
                    ErrorCode.INVALID_REQUEST,
                    f"unknown field(s) in a {op} request: {', '.join(sorted(map(str, unknown)))}",
                    close=prefix.body_len > 0,
                )
            if op == "hello":
                return self._hello(prefix, header, request_id)
            if not self._authenticated:
                raise _Refusal(
                    ErrorCode.UNAUTHORIZED,
                    "a valid token is required: send it in the hello",
                    close=True,
                )
            if op == "push":
                return self._push(prefix, header, request_id)
            return self._pull(prefix, header, request_id)
        except _Refusal as refusal:
            self._send_error(
                request_id, refusal.code, refusal.message, retry_after=refusal.retry_after
            )
            return not refusal.close
        except ServiceError as exc:
            self._send_error(
                request_id,
                exc.code,
                exc.message,
                retry_after=exc.headers.get("Retry-After"),
                details=exc.details,
            )
            return True

    def _hello(self, prefix: frames.Prefix, header: dict[str, Any], request_id: int) -> bool:
        if prefix.body_len:
            raise _Refusal(ErrorCode.INVALID_REQUEST, "a hello has no body", close=True)
        if header.get("version") != frames.VERSION:
            raise _Refusal(
                ErrorCode.INVALID_REQUEST,
                f"data-plane version {header.get('version')!r}; this server speaks "
                f"{frames.VERSION}",
                close=True,
            )
        tokens = self.plane.tokens
        if tokens:
            token = header.get("token")
            can_write = tokens.lookup(token) if isinstance(token, str) else None
            if can_write is None:
                raise _Refusal(
                    ErrorCode.UNAUTHORIZED,
                    "a valid bearer token is required in the hello",
                    close=True,
                )
            self._authenticated, self._can_write = True, can_write
        self._send_frame(request_id, {"status": 200, "version": frames.VERSION}, ())
        return True

    def _push(self, prefix: frames.Prefix, header: dict[str, Any], request_id: int) -> bool:
        settings = self.plane.settings
        service = self.plane.service
        if not self._can_write:
            raise _Refusal(ErrorCode.FORBIDDEN, "this token is read-only", close=True)
        if prefix.body_len > settings.max_body_bytes:
            raise _Refusal(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"a body of {prefix.body_len} bytes; at most {settings.max_body_bytes}",
                close=True,
            )
        session = self._session(header, close=True)
        try:
            layout = self._layouts.get(header.get("tensors"))
        except wire.TensorError as exc:
            raise _Refusal(ErrorCode.INVALID_TENSOR, str(exc), close=True) from None
        if layout.nbytes != prefix.body_len:
            raise _Refusal(
                ErrorCode.INVALID_REQUEST,
                f"the body holds {prefix.body_len} bytes; its tensors need {layout.nbytes}",
                close=True,
            )
        # Before a byte of the body is read: its tensors must be the session's parameters (same
        # names, same shapes; the dtype may differ, as over REST), so what this connection
        # receives is bounded by the session's own size, not only by max_body_bytes.
        parameters = session.trainer.parameters()
        names = [name for name, _, _, _, _ in layout.tensors]
        if set(names) != set(parameters) or any(
            tuple(parameters[name][1]) != shape for name, _, shape, _, _ in layout.tensors
        ):
            raise _Refusal(
                ErrorCode.PARAMETER_MISMATCH,
                "the push's tensors are not the session's parameters: "
                + ", ".join(
                    f"{name} {list(parameters[name][1]) if name in parameters else 'unknown'}"
                    for name in sorted(set(names) | set(parameters))
                )[:500],
                close=True,
            )
        key = header.get("key")
        return_weights = header.get("return_weights", True)
        if len(self._recv) < prefix.body_len:
            # np.empty, not bytearray: no page is touched before its bytes arrive
            self._recv = np.empty(prefix.body_len, np.uint8).data
        body = self._recv[: prefix.body_len]
        try:
            self._recv_exact(
                body,
                self._take_ahead(body),
                time.monotonic() + settings.request_timeout_seconds,
                started=True,
            )
        except _Timeout:
            raise _Refusal(
                ErrorCode.REQUEST_TIMEOUT,
                f"the body did not arrive within {settings.request_timeout_seconds:g} s",
                close=True,
            ) from None
        # The body is read: from here on an error answers and the connection goes on.
        if key is not None and (not isinstance(key, str) or not check_key(key)):
            raise _Refusal(
                ErrorCode.INVALID_IDEMPOTENCY_KEY,
                "an Idempotency-Key is 1-255 printable ASCII characters",
                close=False,
            )
        if not isinstance(return_weights, bool):
            raise _Refusal(ErrorCode.INVALID_REQUEST, "'return_weights' is a bool", close=False)
        base = header.get("base_iterations")
        squares = header.get("sum_squares")
        order = header.get("round_order")
        reported = header.get("metrics")
        try:
            if reported is not None:
                reported = messages.decode_metrics(reported)
            if base is not None:
                base = base_iterations(base)
            if squares is not None:
                squares = decode_sum_squares(squares)
            if order is not None:
                order = decode_round_order(order)
        except MessageError as exc:
            raise _Refusal(exc.code, exc.message, close=False) from None
        grads = layout.views(body)
        # Without a journal the answer may leave before the call returns: it is sent from the
        # weights' own memory while the session's lock holds them still (no copy). With the
        # journal it must wait for the commit, so the weights are copied first.
        direct = return_weights and service.journal is None and self._direct_send
        answer: Callable[[Trainer], tuple[int, list[list[Any]] | None, int]]
        if direct:
            answer = functools.partial(self._send_locked, request_id)
        elif return_weights:
            answer = self._copy_weights
        else:
            answer = _iterations_only
        # A large keyed push's digest (a pass over its bytes) is left for after its answer,
        # where nothing waits on it: the body stays in this connection's buffer until then.
        later = (
            DeferredDigest(grads)
            if direct and key is not None and prefix.body_len > messages.DIGEST_JOIN_BYTES
            else None
        )
        try:
            outcome = service.push_gradients(
                session,
                grads,
                journal_body=lambda: messages.encode_push(grads, base, squares, order),
                idempotency_key=key,
                answer=answer,
                remember=_nothing,
                base_iterations=base,
                sum_squares=squares,
                round_order=order,
                metrics=reported,
                wait=settings.request_timeout_seconds,
                digest_later=later,
            )
        finally:
            if later is not None:
                later.settle()  # before a slow reader is waited on
        if isinstance(outcome, Ticket):
            # A sync round: this connection's thread waits for it (its body buffer holds
            # nothing the round needs: the gradient was copied into the round's rows).
            result = outcome.wait()
            if return_weights:
                weights = result.weights()
                specs = frames.specs_of(weights)
                body_views = frames.buffers_of(list(weights.values()))
                session.stats.sent(sum(len(b) for b in body_views))
                self._send_frame(
                    request_id,
                    {"status": 200, "iterations": result.iterations, "tensors": specs},
                    body_views,
                )
            else:
                self._send_frame(request_id, {"status": 200, "iterations": result.iterations}, ())
            return True
        if outcome.replayed:  # the answer was not kept: the iterations alone, then pull
            self._send_frame(
                request_id, {"status": 200, "iterations": outcome.iterations, "replayed": True}, ()
            )
            return True
        if direct:
            session.stats.sent(self._sent_locked)
            self._finish_locked_send()
            return True
        assert outcome.value is not None
        session.stats.sent(outcome.value[2])
        self._send_answer(request_id, outcome.value)
        return True

    def _pull(self, prefix: frames.Prefix, header: dict[str, Any], request_id: int) -> bool:
        if prefix.body_len:
            raise _Refusal(ErrorCode.INVALID_REQUEST, "a pull has no body", close=True)
        session = self._session(header, close=False)
        min_iterations = header.get("min_iterations")
        wait_seconds = header.get("wait_seconds", 0.0)
        if isinstance(wait_seconds, bool) or not isinstance(wait_seconds, (int, float)):
            raise _Refusal(ErrorCode.INVALID_REQUEST, "'wait_seconds' is a number", close=False)
        self.plane.service.check_wait(min_iterations, float(wait_seconds))
        if min_iterations is not None:
            session.wait_for(min_iterations, float(wait_seconds))  # this connection's thread
        answer = self.plane.service.read_weights(
            session, self._copy_weights, wait=self.plane.settings.request_timeout_seconds
        )
        session.stats.sent(answer[2])
        self._send_answer(request_id, answer)
        return True

    def _session(self, header: dict[str, Any], *, close: bool) -> Any:
        session_id = header.get("session")
        if not isinstance(session_id, str):
            raise _Refusal(ErrorCode.INVALID_REQUEST, "'session' is a session id", close=close)
        try:
            return self.plane.service.store.get(session_id)
        except ServiceError as exc:
            raise _Refusal(exc.code, exc.message, close=close) from None

    # -- answers -------------------------------------------------------------------------------

    def _send_locked(self, request_id: int, trainer: Trainer) -> tuple[int, None, int]:
        """Under the session's lock: send the answer from the weights' own memory for at most
        :data:`LOCKED_SEND_SECONDS`, then copy what is left into the answer buffer (a slow
        reader never holds the session). Never raises: a failed send is raised afterwards,
        once the step is recorded (its key remembered), by :meth:`_finish_locked_send`."""
        weights = trainer.weights()
        head = frames.pack_header(
            {"status": 200, "iterations": trainer.iterations, "tensors": frames.specs_of(weights)}
        )
        body = frames.buffers_of(list(weights.values()))
        self._sent_locked = sum(len(b) for b in body)
        prefix = frames.pack_prefix(frames.RESPONSE, request_id, len(head), self._sent_locked)
        self._pending = None
        self._failed = None
        try:
            rest = frames.send_for(self.sock, [prefix + head, *body], LOCKED_SEND_SECONDS)
        except OSError as exc:
            self._failed = exc
            return trainer.iterations, None, 0
        if rest:
            size = sum(len(v) for v in rest)
            if len(self._send) < size:
                self._send = bytearray(size)
            offset = 0
            for view in rest:
                self._send[offset : offset + len(view)] = view
                offset += len(view)
            self._pending = memoryview(self._send)[:size]
        return trainer.iterations, None, 0

    def _finish_locked_send(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.sock.settimeout(self.plane.settings.request_timeout_seconds)
            frames.send_buffers(self.sock, [pending])

    def _copy_weights(self, trainer: Trainer) -> tuple[int, list[list[Any]], int]:
        """Under the session's lock: the weights copied into this connection's answer buffer."""
        weights = trainer.weights()
        total = sum(int(w.nbytes) for w in weights.values())
        if len(self._send) < total:
            self._send = bytearray(total)
        offset = 0
        for w in weights.values():
            target = np.frombuffer(self._send, dtype=w.dtype, count=w.size, offset=offset)
            np.copyto(target.reshape(w.shape), w)
            offset += int(w.nbytes)
        return trainer.iterations, frames.specs_of(weights), total

    def _send_answer(
        self, request_id: int, answer: tuple[int, list[list[Any]] | None, int]
    ) -> None:
        iterations, specs, total = answer
        header: dict[str, Any] = {"status": 200, "iterations": iterations}
        if specs is not None:
            header["tensors"] = specs
        self._send_frame(request_id, header, (memoryview(self._send)[:total],) if total else ())

    def _send_error(
        self,
        request_id: int,
        code: ErrorCode,
        message: str,
        *,
        retry_after: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        header: dict[str, Any] = {
            "status": STATUS[code],
            "error": error_body(code, message, **(details or {}))["error"],
        }
        if retry_after is not None:
            header["retry_after"] = retry_after
        self._send_frame(request_id, header, ())

    def _send_frame(
        self, request_id: int, header: dict[str, Any], body: Sequence[memoryview]
    ) -> None:
        head = frames.pack_header(header)
        prefix = frames.pack_prefix(
            frames.RESPONSE, request_id, len(head), sum(len(b) for b in body)
        )
        self.sock.settimeout(self.plane.settings.request_timeout_seconds)
        frames.send_buffers(self.sock, [prefix + head, *body])


def _iterations_only(trainer: Trainer) -> tuple[int, None, int]:
    return trainer.iterations, None, 0


def _nothing(_: object) -> None:
    return None
