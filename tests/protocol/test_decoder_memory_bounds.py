"""What a hostile msgpack body costs the decoder: memory and time bounded whatever its size.

``paramserver.wire.unpack`` runs here in process with the limits the server applies to request
bodies (``decode_limits(Settings())``), on the bodies of :mod:`tests.harness.hostile_bodies`.
A body refused on structure alone (lying lengths, deep nesting, ext types, 50 MB of
repetition) allocates a few KiB of bookkeeping; a body of many small values stops at the
object budget. The same bodies sent to a live server: ``tests/server/test_hostile_bodies.py``.
"""

from __future__ import annotations

import time
import tracemalloc

import pytest

from paramserver import wire
from paramserver.server.protocol import decode_limits
from paramserver.server.settings import Settings
from tests.harness.hostile_bodies import OBJECT_HEAVY, STRUCTURAL, many_keys, tiny_values
from tests.harness.http_api import assert_no_leak

LIMITS = decode_limits(Settings())


def peak_while_unpacking(body: bytes) -> tuple[int, float, str]:
    """(tracemalloc peak in bytes, seconds, error) of ``wire.unpack(body, LIMITS)``."""
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(wire.MalformedBody) as refused:
            wire.unpack(body, LIMITS)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, elapsed, str(refused.value)


@pytest.mark.parametrize("name", list(STRUCTURAL))
def test_structurally_hostile_bodies_allocate_nothing_beyond_the_body(name: str) -> None:
    """Refused from headers and lengths alone: a few KiB of bookkeeping, whatever the size."""
    body = STRUCTURAL[name]()
    peak, elapsed, error = peak_while_unpacking(body)
    print(
        f"{name:22s} {len(body):>10} bytes: peak {peak:>8} B, {elapsed * 1000:.1f} ms: {error[:60]}"
    )
    assert peak < 64 * 1024
    assert_no_leak(error)


@pytest.mark.parametrize("name", list(OBJECT_HEAVY))
def test_object_heavy_bodies_stop_at_the_object_budget(name: str) -> None:
    """The decoder refuses them once they hold more values than a request may carry."""
    body = OBJECT_HEAVY[name]()
    if name == "64-maps-of-4096-keys":  # 262k entries fit the budget: make it overflow
        body = many_keys(100)
    started = time.perf_counter()
    with pytest.raises(wire.MalformedBody, match="more values|arrays may not hold"):
        wire.unpack(body, LIMITS)
    print(f"{name}: {len(body)} bytes refused in {(time.perf_counter() - started) * 1000:.1f} ms")


def test_nested_array_bombs_allocate_at_most_twice_the_body() -> None:
    # Arrays may hold only scalars: a nested-array bomb is refused at its first inner array.
    body = tiny_values(levels=2, outer=4)
    tracemalloc.start()
    try:
        with pytest.raises(wire.MalformedBody):
            wire.unpack(body, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"tiny-values: {len(body)} bytes, peak {peak} B ({peak / len(body):.1f}x)")
    assert peak <= 2 * len(body) + 16 * 1024


def test_map_heavy_bodies_cost_at_most_the_object_budget() -> None:
    # Maps of many short keys build one Python object per value until the object budget
    # (max_objects) stops them: the growth is bounded by the budget, not by the body. At the
    # default limits that is ~66k values, a few MiB, whatever the body's size.
    body = many_keys(100)
    tracemalloc.start()
    try:
        with pytest.raises(wire.MalformedBody):
            wire.unpack(body, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"many-keys: {len(body)} bytes, peak {peak} B, budget {LIMITS.max_objects} values")
    assert peak <= LIMITS.max_objects * 160


def _json_create(items: bytes, count: int) -> bytes:
    return b'{"optimizer": "sgd", "weights": {"w": [' + b",".join([items] * count) + b"]}}"


@pytest.mark.parametrize("items", [b"[]", b"{}", b"[[]]"], ids=["lists", "objects", "nested"])
def test_a_json_body_of_empty_containers_is_refused_before_it_is_parsed(items: bytes) -> None:
    """16 MiB of ``[],`` would be about 360 MiB of Python lists once ``json.loads`` built them:
    the body's lists and objects are counted first, against the same budget as msgpack's."""
    from paramserver import messages

    body = _json_create(items, (16 * 1024 * 1024) // (len(items) + 1))
    tracemalloc.start()
    try:
        with pytest.raises(messages.MessageError, match="lists and objects") as refused:
            messages.decode_create(body, "json", LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code == "bad_request"
    assert peak < 64 * 1024 * 1024  # the body's one copy as bytes, nothing built from it


def test_a_json_body_within_the_budget_is_parsed_as_before() -> None:
    from paramserver import messages

    body = (
        b'{"optimizer": {"class_name": "SGD", "config": {"lr": 0.1}}, "weights": '
        b'{"w": {"dtype": "float32", "shape": [2, 2], "data": [1, 2, 3, 4]}}}'
    )
    message = messages.decode_create(body, "json", LIMITS)
    assert message.weights["w"].tolist() == [[1, 2], [3, 4]]
    crowded = _json_create(b"[]", LIMITS.max_objects)  # one more container: the outer map's
    with pytest.raises(messages.MessageError, match="lists and objects"):
        messages.decode_create(crowded, "json", LIMITS)
