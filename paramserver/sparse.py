"""Row-sparse tensors: the rows of an embedding table a batch touched, and nothing else.

On the wire a row-sparse gradient (or a row subset of weights) is a tensor map with indices::

    {"dtype": "float32", "shape": [1000000, 64], "indices": <bin, int64 little-endian>,
     "data": <bin, len(indices) rows of shape[1:]>}

:class:`Rows` is that value in memory: ``indices`` (int64, 1-D) and ``values`` (one row per
index), and ``shape``, the whole tensor's shape (a client may leave it to the session). A
gradient's duplicate indices are summed (as TensorFlow does when it densifies
``IndexedSlices``): :func:`combine` sums them, in the parameter's dtype and in the order they
come, into rows of sorted unique indices, so that a row-sparse push equals the dense push of
``np.add.at(zeros, indices, values)``. :func:`sum_squares` gives that dense tensor's sum of
squares bit for bit as :func:`paramserver.reductions.sum_squares` would (its lanes see the
untouched elements as zeros, which add nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .reductions import LANES

__all__ = ["Rows", "combine", "densify", "sum_squares"]


@dataclass(frozen=True, eq=False)
class Rows:
    """Rows ``indices`` of a tensor of ``shape`` (``None``: the session's parameter's), with
    their ``values`` (``len(indices)`` rows of ``shape[1:]``)."""

    indices: np.ndarray
    values: np.ndarray
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        indices = np.asarray(self.indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(f"Rows: indices must be a 1-D integer array, got {indices.dtype}")
        values = np.asarray(self.values)
        if values.ndim < 1 or values.shape[0] != indices.shape[0]:
            raise ValueError(
                f"Rows: values must hold one row per index ({indices.shape[0]}), got shape "
                f"{list(values.shape)}"
            )
        object.__setattr__(self, "indices", indices.astype(np.int64, copy=False))
        object.__setattr__(self, "values", values)
        if self.shape is not None:
            shape = tuple(int(d) for d in self.shape)
            if shape[1:] != tuple(values.shape[1:]):
                raise ValueError(
                    f"Rows: rows of shape {list(values.shape[1:])} do not fit a tensor of shape "
                    f"{list(shape)}"
                )
            object.__setattr__(self, "shape", shape)

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.indices.nbytes)

    def with_shape(self, shape: tuple[int, ...]) -> Rows:
        return self if self.shape == tuple(shape) else Rows(self.indices, self.values, shape)

    def dense(self) -> np.ndarray:
        """The whole tensor, zeros elsewhere, duplicates summed (``np.add.at``)."""
        if self.shape is None:
            raise ValueError("Rows.dense() needs the tensor's shape")
        return densify(self.indices, self.values, self.shape, self.values.dtype)

    def __repr__(self) -> str:
        return (
            f"Rows({self.indices.shape[0]} rows of {list(self.values.shape[1:])} "
            f"{self.values.dtype}, shape={None if self.shape is None else list(self.shape)})"
        )


def densify(
    indices: np.ndarray, values: np.ndarray, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """``np.add.at(zeros(shape, dtype), indices, values)``: the dense equivalent."""
    out = np.zeros(shape, dtype)
    np.add.at(out, indices, values.astype(dtype, copy=False))
    return out


def combine(
    indices: np.ndarray, values: np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique indices and their rows, duplicates summed in ``dtype`` in the order they
    come (each unique row starts at +0.0, as the dense zeros do)."""
    values = values.astype(dtype, copy=False)
    zero = np.dtype(dtype).type(0)
    if indices.size < 2 or (np.all(indices[1:] > indices[:-1])):
        # Already sorted and unique: nothing to sum, but a row's sum starts at +0.0, which
        # makes a -0.0 +0.0, as np.add.at onto zeros does (a new array: the caller's stays).
        return indices, values + zero
    order = np.argsort(indices, kind="stable")  # each index's rows in the order they came
    ordered = indices[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    counts = np.diff(np.append(starts, indices.size))
    group = np.repeat(np.arange(starts.size), counts)  # of each sorted position
    rank = np.arange(indices.size) - np.repeat(starts, counts)  # its place in its group
    rows = values.reshape(values.shape[0], math.prod(values.shape[1:]))
    summed = np.zeros((starts.size, rows.shape[1]), dtype)
    # Pass k adds every index's k-th row (at most one row per index: plain vector adds), so
    # each index's rows add one after the other in the order they came, from +0.0, as
    # np.add.at would, many times faster. Rows past the first _RANK_PASSES of an index (a
    # hostile push that repeats one index) go through np.add.at, in order, after them.
    passes = min(int(rank.max()) + 1, _RANK_PASSES)
    for k in range(passes):
        at = rank == k
        summed[group[at]] += rows[order[at]]
    rest = rank >= passes
    if rest.any():
        np.add.at(summed, group[rest], rows[order[rest]])
    return ordered[starts], summed.reshape(starts.size, *values.shape[1:])


#: Vector passes of :func:`combine` (an index's first rows); np.add.at adds the rest.
_RANK_PASSES = 16


#: Elements per block of :func:`sum_squares` (its positions and squares stay in cache).
_SUM_CHUNK = 1 << 16


def sum_squares(indices: np.ndarray, rows: np.ndarray, shape: tuple[int, ...]) -> float:
    """The float64 sum of squares of the dense tensor that sorted unique ``indices`` and their
    ``rows`` stand for, in :func:`paramserver.reductions.sum_squares`'s order: element ``k`` of
    the flat tensor goes to lane ``k % 64`` and each lane adds in order (the zeros in between
    add nothing to a sum that is >= 0), the lanes combine pairwise, then the elements past the
    last full row of 64 are added in order. A block of rows at a time: memory stays bounded."""
    size = math.prod(shape)
    width = math.prod(shape[1:])
    if not indices.size or not width:
        return 0.0
    body = size - size % LANES
    flat_rows = rows.reshape(indices.shape[0], width)
    per = max(1, _SUM_CHUNK // width)
    offsets = np.arange(width)
    acc = np.zeros(LANES, np.float64)
    tail: list[float] = []
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, indices.shape[0], per):
            positions = (indices[start : start + per, None] * width + offsets).reshape(-1)
            squares = flat_rows[start : start + per].reshape(-1).astype(np.float64)
            np.multiply(squares, squares, out=squares)
            inside = positions < body
            np.add.at(acc, positions[inside] % LANES, squares[inside])  # in order, by lane
            tail.extend(float(x) for x in squares[~inside])
        width_ = LANES
        while width_ > 1:
            width_ //= 2
            acc[:width_] += acc[width_ : 2 * width_]
        total = float(acc[0])
        for x in tail:
            total += x
    return total
