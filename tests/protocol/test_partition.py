"""The partition of a sharded session (``paramserver.sharding.partition``), in process: it is
deterministic, balances bytes, splits only what may be split and only at row boundaries, and
the shards' records describe it back exactly (``layout_of_shards``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver.sharding import (
    Layout,
    LayoutError,
    Part,
    Shard,
    decode_shard,
    layout_of_shards,
    partition,
)

MODEL = [
    ("emb", "float32", (10000, 64)),  # 2.4 MiB
    ("dense/kernel", "float32", (64, 256)),
    ("dense/bias", "float32", (256,)),
    ("out/kernel", "float64", (256, 10)),
    ("step", "float32", ()),
]


def records(layout: Layout) -> list[tuple[Shard, dict[str, tuple[str, tuple[int, ...]]]]]:
    return [
        (layout.shard(i), {p.name: (p.dtype, p.shape) for p in layout.on(i)})
        for i in range(layout.count)
    ]


def test_the_layout_is_deterministic_and_names_its_inputs():
    a, b = partition(MODEL, 3, slice_bytes=1 << 20), partition(list(MODEL), 3, slice_bytes=1 << 20)
    assert a == b and len(a.digest) == 32
    assert partition(MODEL, 2, slice_bytes=1 << 20).digest != a.digest
    assert partition(MODEL, 3, slice_bytes=1 << 19).digest != a.digest
    assert partition(MODEL[::-1], 3, slice_bytes=1 << 20).digest != a.digest  # order matters
    assert a.names == tuple(n for n, _, _ in MODEL)


def test_large_tensors_are_split_at_row_boundaries_into_slices_of_at_most_slice_bytes():
    layout = partition(MODEL, 3, slice_bytes=1 << 20)
    slices = [p for p in layout.pieces if p.source == "emb"]
    assert [p.rows for p in slices] == [(0, 4096), (4096, 8192), (8192, 10000)]
    assert [p.name for p in slices] == ["emb[0:4096]", "emb[4096:8192]", "emb[8192:10000]"]
    assert all(p.nbytes <= 1 << 20 and p.shape[1:] == (64,) for p in slices)
    assert all(p.rows is None for p in layout.pieces if p.source != "emb")
    # a row larger than the slice size: one row per slice, never less
    rows = partition([("wide", "float32", (3, 1000))], 3, slice_bytes=100)
    assert [p.rows for p in rows.pieces] == [(0, 1), (1, 2), (2, 3)]


def test_norm_constrained_and_tfoptimizer_tensors_stay_whole():
    assert all(
        p.rows is None for p in partition(MODEL, 2, slice_bytes=1 << 20, whole=["emb"]).pieces
    )
    assert all(p.rows is None for p in partition(MODEL, 2, slice_bytes=1, split=False).pieces)


def test_bytes_are_balanced():
    layout = partition(MODEL, 3, slice_bytes=1 << 20)
    loads = layout.bytes_per_shard()
    assert sum(loads) == sum(p.nbytes for p in layout.pieces)
    largest = max(p.nbytes for p in layout.pieces)
    assert max(loads) - min(loads) <= largest  # greedy largest-first placement's bound


def test_what_cannot_be_partitioned_is_refused():
    with pytest.raises(LayoutError, match="at most 2 shards"):
        partition([("a", "float32", (3,)), ("b", "float32", (3,))], 3)
    with pytest.raises(LayoutError, match="rename"):
        partition([("w", "float32", (8, 4)), ("w[0:2]", "float32", (1,))], 2, slice_bytes=32)
    with pytest.raises(LayoutError, match="distinct"):
        partition([("a", "float32", (3,)), ("a", "float32", (3,))], 1)
    for count in (0, 1025, True, 1.0):
        with pytest.raises(LayoutError):
            partition(MODEL, count)  # type: ignore[arg-type]
    with pytest.raises(LayoutError, match="slice_bytes"):
        partition(MODEL, 2, slice_bytes=0)


def test_split_and_join_are_inverse_and_join_writes_into_out():
    layout = partition(MODEL, 3, slice_bytes=1 << 20)
    rng = np.random.default_rng(0)
    arrays = {n: rng.standard_normal(s).astype(d) for n, d, s in MODEL}
    parts = layout.split(arrays)
    assert all(np.shares_memory(parts[p.shard][p.name], arrays[p.source]) for p in layout.pieces)
    joined = layout.join([{k: v.copy() for k, v in part.items()} for part in parts])
    assert all(joined[n].tobytes() == arrays[n].tobytes() for n in arrays)
    out = {n: np.zeros_like(a) for n, a in arrays.items()}
    result = layout.join(parts, out=out)
    assert result["emb"] is out["emb"] and out["emb"].tobytes() == arrays["emb"].tobytes()


def test_the_shards_records_describe_the_layout_back():
    layout = partition(MODEL, 3, slice_bytes=1 << 20)
    assert layout_of_shards(records(layout)) == layout
    for i in range(3):  # through the wire form, as a summary carries it
        assert decode_shard(layout.shard(i).to_dict()) == layout.shard(i)


def _tampered(base: Layout, index: int, **changes: object) -> list[tuple[Shard, dict]]:
    out = records(base)
    shard, params = out[index]
    out[index] = (dataclasses.replace(shard, **changes), params)
    return out


def test_records_of_another_layout_or_order_are_refused():
    layout = partition(MODEL, 3, slice_bytes=1 << 20)
    with pytest.raises(LayoutError, match="shard order"):
        layout_of_shards(records(layout)[::-1])
    with pytest.raises(LayoutError, match="shard order"):
        layout_of_shards(records(layout)[:2])
    with pytest.raises(LayoutError, match="not the parts of one session"):
        layout_of_shards(_tampered(layout, 1, layout="0" * 32))
    with pytest.raises(LayoutError, match="does not record its parts"):
        layout_of_shards(_tampered(layout, 0, parts=None))
    shard, params = records(layout)[2]
    assert shard.parts is not None
    swapped = tuple((name, Part(p.source, p.position + 1, p.rows)) for name, p in shard.parts)
    with pytest.raises(LayoutError):
        layout_of_shards(_tampered(layout, 2, parts=swapped))
    other = partition(MODEL, 3, slice_bytes=1 << 19)  # a shard of another partition
    mixed = records(layout)
    mixed[0] = records(other)[0]
    with pytest.raises(LayoutError):
        layout_of_shards(mixed)


models = st.lists(
    st.tuples(
        st.sampled_from(["float32", "float64", "float16", "bfloat16"]),
        st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(models, st.integers(1, 4), st.integers(1, 4096))
def test_any_model_round_trips(spec, count, slice_bytes):
    model = [(f"p{i}", dtype, shape) for i, (dtype, shape) in enumerate(spec)]
    try:
        layout = partition(model, count, slice_bytes=slice_bytes)
    except LayoutError:
        assert count > 1
        return
    assert {p.shard for p in layout.pieces} == set(range(count))
    assert layout_of_shards(records(layout)) == layout
    for name, _, shape in model:
        pieces = [p for p in layout.pieces if p.source == name]
        if len(pieces) > 1:
            assert pieces[0].rows == (0, pieces[0].shape[0])
            assert sum(p.shape[0] for p in pieces) == shape[0]
