"""The sum of squares that ``clipnorm`` clips with, computed the same way everywhere.

Keras 2.2's ``clipnorm`` scales a step's gradients by ``clipnorm / norm`` when the global norm
of all of them reaches it. The server sums the squares in float64 in one fixed order: per
tensor, 64 lanes (lane ``j`` adds elements ``j, j + 64, ...`` in order), the lanes combined
pairwise (``acc[:w] += acc[w:2w]`` for ``w`` = 32, 16, ..., 1), then the elements past the last
full row of 64 added in order; a push's total adds its tensors' sums in the session's
parameter order. The fused numba kernel (``paramserver.server.optim.numba_kernels``) and this
numpy version give the same bits (tested against each other), so a party without numba (the
numpy backend, a client that must send the sum of a push split over several servers) gets
the server's exact value.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["LANES", "push_sum_squares", "sum_squares"]

#: Independent partial sums (the numba kernel's vector lanes).
LANES = 64
_CHUNK_ROWS = 512  # rows of 64 per pass: 256 KiB of float64, in cache


def sum_squares(g: np.ndarray) -> float:
    """``sum(g * g)`` of one tensor in float64, in the order the module docstring gives."""
    flat = np.ascontiguousarray(g).reshape(-1)
    n = flat.size
    body = n - n % LANES
    acc = np.zeros(LANES, np.float64)
    rows = flat[:body].reshape(-1, LANES)
    buf = np.empty((min(_CHUNK_ROWS, rows.shape[0]) + 1, LANES), np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN is the answer, not an error
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            part = rows[start : start + _CHUNK_ROWS]
            block = buf[: part.shape[0] + 1]
            block[0] = acc  # the running lane sums first: each lane adds its rows in order
            np.copyto(block[1:], part, casting="unsafe")
            np.multiply(block[1:], block[1:], out=block[1:])
            np.add.reduce(block, axis=0, out=acc)
        width = LANES
        while width > 1:
            width //= 2
            acc[:width] += acc[width : 2 * width]
        total = float(acc[0])
        for x in flat[body:].astype(np.float64):
            total += float(x) * float(x)
    return total


def push_sum_squares(grads: Iterable[np.ndarray]) -> float:
    """The sum over a push's tensors (each already in its parameter's dtype), added in the
    order given: the session's parameter order."""
    total = 0.0
    for g in grads:
        total += sum_squares(g)
    return total
