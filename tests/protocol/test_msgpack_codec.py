"""The msgpack codec of ``paramserver.wire``: every format, packing, and what the decoder refuses.

The reference ``msgpack`` package is the oracle in both directions: what it packs we unpack to
the same value, and what we pack it unpacks to the same value. The decoder's refusals (ext
types, non-string and duplicate keys, trailing bytes, truncation, lying container counts, deep
nesting) are checked byte by byte, and hypothesis checks that random bytes can only ever raise
``MalformedBody``. The tensor framing on top of the codec: ``test_tensor_framing.py``.
"""

from __future__ import annotations

import math
import struct
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from paramserver import wire
from paramserver.wire import DecodeLimits, MalformedBody

# Limits wide enough for the largest containers these tests build (the defaults are tuned for
# request bodies, whose arrays are short shapes).
WIDE = DecodeLimits(
    max_depth=64,
    max_objects=10_000_000,
    max_map_items=1_000_000,
    max_array_items=1_000_000,
)

FLOAT_DTYPES = [np.float16, np.float32, np.float64]


def ref_pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def ref_unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=True)


def plain(obj: Any) -> Any:
    """A decoded value with ``bin`` views turned into ``bytes``, for comparisons."""
    if isinstance(obj, memoryview):
        return obj.tobytes()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


