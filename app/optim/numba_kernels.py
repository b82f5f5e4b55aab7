"""Fused numba kernels for the Keras 2.2.4 update rules: one pass over memory per step.

:class:`NumbaBackend` runs each rule of :mod:`paramserver.server.optim.rules` as one loop that reads
every array once and writes each updated array once, where the chunked numpy kernel makes several
passes through scratch buffers. The gradient transform (clipnorm's scale, clipvalue's clip) is fused
into the same loop.

Exactness: each kernel performs the same IEEE operations, in the same order and in the array's
dtype, as the numpy kernel of its rule (float32 arrays are computed in float32: coefficients
are passed as float32 scalars and no float64 literal appears in a kernel). The kernels are
compiled with ``fastmath=False``, so LLVM neither contracts ``a*b + c`` into an FMA nor
reassociates, and results are bit-identical to
:class:`~paramserver.server.optim.engine.NumpyBackend` for float32 and float64. Other dtypes
(float16), arrays that are not 1-D and C-contiguous or not all of one dtype, read-only parameters or
slots, and numpy coefficients of another dtype (with which numpy would compute in the wider dtype)
go to the fallback backend.

Compilation: each kernel is compiled for one fixed signature per dtype (the gradient typed as
a read-only array, so that writable and read-only gradients share it), on first use or by
:meth:`NumbaBackend.warm_up`, never per request. Compiled code is cached on disk
(``cache=True``) in the first writable place of: ``$NUMBA_CACHE_DIR``, the package's
``__pycache__``, the user's cache directory (``~/.cache/numba``). A server installed read-only
(e.g. in a Docker image) should set ``NUMBA_CACHE_DIR`` to a writable directory before numba is
imported, or start-up compiles every time. When no place is writable, numba itself refuses
``cache=True`` (a ``RuntimeError``, not a warning): this module then compiles in memory, logs
that once, and works the same.

Speed (``python -m benchmarks.kernels``; float32, one thread, 2-core AMD EPYC Zen 4): from
memory (1e7 elements) every kernel runs within a few percent of a loop that only reads and
writes the same arrays, and Adam beats torch's fused CPU Adam at every size. In cache (1e5 to
1e6 elements) the rules that divide and take square roots are bound by the divider instead:
about 0.12 ns per float32 division and 0.2 ns per square root and element here, so Adam and
RMSprop take ~0.32 ns per element, Adadelta (two roots) ~0.5 and Nadam (four divisions) ~0.65,
against ~0.2-0.27 ns to move their arrays through L3. These are the correctly rounded IEEE
operations that numpy performs; replacing them (reciprocals, ``rsqrt``) would break bit
identity. Neither a 256-bit vector width nor removing the neutral scale/clip ops changed that.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numba import types as nbt

from .kernels import KernelBackend, NumpyBackend, UpdateKernel
from .rules import RULES, UpdateRule

__all__ = ["JIT_OPTIONS", "SUPPORTED_DTYPES", "NumbaBackend"]

logger = logging.getLogger(__name__)

#: The dtypes the fused kernels are compiled for; anything else goes to the fallback.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: Options of every kernel: numpy's float semantics (no ZeroDivisionError), no FMA contraction
#: or reassociation, the GIL released (the server steps different sessions in threads).
JIT_OPTIONS: dict[str, Any] = {
    "error_model": "numpy",
    "fastmath": False,
    "nogil": True,
    "boundscheck": False,
    "cache": True,
}


# --- the fused gradient transform --------------------------------------------------------


@numba.njit(inline="always", error_model="numpy", fastmath=False, boundscheck=False)
def _grad(
    g: np.ndarray,
    i: int,
    scale: float,
    lo: float,
    hi: float,
) -> float:
    """``clip(g[i] * scale, lo, hi)`` as the numpy backend does it (NaN passes through).

    ``scale = 1`` and ``lo, hi = -inf, inf`` are exact no-ops, so one compiled loop serves
    every combination of clipnorm and clipvalue.
    """
    gi = g[i] * scale
    gi = lo if gi < lo else gi
    return hi if gi > hi else gi


@numba.njit(inline="always", error_model="numpy", fastmath=False, boundscheck=False)
def _maximum(
    x: float,
    y: float,
) -> float:
    """``np.maximum(x, y)`` for one element: a NaN in either gives that NaN, and equal values
    give ``y`` (as numpy does: ``maximum(-0.0, 0.0)`` is ``0.0``, ``maximum(0.0, -0.0)`` is
    ``-0.0``)."""
    return x if (x > y or x != x) else y


# --- the kernels: same operations, same order as paramserver.server.optim.rules -------------------
#
# Signature of every kernel: (p, g, *slots, *coefficients, scale, clip). Comments give the
# numpy kernel's grouping; each binary operation rounds to the array dtype.


def _sgd(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    momentum: float,
    lr: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    for i in range(p.size):
        gi = _grad(g, i, scale, lo, clip)
        lrg = gi * lr
        mi = (m[i] * momentum) - lrg  # v = momentum * m - lr * g
        m[i] = mi
        p[i] = p[i] + mi


def _sgd_nesterov(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    momentum: float,
    lr: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    for i in range(p.size):
        gi = _grad(g, i, scale, lo, clip)
        lrg = gi * lr
        mi = (m[i] * momentum) - lrg
        m[i] = mi
        p[i] = (p[i] + (mi * momentum)) - lrg  # p = (p + momentum * v) - lr * g


def _rmsprop(
    p: np.ndarray,
    g: np.ndarray,
    a: np.ndarray,
    rho: float,
    one_minus_rho: float,
    lr: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    for i in range(p.size):
        gi = _grad(g, i, scale, lo, clip)
        ai = (a[i] * rho) + ((gi * gi) * one_minus_rho)
        a[i] = ai
        p[i] = p[i] - ((gi * lr) / (math.sqrt(ai) + eps))


def _adagrad(
    p: np.ndarray,
    g: np.ndarray,
    a: np.ndarray,
    lr: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    for i in range(p.size):
        gi = _grad(g, i, scale, lo, clip)
        ai = a[i] + (gi * gi)
        a[i] = ai
        p[i] = p[i] - ((gi * lr) / (math.sqrt(ai) + eps))


def _adadelta(
    p: np.ndarray,
    g: np.ndarray,
    a: np.ndarray,
    d_a: np.ndarray,
    rho: float,
    one_minus_rho: float,
    lr: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    for i in range(p.size):
        gi = _grad(g, i, scale, lo, clip)
        ai = (a[i] * rho) + ((gi * gi) * one_minus_rho)
        a[i] = ai
        di = d_a[i]
        u = (gi * math.sqrt(di + eps)) / math.sqrt(ai + eps)
        p[i] = p[i] - (u * lr)
        d_a[i] = (di * rho) + ((u * u) * one_minus_rho)


def _adam(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    beta_1: float,
    one_minus_beta_1: float,
    beta_2: float,
    one_minus_beta_2: float,
    lr_t: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    for i in range(p.size):
        gi = _grad(g, i, scale, lo, clip)
        mi = (m[i] * beta_1) + (gi * one_minus_beta_1)
        vi = (v[i] * beta_2) + ((gi * gi) * one_minus_beta_2)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - ((mi * lr_t) / (math.sqrt(vi) + eps))


def _adam_amsgrad(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    vhat: np.ndarray,
    beta_1: float,
    one_minus_beta_1: float,
    beta_2: float,
    one_minus_beta_2: float,
    lr_t: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    for i in range(p.size):
        gi = _grad(g, i, scale, lo, clip)
        mi = (m[i] * beta_1) + (gi * one_minus_beta_1)
        vi = (v[i] * beta_2) + ((gi * gi) * one_minus_beta_2)
        hi = _maximum(vhat[i], vi)
        m[i] = mi
        v[i] = vi
        vhat[i] = hi
        p[i] = p[i] - ((mi * lr_t) / (math.sqrt(hi) + eps))


def _adamax(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    u: np.ndarray,
    beta_1: float,
    one_minus_beta_1: float,
    beta_2: float,
    lr_t: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    for i in range(p.size):
        gi = _grad(g, i, scale, lo, clip)
        mi = (m[i] * beta_1) + (gi * one_minus_beta_1)
        ui = _maximum(u[i] * beta_2, abs(gi))
        m[i] = mi
        u[i] = ui
        p[i] = p[i] - ((mi * lr_t) / (ui + eps))


def _nadam(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    g_div: float,
    beta_1: float,
    one_minus_beta_1: float,
    m_div: float,
    beta_2: float,
    one_minus_beta_2: float,
    v_div: float,
    one_minus_cache_t: float,
    cache_t_1: float,
    lr: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    for i in range(p.size):
        gi = _grad(g, i, scale, lo, clip)
        mi = (m[i] * beta_1) + (gi * one_minus_beta_1)
        vi = (v[i] * beta_2) + ((gi * gi) * one_minus_beta_2)
        m[i] = mi
        v[i] = vi
        m_bar = ((gi / g_div) * one_minus_cache_t) + ((mi / m_div) * cache_t_1)
        p[i] = p[i] - ((m_bar * lr) / (math.sqrt(vi / v_div) + eps))


#: Independent partial sums of :func:`_sum_squares`. The inner loop over them is elementwise,
#: so LLVM vectorises it without reassociating anything (64 is the smallest width its cost
#: model vectorises here; numba leaves the SLP vectoriser off). The result does not depend on
#: the machine's vector width.
_SUM_LANES = 64


def _sum_squares(
    g: np.ndarray,
) -> float:
    """``sum(g*g)`` in float64: lane ``j`` sums elements ``j, j+64, ...`` in order, the lanes
    are combined pairwise, then the tail is added in order."""
    n = g.size
    body = n - n % _SUM_LANES
    acc = np.zeros(_SUM_LANES, np.float64)
    for i in range(0, body, _SUM_LANES):
        for j in range(_SUM_LANES):
            x = np.float64(g[i + j])
            acc[j] += x * x
    width = _SUM_LANES
    while width > 1:
        width //= 2
        for j in range(width):
            acc[j] += acc[j + width]
    total = acc[0]
    for i in range(body, n):
        x = np.float64(g[i])
        total += x * x
    return total


# --- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _KernelSpec:
    """One fused loop: its Python source, how many slots and float coefficients it takes."""

    py_func: Callable[..., None]
    n_slots: int
    n_coeffs: int


_KERNELS: dict[str, _KernelSpec] = {
    "sgd": _KernelSpec(_sgd, 1, 2),
    "sgd_nesterov": _KernelSpec(_sgd_nesterov, 1, 2),
    "rmsprop": _KernelSpec(_rmsprop, 1, 4),
    "adagrad": _KernelSpec(_adagrad, 1, 2),
    "adadelta": _KernelSpec(_adadelta, 2, 4),
    "adam": _KernelSpec(_adam, 2, 6),
    "adam_amsgrad": _KernelSpec(_adam_amsgrad, 3, 6),
    "adamax": _KernelSpec(_adamax, 2, 5),
    "nadam": _KernelSpec(_nadam, 2, 11),
}


def _kernel_for(rule: UpdateRule, coeffs: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]] | None:
    """The fused kernel for ``rule`` and the float coefficients it takes (flags removed)."""
    name = rule.name
    if RULES.get(name) is not rule:  # a rule of someone else's, with the same name
        return None
    if name == "SGD":
        return ("sgd_nesterov" if coeffs[2] else "sgd"), coeffs[:2]
    if name == "Adam":
        return ("adam_amsgrad" if coeffs[6] else "adam"), coeffs[:6]
    key = name.lower()
    return (key, coeffs) if key in _KERNELS else None


def _exact_scalars(
    floats: tuple[Any, ...], grad_scale: Any, grad_clip: Any, ty: Any
) -> tuple[Any, ...] | None:
    """The kernel's scalar arguments in the array dtype ``ty``, or None if numpy would not
    compute with them in that dtype (a numpy scalar of another dtype: numpy would promote).

    Python numbers are weakly typed (NEP 50): numpy converts them to the array dtype first,
    and so does this. No scale is ``1`` and no clip is ``inf``, both exact no-ops.
    """
    one, inf = _NEUTRAL[ty]
    scalars = (
        *floats,
        one if grad_scale is None else grad_scale,
        inf if grad_clip is None else grad_clip,
    )
    if all(type(c) is ty for c in scalars):
        return scalars
    if any(isinstance(c, (np.generic, bool)) or not isinstance(c, (int, float)) for c in scalars):
        return None
    return tuple(ty(c) for c in scalars)


_NEUTRAL = {d.type: (d.type(1), d.type(np.inf)) for d in SUPPORTED_DTYPES}


def _signature(spec: _KernelSpec, dtype: np.dtype) -> Any:
    scalar = numba.from_dtype(dtype)
    rw = nbt.Array(scalar, 1, "C")
    ro = nbt.Array(scalar, 1, "C", readonly=True)
    args = (rw, ro) + (rw,) * spec.n_slots + (scalar,) * (spec.n_coeffs + 2)
    return nbt.void(*args)


_cache_available = True


def _compile(py_func: Callable[..., Any], signature: Any) -> Any:
    """An eagerly compiled dispatcher of ``py_func`` for exactly ``signature``.

    With an explicit signature the dispatcher never compiles again: a call whose types do not
    fit raises ``TypeError`` instead of compiling a new specialisation at request time.
    """
    global _cache_available
    options = dict(JIT_OPTIONS, cache=_cache_available)
    try:
        return numba.njit(signature, **options)(py_func)
    except RuntimeError as exc:
        if not options["cache"] or "cannot cache function" not in str(exc):
            raise
        _cache_available = False
        logger.warning(
            "numba has no writable cache directory (%s); compiling in memory. Set "
            "NUMBA_CACHE_DIR to a writable directory to reuse compiled kernels.",
            exc,
        )
        return numba.njit(signature, **dict(options, cache=False))(py_func)


# --- the backend --------------------------------------------------------------------------


class NumbaBackend:
    """Fused single-pass numba kernels, bit-identical to the numpy backend.

    One thread per call, the GIL released while a kernel runs. Arrays the kernels were not
    compiled for (float16, not 1-D and contiguous, mixed dtypes, read-only parameters) and
    numpy coefficients of another dtype go to ``fallback``. Kernels are compiled per dtype on
    first use; call :meth:`warm_up` at start-up to take that cost before the first request.
    """

    name = "numba"

    def __init__(self, *, fallback: KernelBackend | None = None) -> None:
        self.fallback: KernelBackend = fallback if fallback is not None else NumpyBackend()
        self._compiled: dict[tuple[str, np.dtype], Any] = {}
        self._lock = threading.Lock()

    def supports(self, rule: str, dtype: np.dtype) -> bool:
        return rule in RULES and np.dtype(dtype) in SUPPORTED_DTYPES

    def warm_up(self) -> None:
        """Compile (or load from the disk cache) every kernel for float32 and float64."""
        for dtype in SUPPORTED_DTYPES:
            self._sum_squares_kernel(dtype)
            for key in _KERNELS:
                self._kernel(key, dtype)

    def _kernel(self, key: str, dtype: np.dtype) -> Any:
        kernel = self._compiled.get((key, dtype))
        if kernel is None:
            with self._lock:
                kernel = self._compiled.get((key, dtype))
                if kernel is None:
                    spec = _KERNELS[key]
                    kernel = _compile(spec.py_func, _signature(spec, dtype))
                    self._compiled[(key, dtype)] = kernel
        return kernel

    def _sum_squares_kernel(self, dtype: np.dtype) -> Any:
        kernel = self._compiled.get(("sum_squares", dtype))
        if kernel is None:
            with self._lock:
                kernel = self._compiled.get(("sum_squares", dtype))
                if kernel is None:
                    array = nbt.Array(numba.from_dtype(dtype), 1, "C", readonly=True)
                    kernel = _compile(_sum_squares, nbt.float64(array))
                    self._compiled[("sum_squares", dtype)] = kernel
        return kernel

    def kernel(self, rule: UpdateRule, dtype: np.dtype) -> UpdateKernel:
        """The fused kernel of ``rule`` for ``dtype``, or the fallback's kernel (float16, a rule
        that is not one of :data:`~paramserver.server.optim.rules.RULES`)."""
        dtype = np.dtype(dtype)
        if dtype not in SUPPORTED_DTYPES or RULES.get(rule.name) is not rule:
            return self.fallback.kernel(rule, dtype)
        return functools.partial(self._fused, rule)

    def sum_squares(self, g: np.ndarray) -> float:
        """``sum(g*g)`` in float64 in one pass (64 ordered partial sums, see
        :func:`_sum_squares`): not the numpy backend's summation order, so the two may differ
        in the last bits. Arrays it was not compiled for go to the fallback."""
        if g.dtype in SUPPORTED_DTYPES and g.ndim == 1 and g.flags.c_contiguous:
            return float(self._sum_squares_kernel(g.dtype)(g))
        return self.fallback.sum_squares(g)

    def update(
        self,
        rule: UpdateRule,
        p: np.ndarray,
        g: np.ndarray,
        slots: tuple[np.ndarray, ...],
        coeffs: tuple[Any, ...],
        grad_scale: Any,
        grad_clip: Any,
    ) -> None:
        """One step over any arrays: fused when they are what the kernels were compiled for
        (1-D, C-contiguous, all of ``p``'s dtype, ``p`` and the slots writable), else the
        fallback. An optimizer calls :meth:`kernel` once instead, for arrays it owns."""
        dtype = p.dtype
        n = p.size
        fits = (
            dtype in SUPPORTED_DTYPES
            and RULES.get(rule.name) is rule
            and all(
                a.ndim == 1 and a.dtype == dtype and a.size == n and a.flags.c_contiguous
                for a in (p, g, *slots)
            )
            and all(a.flags.writeable for a in (p, *slots))
        )
        if fits:
            self._fused(rule, p, g, slots, coeffs, grad_scale, grad_clip)
        else:
            self.fallback.update(rule, p, g, slots, coeffs, grad_scale, grad_clip)

    def _fused(
        self,
        rule: UpdateRule,
        p: np.ndarray,
        g: np.ndarray,
        slots: tuple[np.ndarray, ...],
        coeffs: tuple[Any, ...],
        grad_scale: Any,
        grad_clip: Any,
    ) -> None:
        """The fused kernel over arrays it was compiled for. Coefficients that numpy would not
        compute with in the array dtype (a numpy scalar of another dtype) go to the fallback,
        which then computes exactly as numpy does."""
        chosen = _kernel_for(rule, coeffs)
        scalars = None
        if chosen is not None:
            key, floats = chosen
            scalars = _exact_scalars(floats, grad_scale, grad_clip, p.dtype.type)
        if chosen is None or scalars is None:
            self.fallback.update(rule, p, g, slots, coeffs, grad_scale, grad_clip)
            return
        self._kernel(key, p.dtype)(p, g, *slots, *scalars)
