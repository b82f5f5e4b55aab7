"""The data plane's frames: push and pull as length-prefixed frames on a TCP port of their own.

Both sides import this module; ``docs/protocol.md`` ("Data plane") describes it for other
implementations. A frame is a 24-byte prefix, a msgpack header and a body::

    magic       4 bytes  b"PSDP"
    version     u8       1
    kind        u8       1 request, 2 response
    flags       u16      0
    request_id  u32      chosen by the client, echoed by the answer
    header_len  u32      bytes of the msgpack header (at most MAX_HEADER_BYTES)
    body_len    u64      bytes of the body
    header      msgpack map
    body        the tensors' bytes, little-endian, one after the other in the header's order

(integers little-endian). Unlike the HTTP bodies, tensors are not msgpack values here: the
header lists them as ``[name, dtype, shape]`` and the body holds their bytes back to back, so
that either side can send an array's own memory (``sendmsg``) and receive straight into the
array it will use (``recv_into``). The request header holds ``op`` (``"hello"``, ``"push"``,
``"pull"``) and its fields (see :data:`OPS`); the answer header holds ``status`` (an HTTP
status) and, for an error, ``error`` (``{"code", "message", ...}``, as the REST errors) and
``retry_after``.
"""

from __future__ import annotations

import math
import select
import ssl
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

from . import wire

__all__ = [
    "MAGIC",
    "HELLO_HEADER_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_CONTAINERS",
    "OPS",
    "PREFIX",
    "REQUEST",
    "RESPONSE",
    "VERSION",
    "FrameError",
    "Layout",
    "LayoutCache",
    "Prefix",
    "SpecsCache",
    "layout_of",
    "buffers_of",
    "byte_view",
    "header_containers",
    "pack_header",
    "pack_map",
    "pack_prefix",
    "send_buffers",
    "send_for",
    "specs_of",
    "unpack_header",
    "unpack_prefix",
]

MAGIC = b"PSDP"
VERSION = 1
REQUEST = 1
RESPONSE = 2
PREFIX = struct.Struct("<4sBBHIIQ")
#: A header lists at most ``max_tensors`` (4096) tensors of names up to 256 characters.
MAX_HEADER_BYTES = 4 * 1024 * 1024
#: The most bytes of a header a server reads before the hello has passed (when it has
#: tokens): a hello's header, whose token is at most 4 KiB, fits with room to spare.
HELLO_HEADER_BYTES = 8 * 1024
#: The most lists and maps a header may hold, by default: a push's header is one map, its
#: ``tensors`` list and two lists per tensor (the entry and its shape), and a few more. Each
#: costs tens of bytes of memory from one byte of msgpack, so a bound on the header's bytes
#: alone would let a 4 MiB header become hundreds of MB of Python objects.
MAX_HEADER_CONTAINERS = 2 * 100_000 + 64


def header_containers(max_tensors: int) -> int:
    """The lists and maps a request header of at most ``max_tensors`` tensors may hold."""
    return 2 * max_tensors + 64


#: The request header's fields, per op (``op`` itself aside). ``hello`` opens a connection
#: (``token`` when the server has tokens); ``push`` carries its tensors in the body; ``pull``
#: has no body. Answers to push and pull list the weights in ``tensors`` and carry their bytes.
OPS: Mapping[str, frozenset[str]] = {
    "hello": frozenset({"version", "token"}),
    "push": frozenset(
        {
            "session",
            "key",
            "return_weights",
            "tensors",
            "base_iterations",
            "sum_squares",
            "round_order",
            "metrics",
        }
    ),
    "pull": frozenset({"session", "min_iterations", "wait_seconds"}),
}


class FrameError(ValueError):
    """A frame that breaks the format (the connection cannot go on after it)."""


def pack_header(header: Mapping[str, Any]) -> bytes:
    """A frame header as msgpack (maps, strings, integers, booleans, lists: no bins)."""
    return msgpack.packb(header)


class _Containers:
    """Counts the lists and maps msgpack builds (its ``list_hook`` and ``object_hook``)."""

    __slots__ = ("left",)

    def __init__(self, most: int) -> None:
        self.left = most

    def __call__(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ValueError("too many lists and maps")
        return obj


def unpack_header(
    data: bytes | bytearray | memoryview, *, max_containers: int = MAX_HEADER_CONTAINERS
) -> Any:
    """A frame header, read by msgpack's C unpacker within tight bounds: no bins, no
    extension types, strings up to 4 KiB, maps up to 64 entries, lists up to 100,000 items
    (the tensors of a push), at most ``max_containers`` lists and maps, at most
    MAX_HEADER_BYTES in all. Raises :class:`FrameError`.

    Each list or map is counted as it is built only in a header longer than
    ``max_containers`` bytes (a shorter one cannot hold more, one byte each): a small push's
    header is read at full speed."""
    hooks: dict[str, Any] = {}
    if len(data) > max_containers:
        count = _Containers(max_containers)
        hooks = {"list_hook": count, "object_hook": count}
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=0,
            max_ext_len=0,
            max_str_len=4096,
            max_map_len=64,
            max_array_len=100_000,
            **hooks,
        )
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise FrameError(f"an unreadable frame header: {exc}") from None


