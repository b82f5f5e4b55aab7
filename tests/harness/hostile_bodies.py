"""msgpack bodies built to exhaust a decoder, byte by byte: what a hostile client sends.

:data:`STRUCTURAL` holds bodies the decoder must refuse on structure alone (lying lengths and
headers, deep nesting, ext types, 50 MB of repetition), before building anything;
:data:`OBJECT_HEAVY` holds bodies within the structural bounds that fill the decoder's budget
of values. Each is a function, so that a body is built only by the test that sends it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = ["FIFTY_MB", "OBJECT_HEAVY", "STRUCTURAL", "many_keys", "tiny_values"]


def _u16(n: int) -> bytes:
    return struct.pack(">H", n)


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _str(s: str) -> bytes:
    raw = s.encode()
    return (bytes((0xA0 | len(raw),)) if len(raw) < 32 else b"\xd9" + bytes((len(raw),))) + raw


def _array(n: int) -> bytes:
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + _u16(n)


def _map(n: int) -> bytes:
    return bytes((0x80 | n,)) if n < 16 else b"\xde" + _u16(n)


def _gradients(value: bytes) -> bytes:
    return _map(1) + _str("gradients") + value


def _tensor(data: bytes) -> bytes:
    return (
        _map(3)
        + _str("dtype")
        + _str("float32")
        + _str("shape")
        + _array(1)
        + b"\x04"
        + _str("data")
        + data
    )


def tiny_values(width: int = 64, levels: int = 3, outer: int = 4) -> bytes:
    """``outer`` x ``width``^``levels`` nils in nested arrays that each fit the item bound."""
    block = _array(width) + b"\xc0" * width
    for _ in range(levels - 1):
        block = _array(width) + block * width
    return _array(outer) + block * outer


def many_keys(maps: int, keys: int = 4096) -> bytes:
    """A map of ``maps`` maps, each of ``keys`` distinct short keys to nil."""
    out = [_map(maps)]
    for m in range(maps):
        out.append(_str(f"m{m}") + _map(keys))
        out.extend(_str(f"{m * keys + k:x}") + b"\xc0" for k in range(keys))
    return b"".join(out)


FIFTY_MB = 50 * 1024 * 1024
SMALL_MAP = _map(1) + _str("a") + b"\x01"

# Bodies the decoder refuses on structure alone, before building anything.
STRUCTURAL: dict[str, Callable[[], bytes]] = {
    "map32-header": lambda: b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64,
    "array32-header": lambda: b"\xdd\xff\xff\xff\xff" + b"\xc0" * 64,
    "map16-header": lambda: _gradients(b"\xde\xff\xff" + b"\xc0" * 64),
    "nested-map-header": lambda: _gradients(_map(1) + _str("w") + b"\xdf\x7f\xff\xff\xff"),
    "deep-arrays": lambda: b"\x91" * 100_000 + b"\xc0",
    "deep-maps": lambda: (_map(1) + _str("a")) * 10_000 + b"\xc0",
    "ext-fixext1": lambda: _gradients(b"\xd4\x01\x00"),
    "ext-timestamp": lambda: _gradients(b"\xd6\xff\x00\x00\x00\x00"),
    "ext8": lambda: _gradients(b"\xc7\x05\x01" + b"\x00" * 5),
    "ext32-huge": lambda: _gradients(b"\xc9\xff\xff\xff\xff\x01" + b"\x00" * 16),
    "bin32-past-end": lambda: _gradients(
        _map(1) + _str("w") + _tensor(b"\xc6" + _u32(0xFFFFFFFF) + b"\x00" * 16)
    ),
    "str32-past-end": lambda: _gradients(b"\xdb" + _u32(0xFFFFFFFF) + b"a" * 16),
    "never-used-byte": lambda: _gradients(b"\xc1"),
    "50MB-repeated-maps": lambda: SMALL_MAP * (FIFTY_MB // len(SMALL_MAP)),
    "50MB-array-of-maps": lambda: b"\xdd" + _u32(FIFTY_MB // 4) + SMALL_MAP * (FIFTY_MB // 4),
    "50MB-map-of-maps": lambda: (
        b"\xdf" + _u32(FIFTY_MB // 8) + (_str("k") + SMALL_MAP) * (FIFTY_MB // 6)
    ),
}
# Bodies within the structural bounds that fill the decoder's object budget.
OBJECT_HEAVY: dict[str, Callable[[], bytes]] = {
    "1M-tiny-values": lambda: tiny_values(),
    "64-maps-of-4096-keys": lambda: many_keys(64),
}
