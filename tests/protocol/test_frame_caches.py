"""The caches of paramserver.frames that spare each push the work of its layout: the same
answers as the functions they cache, for every input those refuse too."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from paramserver import frames, wire


def test_a_cached_layout_is_the_layout_and_other_spellings_are_still_refused():
    cache = frames.LayoutCache(field="tensors")
    specs = [["w", "float32", [3, 4]], ["b", "float16", [4]]]
    first = cache.get(specs)
    assert first == frames.layout_of(specs, field="tensors")
    assert cache.get([["w", "float32", [3, 4]], ["b", "float16", [4]]]) is first
    for other in (
        [["w", "float32", [3.0, 4]], ["b", "float16", [4]]],
        [["w", "float32", [True, 4]], ["b", "float16", [4]]],
        [["w", "float32", [3, 4]]] * 2,
        "not a list",
        [["w", "float32", [3, 4]], ["b", "float16", [4]], object()],  # not msgpack at all
    ):
        with pytest.raises(wire.TensorError):
            cache.get(other)
        assert cache.get(specs) is first  # nothing refused took its place


def test_the_layout_cache_checks_its_limits_and_stays_small():
    cache = frames.LayoutCache(field="tensors", limits=wire.DecodeLimits(max_tensors=2))
    with pytest.raises(wire.TensorError, match="at most 2"):
        cache.get([[f"t{i}", "float32", [1]] for i in range(3)])
    for i in range(3 * frames.CACHED_LAYOUTS):
        layout = cache.get([["w", "float32", [i + 1]]])
        assert layout.nbytes == 4 * (i + 1)
    assert len(cache._layouts) <= frames.CACHED_LAYOUTS


def test_packed_specs_are_msgpack_of_specs_of():
    cache = frames.SpecsCache()
    arrays = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, ">f8"), "s": np.float32(1)}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    assert cache.packed(arrays) == msgpack.packb(frames.specs_of(arrays))
    assert cache.packed(arrays) is cache.packed(arrays)
    reshaped = dict(arrays, w=np.zeros((4, 3), np.float32))
    assert cache.packed(reshaped) == msgpack.packb(frames.specs_of(reshaped))
    with pytest.raises(wire.TensorError):
        cache.packed({"i": np.zeros(2, np.int32)})


@pytest.mark.parametrize("count", [0, 1, 15, 16, 40])
def test_a_map_put_together_from_packed_fields_is_msgpack_of_the_map(count):
    fields = {f"k{i}": [i, "v" * i, {"n": i}] for i in range(count)}
    parts = [msgpack.packb(k) + msgpack.packb(v) for k, v in fields.items()]
    assert frames.pack_map(parts) == msgpack.packb(fields)


def test_the_layout_cache_holds_at_most_its_bytes():
    """A server keeps one cache per connection: long lists are checked each time, not kept."""
    cache = frames.LayoutCache(field="tensors")
    long = [[f"{i:04d}" + "n" * 250, "float32", [2]] for i in range(300)]  # ~80 KiB packed
    assert len(msgpack.packb(long)) > frames.CACHED_SPECS_BYTES
    assert cache.get(long).nbytes == 300 * 8
    assert cache._layouts == {} and cache._bytes == 0
    medium = [[f"{i:04d}" + "n" * 250, "float32", [2]] for i in range(100)]  # ~26 KiB
    for width in range(1, 2 * frames.CACHED_LAYOUTS):
        specs = [[name, dtype, [width]] for name, dtype, _ in medium]
        assert cache.get(specs).nbytes == 100 * 4 * width
        assert cache._bytes <= frames.CACHED_SPECS_BYTES
        assert cache._bytes == sum(map(len, cache._layouts))
