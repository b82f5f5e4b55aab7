"""The update rules of the seven Keras 2.2.4 optimizers, written out as Keras writes them.

Each rule is two pure pieces:

* ``coefficients(config, iterations, scalars, dtype)``: the per-step scalars (decayed lr, bias
  corrections, Nadam's momentum cache) computed exactly as Keras's TensorFlow graph computes
  them: hyperparameters that Keras keeps as ``K.variable`` are rounded to the compute dtype
  first and every operation rounds to it; hyperparameters Keras keeps as Python floats
  (``epsilon``, Adadelta's ``rho``, Nadam's ``schedule_decay``) are combined in float64 and
  rounded where TensorFlow would convert them.
* ``numpy_kernel(p, g, slots, coeffs, scratch)``: the elementwise update, in place, over 1-D
  contiguous arrays of one dtype, with the same operations in the same order as Keras, so that
  every element rounds the same way. The fused numba kernels
  (``paramserver.server.optim.numba_kernels``) follow the same order and give bit-identical results.

Keras reads ``iterations`` before its own increment lands, so ``iterations`` here is the count
of steps already applied; ``t = iterations + 1`` is the step being taken.

Every rule but Nadam computes its coefficients from its config and ``iterations`` alone
(``UpdateRule.iterations_only``). Those functions also take ``iterations`` as an int64 array
and then return arrays for the coefficients that change from step to step: numpy rounds each
element of an elementwise add, subtract, multiply, divide or square root as it rounds the same
operation on scalars (IEEE operations), so a :class:`CoefficientSchedule` computes many steps'
coefficients in one call, bit for bit those of one step at a time (tested for every such rule
and dtype). ``pow`` is the exception: numpy's power of two scalars and its power loop over
arrays are different approximations (an ulp apart in a few tenths of a percent of cases with
numpy 2.4), so :func:`_power` takes the scalar one element by element. Taken 32 steps at a
time, in one loop, a step's share costs a fraction of its dozen numpy scalar operations, which
cost more than the whole kernel of a small model when they run between a request's parsing
and its answer (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Coefficients = tuple[Any, ...]
#: A step's iteration count, or (for a :class:`CoefficientSchedule`) an int64 array of them.
Iterations = int | np.ndarray
Kernel = Callable[[np.ndarray, np.ndarray, tuple[np.ndarray, ...], Coefficients, "Scratch"], None]
CoefficientFn = Callable[
    [Mapping[str, Any], Iterations, Mapping[str, Any], np.dtype],
    tuple[Coefficients, dict[str, Any]],
]


@dataclass
class Scratch:
    """Two fixed-size work buffers for the chunked numpy kernels (sized by the engine)."""

    a: np.ndarray
    b: np.ndarray


def _power(base: Any, exponent: Any) -> Any:
    """``np.power(base, exponent)`` of numpy scalars; of an array of exponents, the same scalar
    power of each (numpy's power loop over arrays may differ from it by an ulp)."""
    if isinstance(exponent, np.ndarray):
        return np.array([np.power(base, e) for e in exponent], dtype=exponent.dtype)
    return np.power(base, exponent)


def _decayed_lr(config: Mapping[str, Any], iterations: Iterations, dt: Any) -> Any:
    """``lr * (1 / (1 + decay * iterations))`` in the compute dtype, as Keras 2.2.4 does."""
    lr = dt(config["lr"])
    if config.get("decay", 0.0) > 0:
        one = dt(1.0)
        lr = lr * (one / (one + dt(config["decay"]) * dt(iterations)))
    return lr


# --- SGD -----------------------------------------------------------------------------------


def sgd_coefficients(
    config: Mapping[str, Any], iterations: Iterations, scalars: Mapping[str, Any], dtype: np.dtype
) -> tuple[Coefficients, dict[str, Any]]:
    dt = dtype.type
    return (dt(config["momentum"]), _decayed_lr(config, iterations, dt), config["nesterov"]), {}


def sgd_kernel(
    p: np.ndarray,
    g: np.ndarray,
    slots: tuple[np.ndarray, ...],
    coeffs: Coefficients,
    scratch: Scratch,
) -> None:
    (m,) = slots
    momentum, lr, nesterov = coeffs
    lrg = np.multiply(g, lr, out=scratch.a)
    # v = momentum * m - lr * g, stored into m
    np.multiply(m, momentum, out=m)
    np.subtract(m, lrg, out=m)
    if nesterov:
        # p = (p + momentum * v) - lr * g
        mv = np.multiply(m, momentum, out=scratch.b)
        np.add(p, mv, out=p)
        np.subtract(p, lrg, out=p)
    else:
        np.add(p, m, out=p)


# --- RMSprop -------------------------------------------------------------------------------


def rmsprop_coefficients(
    config: Mapping[str, Any], iterations: Iterations, scalars: Mapping[str, Any], dtype: np.dtype
) -> tuple[Coefficients, dict[str, Any]]:
    dt = dtype.type
    rho = dt(config["rho"])
    return (rho, dt(1.0) - rho, _decayed_lr(config, iterations, dt), dt(config["epsilon"])), {}


def rmsprop_kernel(
    p: np.ndarray,
    g: np.ndarray,
    slots: tuple[np.ndarray, ...],
    coeffs: Coefficients,
    scratch: Scratch,
) -> None:
    (a,) = slots
    rho, one_minus_rho, lr, eps = coeffs
    s = scratch.a
    # new_a = rho * a + (1 - rho) * g^2
    np.multiply(a, rho, out=a)
    np.multiply(g, g, out=s)
    np.multiply(s, one_minus_rho, out=s)
    np.add(a, s, out=a)
    # p = p - (lr * g) / (sqrt(new_a) + eps)
    _apply_scaled_quotient(p, g, lr, a, eps, scratch)


def _apply_scaled_quotient(
    p: np.ndarray,
    numerator: np.ndarray,
    scale: Any,
    denominator_sq: np.ndarray,
    eps: Any,
    scratch: Scratch,
) -> None:
    """``p -= (scale * numerator) / (sqrt(denominator_sq) + eps)``, Keras's rounding order."""
    den = np.sqrt(denominator_sq, out=scratch.a)
    np.add(den, eps, out=den)
    num = np.multiply(numerator, scale, out=scratch.b)
    np.divide(num, den, out=num)
    np.subtract(p, num, out=p)


# --- Adagrad -------------------------------------------------------------------------------


def adagrad_coefficients(
    config: Mapping[str, Any], iterations: Iterations, scalars: Mapping[str, Any], dtype: np.dtype
) -> tuple[Coefficients, dict[str, Any]]:
    dt = dtype.type
    return (_decayed_lr(config, iterations, dt), dt(config["epsilon"])), {}


def adagrad_kernel(
    p: np.ndarray,
    g: np.ndarray,
    slots: tuple[np.ndarray, ...],
    coeffs: Coefficients,
    scratch: Scratch,
) -> None:
    (a,) = slots
    lr, eps = coeffs
    s = np.multiply(g, g, out=scratch.a)
    np.add(a, s, out=a)
    _apply_scaled_quotient(p, g, lr, a, eps, scratch)


# --- Adadelta ------------------------------------------------------------------------------


def adadelta_coefficients(
    config: Mapping[str, Any], iterations: Iterations, scalars: Mapping[str, Any], dtype: np.dtype
) -> tuple[Coefficients, dict[str, Any]]:
    dt = dtype.type
    # Keras keeps Adadelta's rho as a Python float: (1 - rho) is taken in float64, then rounded.
    rho = config["rho"]
    return (
        dt(rho),
        dt(1.0 - rho),
        _decayed_lr(config, iterations, dt),
        dt(config["epsilon"]),
    ), {}


def adadelta_kernel(
    p: np.ndarray,
    g: np.ndarray,
    slots: tuple[np.ndarray, ...],
    coeffs: Coefficients,
    scratch: Scratch,
) -> None:
    a, d_a = slots
    rho, one_minus_rho, lr, eps = coeffs
    s, u = scratch.a, scratch.b
    # new_a = rho * a + (1 - rho) * g^2
    np.multiply(a, rho, out=a)
    np.multiply(g, g, out=s)
    np.multiply(s, one_minus_rho, out=s)
    np.add(a, s, out=a)
    # update = g * sqrt(d_a + eps) / sqrt(new_a + eps)
    np.add(d_a, eps, out=u)
    np.sqrt(u, out=u)
    np.multiply(g, u, out=u)
    np.add(a, eps, out=s)
    np.sqrt(s, out=s)
    np.divide(u, s, out=u)
    # p = p - lr * update
    np.multiply(u, lr, out=s)
    np.subtract(p, s, out=p)
    # new_d_a = rho * d_a + (1 - rho) * update^2
    np.multiply(d_a, rho, out=d_a)
    np.multiply(u, u, out=u)
    np.multiply(u, one_minus_rho, out=u)
    np.add(d_a, u, out=d_a)


# --- Adam ----------------------------------------------------------------------------------


def adam_coefficients(
    config: Mapping[str, Any], iterations: Iterations, scalars: Mapping[str, Any], dtype: np.dtype
) -> tuple[Coefficients, dict[str, Any]]:
    dt = dtype.type
    one = dt(1.0)
    lr = _decayed_lr(config, iterations, dt)
    t = dt(iterations) + one
    beta_1, beta_2 = dt(config["beta_1"]), dt(config["beta_2"])
    lr_t = lr * (np.sqrt(one - _power(beta_2, t)) / (one - _power(beta_1, t)))
    return (
        beta_1,
        one - beta_1,
        beta_2,
        one - beta_2,
        dt(lr_t),
        dt(config["epsilon"]),
        config["amsgrad"],
    ), {}


def adam_kernel(
    p: np.ndarray,
    g: np.ndarray,
    slots: tuple[np.ndarray, ...],
    coeffs: Coefficients,
    scratch: Scratch,
) -> None:
    beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, lr_t, eps, amsgrad = coeffs
    m, v = slots[0], slots[1]
    _update_moments(m, v, g, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, scratch)
    if amsgrad:
        vhat = slots[2]
        np.maximum(vhat, v, out=vhat)
        _apply_scaled_quotient(p, m, lr_t, vhat, eps, scratch)
    else:
        _apply_scaled_quotient(p, m, lr_t, v, eps, scratch)


def _update_moments(
    m: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    beta_1: Any,
    one_minus_beta_1: Any,
    beta_2: Any,
    one_minus_beta_2: Any,
    scratch: Scratch,
) -> None:
    """``m = b1*m + (1-b1)*g`` and ``v = b2*v + (1-b2)*g^2`` in Keras's rounding order."""
    s = scratch.a
    np.multiply(m, beta_1, out=m)
    np.multiply(g, one_minus_beta_1, out=s)
    np.add(m, s, out=m)
    np.multiply(v, beta_2, out=v)
    np.multiply(g, g, out=s)
    np.multiply(s, one_minus_beta_2, out=s)
    np.add(v, s, out=v)


# --- Adamax --------------------------------------------------------------------------------


def adamax_coefficients(
    config: Mapping[str, Any], iterations: Iterations, scalars: Mapping[str, Any], dtype: np.dtype
) -> tuple[Coefficients, dict[str, Any]]:
    dt = dtype.type
    one = dt(1.0)
    lr = _decayed_lr(config, iterations, dt)
    t = dt(iterations) + one
    beta_1, beta_2 = dt(config["beta_1"]), dt(config["beta_2"])
    lr_t = lr / (one - _power(beta_1, t))
    return (beta_1, one - beta_1, beta_2, dt(lr_t), dt(config["epsilon"])), {}


def adamax_kernel(
    p: np.ndarray,
    g: np.ndarray,
    slots: tuple[np.ndarray, ...],
    coeffs: Coefficients,
    scratch: Scratch,
) -> None:
    m, u = slots
    beta_1, one_minus_beta_1, beta_2, lr_t, eps = coeffs
    s = scratch.a
    np.multiply(m, beta_1, out=m)
    np.multiply(g, one_minus_beta_1, out=s)
    np.add(m, s, out=m)
    # u = max(beta_2 * u, |g|)
    np.multiply(u, beta_2, out=u)
    np.abs(g, out=s)
    np.maximum(u, s, out=u)
    # p = p - (lr_t * m) / (u + eps)
    den = np.add(u, eps, out=scratch.a)
    num = np.multiply(m, lr_t, out=scratch.b)
    np.divide(num, den, out=num)
    np.subtract(p, num, out=p)


# --- Nadam ---------------------------------------------------------------------------------


def nadam_coefficients(
    config: Mapping[str, Any], iterations: Iterations, scalars: Mapping[str, Any], dtype: np.dtype
) -> tuple[Coefficients, dict[str, Any]]:
    dt = dtype.type
    one, half = dt(1.0), dt(0.5)
    t = dt(iterations) + one
    decay = dt(config["schedule_decay"])
    beta_1, beta_2 = dt(config["beta_1"]), dt(config["beta_2"])
    c096 = dt(0.96)
    cache_t = beta_1 * (one - half * np.power(c096, t * decay))
    cache_t_1 = beta_1 * (one - half * np.power(c096, (t + one) * decay))
    m_schedule = dt(scalars["m_schedule"])
    m_schedule_new = m_schedule * cache_t
    m_schedule_next = m_schedule * cache_t * cache_t_1
    coeffs = (
        dt(one - m_schedule_new),  # g_prime = g / (1 - m_schedule_new)
        beta_1,
        one - beta_1,
        dt(one - m_schedule_next),  # m_t_prime = m_t / (1 - m_schedule_next)
        beta_2,
        one - beta_2,
        dt(one - np.power(beta_2, t)),  # v_t_prime = v_t / (1 - beta_2^t)
        dt(one - cache_t),
        dt(cache_t_1),
        dt(config["lr"]),
        dt(config["epsilon"]),
    )
    return coeffs, {"m_schedule": dt(m_schedule_new)}


def nadam_kernel(
    p: np.ndarray,
    g: np.ndarray,
    slots: tuple[np.ndarray, ...],
    coeffs: Coefficients,
    scratch: Scratch,
) -> None:
    m, v = slots
    (
        g_div,
        beta_1,
        one_minus_beta_1,
        m_div,
        beta_2,
        one_minus_beta_2,
        v_div,
        one_minus_cache_t,
        cache_t_1,
        lr,
        eps,
    ) = coeffs
    a, b = scratch.a, scratch.b
    _update_moments(m, v, g, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, scratch)
    # m_t_bar = (1 - cache_t) * (g / g_div) + cache_t_1 * (m_t / m_div)
    np.divide(g, g_div, out=a)
    np.multiply(a, one_minus_cache_t, out=a)
    np.divide(m, m_div, out=b)
    np.multiply(b, cache_t_1, out=b)
    np.add(a, b, out=a)
    # p = p - (lr * m_t_bar) / (sqrt(v_t / v_div) + eps)
    np.multiply(a, lr, out=a)
    np.divide(v, v_div, out=b)
    np.sqrt(b, out=b)
    np.add(b, eps, out=b)
    np.divide(a, b, out=a)
    np.subtract(p, a, out=p)


# --- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer's update: its slot names, scalar state, coefficients and numpy kernel."""

    name: str
    slots: Callable[[Mapping[str, Any]], tuple[str, ...]]
    coefficients: CoefficientFn
    numpy_kernel: Kernel
    initial_scalars: dict[str, float] = field(default_factory=dict)
    #: Its coefficients depend on the config and the iteration count alone (no scalar state):
    #: a :class:`CoefficientSchedule` may compute them for many steps at once.
    iterations_only: bool = True


class CoefficientSchedule:
    """The coefficients of an ``iterations_only`` rule for the steps ``[first, stop)``,
    computed by one call of its coefficient function over an int64 array of iteration counts
    (the module docstring says why that is exact). :meth:`at` gives one step's tuple, as the
    function gives it for that step alone: the same values of the same numpy scalar types."""

    __slots__ = ("first", "stop", "_constants", "_varying")

    def __init__(
        self,
        rule: UpdateRule,
        config: Mapping[str, Any],
        first: int,
        count: int,
        dtype: np.dtype,
    ) -> None:
        if not rule.iterations_only:
            raise ValueError(f"{rule.name}'s coefficients depend on its scalar state")
        # Steps past the last one a session can take are computed but never asked for; a
        # float16 count beyond 65504 is inf in both ways of computing: no warning either way.
        with np.errstate(all="ignore"):
            coeffs, new_scalars = rule.coefficients(
                config, np.arange(first, first + count, dtype=np.int64), {}, dtype
            )
        if new_scalars:
            raise ValueError(f"{rule.name} returned scalar state; it is not iterations_only")
        self.first, self.stop = first, first + count
        self._constants = list(coeffs)
        self._varying = [(i, c) for i, c in enumerate(coeffs) if isinstance(c, np.ndarray)]

    def covers(self, iterations: int) -> bool:
        return self.first <= iterations < self.stop

    def at(self, iterations: int) -> Coefficients:
        """The coefficients of the step taken at ``iterations`` (one :meth:`covers`)."""
        k = iterations - self.first
        values = self._constants.copy()
        for i, column in self._varying:
            values[i] = column[k]
        return tuple(values)


RULES: dict[str, UpdateRule] = {
    "SGD": UpdateRule("SGD", lambda c: ("moment",), sgd_coefficients, sgd_kernel),
    "RMSprop": UpdateRule(
        "RMSprop", lambda c: ("accumulator",), rmsprop_coefficients, rmsprop_kernel
    ),
    "Adagrad": UpdateRule(
        "Adagrad", lambda c: ("accumulator",), adagrad_coefficients, adagrad_kernel
    ),
    "Adadelta": UpdateRule(
        "Adadelta",
        lambda c: ("accumulator", "delta_accumulator"),
        adadelta_coefficients,
        adadelta_kernel,
    ),
    "Adam": UpdateRule(
        "Adam",
        lambda c: ("m", "v", "vhat") if c["amsgrad"] else ("m", "v"),
        adam_coefficients,
        adam_kernel,
    ),
    "Adamax": UpdateRule("Adamax", lambda c: ("m", "u"), adamax_coefficients, adamax_kernel),
    "Nadam": UpdateRule(
        "Nadam",
        lambda c: ("m", "v"),
        nadam_coefficients,
        nadam_kernel,
        {"m_schedule": 1.0},
        iterations_only=False,
    ),
}
