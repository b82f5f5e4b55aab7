"""Keras 2.2.4's weight constraints, computed as ``keras/constraints.py`` does: numpy in, numpy
out.

Each function takes a parameter's new value (after the optimizer's step, as Keras's update
passes ``new_p`` to ``p.constraint``) and returns the constrained value, computed with the
operations of Keras 2.2.4's TensorFlow backend in the parameter's dtype: ``K.square``, a
``K.sum`` over ``axis`` with ``keepdims``, ``K.sqrt`` (which clips at 0 first), ``K.clip``
(``maximum(minimum(x, max), min)``, ``max`` raised to ``min`` when below it), Python numbers
(``K.epsilon()`` = 1e-7, ``rate``, ``1 - rate``) rounded to the dtype as
``tf.convert_to_tensor`` rounds them. The results equal the vendored Keras 2.2.4 source run on
the numpy graph backend bit for bit (``tests/server/optim/test_constraint_parity.py``).
``NonNeg`` multiplies by its mask in the parameter's dtype (Keras casts the mask to floatx,
float32, which cannot multiply a float64 variable there).
"""

from __future__ import annotations

import numpy as np

from paramserver.constraints import Constraint, MaxNorm, MinMaxNorm, NonNeg, UnitNorm

__all__ = ["constrained"]

_EPSILON = 1e-7  # K.epsilon()


def _norms(w: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``K.sqrt(K.sum(K.square(w), axis=axes, keepdims=True))``."""
    total = np.sum(np.square(w), axis=axes, keepdims=True, dtype=w.dtype)
    dt = w.dtype.type
    return np.sqrt(np.maximum(np.minimum(total, dt(np.inf)), dt(0.0)))


def _clip(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``K.clip(x, low, high)``."""
    if high < low:
        high = low
    dt = x.dtype.type
    return np.maximum(np.minimum(x, dt(high)), dt(low))


def constrained(constraint: Constraint, w: np.ndarray) -> np.ndarray:
    """``constraint(w)`` as Keras 2.2.4 computes it, in ``w``'s dtype (a new array)."""
    dt = w.dtype.type
    if isinstance(constraint, NonNeg):
        return np.multiply(w, np.greater_equal(w, dt(0.0)).astype(w.dtype))
    norms = _norms(w, constraint.axes)
    eps = dt(_EPSILON)
    if isinstance(constraint, UnitNorm):
        return np.divide(w, eps + norms)
    if isinstance(constraint, MaxNorm):
        desired = _clip(norms, 0, constraint.max_value)
    elif isinstance(constraint, MinMaxNorm):
        rate = constraint.rate
        desired = (
            dt(rate) * _clip(norms, constraint.min_value, constraint.max_value)
            + dt(1 - rate) * norms
        )
    else:  # pragma: no cover - paramserver.constraints has no other class
        raise TypeError(f"unknown constraint {constraint!r}")
    return np.multiply(w, desired / (eps + norms))
