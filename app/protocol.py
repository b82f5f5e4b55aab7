"""What the server adds to the shared messages (:mod:`paramserver.messages`): its limits and
the content types it reads.

The messages themselves are encoded and decoded by :mod:`paramserver.messages`, the same code
the client uses; the service turns their errors (:class:`~paramserver.codes.MessageError`)
into :class:`~paramserver.server.errors.ServiceError` with the same code and status.
"""

from __future__ import annotations

from paramserver import wire
from paramserver.messages import JSON_MEDIA_TYPE, BodyKind

from .errors import UnsupportedMediaType
from .settings import Settings

__all__ = ["body_kind", "decode_limits"]


def decode_limits(settings: Settings) -> wire.DecodeLimits:
    """The bounds on one request body of this server."""
    return wire.DecodeLimits(
        # A push or create body holds one map of tensors, each a map of three entries (~8
        # values) and a shape of a few dimensions; deeper shapes draw on the same budget. The
        # budget bounds the Python objects, and so the time, one hostile body can cost.
        # decode_state allows four times as much (weights and up to three slots).
        max_objects=1024 + settings.max_tensors * 16,
        max_map_items=max(settings.max_tensors, 64),
        max_array_items=max(settings.max_dims, 64),
        scalar_arrays=True,
        max_tensors=settings.max_tensors,
        max_dims=settings.max_dims,
        max_elements=settings.max_elements,
    )


def body_kind(content_type: str | None, *, allow_json: bool) -> BodyKind:
    """``"msgpack"`` or ``"json"`` for a Content-Type header; 415 for anything else."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in wire.MSGPACK_CONTENT_TYPES:
        return "msgpack"
    if allow_json and media == JSON_MEDIA_TYPE:
        return "json"
    accepted = wire.MSGPACK_MEDIA_TYPE + (f" or {JSON_MEDIA_TYPE}" if allow_json else "")
    raise UnsupportedMediaType(
        f"Content-Type {content_type or '(none)'!r} is not accepted here; send {accepted}"
    )
