"""The wire format of paramserver protocol version 1: MessagePack with explicitly framed tensors.

This is the one module that reads and writes bodies, used by both the server and the client.

A tensor travels as a map ``{"dtype": "float32" | "float64" | "float16", "shape": [int, ...],
"data": bin}`` whose ``data`` holds the little-endian C-order bytes; ``len(data)`` must equal
``prod(shape) * itemsize``. Nothing else can build an object: there are no msgpack ext types,
and nothing is ever unpickled.

* :func:`unpack` parses a msgpack body without copying it: ``bin`` values come back as
  ``memoryview`` slices of the body, so :func:`decode_tensor` is ``numpy.frombuffer`` on the
  received bytes. It refuses ext types, non-string map keys, duplicate keys, deep nesting,
  containers inside arrays (with ``scalar_arrays``, as the server sets) and any length that
  runs past the end of the body, and it counts values against a budget
  (:class:`DecodeLimits`), all checked at a container's header before anything is built for
  it: a hostile body costs at most the budget's Python objects (a few MiB at the server's
  defaults), whatever its size.
* :func:`pack` writes a message in one pass: ``numpy`` arrays become tensor maps whose ``data``
  is taken straight from the array's memory, and the whole body is joined once, so encoding
  costs one copy of the array bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

from .sparse import Rows

__all__ = [
    "MSGPACK_CONTENT_TYPES",
    "MSGPACK_MEDIA_TYPE",
    "TENSOR_DTYPES",
    "WIRE_DTYPES",
    "DecodeLimits",
    "LimitExceeded",
    "MalformedBody",
    "TensorError",
    "check_dtype_and_shape",
    "decode_tensor",
    "decode_tensor_map",
    "decode_json_tensor",
    "pack",
    "unpack",
]

MSGPACK_MEDIA_TYPE = "application/msgpack"
#: Content types accepted for msgpack bodies.
MSGPACK_CONTENT_TYPES = frozenset({"application/msgpack", "application/x-msgpack"})

#: The dtypes a tensor may have on the wire, all little-endian. ``bfloat16`` (mixed-precision
#: gradients; numpy's dtype from ``ml_dtypes``) is for gradients: the server casts it to the
#: parameter's dtype, as it casts float16; a session's weights are float16, 32 or 64.
TENSOR_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
_DTYPE_NAMES = {dt: name for name, dt in TENSOR_DTYPES.items()}
#: The same dtypes as a set (``dtype in WIRE_DTYPES``: travels as it is).
WIRE_DTYPES = frozenset(_DTYPE_NAMES)


class MalformedBody(ValueError):
    """The body is not well-formed msgpack of the kinds this protocol allows (HTTP 400)."""


class TensorError(ValueError):
    """A well-formed tensor map that is invalid: bad dtype, shape or data length (HTTP 422)."""


class LimitExceeded(MalformedBody):
    """Well-formed so far, but a container is larger than the request's limits allow (422).

    Raised from a container's header, before anything is parsed for it.
    """


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what one body may hold. ``None`` means no bound beyond the body's size."""

    max_depth: int = 16
    max_objects: int = 1_000_000  # values inside containers, in all
    max_map_items: int = 100_000  # entries of one map
    max_array_items: int = 1024  # items of one array (arrays are shapes in this protocol)
    scalar_arrays: bool = False  # arrays may hold only scalars (the server's requests)
    max_tensors: int | None = 100_000
    max_dims: int = 32
    max_elements: int | None = None


# --- decoding ------------------------------------------------------------------------------

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")


