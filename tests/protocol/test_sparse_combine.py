"""``paramserver.sparse.combine`` and ``sum_squares`` in process: duplicates summed exactly as
``np.add.at`` sums them (in order, from +0.0, in the parameter's dtype), bit for bit, for every
dtype and row shape, with signed zeros, infinities, NaNs and an index repeated far more often
than the vector passes cover; the rows' sum of squares equals the dense tensor's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from paramserver import reductions
from paramserver.sparse import combine, densify, sum_squares

ROW_SHAPES = [(), (1,), (3,), (64,), (2, 5), (0,)]
DTYPES = [np.float16, np.float32, np.float64]


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _reference(indices: np.ndarray, values: np.ndarray, dtype: np.dtype):  # type: ignore[no-untyped-def]
    unique = np.unique(indices)
    summed = np.zeros((unique.size, *values.shape[1:]), dtype)
    with np.errstate(all="ignore"):
        np.add.at(summed, np.searchsorted(unique, indices), values.astype(dtype))
    return unique, summed


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("row_shape", ROW_SHAPES, ids=str)
def test_combine_sums_duplicates_as_add_at(row_shape: tuple[int, ...], dtype: type) -> None:
    dt = np.dtype(dtype)
    rng = np.random.default_rng(abs(hash((row_shape, dt.name))) % 2**32)
    for trial in range(12):
        n = int(rng.integers(2, 2500))
        indices = rng.integers(0, max(2, n // int(rng.integers(1, 40))), n)
        scale = 10.0 ** rng.uniform(-6, 6 if dt.itemsize > 2 else 3, (n, *row_shape))
        with np.errstate(over="ignore"):
            values = (rng.standard_normal((n, *row_shape)) * scale).astype(dt)
        if trial % 3 == 0:
            values[rng.random(values.shape) < 0.3] = -0.0
        if trial == 4:
            values[:] = -0.0  # every row -0.0: the sum from +0.0 is +0.0
        if trial == 5:
            values[rng.random(values.shape) < 0.01] = np.inf
            values[rng.random(values.shape) < 0.01] = -np.inf
        if trial == 6:
            indices[: n // 2] = 7  # one index repeated past the vector passes
        with np.errstate(over="ignore", invalid="ignore"):  # inf - inf is a result here
            got_idx, got = combine(indices, values, dt)
        want_idx, want = _reference(indices, values, dt)
        assert np.array_equal(got_idx, want_idx)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _bits(got) == _bits(want), f"trial {trial}"


def test_combine_of_sorted_unique_rows_sums_from_plus_zero() -> None:
    """Nothing to sum, but each row starts at +0.0 as np.add.at onto zeros: a -0.0 becomes
    +0.0; the caller's array is left as it is."""
    values = np.array([[1.5, -0.0], [-0.0, 2.0], [3.0, 0.0]], np.float32)
    idx = np.array([1, 5, 9])
    got_idx, got = combine(idx, values, np.dtype(np.float32))
    _, want = _reference(idx, values, np.dtype(np.float32))
    assert got_idx is idx and _bits(got) == _bits(want)
    assert not np.signbit(got).any() and np.signbit(values).sum() == 2


def test_combine_casts_to_the_parameter_dtype_first() -> None:
    """float64 rows for a float32 parameter sum in float32, as the dense equivalent would.

    In float32, 1e8 + 3 rounds back to 1e8 (float32's spacing there is 8), twice; summed in
    float64 first, 1e8 + 6 would round to 100000008 when cast."""
    values = np.array([[1e8], [3.0], [3.0]], np.float64)
    _, got = combine(np.array([2, 2, 2]), values, np.dtype(np.float32))
    dense = densify(np.array([2, 2, 2]), values, (3, 1), np.dtype(np.float32))
    assert np.float32(values.sum()) == np.float32(100000008)  # what a float64 sum would give
    assert got.dtype == np.float32 and got[0, 0] == dense[2, 0] == np.float32(1e8)


@pytest.mark.parametrize("shape", [(1000,), (977, 3), (129, 100), (5, 7, 11), (65, 1), (3, 0)])
def test_sum_squares_of_rows_is_the_dense_tensors(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape) * 1000 + shape[0])
    width = math.prod(shape[1:])
    for take in (1, shape[0] // 4 or 1, shape[0]):
        index = np.sort(rng.choice(shape[0], take, replace=False))
        rows = rng.standard_normal((take, width)).astype(np.float32)
        dense = np.zeros((shape[0], width), np.float32)
        dense[index] = rows
        assert sum_squares(index, rows, shape) == reductions.sum_squares(dense)
