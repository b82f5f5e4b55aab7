"""The reference servers of the benchmarks, each run as its own process on 127.0.0.1.

* ``python -m benchmarks.echo_app http --port P``: a bare FastAPI app whose ``POST /echo``
  answers the request body as it came, served by uvicorn exactly as ``paramserver serve``
  serves ours (one process, ``uvicorn.Config`` with the same arguments, so the same
  ``loop="auto"`` and ``http="auto"``: uvloop and httptools when installed). It is what a
  push costs with nothing of ours in it: HTTP parsing, the ASGI/FastAPI route, the body in
  and out.
* ``python -m benchmarks.echo_app asgi --port P``: the floor of the HTTP stack: a bare ASGI
  app (no FastAPI, no Starlette) under the same uvicorn, that reads the body into a reused
  buffer and answers ``?answer=N`` bytes (default: as many as it received) from a prebuilt
  buffer. What uvicorn and httptools alone cost to move a push's bytes.
* ``python -m benchmarks.echo_app tcp --port P``: a raw TCP echo, the floor of moving bytes
  over loopback from Python. A request is a 16-byte header (two little-endian u64: how many
  bytes follow, how many to answer) and that many bytes; the answer is that many bytes. Both
  are moved with ``recv_into``/``sendall`` on preallocated buffers, one thread per
  connection.
"""

from __future__ import annotations

import argparse
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, Response

__all__ = ["ECHO_HEADER", "BareASGIEcho", "create_echo_app", "main", "serve_http", "serve_tcp"]

#: The TCP echo's request header: bytes that follow, bytes to answer.
ECHO_HEADER = struct.Struct("<QQ")


def create_echo_app() -> FastAPI:
    """``POST /echo`` answers its body (msgpack content type); ``GET /health`` is ``ok``."""
    app = FastAPI(title="echo")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(content=await request.body(), media_type="application/msgpack")

    return app


class BareASGIEcho:
    """``POST`` anything: the body is read into a reused buffer; the answer is ``?answer=N``
    bytes (default: the body's size) of a prebuilt buffer. ``GET /health`` answers ``ok``."""

    def __init__(self) -> None:
        self._inbox = bytearray(0)
        self._answers: dict[int, bytes] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            await self._answer(send, b'{"status":"ok"}', b"application/json")
            return
        received = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            end = received + len(chunk)
            if end > len(self._inbox):
                self._inbox.extend(bytes(end - len(self._inbox)))
            self._inbox[received:end] = chunk
            received = end
            if not message.get("more_body", False):
                break
        size = received
        for key, _, value in (p.partition(b"=") for p in scope["query_string"].split(b"&")):
            if key == b"answer":
                size = int(value)
        answer = self._answers.get(size)
        if answer is None:
            answer = self._answers[size] = bytes(size)
        await self._answer(send, answer, b"application/msgpack")

    @staticmethod
    async def _answer(send: Any, body: bytes, media_type: bytes) -> None:
        headers = [(b"content-type", media_type), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def serve_http(
    port: int, *, host: str = "127.0.0.1", log_level: str = "warning", bare: bool = False
) -> None:
    """Serve :func:`create_echo_app` (or :class:`BareASGIEcho` with ``bare``) as
    ``paramserver.server.cli.serve`` serves ours: the same ``uvicorn.Config`` arguments."""
    import uvicorn

    config = uvicorn.Config(
        BareASGIEcho() if bare else create_echo_app(),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
    )
    uvicorn.Server(config).run()


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``conn``; False if the peer closed first."""
    pos, n = 0, len(view)
    while pos < n:
        got = conn.recv_into(view[pos:], n - pos)
        if got == 0:
            return False
        pos += got
    return True


def _echo_connection(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = bytearray(ECHO_HEADER.size)
    inbox = bytearray(0)
    outbox = bytearray(0)
    with conn:
        while _recv_exactly(conn, memoryview(header)):
            n_in, n_out = ECHO_HEADER.unpack(header)
            if len(inbox) < n_in:
                inbox = bytearray(n_in)
            if len(outbox) < n_out:
                outbox = bytearray(n_out)
            if not _recv_exactly(conn, memoryview(inbox)[:n_in]):
                return
            conn.sendall(memoryview(outbox)[:n_out])


def serve_tcp(port: int, *, host: str = "127.0.0.1") -> None:
    """Accept connections forever (the benchmark ends the process), one thread each."""
    with socket.create_server((host, port), backlog=128) as server:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=_echo_connection, args=(conn,), daemon=True).start()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Reference servers of the benchmarks.")
    parser.add_argument("kind", choices=["http", "asgi", "tcp"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    if args.kind in ("http", "asgi"):
        serve_http(args.port, host=args.host, bare=args.kind == "asgi")
    else:
        serve_tcp(args.port, host=args.host)


if __name__ == "__main__":
    main()
