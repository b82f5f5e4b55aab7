"""Reading request bodies with a size limit enforced while they stream in."""

from __future__ import annotations

import anyio
import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from ..errors import BadRequest, PayloadTooLarge, RequestTimeout


async def read_body(
    request: Request, limit: int, *, timeout: float | None = None
) -> bytearray | memoryview:
    """The whole body within ``timeout`` seconds (408 past it); see :func:`_read`."""
    try:
        if timeout is None:
            return await _read(request, limit)
        with anyio.fail_after(timeout):
            return await _read(request, limit)
    except ClientDisconnect:
        # The client went away mid-body: nothing was applied and nobody reads the answer.
        raise BadRequest("the client disconnected before the body was complete") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g} s",
            headers={"Connection": "close"},
        ) from None


async def _read(request: Request, limit: int) -> bytearray | memoryview:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before any byte is read; a body
    without one (chunked) is refused as soon as the bytes received pass the limit. With a
    ``Content-Length`` the body lands in one buffer of that size, copied once.
    """
    declared = request.headers.get("content-length")
    too_large = PayloadTooLarge(f"the request body is larger than the {limit}-byte limit")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("invalid Content-Length header") from None
        if size < 0:
            raise BadRequest("invalid Content-Length header")
        if size > limit:
            raise too_large
        # np.empty, not bytearray(size): the buffer is not zero-filled, so for a large body
        # its pages become resident only as the bytes arrive, not when the header does.
        view = np.empty(size, dtype=np.uint8).data
        pos = 0
        async for chunk in request.stream():
            end = pos + len(chunk)
            if end > size:
                raise BadRequest("the body is longer than its Content-Length")
            view[pos:end] = chunk
            pos = end
        if pos != size:
            raise BadRequest("the body is shorter than its Content-Length")
        return view
    out = bytearray()
    async for chunk in request.stream():
        if len(out) + len(chunk) > limit:
            raise too_large
        out += chunk
    return out