class _Reader:
    __slots__ = ("budget", "buf", "end", "max_array", "max_depth", "max_map", "pos", "scalars")

    def __init__(self, buf: memoryview, limits: DecodeLimits) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.max_depth = limits.max_depth
        self.budget = limits.max_objects
        self.max_map = limits.max_map_items
        self.max_array = limits.max_array_items
        self.scalars = limits.scalar_arrays

    def need(self, n: int) -> int:
        start = self.pos
        if n > self.end - start:
            raise MalformedBody(
                f"truncated msgpack: a value needs {n} bytes at offset {start}, "
                f"{self.end - start} remain"
            )
        self.pos = start + n
        return start

    def length(self, s: struct.Struct) -> int:
        start = self.need(s.size)
        return int(s.unpack_from(self.buf, start)[0])

    def read(self, depth: int) -> Any:
        b = self.buf[self.need(1)]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self.text(b & 0x1F)
        if b == 0xC0:
            return None
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b == 0xC4:
            return self.binary(self.buf[self.need(1)])
        if b == 0xC5:
            return self.binary(self.length(_U16))
        if b == 0xC6:
            return self.binary(self.length(_U32))
        if b == 0xCA:
            return float(_F32.unpack_from(self.buf, self.need(4))[0])
        if b == 0xCB:
            return float(_F64.unpack_from(self.buf, self.need(8))[0])
        if b == 0xCC:
            return self.buf[self.need(1)]
        if b == 0xCD:
            return self.length(_U16)
        if b == 0xCE:
            return self.length(_U32)
        if b == 0xCF:
            return self.length(_U64)
        if b == 0xD0:
            return int(_I8.unpack_from(self.buf, self.need(1))[0])
        if b == 0xD1:
            return int(_I16.unpack_from(self.buf, self.need(2))[0])
        if b == 0xD2:
            return int(_I32.unpack_from(self.buf, self.need(4))[0])
        if b == 0xD3:
            return int(_I64.unpack_from(self.buf, self.need(8))[0])
        if b == 0xD9:
            return self.text(self.buf[self.need(1)])
        if b == 0xDA:
            return self.text(self.length(_U16))
        if b == 0xDB:
            return self.text(self.length(_U32))
        if b == 0xDC:
            return self.array(self.length(_U16), depth)
        if b == 0xDD:
            return self.array(self.length(_U32), depth)
        if b == 0xDE:
            return self.map(self.length(_U16), depth)
        if b == 0xDF:
            return self.map(self.length(_U32), depth)
        if b in (0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8):
            raise MalformedBody(f"msgpack ext types are not accepted (byte 0x{b:02x})")
        raise MalformedBody(f"invalid msgpack byte 0x{b:02x} at offset {self.pos - 1}")

    def binary(self, n: int) -> memoryview:
        start = self.need(n)
        return self.buf[start : start + n]

    def text(self, n: int) -> str:
        start = self.need(n)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedBody(f"invalid UTF-8 in a msgpack string at offset {start}") from exc

    def _enter(self, n: int, per_item: int, depth: int) -> None:
        if depth >= self.max_depth:
            raise MalformedBody(f"msgpack nesting deeper than {self.max_depth} levels")
        # Every element needs at least one byte: a count the rest of the body cannot hold is a
        # lie, refused before anything is allocated for it.
        if n * per_item > self.end - self.pos:
            raise MalformedBody(
                f"truncated msgpack: a container of {n} items at offset {self.pos} "
                "runs past the end of the body"
            )
        bound = self.max_map if per_item == 2 else self.max_array
        if n > bound:
            if per_item == 2:
                raise LimitExceeded(f"a map of {n} entries; at most {bound} allowed per map")
            raise LimitExceeded(f"an array of {n} items; at most {bound} allowed per array")
        self.budget -= n * per_item
        if self.budget < 0:
            raise LimitExceeded("the body holds more values than this request may carry")

    def array(self, n: int, depth: int) -> list[Any]:
        self._enter(n, 1, depth)
        out = []
        for _ in range(n):
            item = self.read(depth + 1)
            # Arrays in requests are shapes and small config values: scalars only. Refusing
            # the first container inside an array stops nested-array bombs early.
            if self.scalars and isinstance(item, (list, dict)):
                raise LimitExceeded("arrays may not hold arrays or maps here")
            out.append(item)
        return out

    def map(self, n: int, depth: int) -> dict[str, Any]:
        self._enter(n, 2, depth)
        out: dict[str, Any] = {}
        for _ in range(n):
            key = self.read(depth + 1)
            if not isinstance(key, str):
                raise MalformedBody(f"msgpack map keys must be strings, got {type(key).__name__}")
            if key in out:
                raise MalformedBody(f"duplicate msgpack map key {key!r}")
            out[key] = self.read(depth + 1)
        return out


def unpack(body: bytes | bytearray | memoryview, limits: DecodeLimits | None = None) -> Any:
    """Parse one msgpack value that fills ``body`` exactly; ``bin`` values are zero-copy views.

    Raises :class:`MalformedBody` for anything that is not well-formed msgpack of the allowed
    kinds (nil, bool, int, float, str, bin, array, map with string keys), for ext types, for
    trailing bytes, and for anything past ``limits`` (nesting depth, items of one container,
    values in all): a container's count is checked against the limits and against the bytes
    left before anything is parsed for it, so a hostile body is refused early and cannot
    make the decoder build more Python objects than the limits allow.
    """
    limits = limits if limits is not None else DecodeLimits()
    view = memoryview(body)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if not view:
        raise MalformedBody("empty body: expected a msgpack map")
    reader = _Reader(view, limits)
    try:
        value = reader.read(0)
    except RecursionError as exc:  # pragma: no cover - max_depth keeps us far from it
        raise MalformedBody("msgpack nesting too deep") from exc
    if reader.pos != reader.end:
        raise MalformedBody(f"{reader.end - reader.pos} trailing bytes after the msgpack value")
    return value


