"""The per-session caches of paramserver.messages that spare each push the parse of its body
(PushLayouts) and the packing of its answer (WeightsAnswers): the same results as the functions
they stand in for, for every body and every set of weights, and never a guess."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from paramserver import messages, wire
from paramserver.messages import MessageError, PushLayouts, WeightsAnswers

LIMITS = wire.DecodeLimits()
BF16 = ml_dtypes.bfloat16


def _grads(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "h": rng.standard_normal(5).astype(np.float16),
    }


def _same(a: messages.PushMessage, b: messages.PushMessage) -> None:
    assert list(a.gradients) == list(b.gradients)
    for name, array in a.gradients.items():
        other = b.gradients[name]
        assert array.dtype == other.dtype and array.shape == other.shape
        assert np.array_equal(array, other)
    assert (a.base_iterations, a.sum_squares, a.round_order, a.metrics, a.returns) == (
        b.base_iterations,
        b.sum_squares,
        b.round_order,
        b.metrics,
        b.returns,
    )


def _no_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("decoded in full")

    monkeypatch.setattr(messages, "decode_push_message", refuse)


def test_a_push_of_the_kept_layout_is_viewed_in_its_body_without_a_parse(monkeypatch):
    layouts = PushLayouts()
    first = bytearray(messages.encode_push(_grads(0)))
    _same(layouts.decode(first, LIMITS), messages.decode_push_message(first, LIMITS))
    second = bytearray(messages.encode_push(_grads(1)))
    expected = messages.decode_push_message(second, LIMITS)
    _no_full_decode(monkeypatch)
    got = layouts.decode(second, LIMITS)
    _same(got, expected)
    for array in got.gradients.values():
        assert np.shares_memory(array, np.frombuffer(second, np.uint8))  # views, as in full
    assert got.gradients["w"].dtype == np.float32 and got.gradients["h"].dtype == np.float16


@pytest.mark.parametrize(
    "other",
    [
        {"v": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32), "h": np.ones(5, "f2")},
        {"w": np.ones((4, 3), np.float32), "b": np.ones(4, np.float32), "h": np.ones(5, "f2")},
        {"w": np.ones((3, 2), np.float64), "b": np.ones(4, np.float32), "h": np.ones(5, "f2")},
        {"b": np.ones(4, np.float32), "w": np.ones((3, 4), np.float32), "h": np.ones(5, "f2")},
        {"w": np.ones((3, 4), ">f4"), "b": np.ones(4, np.float32), "h": np.ones(5, "f2")},
    ],
    ids=["another name", "another shape", "another dtype", "another order", "big-endian"],
)
def test_a_body_of_the_same_size_but_another_layout_is_decoded_in_full(other):
    layouts = PushLayouts()
    layouts.decode(bytearray(messages.encode_push(_grads())), LIMITS)
    body = bytearray(messages.encode_push(other))
    assert len(body) == len(messages.encode_push(_grads()))  # the size alone does not tell
    _same(layouts.decode(body, LIMITS), messages.decode_push_message(body, LIMITS))
    again = bytearray(messages.encode_push(other))
    _same(layouts.decode(again, LIMITS), messages.decode_push_message(again, LIMITS))


def test_a_body_that_is_not_plain_is_decoded_in_full_and_its_layout_not_kept(monkeypatch):
    layouts = PushLayouts()
    for body in (
        messages.encode_push(_grads(), base_iterations=7),
        messages.encode_push(_grads(), sum_squares=2.5),
        messages.encode_push(_grads(), metrics={"loss": 0.5}),
        messages.encode_push(_grads(), returns={"w": None}),
        messages.encode_push({"w": np.ones(0, np.float32)}),
    ):
        body = bytearray(body)
        _same(layouts.decode(body, LIMITS), messages.decode_push_message(body, LIMITS))
        assert layouts._layout is None
    plain = bytearray(messages.encode_push(_grads(3)))
    layouts.decode(plain, LIMITS)
    with_base = bytearray(messages.encode_push(_grads(3), base_iterations=7))
    assert layouts.decode(with_base, LIMITS).base_iterations == 7


def test_a_damaged_body_of_the_kept_size_is_refused_as_the_full_decode_refuses_it():
    layouts = PushLayouts()
    good = bytearray(messages.encode_push(_grads()))
    layouts.decode(good, LIMITS)
    kept = layouts._layout
    for at in range(len(good)):
        if any(start <= at < start + len(piece) for start, piece in kept.pieces):
            bad = bytearray(good)
            bad[at] ^= 0xFF
            try:
                expected = messages.decode_push_message(bytearray(bad), LIMITS)
            except MessageError as exc:
                with pytest.raises(MessageError) as got:
                    layouts.decode(bad, LIMITS)
                assert (got.value.code, got.value.message) == (exc.code, exc.message)
            else:
                _same(layouts.decode(bad, LIMITS), expected)
            layouts.decode(good, LIMITS)  # the kept layout is the good body's again
    assert layouts._layout == kept


def test_other_limits_are_never_answered_from_a_layout_kept_under_others():
    layouts = PushLayouts()
    body = bytearray(messages.encode_push(_grads()))
    layouts.decode(body, LIMITS)
    with pytest.raises(MessageError, match="at most 2"):
        layouts.decode(body, wire.DecodeLimits(max_tensors=2))


def test_a_layout_with_too_much_outside_the_data_is_not_kept():
    names = {f"{'n' * 200}{i}": np.ones(1, np.float32) for i in range(400)}
    body = bytearray(messages.encode_push(names))
    layouts = PushLayouts()
    _same(layouts.decode(body, LIMITS), messages.decode_push_message(body, LIMITS))
    assert layouts._layout is None


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "dense/kernel": rng.standard_normal((3, 4)).astype(np.float32),
        "dense/bias": rng.standard_normal(4).astype(np.float64),
        "h": rng.standard_normal(2).astype(np.float16),
    }


@pytest.mark.parametrize("iterations", [0, 1, 127, 128, 255, 65_536, 2**32, 2**40, 2**63 - 1])
def test_a_kept_answer_is_byte_for_byte_the_packed_answer(iterations):
    answers = WeightsAnswers()
    for seed in range(3):
        weights = _weights(seed)
        assert answers.encode(iterations + seed, weights) == messages.encode_weights(
            iterations + seed, weights
        )
    assert answers._layout is not None


@pytest.mark.parametrize(
    "other",
    [
        {"dense/kernel": np.ones((4, 3), np.float32), "dense/bias": np.ones(4), "h": np.ones(2)},
        {"dense/kernel": np.ones((3, 4), np.float64), "dense/bias": np.ones(4), "h": np.ones(2)},
        {"dense/kernel": np.ones((3, 4), np.float32)},
        {"renamed": np.ones((3, 4), np.float32), "dense/bias": np.ones(4), "h": np.ones(2)},
        {"dense/kernel": np.ones((4, 3), np.float32).T, "dense/bias": np.ones(4), "h": np.ones(2)},
        {"dense/kernel": np.ones((3, 4), ">f4"), "dense/bias": np.ones(4), "h": np.ones(2)},
        {"dense/kernel": np.ones((3, 4), BF16), "dense/bias": np.ones(4), "h": np.ones(2)},
        {"dense/kernel": np.ones((0, 4), np.float32), "dense/bias": np.ones(4), "h": np.ones(2)},
        {},
    ],
    ids=[
        "shape",
        "dtype",
        "fewer",
        "name",
        "not contiguous",
        "big-endian",
        "bfloat16",
        "empty",
        "none",
    ],
)
def test_weights_of_another_layout_are_packed_in_full(other):
    answers = WeightsAnswers()
    answers.encode(3, _weights(0))
    for _ in range(2):  # once against the old layout, once against whatever it keeps now
        assert answers.encode(4, other) == messages.encode_weights(4, other)
    assert answers.encode(5, _weights(1)) == messages.encode_weights(5, _weights(1))


def test_an_iteration_count_that_is_not_a_plain_int_is_packed_in_full():
    answers = WeightsAnswers()
    answers.encode(1, _weights(0))
    count = np.int64(9)
    assert answers.encode(count, _weights(1)) == messages.encode_weights(count, _weights(1))
    assert wire.unpack(answers.encode(2, _weights(1)))["iterations"] == 2
