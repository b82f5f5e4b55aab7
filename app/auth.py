"""Bearer-token authentication, as a pure ASGI middleware.

When tokens are configured, every request but ``GET /health`` and ``GET /ready`` needs
``Authorization: Bearer <token>``. A read-only token may list, describe and pull (``GET`` and
``HEAD``); a read-write token may do everything. A missing or unknown token gets 401 and a
read-only token on a write gets 403, with a body that says nothing about which tokens exist.
Tokens are compared in constant time: each presented token is hashed and compared with every
known hash, so the time taken does not depend on how much of a token matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from paramserver.codes import ErrorCode, error_json

__all__ = ["AuthMiddleware", "TokenTable", "load_tokens"]

READ_METHODS = frozenset({"GET", "HEAD"})
OPEN_PATHS = frozenset({"/health", "/ready"})
#: The dashboard's page and static files: a browser cannot send a bearer header when it opens
#: a page; the data the page fetches needs a token as usual.
OPEN_PREFIXES = ("/dashboard",)


def is_open(path: str, *, metrics_public: bool = False) -> bool:
    """Whether ``path`` is served without a token."""
    if path in OPEN_PATHS or (metrics_public and path == "/metrics"):
        return True
    return any(path == p or path.startswith(p + "/") for p in OPEN_PREFIXES)


@dataclass(frozen=True)
class TokenTable:
    """Hashes of the known tokens, each with its right to write."""

    entries: tuple[tuple[bytes, bool], ...]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def lookup(self, token: str) -> bool | None:
        """``True`` (may write), ``False`` (read-only) or ``None`` (unknown), in constant time."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: bool | None = None
        for known, can_write in self.entries:
            if hmac.compare_digest(known, digest):
                found = can_write
        return found


def _parse_entry(entry: str) -> tuple[bytes, bool] | None:
    entry = entry.strip()
    if not entry or entry.startswith("#"):
        return None
    can_write = True
    if entry.endswith(":ro"):
        entry, can_write = entry[:-3], False
    elif entry.endswith(":rw"):
        entry = entry[:-3]
    if not entry:
        raise ValueError("an empty token is not allowed")
    return hashlib.sha256(entry.encode("utf-8")).digest(), can_write


def load_tokens(tokens: str | None, tokens_file: Path | None) -> TokenTable:
    """Tokens from a comma-separated string and/or a file of one token per line.

    Each entry is ``SECRET`` or ``SECRET:rw`` (read-write) or ``SECRET:ro`` (read-only).
    """
    raw: list[str] = []
    if tokens:
        raw.extend(tokens.split(","))
    if tokens_file is not None:
        raw.extend(Path(tokens_file).read_text(encoding="utf-8").splitlines())
    entries = [e for e in (_parse_entry(x) for x in raw) if e is not None]
    return TokenTable(tuple(entries))


def _error(
    status: int, code: ErrorCode, message: str, extra: Iterable[tuple[bytes, bytes]] = ()
) -> tuple[dict[str, Any], bytes]:
    body = error_json(code, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    return {"type": "http.response.start", "status": status, "headers": headers}, body


def _is_read(scope: Scope) -> bool:
    """GET and HEAD, and the partial pull (a POST that reads: its body names the rows)."""
    if scope["method"] in READ_METHODS:
        return True
    return scope["method"] == "POST" and scope["path"].endswith("/weights/query")


class AuthMiddleware:
    """401 without a valid bearer token; 403 for a read-only token on a write."""

    def __init__(self, app: ASGIApp, tokens: TokenTable, *, metrics_public: bool = False) -> None:
        self.app = app
        self.tokens = tokens
        self.metrics_public = metrics_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (
            scope["type"] == "http" and is_open(scope["path"], metrics_public=self.metrics_public)
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            # No route takes another scope (the server runs without WebSockets); whatever
            # the transport, nothing reaches the app unauthenticated.
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        token = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    token = credentials.strip()
                break
        can_write = None if token is None else self.tokens.lookup(token)
        if can_write is None:
            start, body = _error(
                401,
                ErrorCode.UNAUTHORIZED,
                "a valid bearer token is required (Authorization: Bearer <token>)",
                [(b"www-authenticate", b'Bearer realm="paramserver"')],
            )
        elif not can_write and not _is_read(scope):
            start, body = _error(403, ErrorCode.FORBIDDEN, "this token is read-only")
        else:
            await self.app(scope, receive, send)
            return
        await send(start)
        await send({"type": "http.response.body", "body": body})
