"""What a hostile data-plane header costs ``paramserver.frames.unpack_header``: at most its
bound of lists and maps, each of which msgpack builds from one byte (an empty list or map is
one byte on the wire and tens of bytes of Python object). The same headers sent to a live
server: ``tests/server/test_dataplane.py``."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest

from paramserver import frames


def nested_empties(size: int, *, empty: bytes = b"\x90") -> bytes:
    """A list of lists of empty lists (or maps), about ``size`` bytes: no other bound of
    ``unpack_header`` refuses it (every list is within 100,000 items, no string, no bin)."""
    inner = b"\xdc" + (60_000).to_bytes(2, "big") + empty * 60_000
    count = max(1, size // len(inner))
    return b"\xdc" + count.to_bytes(2, "big") + inner * count


def _push_header(tensors: int) -> bytes:
    specs = [[f"layer_{i}/kernel", "float32", [64, 3, 3]] for i in range(tensors)]
    return msgpack.packb({"op": "push", "session": "s", "key": "k", "tensors": specs})


@pytest.mark.parametrize("empty", [b"\x90", b"\x80"], ids=["lists", "maps"])
def test_a_header_of_empty_containers_is_refused_within_its_bound(empty: bytes) -> None:
    header = nested_empties(frames.MAX_HEADER_BYTES - 16, empty=empty)
    assert len(header) <= frames.MAX_HEADER_BYTES
    most = frames.header_containers(4096)
    tracemalloc.start()
    try:
        with pytest.raises(frames.FrameError, match="too many lists and maps"):
            frames.unpack_header(header, max_containers=most)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # what it built before the refusal: about `most` objects, not 4 million (about 280 MB)
    assert peak < 2 * 1024 * 1024, peak


def test_the_default_bound_holds_on_the_client_side_too() -> None:
    header = nested_empties(frames.MAX_HEADER_BYTES - 16)
    with pytest.raises(frames.FrameError, match="too many lists and maps"):
        frames.unpack_header(header)


def test_a_push_header_of_max_tensors_tensors_is_read_whole() -> None:
    """The bound leaves room for the largest header a server takes: ``max_tensors`` entries."""
    for tensors in (1, 200, 4096):
        header = _push_header(tensors)
        decoded = frames.unpack_header(header, max_containers=frames.header_containers(4096))
        assert decoded == msgpack.unpackb(header)
        assert len(decoded["tensors"]) == tensors
    with pytest.raises(frames.FrameError, match="too many lists and maps"):
        frames.unpack_header(_push_header(4096), max_containers=frames.header_containers(4000))


def test_a_header_shorter_than_its_bound_is_read_as_before() -> None:
    """A header of at most ``max_containers`` bytes cannot hold more: read without counting."""
    header = nested_empties(10_000)[:-1]  # a truncated header: refused as unreadable
    with pytest.raises(frames.FrameError, match="unreadable"):
        frames.unpack_header(header, max_containers=len(header))
    small = b"\x93" + b"\x90" * 3  # four lists in four bytes: exactly at a bound of 4
    assert frames.unpack_header(small, max_containers=4) == [[], [], []]
    with pytest.raises(frames.FrameError, match="too many lists and maps"):
        frames.unpack_header(small, max_containers=3)
