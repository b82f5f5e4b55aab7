"""Push and pull over the server's data plane (:mod:`paramserver.frames`), beside httpx.

The lean path of both clients: a pool of plain (or TLS) sockets to the port the server
announces at ``GET /data-plane``, one per call in flight. A push sends the frame header and
every gradient's own memory in one ``sendmsg`` (no join, no msgpack copy) and receives the new
weights straight into the arrays it returns, or into the caller's (``out=``), with
``recv_into``. Failures are raised as the ``httpx`` exceptions the retry logic of
:mod:`paramserver.client._base` already classifies (connect, read, write, timeouts, a dropped
connection), and error answers come back as a :class:`~._base.Reply` with the protocol's JSON
error body, so timeouts, retries with the same Idempotency-Key, the deadline and the typed
errors are those of the HTTP path. Where the lean path cannot serve a URL (a proxy, a path
prefix, a custom transport, a server without a data plane, https without a TLS data plane)
the client stays on HTTP.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import numpy as np

from paramserver import frames, wire
from paramserver.codes import error_json

from ._base import Attempts, LeanAnswer, LeanRequest, Reply, ssl_context

__all__ = ["DataPlaneChannel", "PlaneBusy", "channel_from_announcement", "usable_for"]

#: How long a data plane that refused connections is left alone (HTTP meanwhile).
RETRY_AFTER_FAILURE_SECONDS = 30.0
#: ... and after it answered that all its connections are busy.
BUSY_REST_SECONDS = 5.0
#: A pooled connection idle longer than this is closed rather than reused (the server's
#: default idle timeout is 5 s).
MAX_IDLE_SECONDS = 4.0
#: Bytes asked for by an answer's first read: a small answer's prefix, header and body.
READ_AHEAD = 16 * 1024


def usable_for(base_url: httpx.URL, *, transport: object | None) -> bool:
    """Whether the data plane may serve this URL: no custom transport, no path prefix (a
    reverse proxy), no proxy configured for the host."""
    if transport is not None or base_url.path not in ("", "/"):
        return False
    host = base_url.host
    proxies = urllib.request.getproxies()
    if not any(k in proxies for k in ("http", "https", "all")):
        return True
    return bool(urllib.request.proxy_bypass(host))


def channel_from_announcement(
    base_url: httpx.URL,
    *,
    verify: bool | ssl.SSLContext,
    token: str | None,
    status: int,
    body: bytes,
) -> DataPlaneChannel | bool:
    """The channel ``GET /data-plane`` announced, or False (HTTP only): no data plane, an
    answer this client does not understand, or a plain data plane behind an https URL (never
    a downgrade)."""
    if status != 200:
        return False
    try:
        announced = json.loads(body)
        port, tls, version = announced["port"], announced["tls"], announced["version"]
    except (ValueError, KeyError, TypeError):
        return False
    if version != frames.VERSION or not isinstance(port, int) or not isinstance(tls, bool):
        return False
    if base_url.scheme == "https" and not tls:
        return False
    host = base_url.host
    return DataPlaneChannel(
        host,
        port,
        tls=ssl_context(verify) if tls else None,
        server_hostname=host,
        token=token,
    )


class DataPlaneChannel:
    """Connections to one server's data plane, and the frames over them (thread-safe)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        server_hostname: str,
        token: str | None,
        max_idle: int = 20,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.server_hostname = server_hostname
        self.token = token
        self.max_idle = max_idle
        self._idle: list[tuple[socket.socket, float]] = []
        self._lock = threading.Lock()
        self._request_id = 0
        self.down_until = 0.0
        #: The answers' layouts, per thread (a LayoutCache is not thread-safe).
        self._layouts = threading.local()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock, _ in idle:
            sock.close()

    # -- one exchange --------------------------------------------------------------------------

    def exchange(self, request: LeanRequest, attempts: Attempts) -> Reply | LeanAnswer:
        """Send ``request``, read its answer: a :class:`LeanAnswer`, or a :class:`Reply`
        holding an error; raises httpx exceptions for transport failures."""
        attempts.check_deadline()
        timeout = attempts.timeout()
        try:
            sock = self._take(timeout)
        except _HelloRefused as refused:
            if refused.header.get("status") == 503:
                # Every data-plane connection is busy (pushes waiting in sync rounds hold
                # theirs): this call, and the next ones for a while, go over HTTP, so that
                # the push that would complete those rounds is not locked out.
                self.down_until = time.monotonic() + BUSY_REST_SECONDS
                raise PlaneBusy(str(refused)) from None
            return _error_reply(refused.header)  # a bad token: 401, as REST answers
        keep = False
        try:
            with self._lock:
                self._request_id = (self._request_id + 1) & 0xFFFFFFFF
                request_id = self._request_id
            self._send(sock, request_id, request.header, request.tensors, timeout)
            answer, keep = self._receive(sock, request_id, request.out, timeout, attempts)
            return answer
        finally:
            if keep:
                self._give_back(sock)
            else:
                sock.close()

    def _layout_cache(self) -> frames.LayoutCache:
        cache: frames.LayoutCache | None = getattr(self._layouts, "cache", None)
        if cache is None:
            cache = self._layouts.cache = frames.LayoutCache(field="tensors")
        return cache

    def _take(self, timeout: httpx.Timeout) -> socket.socket:
        """A pooled connection that is still open, else a new one. A connection idle for
        longer than the server's idle timeout (5 s by default) is not trusted."""
        while True:
            with self._lock:
                if not self._idle:
                    break
                sock, since = self._idle.pop()
            if time.monotonic() - since < MAX_IDLE_SECONDS and not _closed_by_peer(sock):
                return sock
            sock.close()
        return self._connect(timeout)

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append((sock, time.monotonic()))
                return
        sock.close()

    def _connect(self, timeout: httpx.Timeout) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout.connect)
        except TimeoutError as exc:
            self.down_until = time.monotonic() + RETRY_AFTER_FAILURE_SECONDS
            raise httpx.ConnectTimeout(f"data plane {self.host}:{self.port}: {exc}") from exc
        except OSError as exc:
            self.down_until = time.monotonic() + RETRY_AFTER_FAILURE_SECONDS
            raise httpx.ConnectError(f"data plane {self.host}:{self.port}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_hostname)
            hello: dict[str, Any] = {"op": "hello", "version": frames.VERSION}
            if self.token is not None:
                hello["token"] = self.token
            self._send(sock, 0, hello, (), timeout)
            prefix, header, _ = self._read_head(sock, 0, timeout)
            if prefix.body_len:
                raise httpx.RemoteProtocolError("data plane: a hello answer with a body")
            if header.get("status") != 200:
                raise _HelloRefused(header)
        except _HelloRefused:
            sock.close()
            raise
        except OSError as exc:  # ssl.SSLError included
            sock.close()
            raise httpx.ConnectError(f"data plane {self.host}:{self.port}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    def _send(
        self,
        sock: socket.socket,
        request_id: int,
        header: Mapping[str, Any] | bytes,
        tensors: Sequence[np.ndarray],
        timeout: httpx.Timeout,
    ) -> None:
        head = header if isinstance(header, bytes) else frames.pack_header(header)
        buffers = frames.buffers_of(tensors)
        body_len = sum(len(b) for b in buffers)
        prefix = frames.pack_prefix(frames.REQUEST, request_id, len(head), body_len)
        _settimeout(sock, timeout.write)
        try:
            frames.send_buffers(sock, [prefix + head, *buffers])
        except TimeoutError as exc:
            raise httpx.WriteTimeout(f"data plane: {exc}") from exc
        except OSError as exc:  # ssl.SSLError included
            raise httpx.WriteError(f"data plane: {exc}") from exc

    def _read_head(
        self, sock: socket.socket, request_id: int, timeout: httpx.Timeout
    ) -> tuple[frames.Prefix, dict[str, Any], memoryview]:
        """The answer's prefix and header, and the bytes of its body that came with them.

        One ``recv_into`` of up to :data:`READ_AHEAD` bytes usually brings a small answer
        whole (prefix, header and body), where reading the prefix, the header and each
        tensor exactly would cost a system call each. The body bytes beyond what came with
        the header are received straight into their arrays by :meth:`_receive`.
        """
        raw = bytearray(READ_AHEAD)
        view = memoryview(raw)
        got = _recv_some(sock, view, frames.PREFIX.size, timeout.read, first=True)
        try:
            prefix = frames.unpack_prefix(view[: frames.PREFIX.size], expect=frames.RESPONSE)
        except frames.FrameError as exc:
            raise httpx.RemoteProtocolError(f"data plane: {exc}") from exc
        if prefix.request_id not in (request_id, 0):
            raise httpx.RemoteProtocolError(
                f"data plane: an answer to request {prefix.request_id}, not {request_id}"
            )
        head_end = frames.PREFIX.size + prefix.header_len
        if head_end <= len(raw):
            if got < head_end:
                got += _recv_some(sock, view[got:], head_end - got, timeout.read)
            head: bytearray | memoryview = view[frames.PREFIX.size : head_end]
        else:  # a header longer than the read-ahead: in a buffer of its own
            head = bytearray(prefix.header_len)
            came = got - frames.PREFIX.size
            head[:came] = view[frames.PREFIX.size : got]
            _recv_exact(sock, memoryview(head)[came:], timeout.read)
            got = head_end = 0
        if got - head_end > prefix.body_len:
            raise httpx.RemoteProtocolError("data plane: bytes after the answer")
        try:
            header = frames.unpack_header(head)
        except frames.FrameError as exc:
            raise httpx.RemoteProtocolError(f"data plane: {exc}") from exc
        if not isinstance(header, dict) or not isinstance(header.get("status"), int):
            raise httpx.RemoteProtocolError("data plane: an answer header without a status")
        return prefix, header, view[head_end:got]

    def _receive(
        self,
        sock: socket.socket,
        request_id: int,
        out: Mapping[str, np.ndarray] | None,
        timeout: httpx.Timeout,
        attempts: Attempts,
    ) -> tuple[Reply | LeanAnswer, bool]:
        prefix, header, early = self._read_head(sock, request_id, timeout)
        status = header["status"]
        if status != 200:
            if prefix.body_len:
                raise httpx.RemoteProtocolError("data plane: an error answer with a body")
            # the server closes after refusing a request whose body it did not read
            return _error_reply(header), False
        iterations = header.get("iterations")
        if not isinstance(iterations, int):
            raise httpx.RemoteProtocolError("data plane: an answer without iterations")
        specs = header.get("tensors")
        if specs is None:
            if prefix.body_len:
                raise httpx.RemoteProtocolError("data plane: a body without tensors")
            return LeanAnswer(iterations, None, bool(header.get("replayed"))), True
        try:
            layout = self._layout_cache().get(specs)
        except wire.TensorError as exc:
            raise httpx.RemoteProtocolError(f"data plane: {exc}") from exc
        if layout.nbytes != prefix.body_len:
            raise httpx.RemoteProtocolError(
                "data plane: the answer's body does not fit its tensors"
            )
        try:
            arrays = _destinations(layout, out)
        except (MemoryError, ValueError) as exc:  # a size this machine cannot hold
            raise httpx.RemoteProtocolError(
                f"data plane: an answer of {layout.nbytes} bytes: {exc}"
            ) from exc
        for array in arrays.values():
            if array.nbytes:
                target = frames.byte_view(array)
                came = min(len(early), len(target))
                if came:  # what came with the header, then the rest straight into the array
                    target[:came] = early[:came]
                    early = early[came:]
                    if came == len(target):
                        continue
                _recv_exact(
                    sock,
                    target[came:],
                    timeout.read,
                    check=attempts.check_deadline,
                )
        return LeanAnswer(iterations, arrays, False), True


def _error_reply(header: dict[str, Any]) -> Reply:
    """An error answer as the REST routes would have sent it (JSON body, Retry-After)."""
    error = header.get("error")
    if not isinstance(error, dict):
        error = {}
    headers = httpx.Headers({"content-type": "application/json"})
    if header.get("retry_after") is not None:
        headers["retry-after"] = str(header["retry_after"])
    details = {str(k): v for k, v in error.items() if k not in ("code", "message")}
    body = error_json(str(error.get("code", "")), str(error.get("message", "")), **details)
    return Reply(int(header["status"]), headers, bytearray(body))


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle connection is readable: closed by the server (or unexpected bytes)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class PlaneBusy(Exception):
    """The data plane refused a new connection because every one it holds is busy: the twins
    send the call over HTTP instead."""


class _HelloRefused(Exception):
    """The hello was answered with an error (a bad token): no transient failure."""

    def __init__(self, header: dict[str, Any]) -> None:
        super().__init__(f"data plane refused the connection: {header.get('error')}")
        self.header = header


def _destinations(
    layout: frames.Layout, out: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """Where each answered tensor is received: the caller's array when it fits exactly
    (C-contiguous, writable, same dtype and shape), else a new array (copied into ``out``
    by the caller)."""
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape, _, _ in layout.tensors:
        target = None if out is None else out.get(name)
        if (
            target is not None
            and target.dtype == dtype
            and target.shape == shape
            and target.flags.c_contiguous
            and target.flags.writeable
        ):
            arrays[name] = target
        else:
            arrays[name] = np.empty(shape, dtype=dtype)
    return arrays


def _settimeout(sock: socket.socket, timeout: float | None) -> None:
    """``sock.settimeout`` unless it is already so (each call costs system calls)."""
    if sock.gettimeout() != timeout:
        sock.settimeout(timeout)


def _recv_some(
    sock: socket.socket,
    view: memoryview,
    least: int,
    timeout: float | None,
    *,
    first: bool = False,
    check: Callable[[], None] | None = None,
) -> int:
    """Receive at least ``least`` bytes into ``view`` (more if they are there, up to its
    length); the number received. ``check`` runs after each read (the deadline)."""
    _settimeout(sock, timeout)
    pos = 0
    while pos < least:
        try:
            n = sock.recv_into(view[pos:])
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"data plane: {exc}") from exc
        except OSError as exc:  # ssl.SSLError included
            raise httpx.ReadError(f"data plane: {exc}") from exc
        if n == 0:
            if first and pos == 0:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            raise httpx.RemoteProtocolError("data plane: the connection closed mid-answer")
        pos += n
        if check is not None:
            check()  # an answer that trickles in ends at the deadline
    return pos


def _recv_exact(
    sock: socket.socket,
    view: memoryview,
    timeout: float | None,
    *,
    check: Callable[[], None] | None = None,
) -> None:
    """Fill ``view``."""
    _recv_some(sock, view, len(view), timeout, check=check)
