"""The tensor framing of protocol v1 (``paramserver.wire``): arrays as ``{dtype, shape, data}``.

``pack`` writes any array as little-endian C-order bytes of an allowed float dtype, which the
reference ``msgpack`` package reads back; ``decode_tensor`` checks the map (dtype from the
allow-list, shape, ``prod(shape) * itemsize == len(data)``, the limits) before it views the
body's memory, without a copy.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from paramserver import wire
from paramserver.wire import DecodeLimits, TensorError
from tests.harness.http_api import packb, unpackb

FLOAT_DTYPES = [np.float16, np.float32, np.float64]


# --- packing arrays ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 4), (1, 1, 1, 7)])
def test_arrays_become_tensor_maps_the_reference_reads(
    dtype: type[np.floating], shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(7)
    arr = rng.standard_normal(shape).astype(dtype)
    body = wire.pack({"w": arr})
    tensor = unpackb(body)["w"]
    assert tensor == {
        "dtype": np.dtype(dtype).name,
        "shape": list(shape),
        "data": arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes(),
    }
    back = wire.decode_tensor(wire.unpack(body)["w"])
    assert back.dtype == np.dtype(dtype).newbyteorder("<")
    assert back.shape == shape
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a.T,  # Fortran order
        lambda a: a[:, ::2],  # strided
        lambda a: a.astype(">f4"),  # big-endian
        lambda a: np.asfortranarray(a.astype(">f8")),  # both
    ],
    ids=["transposed", "strided", "big-endian", "big-endian-fortran"],
)
def test_pack_writes_little_endian_c_order_for_any_layout(make: Any) -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arr = make(base)
    tensor = unpackb(wire.pack(arr))
    assert tensor["shape"] == list(arr.shape)
    little = np.dtype(arr.dtype).newbyteorder("<")
    assert tensor["dtype"] == little.name
    decoded = np.frombuffer(tensor["data"], dtype=little).reshape(arr.shape)
    np.testing.assert_array_equal(decoded, arr)


def test_a_tensor_packed_by_hand_with_the_reference_decodes() -> None:
    arr = np.array([[1.0, -2.5], [np.inf, 0.0]], dtype=np.float64)
    body = packb({"t": {"dtype": "float64", "shape": [2, 2], "data": arr.astype("<f8").tobytes()}})
    np.testing.assert_array_equal(wire.decode_tensor(wire.unpack(body)["t"]), arr)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.complex64, np.bool_, object])
def test_pack_refuses_arrays_of_other_dtypes(dtype: Any) -> None:
    with pytest.raises(TensorError):
        wire.pack({"w": np.zeros(3, dtype=dtype)})


# --- zero copy --------------------------------------------------------------------------------


def test_decoded_tensor_views_the_body_without_a_copy() -> None:
    arr = np.arange(1000, dtype=np.float32)
    body = bytearray(wire.pack({"gradients": {"w": arr}}))
    obj = wire.unpack(body)
    data = obj["gradients"]["w"]["data"]
    assert isinstance(data, memoryview)
    assert data.obj is body
    decoded = wire.decode_tensor(obj["gradients"]["w"])
    assert np.shares_memory(decoded, np.frombuffer(body, dtype=np.uint8))
    # Writing into the body shows through the decoded array: it is the body's memory.
    offset = len(body) - arr.nbytes
    body[offset : offset + 4] = struct.pack("<f", 42.0)
    assert decoded[0] == 42.0
    np.testing.assert_array_equal(decoded[1:], arr[1:])


def test_decoded_tensor_from_bytes_is_a_read_only_view() -> None:
    body = wire.pack({"w": np.ones((3, 3), dtype=np.float64)})
    decoded = wire.decode_tensor(wire.unpack(body)["w"])
    assert np.shares_memory(decoded, np.frombuffer(body, dtype=np.uint8))
    assert not decoded.flags.writeable


# --- tensor framing ---------------------------------------------------------------------------


def tensor_map(dtype: Any = "float32", shape: Any = (2,), data: Any = bytes(8)) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data": data,
    }


@pytest.mark.parametrize(
    "obj",
    [
        tensor_map(data=bytes(7)),
        tensor_map(data=bytes(12)),
        tensor_map(shape=(2, 2), data=bytes(8)),
        tensor_map(dtype="float64", data=bytes(8)),
        tensor_map(dtype="float16", data=bytes(8)),
        tensor_map(shape=(), data=b""),
    ],
    ids=["short", "long", "shape-needs-more", "f64-needs-more", "f16-needs-less", "scalar-empty"],
)
def test_data_length_must_match_shape_and_dtype(obj: dict[str, Any]) -> None:
    with pytest.raises(TensorError, match="bytes"):
        wire.decode_tensor(obj)


@pytest.mark.parametrize(
    "obj",
    [
        tensor_map(dtype="int32"),
        tensor_map(dtype="float8"),
        tensor_map(dtype=">f4"),
        tensor_map(dtype="<f4"),
        tensor_map(dtype="bfloat16"),
        tensor_map(dtype="object"),
        tensor_map(dtype=None),
        tensor_map(dtype=4),
        tensor_map(shape=[-1]),
        tensor_map(shape=[True, 2]),
        tensor_map(shape=[2.0]),
        tensor_map(shape="2"),
        tensor_map(shape=None),
        tensor_map(data="\x00" * 8),
        tensor_map(data=[0.0, 0.0]),
        tensor_map(data=None),
        {"dtype": "float32", "shape": [2]},
        {**tensor_map(), "extra": 1},
        [1, 2],
        None,
    ],
)
def test_invalid_tensor_maps_are_refused(obj: Any) -> None:
    with pytest.raises(TensorError):
        wire.decode_tensor(obj)


def test_tensor_limits() -> None:
    limits = DecodeLimits(max_dims=2, max_elements=6)
    assert wire.decode_tensor(tensor_map(shape=(2, 3), data=bytes(24)), limits=limits).shape == (
        2,
        3,
    )
    with pytest.raises(TensorError, match="dimensions"):
        wire.decode_tensor(tensor_map(shape=(1, 1, 1), data=bytes(4)), limits=limits)
    with pytest.raises(TensorError, match="elements"):
        wire.decode_tensor(tensor_map(shape=(7,), data=bytes(28)), limits=limits)
    # The element bound is checked before the data length: a huge claimed shape is refused
    # for its size, not multiplied out against the data.
    with pytest.raises(TensorError, match="elements"):
        wire.decode_tensor(tensor_map(shape=(2**40, 2**40), data=b""), limits=limits)


def test_tensor_map_names_and_count() -> None:
    good = tensor_map()
    assert set(wire.decode_tensor_map({"a": good, "x" * 256: good}, field="w")) == {"a", "x" * 256}
    for name in ["", "x" * 257, "a\nb", "\x00", "tab\there"]:
        with pytest.raises(TensorError, match="name"):
            wire.decode_tensor_map({name: good}, field="w")
    with pytest.raises(TensorError):
        wire.decode_tensor_map([good], field="w")
    limits = DecodeLimits(max_tensors=2)
    with pytest.raises(TensorError, match="at most 2"):
        wire.decode_tensor_map({"a": good, "b": good, "c": good}, field="w", limits=limits)


def test_json_tensors() -> None:
    arr = wire.decode_json_tensor({"dtype": "float16", "shape": [2, 2], "data": [1, 2.5, -3, 0]})
    np.testing.assert_array_equal(arr, np.array([[1, 2.5], [-3, 0]], dtype=np.float16))
    assert arr.dtype == np.float16
    for bad in (
        {"dtype": "float32", "shape": [3], "data": [1, 2]},
        {"dtype": "float32", "shape": [2], "data": [1, True]},
        {"dtype": "float32", "shape": [2], "data": [1, "2"]},
        {"dtype": "float32", "shape": [2], "data": [[1, 2]]},
        {"dtype": "float32", "shape": [2], "data": "AAAA"},
    ):
        with pytest.raises(TensorError):
            wire.decode_json_tensor(bad)
