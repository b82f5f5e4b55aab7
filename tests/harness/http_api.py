"""The sessions API over HTTP, spoken with the reference ``msgpack`` package.

Bodies are built and answers read with ``msgpack`` itself, never with :mod:`paramserver.wire`
or the client library, so that the tests speak the wire format as a third party would. Each
request function takes a :data:`Target`: a client made with a server's ``base_url``, or the
server's base URL, sent with :data:`HTTP` (one client for the whole run: a new client per
request costs tens of milliseconds).

:func:`assert_error` checks an error answer: the protocol's ``{"error": {"code", "message"}}``
body, and nothing internal in it (no traceback, no file path). :func:`observed` reads what a
refused request must not have changed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import httpx
import msgpack
import numpy as np

__all__ = [
    "HTTP",
    "LEAKS",
    "MSGPACK",
    "MSGPACK_TYPE",
    "REPLAYED",
    "Target",
    "array",
    "arrays",
    "assert_error",
    "assert_no_leak",
    "create_body",
    "create_session",
    "get_state",
    "gradients_body",
    "msgpack_answer",
    "new_id",
    "observed",
    "packb",
    "post_session",
    "pull",
    "push",
    "pushed",
    "put_state",
    "request",
    "session_ids",
    "tensor",
    "tensors",
    "unpackb",
]

MSGPACK_TYPE = "application/msgpack"
MSGPACK = {"Content-Type": MSGPACK_TYPE}
#: The header that marks the answer of a push replayed for its ``Idempotency-Key``.
REPLAYED = "idempotent-replayed"
#: One client for every test that needs no client of its own.
HTTP = httpx.Client(timeout=60)


# --- msgpack, by the reference package --------------------------------------------------------


def tensor(a: Any) -> dict[str, Any]:
    """A protocol tensor map for an array: little-endian C-order bytes in ``data``."""
    a = np.asarray(a)
    little = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": little.tobytes(order="C")}


def tensors(values: Mapping[str, Any]) -> dict[str, Any]:
    """Name -> tensor map; a value that is not an array is sent as it is (a hand-made map)."""
    return {n: tensor(v) if isinstance(v, np.ndarray) else v for n, v in values.items()}


def array(t: Mapping[str, Any]) -> np.ndarray:
    """The array of a tensor map of an answer (read-only: a view of the answer's bytes)."""
    assert set(t) == {"dtype", "shape", "data"}, set(t)
    dtype = np.dtype(t["dtype"]).newbyteorder("<")
    return np.frombuffer(t["data"], dtype=dtype).reshape(t["shape"])


def arrays(tensor_maps: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {n: array(t) for n, t in tensor_maps.items()}


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=True)


def msgpack_answer(r: httpx.Response) -> Any:
    """The decoded body of a msgpack answer."""
    assert r.headers["content-type"].split(";")[0] == MSGPACK_TYPE, (r.status_code, r.text)
    return unpackb(r.content)


# --- bodies -----------------------------------------------------------------------------------


def create_body(session_id: Any, optimizer: Any, weights: Mapping[str, Any]) -> bytes:
    """``POST /sessions``; without ``session_id`` when it is None (the server makes one)."""
    body: dict[str, Any] = {"optimizer": optimizer, "weights": tensors(weights)}
    if session_id is not None:
        body["session_id"] = session_id
    return packb(body)


def gradients_body(grads: Mapping[str, Any]) -> bytes:
    """``POST /sessions/{id}/gradients``."""
    return packb({"gradients": tensors(grads)})


# --- requests ---------------------------------------------------------------------------------

#: Where a request goes: a client made with ``base_url`` (the request takes the path alone),
#: or a server's base URL (the request goes through :data:`HTTP`).
Target = httpx.Client | str


def request(
    target: Target, method: str, path: str, *, via: httpx.Client | None = None, **kwargs: Any
) -> httpx.Response:
    """Send to ``target``; a base URL goes through ``via`` (by default :data:`HTTP`)."""
    if isinstance(target, str):
        return (via or HTTP).request(method, target + path, **kwargs)
    return target.request(method, path, **kwargs)


def post_session(
    target: Target,
    optimizer: Any,
    weights: Mapping[str, Any],
    *,
    session_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str = MSGPACK_TYPE,
) -> httpx.Response:
    """``POST /sessions``; the answer unchecked (see :func:`create_session`)."""
    return request(
        target,
        "POST",
        "/sessions",
        content=create_body(session_id, optimizer, weights),
        headers={"Content-Type": content_type, **(headers or {})},
    )


def create_session(
    target: Target,
    optimizer: Any,
    weights: Mapping[str, Any],
    *,
    session_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str = MSGPACK_TYPE,
) -> dict[str, Any]:
    """Create a session (201 expected); returns its summary."""
    r = post_session(
        target,
        optimizer,
        weights,
        session_id=session_id,
        headers=headers,
        content_type=content_type,
    )
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    summary: dict[str, Any] = r.json()
    return summary


def push(
    target: Target,
    session_id: str,
    grads: Mapping[str, Any],
    *,
    key: str | bytes | None = None,
    return_weights: bool | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str = MSGPACK_TYPE,
    via: httpx.Client | None = None,
) -> httpx.Response:
    """Push ``grads`` (with an ``Idempotency-Key`` if ``key`` is given); the answer unchecked."""
    sent: list[tuple[str, str | bytes]] = [("Content-Type", content_type)]
    sent += list((headers or {}).items())
    if key is not None:
        sent.append(("Idempotency-Key", key))
    params = None if return_weights is None else {"return_weights": str(return_weights).lower()}
    return request(
        target,
        "POST",
        f"/sessions/{session_id}/gradients",
        content=gradients_body(grads),
        headers=sent,
        params=params,
        via=via,
    )


def pushed(
    target: Target, session_id: str, grads: Mapping[str, Any], **options: Any
) -> dict[str, Any]:
    """Push (200 expected); returns the decoded answer (``iterations``, maybe ``weights``)."""
    r = push(target, session_id, grads, **options)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = msgpack_answer(r)
    return answer


def pull(target: Target, session_id: str) -> tuple[int, dict[str, np.ndarray]]:
    """``GET /sessions/{id}/weights``: (iterations, weights)."""
    r = request(target, "GET", f"/sessions/{session_id}/weights")
    assert r.status_code == 200, r.text
    message = msgpack_answer(r)
    assert set(message) == {"iterations", "weights"}, set(message)
    return message["iterations"], arrays(message["weights"])


def get_state(target: Target, session_id: str) -> bytes:
    """``GET /sessions/{id}/state``: the state's bytes, as exported."""
    r = request(target, "GET", f"/sessions/{session_id}/state")
    assert r.status_code == 200, r.text
    msgpack_answer(r)
    return r.content


def put_state(
    target: Target, session_id: str, body: bytes, *, content_type: str = MSGPACK_TYPE
) -> httpx.Response:
    """``PUT /sessions/{id}/state``; the answer unchecked."""
    return request(
        target,
        "PUT",
        f"/sessions/{session_id}/state",
        content=body,
        headers={"Content-Type": content_type},
    )


def session_ids(target: Target) -> list[str]:
    """The ids of every session, sorted."""
    r = request(target, "GET", "/sessions")
    assert r.status_code == 200, r.text
    return sorted(s["session_id"] for s in r.json()["sessions"])


def observed(target: Target) -> dict[str, Any]:
    """Every session's id, iterations and weights: what a refused request must not change."""
    out = {}
    for sid in session_ids(target):
        iterations, weights = pull(target, sid)
        out[sid] = (iterations, {k: v.tobytes() for k, v in weights.items()})
    return out


def new_id(prefix: str = "s") -> str:
    """A session id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- error answers ----------------------------------------------------------------------------

#: What must never appear in an error body: a traceback, a file, a path, a repr, an address.
LEAKS = ("Traceback", 'File "', ".py", "/work/", "site-packages", "Error(", "0x7f")


def assert_no_leak(text: str) -> None:
    for marker in LEAKS:
        assert marker not in text, f"{marker!r} leaks into an error body: {text[:500]}"


def assert_error(r: httpx.Response, status: int | set[int], code: str | None = None) -> str:
    """``r`` is an error answer of ``status`` (one of them, if a set), with exactly
    ``{"error": {"code": code, "message": str}}`` and nothing internal; returns the message."""
    statuses = {status} if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert r.headers["content-type"].split(";")[0] == "application/json", r.headers
    assert_no_leak(r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message, body
    return message