def _check_shape(shape: Any, where: str, limits: DecodeLimits) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TensorError(f"{where}: 'shape' must be a list of integers >= 0, got {shape!r}")
    if len(shape) > limits.max_dims:
        raise TensorError(f"{where}: {len(shape)} dimensions; at most {limits.max_dims} allowed")
    if limits.max_elements is not None and any(d > limits.max_elements for d in shape):
        # checked per dimension too: [0, 2**62, 2**62] has no elements but cannot be shaped
        raise TensorError(f"{where}: a dimension over {limits.max_elements} elements")
    n = math.prod(shape)
    if limits.max_elements is not None and n > limits.max_elements:
        raise TensorError(f"{where}: {n} elements; at most {limits.max_elements} allowed")
    return tuple(shape)


def _check_dtype(dtype: Any, where: str) -> np.dtype:
    if not isinstance(dtype, str) or dtype not in TENSOR_DTYPES:
        raise TensorError(
            f"{where}: 'dtype' must be one of {', '.join(TENSOR_DTYPES)}, got {dtype!r}"
        )
    return TENSOR_DTYPES[dtype]


def check_dtype_and_shape(
    dtype: Any, shape: Any, where: str, limits: DecodeLimits
) -> tuple[np.dtype, tuple[int, ...]]:
    """A tensor's dtype (from the allow-list) and shape (within ``limits``), checked as
    :func:`decode_tensor` checks them; :class:`TensorError` says what is wrong."""
    return _check_dtype(dtype, where), _check_shape(shape, where, limits)


def _check_keys(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        raise TensorError(
            f"{where}: a tensor must be a map {{dtype, shape, data}}, got {type(obj).__name__}"
        )
    keys = set(obj)
    if keys != {"dtype", "shape", "data"}:
        missing = sorted({"dtype", "shape", "data"} - keys)
        extra = sorted(keys - {"dtype", "shape", "data"})
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing)}")
        if extra:
            detail.append(f"unexpected {', '.join(map(repr, extra))}")
        raise TensorError(
            f"{where}: a tensor map has keys dtype, shape, data ({'; '.join(detail)})"
        )