def expected(obj: Any) -> Any:
    """What ``obj`` should decode to: arrays become protocol tensor maps, tuples lists."""
    if isinstance(obj, np.ndarray):
        little = obj.astype(obj.dtype.newbyteorder("<"), copy=False)
        return {
            "dtype": obj.dtype.name,
            "shape": list(obj.shape),
            "data": little.tobytes(order="C"),
        }
    if isinstance(obj, dict):
        return {k: expected(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [expected(v) for v in obj]
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    return obj


def same(a: Any, b: Any) -> bool:
    """Equality that also tells ints from bools and floats (``1 == True == 1.0`` in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return struct.pack(">d", a) == struct.pack(">d", b)  # -0.0 differs from 0.0
    return bool(a == b)


# --- every msgpack format, against the reference ----------------------------------------------


def _u8(n: int) -> bytes:
    return struct.pack(">B", n)


def _u16(n: int) -> bytes:
    return struct.pack(">H", n)


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


# (encoded bytes, the value), each format written out by hand, several in a non-minimal width
# that a conforming decoder must still accept.
FORMATS: list[tuple[str, bytes, Any]] = [
    ("positive fixint 0", b"\x00", 0),
    ("positive fixint 127", b"\x7f", 127),
    ("negative fixint -1", b"\xff", -1),
    ("negative fixint -32", b"\xe0", -32),
    ("uint8", b"\xcc\xff", 255),
    ("uint8 non-minimal", b"\xcc\x01", 1),
    ("uint16", b"\xcd\xff\xff", 65535),
    ("uint32", b"\xce\xff\xff\xff\xff", 2**32 - 1),
    ("uint64", b"\xcf" + b"\xff" * 8, 2**64 - 1),
    ("uint64 non-minimal", b"\xcf" + b"\x00" * 7 + b"\x05", 5),
    ("int8", b"\xd0\x80", -128),
    ("int8 positive", b"\xd0\x7f", 127),
    ("int16", b"\xd1\x80\x00", -32768),
    ("int32", b"\xd2\x80\x00\x00\x00", -(2**31)),
    ("int64", b"\xd3\x80" + b"\x00" * 7, -(2**63)),
    ("int64 -1", b"\xd3" + b"\xff" * 8, -1),
    ("nil", b"\xc0", None),
    ("false", b"\xc2", False),
    ("true", b"\xc3", True),
    ("float32", b"\xca" + struct.pack(">f", 1.5), 1.5),
    ("float32 inf", b"\xca" + struct.pack(">f", float("inf")), float("inf")),
    ("float64", b"\xcb" + struct.pack(">d", -0.1), -0.1),
    ("float64 -0.0", b"\xcb" + struct.pack(">d", -0.0), -0.0),
    ("fixstr empty", b"\xa0", ""),
    ("fixstr", b"\xa3abc", "abc"),
    ("fixstr 31", b"\xbf" + b"x" * 31, "x" * 31),
    ("fixstr utf-8", b"\xa2\xc3\xa9", "\u00e9"),
    ("str8", b"\xd9\x20" + b"y" * 32, "y" * 32),
    ("str8 non-minimal", b"\xd9\x02hi", "hi"),
    ("str16", b"\xda" + _u16(300) + b"z" * 300, "z" * 300),
    ("str32", b"\xdb" + _u32(3) + b"abc", "abc"),
    ("bin8", b"\xc4\x03\x00\x01\x02", b"\x00\x01\x02"),
    ("bin8 empty", b"\xc4\x00", b""),
    ("bin16", b"\xc5" + _u16(300) + bytes(range(256)) + bytes(44), bytes(range(256)) + bytes(44)),
    ("bin32", b"\xc6" + _u32(2) + b"\xff\xfe", b"\xff\xfe"),
    ("fixarray empty", b"\x90", []),
    ("fixarray", b"\x93\x01\xa1a\xc0", [1, "a", None]),
    ("array16", b"\xdc" + _u16(2) + b"\x01\x02", [1, 2]),
    ("array32", b"\xdd" + _u32(2) + b"\xc2\xc3", [False, True]),
    ("fixmap empty", b"\x80", {}),
    ("fixmap", b"\x82\xa1a\x01\xa1b\x92\x02\x03", {"a": 1, "b": [2, 3]}),
    ("map16", b"\xde" + _u16(1) + b"\xa1k\xc0", {"k": None}),
    ("map32", b"\xdf" + _u32(1) + b"\xd9\x01k\xc4\x01\x07", {"k": b"\x07"}),
]


@pytest.mark.parametrize(("body", "value"), [f[1:] for f in FORMATS], ids=[f[0] for f in FORMATS])
def test_unpack_every_format_like_the_reference(body: bytes, value: Any) -> None:
    ours = plain(wire.unpack(body, WIDE))
    assert same(ours, value)
    assert same(ours, ref_unpack(body))


# Values whose minimal encodings cover every width boundary; packed by the reference and by us.
BOUNDARY_INTS = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
]  # fmt: skip
BOUNDARY_LENGTHS = [0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536]


def boundary_values() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [(f"int {n}", n) for n in BOUNDARY_INTS]
    for n in BOUNDARY_LENGTHS:
        out.append((f"str {n}", "s" * n))
        out.append((f"bin {n}", bytes(n)))
        out.append((f"array {n}", [i % 3 for i in range(n)]))
    for n in (0, 15, 16, 65535, 65536):
        out.append((f"map {n}", {f"k{i}": i for i in range(n)}))
    out.append(("float", 3.141592653589793))
    out.append(("nested", {"a": [{"b": [None, True, False, -1.25, "\u2603", b"\xff"]}]}))
    return out


BOUNDARY = boundary_values()


@pytest.mark.parametrize("value", [v for _, v in BOUNDARY], ids=[n for n, _ in BOUNDARY])
def test_round_trip_with_the_reference_both_ways(value: Any) -> None:
    # reference -> ours
    assert same(plain(wire.unpack(ref_pack(value), WIDE)), value)
    # ours -> reference, and ours -> ours
    body = wire.pack(value)
    assert same(ref_unpack(body), value)
    assert same(plain(wire.unpack(body, WIDE)), value)


def test_str8_from_the_reference() -> None:
    body = ref_pack("q" * 40)
    assert body[0] == 0xD9
    assert wire.unpack(body) == "q" * 40


def test_float32_from_the_reference() -> None:
    body = msgpack.packb(0.25, use_single_float=True)
    assert body[0] == 0xCA
    assert same(wire.unpack(body), 0.25)


# --- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [{1: 2}, {b"k": 1}, {None: 1}, {"ok": {2.5: 1}}])
def test_pack_refuses_non_string_keys(value: Any) -> None:
    with pytest.raises(TypeError):
        wire.pack(value)


@pytest.mark.parametrize("value", [object(), {1, 2}, {"x": 1j}, [lambda: 0]])
def test_pack_refuses_values_it_cannot_frame(value: Any) -> None:
    with pytest.raises(TypeError):
        wire.pack(value)


def test_pack_numpy_scalars_become_plain_numbers() -> None:
    assert ref_unpack(wire.pack({"i": np.int64(-3), "f": np.float32(0.5)})) == {
        "i": -3,
        "f": 0.5,
    }


# --- bins: views of the body ------------------------------------------------------------------


def test_unpack_accepts_a_memoryview_of_the_body() -> None:
    body = bytearray(b"\x00\x00" + ref_pack({"a": b"xyz"}))
    view = memoryview(body)[2:]
    data = wire.unpack(view)["a"]
    assert data.obj is body
    assert bytes(data) == b"xyz"


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16, 0, 3, 255, 256, 70_000])
def test_ext_types_are_refused(size: int) -> None:
    ext = msgpack.ExtType(5, b"e" * size)
    for body in (ref_pack(ext), ref_pack({"gradients": {"w": ext}}), ref_pack([1, ext])):
        assert ref_unpack(body) is not None  # the reference decodes it; we must not
        with pytest.raises(MalformedBody, match="ext"):
            wire.unpack(body, WIDE)


@pytest.mark.parametrize(
    "value",
    [{1: "a"}, {-1: "a"}, {b"k": 1}, {None: 1}, {True: 1}, {1.5: 1}, {"ok": {7: 1}}],
    ids=["int", "negative", "bin", "nil", "bool", "float", "nested"],
)
def test_non_string_keys_are_refused(value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    with pytest.raises(MalformedBody, match="key"):
        wire.unpack(body)


def test_container_keys_are_refused() -> None:
    body = b"\x81\x91\x01\x02"  # {[1]: 2}
    with pytest.raises(MalformedBody):
        wire.unpack(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\x82\xa1a\x01\xa1a\x02",  # {"a": 1, "a": 2}
        b"\x81\xa1m\x83\xa1x\xc0\xa1y\xc0\xa1x\xc0",  # nested
        b"\x82\xa1a\x01\xd9\x01a\x02",  # same key, different string widths
    ],
)
def test_duplicate_keys_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedBody, match="duplicate"):
        wire.unpack(body)


@pytest.mark.parametrize(
    "body",
    [ref_pack({}) + b"\xc0", ref_pack(1) + b"\x00", ref_pack({"a": b"x"}) * 2, b"\xc0\xc0"],
)
def test_trailing_bytes_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedBody, match="trailing"):
        wire.unpack(body)


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\xa2\xc3\x28", b"\xd9\x02\xff\xfe", b"\x81\xa2\xc3\x28\x01"],
    ids=["empty", "never-used-0xc1", "bad-utf8", "bad-utf8-str8", "bad-utf8-key"],
)
def test_invalid_bytes_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedBody):
        wire.unpack(body)


SAMPLE = wire.pack(
    {
        "gradients": {
            "w": np.arange(6, dtype=np.float32).reshape(3, 2),
            "b": np.array([1.0, -1.0]),
            "h": np.zeros((), dtype=np.float16),
        },
        "meta": [1, -200, 70_000, 2**40, -(2**40), 1.5, "str", None, True, False, b"bin"],
        "long": "x" * 300,
        "blob": bytes(300),
        "empty": {},
    }
)


def test_truncated_input_is_refused_at_every_cut_point() -> None:
    assert wire.unpack(SAMPLE)  # the whole sample is valid
    for cut in range(len(SAMPLE)):
        with pytest.raises(MalformedBody):
            wire.unpack(SAMPLE[:cut])


@pytest.mark.parametrize(
    "body",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 of 4G items, nothing follows
        b"\xdd\xff\xff\xff\xff" + b"\xc0" * 100,
        b"\xdf\xff\xff\xff\xff" + b"\xa1a\xc0" * 10,  # map32 of 4G entries
        b"\xdc\xff\xff" + b"\xc0" * 10,  # array16 of 65535
        b"\xde\x00\x10" + b"\xa1a\xc0",  # map16 of 16, one present
        b"\x9f\xc0",  # fixarray of 15, one present
        b"\x8f\xa1a\xc0",  # fixmap of 15, one present
        b"\xc6\xff\xff\xff\xff" + b"x" * 10,  # bin32 of 4 GiB
        b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # str32 of 4 GiB
        b"\x81\xa4data\xc6\x7f\xff\xff\xff",  # a tensor's data claiming 2 GiB
    ],
)
def test_containers_claiming_more_than_the_body_holds_are_refused_without_allocating(
    body: bytes,
) -> None:
    for limits in (None, WIDE):
        tracemalloc.start()
        try:
            with pytest.raises(MalformedBody):
                wire.unpack(body, limits)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024, f"decoding a {len(body)}-byte body allocated {peak} bytes"


def test_default_limits_refuse_long_arrays_and_maps() -> None:
    limits = DecodeLimits(max_array_items=4, max_map_items=3)
    assert wire.unpack(ref_pack([0] * 4), limits) == [0] * 4
    with pytest.raises(MalformedBody):
        wire.unpack(ref_pack([0] * 5), limits)
    three = {str(i): i for i in range(3)}
    assert wire.unpack(ref_pack(three), limits) == three
    with pytest.raises(MalformedBody):
        wire.unpack(ref_pack({str(i): i for i in range(4)}), limits)


def test_the_object_budget_counts_values_in_all_containers() -> None:
    body = ref_pack([[1, 2], [3, 4], [5, 6]])  # 3 + 6 values inside containers
    assert wire.unpack(body, DecodeLimits(max_objects=9)) == [[1, 2], [3, 4], [5, 6]]
    with pytest.raises(MalformedBody):
        wire.unpack(body, DecodeLimits(max_objects=8))


@pytest.mark.parametrize(
    "opener", [b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\xdf\x00\x00\x00\x01\xa1k"]
)
def test_nesting_is_bounded(opener: bytes) -> None:
    limit = 16
    limits = DecodeLimits(max_depth=limit)
    ok = opener * limit + b"\xc0"
    assert wire.unpack(ok, limits) is not None
    with pytest.raises(MalformedBody, match="nest"):
        wire.unpack(opener * (limit + 1) + b"\xc0", limits)


def test_very_deep_nesting_is_refused_without_recursion_error() -> None:
    for body in (b"\x91" * 100_000 + b"\xc0", b"\x81\xa1k" * 100_000 + b"\xc0"):
        with pytest.raises(MalformedBody):
            wire.unpack(body)


def test_default_depth_holds_a_state_body() -> None:
    # A state body nests slots -> slot -> param -> tensor -> shape: well inside the default.
    state = {"slots": {"m": {"w": np.zeros((2, 2), dtype=np.float32)}}, "scalars": {}}
    assert wire.unpack(wire.pack(state))["slots"]["m"]["w"]["shape"] == [2, 2]


# --- properties -------------------------------------------------------------------------------

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
keys = st.text(max_size=12)


def trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5)
        ),
        max_leaves=25,
    )


arrays = st.sampled_from(FLOAT_DTYPES).flatmap(
    lambda dt: hnp.arrays(
        dt,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        elements=st.floats(width=np.finfo(dt).bits, allow_nan=True),
    )
)


@PROPERTY
@given(trees(scalars | arrays))
def test_pack_then_unpack_is_identity(value: Any) -> None:
    body = wire.pack(value)
    want = expected(value)
    assert same(plain(wire.unpack(body, WIDE)), want)
    assert same(ref_unpack(body), want)


@PROPERTY
@given(trees(scalars))
def test_unpack_reads_what_the_reference_packs(value: Any) -> None:
    assert same(plain(wire.unpack(ref_pack(value), WIDE)), value)


def _edited(body: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(body)
    for kind, pos, byte in edits:
        if not out:
            out.append(byte)
            continue
        i = pos % len(out)
        if kind == 0:
            out[i] = byte
        elif kind == 1:
            out.insert(i, byte)
        else:
            del out[i]
    return bytes(out)


edit = st.tuples(st.integers(0, 2), st.integers(0, 2**16), st.integers(0, 255))
hostile = st.binary(max_size=200) | st.builds(
    _edited, trees(scalars | arrays).map(wire.pack), st.lists(edit, max_size=4)
)


@PROPERTY
@given(hostile)
def test_unpack_raises_only_malformed_body(body: bytes) -> None:
    for limits in (None, WIDE):
        try:
            ours = wire.unpack(body, limits)
        except MalformedBody:
            continue
        # Anything we accept is valid msgpack that the reference reads the same way.
        assert same(plain(ours), ref_unpack(body))