class Prefix(NamedTuple):
    kind: int
    request_id: int
    header_len: int
    body_len: int


def pack_prefix(kind: int, request_id: int, header_len: int, body_len: int) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, kind, 0, request_id, header_len, body_len)


def unpack_prefix(data: bytes | bytearray | memoryview, *, expect: int) -> Prefix:
    magic, version, kind, _flags, request_id, header_len, body_len = PREFIX.unpack(data)
    if magic != MAGIC:
        raise FrameError(f"not a paramserver data-plane frame (magic {bytes(magic)!r})")
    if version != VERSION:
        raise FrameError(f"data-plane version {version}; this side speaks {VERSION}")
    if kind != expect:
        raise FrameError(f"frame kind {kind}, expected {expect}")
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"a frame header of {header_len} bytes; at most {MAX_HEADER_BYTES}")
    return Prefix(kind, request_id, header_len, body_len)


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a body lies: ``(name, dtype, shape, offset, nbytes)``."""

    tensors: tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]
    nbytes: int

    def views(self, buffer: bytearray | memoryview | np.ndarray) -> dict[str, np.ndarray]:
        """Arrays that view ``buffer`` (no copy), by name."""
        out: dict[str, np.ndarray] = {}
        for name, dtype, shape, offset, nbytes in self.tensors:
            count = nbytes // dtype.itemsize
            out[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(
                shape
            )
        return out

    def specs(self) -> list[list[Any]]:
        return [[name, wire.dtype_name(dt), list(shape)] for name, dt, shape, _, _ in self.tensors]


def specs_of(arrays: Mapping[str, np.ndarray]) -> list[list[Any]]:
    """``[name, dtype, shape]`` of each array, in order (dtype names as on the wire)."""
    return [
        [name, wire.dtype_name(a.dtype, repr(name)), list(a.shape)] for name, a in arrays.items()
    ]


_NO_LIMITS = wire.DecodeLimits()


def layout_of(specs: Any, *, field: str, limits: wire.DecodeLimits = _NO_LIMITS) -> Layout:
    """The layout of a body listed by ``specs``, checked as the REST decoder checks tensors
    (dtype allow-list, shapes, element and tensor counts, names, no duplicates);
    :class:`wire.TensorError` says what is wrong."""
    if not isinstance(specs, list):
        raise wire.TensorError(f"'{field}' must be a list of [name, dtype, shape]")
    if limits.max_tensors is not None and len(specs) > limits.max_tensors:
        raise wire.TensorError(
            f"'{field}' holds {len(specs)} tensors; at most {limits.max_tensors} allowed"
        )
    tensors = []
    seen: set[str] = set()
    offset = 0
    for spec in specs:
        if not isinstance(spec, list) or len(spec) != 3:
            raise wire.TensorError(
                f"'{field}': each entry is [name, dtype, shape], got {spec!r}"[:300]
            )
        name, dtype_name, shape = spec
        wire.check_parameter_name(name)
        if name in seen:
            raise wire.TensorError(f"'{field}' lists {name!r} twice")
        seen.add(name)
        where = f"{field}[{name!r}]"
        dtype, dims = wire.check_dtype_and_shape(dtype_name, shape, where, limits)
        nbytes = math.prod(dims) * dtype.itemsize
        tensors.append((name, dtype, dims, offset, nbytes))
        offset += nbytes
    return Layout(tuple(tensors), offset)


#: Entries each cache below keeps (a connection or a client sees few layouts: its sessions').
CACHED_LAYOUTS = 8
#: The most bytes of packed ``tensors`` lists a :class:`LayoutCache` holds (a server keeps
#: one per data-plane connection): a longer list is checked each time instead. The layouts
#: kept for them take about ten times as much as Python objects (under 1 MB a connection).
CACHED_SPECS_BYTES = 64 * 1024


class LayoutCache:
    """:func:`layout_of` for the few ``tensors`` lists one side reads again and again (a
    connection's pushes, a client's answers), by their msgpack bytes: packing the list again
    costs an eighth of checking it, and bytes tell ``1`` from ``1.0`` and ``True``, so what
    is refused the first time is refused every time. Not thread-safe: one per connection or
    per thread."""

    def __init__(self, *, field: str, limits: wire.DecodeLimits = _NO_LIMITS) -> None:
        self.field = field
        self.limits = limits
        self._layouts: dict[bytes, Layout] = {}
        self._bytes = 0  # of the keys held

    def get(self, specs: Any) -> Layout:
        """The layout of ``specs``; raises :class:`wire.TensorError` as :func:`layout_of`."""
        try:
            key = msgpack.packb(specs)
        except (TypeError, ValueError, OverflowError):
            return layout_of(specs, field=self.field, limits=self.limits)  # it says why
        layout = self._layouts.get(key)
        if layout is None:
            layout = layout_of(specs, field=self.field, limits=self.limits)
            if len(key) > CACHED_SPECS_BYTES:  # a huge model's list: checked each time
                return layout
            if len(self._layouts) >= CACHED_LAYOUTS or self._bytes + len(key) > CACHED_SPECS_BYTES:
                self._layouts.clear()
                self._bytes = 0
            self._layouts[key] = layout
            self._bytes += len(key)
        return layout


class SpecsCache:
    """:func:`specs_of` packed as msgpack, for the few layouts of arrays one side sends again
    and again (a client's gradients, a server's weights), by each array's name, dtype and
    shape. Thread-safe (a lost entry is packed again)."""

    def __init__(self) -> None:
        self._packed: dict[tuple[tuple[str, np.dtype, tuple[int, ...]], ...], bytes] = {}

    def packed(self, arrays: Mapping[str, np.ndarray]) -> bytes:
        """``msgpack.packb(specs_of(arrays))``; raises :class:`wire.TensorError` for a dtype
        the wire does not carry."""
        key = tuple((name, a.dtype, a.shape) for name, a in arrays.items())
        packed = self._packed.get(key)
        if packed is None:
            packed = msgpack.packb(specs_of(arrays))
            if len(self._packed) >= CACHED_LAYOUTS:
                self._packed = {}
            self._packed[key] = packed
        return packed


def pack_map(fields: Sequence[bytes]) -> bytes:
    """A msgpack map of ``fields``, each a packed key followed by its packed value (as
    ``msgpack.packb`` makes them): a header put together from parts packed once."""
    count = len(fields)
    head = bytes([0x80 | count]) if count < 16 else b"\xde" + struct.pack(">H", count)
    return head + b"".join(fields)


def byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array as a flat, writable-if-the-array-is memoryview (no
    copy; works for 0-d arrays too)."""
    return array.reshape(-1).view(np.uint8).data