def decode_tensor(
    obj: Any, *, where: str = "tensor", limits: DecodeLimits = DecodeLimits()
) -> np.ndarray:
    """Turn a decoded tensor map into an array that views the body's bytes (no copy).

    Checks the dtype against the allow-list, the shape, and that
    ``len(data) == prod(shape) * itemsize`` before ``numpy.frombuffer``.
    """
    _check_keys(obj, where)
    dtype = _check_dtype(obj["dtype"], where)
    shape = _check_shape(obj["shape"], where, limits)
    data = obj["data"]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TensorError(f"{where}: 'data' must be msgpack bin, got {type(data).__name__}")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise TensorError(
            f"{where}: 'data' holds {len(data)} bytes; shape {list(shape)} of {obj['dtype']} "
            f"needs {expected}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # e.g. an empty shape with a dimension numpy cannot index
        raise TensorError(f"{where}: shape {list(shape)} cannot be used: {exc}") from None


def decode_json_tensor(
    obj: Any, *, where: str = "tensor", limits: DecodeLimits = DecodeLimits()
) -> np.ndarray:
    """A JSON tensor: like :func:`decode_tensor` but ``data`` is a flat list of numbers."""
    _check_keys(obj, where)
    dtype = _check_dtype(obj["dtype"], where)
    shape = _check_shape(obj["shape"], where, limits)
    data = obj["data"]
    if not isinstance(data, list):
        raise TensorError(f"{where}: in JSON, 'data' must be a flat list of numbers")
    n = math.prod(shape)
    if len(data) != n:
        raise TensorError(
            f"{where}: 'data' holds {len(data)} numbers; shape {list(shape)} needs {n}"
        )
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
        raise TensorError(f"{where}: 'data' must hold only numbers")
    try:
        with np.errstate(over="ignore"):
            values = np.asarray(data, dtype=np.float64).astype(dtype.newbyteorder("="))
        return values.reshape(shape)
    except (OverflowError, ValueError) as exc:  # an integer beyond float64, an odd shape
        raise TensorError(f"{where}: 'data' cannot be read as {obj['dtype']}: {exc}") from None


_ROWS_KEYS = frozenset({"dtype", "shape", "indices", "data"})
_INDEX = np.dtype("<i8")


def decode_rows(obj: Any, *, where: str = "tensor", limits: DecodeLimits = DecodeLimits()) -> Any:
    """A row-sparse tensor map ``{dtype, shape, indices, data}``
    (:class:`paramserver.sparse.Rows`, viewing the body's bytes). Everything is checked
    before any allocation: the keys, the dtype, the shape (at least one dimension), 8 bytes
    per index, as many rows as indices, at most ``max_elements`` elements of data, and every
    index in ``[0, shape[0])``."""
    if not isinstance(obj, dict) or set(obj) != _ROWS_KEYS:
        raise TensorError(f"{where}: a row-sparse tensor is a map {{dtype, shape, indices, data}}")
    dtype = _check_dtype(obj["dtype"], where)
    shape = _check_shape(obj["shape"], where, limits)
    if not shape:
        raise TensorError(f"{where}: a row-sparse tensor has at least one dimension")
    indices, data = obj["indices"], obj["data"]
    for key, value in (("indices", indices), ("data", data)):
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TensorError(f"{where}: {key!r} must be msgpack bin, got {type(value).__name__}")
    if len(indices) % 8:
        raise TensorError(f"{where}: 'indices' holds {len(indices)} bytes, not int64s")
    n = len(indices) // 8
    row = math.prod(shape[1:])
    if limits.max_elements is not None and n * max(row, 1) > limits.max_elements:
        raise TensorError(f"{where}: {n} rows; at most {limits.max_elements} elements allowed")
    expected = n * row * dtype.itemsize
    if len(data) != expected:
        raise TensorError(
            f"{where}: 'data' holds {len(data)} bytes; {n} rows of {list(shape[1:])} "
            f"{obj['dtype']} need {expected}"
        )
    index = np.frombuffer(indices, dtype=_INDEX)
    if n and (int(index.min()) < 0 or int(index.max()) >= shape[0]):
        bad = index[(index < 0) | (index >= shape[0])][0]
        raise TensorError(
            f"{where}: index {int(bad)} is out of range for {shape[0]} rows (0..{shape[0] - 1})"
        )
    values = np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))
    return Rows(index, values, shape)


def decode_tensor_map(
    obj: Any,
    *,
    field: str,
    limits: DecodeLimits = DecodeLimits(),
    json: bool = False,
    rows: bool = False,
) -> dict[str, Any]:
    """Decode ``{name: tensor}``; names are 1-256 printable characters. With ``rows`` a
    tensor may be row-sparse (:func:`decode_rows`)."""
    if not isinstance(obj, dict):
        raise TensorError(f"'{field}' must be a map of name to tensor, got {type(obj).__name__}")
    if limits.max_tensors is not None and len(obj) > limits.max_tensors:
        raise TensorError(
            f"'{field}' holds {len(obj)} tensors; at most {limits.max_tensors} allowed"
        )
    out: dict[str, np.ndarray] = {}
    for name, tensor in obj.items():
        check_parameter_name(name)
        where = f"{field}[{name!r}]"
        if rows and not json and isinstance(tensor, dict) and "indices" in tensor:
            out[name] = decode_rows(tensor, where=where, limits=limits)
            continue
        out[name] = (
            decode_json_tensor(tensor, where=where, limits=limits)
            if json
            else decode_tensor(tensor, where=where, limits=limits)
        )
    return out


def check_parameter_name(name: Any) -> str:
    """A parameter name is 1-256 printable characters."""
    if not isinstance(name, str) or not 1 <= len(name) <= 256 or not name.isprintable():
        raise TensorError(f"parameter names must be 1-256 printable characters, got {name!r}"[:300])
    return name


def dtype_name(dtype: np.dtype, name: str | None = None) -> str:
    """The wire name of ``dtype`` (``TensorError`` naming ``name``, the tensor as the message
    should call it, if it has none)."""
    known = _DTYPE_NAMES.get(dtype)
    if known is not None:  # a dtype of the wire in this machine's (little-endian) order
        return known
    dt = np.dtype(dtype).newbyteorder("<")
    try:
        return _DTYPE_NAMES[dt]
    except KeyError:
        what = "" if name is None else f"{name}: "
        hint = ""
        if dt == np.dtype(object):
            hint = (
                " (an object array: a None gradient, a TensorFlow IndexedSlices or a list of "
                "arrays of different shapes; send a numeric array)"
            )
        raise TensorError(
            f"{what}dtype {dtype} cannot travel{hint}; supported: {', '.join(TENSOR_DTYPES)}"
        ) from None


