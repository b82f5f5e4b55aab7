"""The kernel backends: how the elementwise part of a step runs over one parameter.

:class:`KernelBackend` is the interface; :class:`NumpyBackend` runs the numpy kernels of
:mod:`paramserver.server.optim.rules` in fixed-size chunks (any float dtype, any layout);
:class:`~paramserver.server.optim.numba_kernels.NumbaBackend` runs fused single-pass loops. An
optimizer asks its backend for one :data:`UpdateKernel` per parameter when it is bound to its
parameters (as torch.optim picks its single-tensor, multi-tensor or fused path once), and calls
that kernel on every step.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from paramserver import reductions, sparse

from .rules import RULES, Scratch, UpdateRule

__all__ = [
    "CHUNK_ELEMENTS",
    "FLOAT_DTYPES",
    "KernelBackend",
    "NumpyBackend",
    "RowsKernel",
    "UpdateKernel",
]

#: The float dtypes a parameter, gradient or slot may have.
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: Elements per block of the numpy kernels: small enough for the scratch to stay in L2.
CHUNK_ELEMENTS = 1 << 14

#: One step over one parameter, in place: ``kernel(p, g, slots, coeffs, grad_scale,
#: grad_clip)`` with 1-D C-contiguous arrays of the parameter's dtype (``grad_scale`` is None
#: when clipnorm does not apply, ``grad_clip`` None without clipvalue).
UpdateKernel = Callable[
    [np.ndarray, np.ndarray, tuple[np.ndarray, ...], tuple[Any, ...], Any, Any], None
]

#: One lazy step over rows of one parameter, in place: ``kernel(p, rows, index, width, slots,
#: coeffs, grad_scale, grad_clip)``: rows ``index`` (sorted, unique, in range) of ``width``
#: elements of ``p`` and of each slot are stepped with the gradient rows ``rows`` (1-D,
#: ``len(index) * width`` elements); every other element stays as it is.
RowsKernel = Callable[
    [
        np.ndarray,
        np.ndarray,
        np.ndarray,
        int,
        tuple[np.ndarray, ...],
        tuple[Any, ...],
        Any,
        Any,
    ],
    None,
]


class KernelBackend(Protocol):
    """A way to run the elementwise part of a step (numpy chunks, fused numba loops)."""

    name: str

    def supports(self, rule: str, dtype: np.dtype) -> bool: ...

    def kernel(self, rule: UpdateRule, dtype: np.dtype) -> UpdateKernel:
        """The kernel that will run ``rule`` over parameters of ``dtype``: chosen once, when an
        optimizer is bound to its parameters, not on every step."""
        ...

    def rows_kernel(self, rule: UpdateRule, dtype: np.dtype) -> RowsKernel:
        """The kernel that steps only given rows of parameters of ``dtype`` (a lazy
        row-sparse step), chosen once like :meth:`kernel`."""
        ...

    def sum_squares(self, g: np.ndarray) -> float:
        """Sum of ``g*g`` over a 1-D array, accumulated in float64."""
        ...

    def sparse_sum_squares(
        self, index: np.ndarray, rows: np.ndarray, shape: tuple[int, ...]
    ) -> float:
        """The sum of squares of the dense tensor of ``shape`` that sorted unique rows
        ``index`` holding ``rows`` stand for, bit for bit :meth:`sum_squares` of it."""
        ...

    def update_rows(
        self,
        rule: UpdateRule,
        p: np.ndarray,
        rows: np.ndarray,
        index: np.ndarray,
        width: int,
        slots: tuple[np.ndarray, ...],
        coeffs: tuple[Any, ...],
        grad_scale: Any,
        grad_clip: Any,
    ) -> None:
        """One lazy step of rows ``index`` (see :data:`RowsKernel`)."""
        ...

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
        """One step over 1-D contiguous arrays of one dtype.

        The gradient used is ``clip(g * grad_scale, -grad_clip, grad_clip)`` when clipping is
        on (``grad_scale`` is None when clipnorm does not apply, ``grad_clip`` None without
        clipvalue).
        """
        ...


class NumpyBackend:
    """Chunked in-place numpy kernels: no allocation proportional to the parameter size.

    One instance serves every session, and steps of different sessions run in parallel
    threads (numpy releases the GIL), so the scratch buffers are per thread.
    """

    name = "numpy"

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.chunk = chunk_elements
        self._local = threading.local()

    def supports(self, rule: str, dtype: np.dtype) -> bool:
        return rule in RULES and dtype in FLOAT_DTYPES

    def _buffers(self, dtype: np.dtype) -> tuple[Scratch, np.ndarray]:
        scratch: dict[np.dtype, tuple[Scratch, np.ndarray]] | None = getattr(
            self._local, "scratch", None
        )
        if scratch is None:
            scratch = self._local.scratch = {}
        buffers = scratch.get(dtype)
        if buffers is None:
            n = self.chunk
            buffers = (
                Scratch(np.empty(n, dtype), np.empty(n, dtype)),
                np.empty(n, dtype),
            )
            scratch[dtype] = buffers
        return buffers

    def sum_squares(self, g: np.ndarray) -> float:
        # The numba kernel's order (paramserver.reductions): the same bits on every backend.
        return reductions.sum_squares(g)

    def sparse_sum_squares(
        self, index: np.ndarray, rows: np.ndarray, shape: tuple[int, ...]
    ) -> float:
        return sparse.sum_squares(index, rows, shape)

    def kernel(self, rule: UpdateRule, dtype: np.dtype) -> UpdateKernel:
        return functools.partial(self.update, rule)

    def rows_kernel(self, rule: UpdateRule, dtype: np.dtype) -> RowsKernel:
        return functools.partial(self.update_rows, rule)

    def update_rows(
        self,
        rule: UpdateRule,
        p: np.ndarray,
        rows: np.ndarray,
        index: np.ndarray,
        width: int,
        slots: tuple[np.ndarray, ...],
        coeffs: tuple[Any, ...],
        grad_scale: Any,
        grad_clip: Any,
    ) -> None:
        """The touched rows gathered (a chunk of them at a time), stepped by :meth:`update`,
        and scattered back: the same operations on each element as the fused kernel."""
        if not width or not index.size:
            return
        per = max(1, self.chunk // width)
        grid = p.reshape(-1, width)
        slot_grids = [s.reshape(-1, width) for s in slots]
        g = rows.reshape(-1, width)
        for start in range(0, index.size, per):
            idx = index[start : start + per]
            gathered = grid[idx]
            slot_rows = [s[idx] for s in slot_grids]
            self.update(
                rule,
                gathered.reshape(-1),
                np.ascontiguousarray(g[start : start + per]).reshape(-1),
                tuple(r.reshape(-1) for r in slot_rows),
                coeffs,
                grad_scale,
                grad_clip,
            )
            grid[idx] = gathered
            for s, r in zip(slot_grids, slot_rows, strict=True):
                s[idx] = r

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
        # Overflow to inf and inf - inf = NaN are results here (Keras lets weights diverge; a
        # session may refuse them with refuse_non_finite), not errors: no numpy warnings.
        with np.errstate(all="ignore"):
            scratch, gbuf = self._buffers(p.dtype)
            n = p.size
            step = self.chunk
            for start in range(0, n, step):
                stop = min(start + step, n)
                k = stop - start
                if k == step:
                    sc = scratch
                else:
                    sc = Scratch(scratch.a[:k], scratch.b[:k])
                gc = g[start:stop]
                if grad_scale is not None or grad_clip is not None:
                    gb = gbuf[:k]
                    if grad_scale is not None:
                        np.multiply(gc, grad_scale, out=gb)
                    else:
                        gb[...] = gc
                    if grad_clip is not None:
                        np.clip(gb, -grad_clip, grad_clip, out=gb)
                    gc = gb
                rule.numpy_kernel(
                    p[start:stop], gc, tuple(s[start:stop] for s in slots), coeffs, sc
                )