#: The byte orders of a dtype whose bytes are little-endian as they are in memory.
_LITTLE = "=<|" if sys.byteorder == "little" else "<|"


def buffers_of(arrays: Sequence[np.ndarray]) -> list[memoryview]:
    """Each array's little-endian bytes as a flat memoryview (no copy for a contiguous
    little-endian array); arrays without elements are left out (they have no bytes)."""
    out = []
    for array in arrays:
        if not array.size:
            continue
        if (
            array.dtype.byteorder not in _LITTLE
            or not array.flags.c_contiguous
            or type(array) is not np.ndarray  # a subclass (np.matrix) may not flatten
        ):
            array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
        out.append(byte_view(array))
    return out


def send_buffers(sock: Any, buffers: Sequence[Any]) -> None:
    """Every byte of ``buffers`` on ``sock``: one scatter-gather ``sendmsg`` on a plain socket
    (the arrays' own memory, no join), ``sendall`` of each on a TLS one (no ``sendmsg``)."""
    if isinstance(sock, ssl.SSLSocket):
        for buffer in buffers:
            sock.sendall(buffer)
        return
    views = _views(buffers)
    while views:
        _advance(views, sock.sendmsg(views))


def send_for(sock: Any, buffers: Sequence[Any], seconds: float) -> list[memoryview]:
    """Send ``buffers`` on a plain socket for at most ``seconds``; returns what is left
    (empty when all was sent). The socket's own timeout is left as it was."""
    views = _views(buffers)
    timeout = sock.gettimeout()
    deadline = time.monotonic() + seconds
    sock.settimeout(0.0)
    try:
        while views:
            try:
                _advance(views, sock.sendmsg(views))
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                select.select([], [sock], [], remaining)
    finally:
        sock.settimeout(timeout)
    return views


def _views(buffers: Sequence[Any]) -> list[memoryview]:
    return [memoryview(b).cast("B") for b in buffers if len(b)]


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop the ``sent`` bytes from the front of ``views`` (a partial ``sendmsg``)."""
    while views and sent >= len(views[0]):
        sent -= len(views[0])
        views.pop(0)
    if views and sent:
        views[0] = views[0][sent:]