# --- encoding ------------------------------------------------------------------------------

_packb = msgpack.packb


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return bytes((0xC4, n))
    if n < 0x10000:
        return b"\xc5" + _U16.pack(n)
    if n < 0x100000000:
        return b"\xc6" + _U32.pack(n)
    raise ValueError("a msgpack bin holds at most 4 GiB")


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 0x10000:
        return b"\xde" + _U16.pack(n)
    return b"\xdf" + _U32.pack(n)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + _U16.pack(n)
    return b"\xdd" + _U32.pack(n)


_DATA_KEY = _packb("data")
_TENSOR_HEAD = _map_header(3) + _packb("dtype")
_SHAPE_KEY = _packb("shape")


def _tensor_chunks(arr: np.ndarray, out: list[Any], key: str | None = None) -> None:
    name = dtype_name(arr.dtype, key)
    if arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    out.append(_TENSOR_HEAD)
    out.append(_packb(name))
    out.append(_SHAPE_KEY)
    out.append(_packb(list(arr.shape)))
    out.append(_DATA_KEY)
    out.append(_bin_header(arr.nbytes))
    if arr.nbytes:
        # the array's own memory, not a copy (through uint8: bfloat16 has no buffer format)
        out.append(arr.reshape(-1).view(np.uint8).data)


_ROWS_HEAD = _map_header(4) + _packb("dtype")
_INDICES_KEY = _packb("indices")


def _rows_chunks(rows: Any, out: list[Any], key: str | None = None) -> None:
    """A row-sparse tensor map: dtype, shape (the whole tensor's), indices, data."""
    if rows.shape is None:
        raise TypeError(f"the rows {key or ''} need the tensor's shape to travel".strip())
    values = rows.values
    name = dtype_name(values.dtype, key)
    if values.dtype.byteorder == ">" or not values.flags.c_contiguous:
        values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    index = np.ascontiguousarray(rows.indices, dtype=_INDEX)
    out.append(_ROWS_HEAD)
    out.append(_packb(name))
    out.append(_SHAPE_KEY)
    out.append(_packb(list(rows.shape)))
    out.append(_INDICES_KEY)
    out.append(_bin_header(index.nbytes))
    if index.nbytes:
        out.append(index.view(np.uint8).data)
    out.append(_DATA_KEY)
    out.append(_bin_header(values.nbytes))
    if values.nbytes:
        out.append(values.reshape(-1).view(np.uint8).data)


def _chunks(obj: Any, out: list[Any]) -> None:
    # scalars and dicts first, by their exact type (a Mapping check costs an ABC lookup)
    kind = type(obj)
    if kind is int or kind is str or kind is float or obj is None or kind is bool:
        out.append(_packb(obj))
    elif isinstance(obj, np.ndarray):
        _tensor_chunks(obj, out)
    elif isinstance(obj, Rows):
        _rows_chunks(obj, out)
    elif kind is dict or isinstance(obj, Mapping):
        out.append(_map_header(len(obj)))
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"map keys must be strings, got {type(key).__name__}")
            out.append(_packb(key))
            if isinstance(value, np.ndarray):
                _tensor_chunks(value, out, repr(key))
            elif isinstance(value, Rows):
                _rows_chunks(value, out, repr(key))
            else:
                _chunks(value, out)
    elif isinstance(obj, (list, tuple)):
        out.append(_array_header(len(obj)))
        for value in obj:
            _chunks(value, out)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        view = memoryview(obj).cast("B") if isinstance(obj, memoryview) else obj
        out.append(_bin_header(len(view)))
        out.append(view)
    elif isinstance(obj, np.generic):
        out.append(_packb(obj.item()))
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        out.append(_packb(obj))
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack; numpy arrays become tensor maps (one copy of their bytes).

    Allowed values: dict with string keys, list/tuple, str, int, float, bool, None, bytes and
    numpy arrays of float16/32/64.
    """
    out: list[Any] = []
    _chunks(obj, out)
    return b"".join(out)


def pack_chunks(obj: Any) -> Iterable[Any]:
    """The pieces :func:`pack` would join (array data as memoryviews of the arrays)."""
    out: list[Any] = []
    _chunks(obj, out)
    return out
