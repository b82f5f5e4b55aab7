"""Apply Keras 2.2.4 optimizer steps to named numpy parameters, in place.

:class:`KerasOptimizer` is bound to a configuration (``paramserver.optimizers``) and to the names,
shapes and dtypes of a model's parameters. It owns the optimizer's state (per-parameter slots,
the iteration counter, Nadam's ``m_schedule``) and applies one step at a time:

1. check the gradients (names, shapes, supported float dtypes) and take the sum of squares of
   every gradient in float64: a non-finite sum means a NaN or inf element, and the step is
   refused before anything changes; the same sums give Keras 2.2's global ``clipnorm`` norm;
2. compute the step's coefficients in the compute dtype (:mod:`paramserver.server.optim.rules`;
   for every rule but Nadam, the next :data:`SCHEDULE_STEPS` steps' at once);
3. run each parameter's update kernel, in place: the fused numba kernel where it is available,
   else the chunked numpy kernel with fixed-size scratch buffers (chosen once per parameter,
   when the optimizer is bound to its parameters);
4. count the step.

Nothing here knows about HTTP, storage or threads; callers serialise access.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from paramserver.codes import ErrorCode
from paramserver.optimizers import Optimizer as OptimizerConfig
from paramserver.optimizers import TFOptimizer
from paramserver.sparse import Rows, combine
from paramserver.sparse import sum_squares as sparse_sum_squares

from .kernels import (
    CHUNK_ELEMENTS,
    FLOAT_DTYPES,
    KernelBackend,
    NumpyBackend,
    RowsKernel,
    UpdateKernel,
)
from .rules import RULES, Coefficients, CoefficientSchedule

#: What a gradient may be: a parameter's dtype, or bfloat16 (mixed precision), cast to the
#: parameter's dtype before the step.
GRADIENT_DTYPES = (*FLOAT_DTYPES, np.dtype(ml_dtypes.bfloat16))

__all__ = [
    "CHUNK_ELEMENTS",
    "FLOAT_DTYPES",
    "GradientError",
    "KerasOptimizer",
    "KernelBackend",
    "NumpyBackend",
    "OptimizerState",
    "PreparedGradients",
    "SparseGradient",
    "StateError",
    "check_weights",
    "default_backend",
    "prepare_gradients",
]


#: Steps whose coefficients a :class:`~.rules.CoefficientSchedule` computes at once.
SCHEDULE_STEPS = 32

#: Elements per chunk of an exact sparse step: a 256 KiB float32 gradient buffer, in cache.
SPARSE_CHUNK_ELEMENTS = 1 << 16


class GradientError(ValueError):
    """The gradients do not fit the parameters, or hold NaN or inf. Nothing was changed."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.PARAMETER_MISMATCH) -> None:
        super().__init__(message)
        self.code = code


class StateError(ValueError):
    """An optimizer state (or a session's weights or settings) does not fit. Nothing was
    changed. ``code``: the protocol's error code when it is not the caller's default."""

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class OptimizerState:
    """Everything an optimizer carries between steps (Keras's ``get_weights`` and more).

    ``slots[slot][param]`` are arrays of the parameter's shape and dtype; ``scalars`` holds
    scalar state such as Nadam's ``m_schedule``.
    """

    iterations: int
    slots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SparseGradient:
    """A row-sparse gradient checked against its parameter: sorted unique row ``indices``
    and their ``rows`` (``(len(indices), width)``, the parameter's dtype, duplicates summed)."""

    indices: np.ndarray
    rows: np.ndarray
    width: int

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.indices.nbytes)

    def dense(self, size: int) -> np.ndarray:
        """The flat dense gradient (zeros elsewhere): for the paths that need one."""
        out = np.zeros(size, self.rows.dtype)
        if self.indices.size and self.width:
            out.reshape(-1, self.width)[self.indices] = self.rows
        return out


@dataclass(frozen=True)
class PreparedGradients:
    """Gradients checked against the parameters: flat arrays of each parameter's dtype (in the
    parameters' order), or :class:`SparseGradient` rows, and their global sum of squares in
    float64 (a sparse gradient's as its dense equivalent's, bit for bit). What
    ``check_gradients`` returns and ``apply`` takes, so a step prepares its gradients once."""

    flat: dict[str, np.ndarray | SparseGradient]
    sum_squares: float

    def dense(self, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
        """Every gradient flat and dense (a sparse one densified)."""
        return {
            name: g.dense(math.prod(specs[name][0])) if isinstance(g, SparseGradient) else g
            for name, g in self.flat.items()
        }


def check_weights(weights: Mapping[str, np.ndarray], *, finite: bool = True) -> None:
    """Weights are a non-empty map of float16/32/64 arrays; initial ones (``finite``) hold no
    NaN or inf. (A restored state may: Keras lets weights diverge, and every state a session
    reached must load again.)"""
    if not weights:
        raise StateError("a session needs at least one parameter in 'weights'")
    for name, value in weights.items():
        if np.dtype(value.dtype) not in FLOAT_DTYPES:
            raise StateError(f"weight {name!r} has dtype {value.dtype}; use float16/32/64")
        if finite and not np.isfinite(value).all():
            raise StateError(f"weight {name!r} contains NaN or infinite values")


_DEFAULT_BACKEND: KernelBackend | None = None


def default_backend() -> KernelBackend:
    """The fused numba backend when numba is importable, else the numpy one (made once)."""
    global _DEFAULT_BACKEND
    if _DEFAULT_BACKEND is None:
        try:
            from .numba_kernels import NumbaBackend
        except ImportError:
            _DEFAULT_BACKEND = NumpyBackend()
        else:
            _DEFAULT_BACKEND = NumbaBackend(fallback=NumpyBackend())
    return _DEFAULT_BACKEND


def prepare_gradients(
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    grads: Mapping[str, np.ndarray],
    *,
    cast: Callable[[str, np.ndarray, np.dtype], np.ndarray],
    sum_squares: Callable[[np.ndarray], float],
    sparse_sum_squares: Callable[
        [np.ndarray, np.ndarray, tuple[int, ...]], float
    ] = sparse_sum_squares,
) -> PreparedGradients:
    """Check ``grads`` against ``specs`` (name -> (shape, dtype)); cast, then check finiteness.

    Returns the gradients as flat arrays of their parameters' dtypes (``cast(name, flat,
    dtype)`` makes them) and their global sum of squares. A missing or extra name, an
    unsupported dtype or a shape that does not fit raises :class:`GradientError`
    ``parameter_mismatch``; a NaN or inf, also one that appears in the cast (a finite float64
    beyond float32's range), or a global sum that overflows float64 raises
    ``non_finite_gradient``. Changes nothing. Shared by every trainer (numpy and TensorFlow).
    """
    missing = [n for n in specs if n not in grads]
    extra = [n for n in grads if n not in specs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing gradient(s) for {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"gradient(s) for unknown parameter(s) {', '.join(map(repr, extra))}")
        raise GradientError("; ".join(parts))
    total = 0.0
    flat: dict[str, np.ndarray | SparseGradient] = {}
    for name, (shape, dtype) in specs.items():
        g = grads[name]
        if isinstance(g, Rows):
            sparse = _prepare_rows(name, g, shape, dtype)
            flat[name] = sparse
            sq = sparse_sum_squares(sparse.indices, sparse.rows, shape)
            if not math.isfinite(sq):
                raise GradientError(
                    f"gradient {name!r} contains NaN or infinite values",
                    code=ErrorCode.NON_FINITE_GRADIENT,
                )
            total += sq
            continue
        if np.dtype(g.dtype) not in GRADIENT_DTYPES:
            raise GradientError(
                f"gradient {name!r} has dtype {g.dtype}; supported: float16, float32, float64, "
                "bfloat16"
            )
        if tuple(g.shape) != shape:
            raise GradientError(
                f"gradient {name!r} has shape {list(g.shape)}, parameter has {list(shape)}"
            )
        g = cast(name, _flat(g), dtype)
        if not g.flags.c_contiguous:  # a strided 1-D view: the kernels take contiguous arrays
            g = np.ascontiguousarray(g)
        flat[name] = g
        sq = sum_squares(g)
        if not math.isfinite(sq):
            raise GradientError(
                f"gradient {name!r} contains NaN or infinite values",
                code=ErrorCode.NON_FINITE_GRADIENT,
            )
        total += sq
    if not math.isfinite(total):  # finite parts whose float64 sum overflows
        raise GradientError(
            "gradients are too large: their global norm overflows float64",
            code=ErrorCode.NON_FINITE_GRADIENT,
        )
    return PreparedGradients(flat, total)


def _prepare_rows(name: str, g: Rows, shape: tuple[int, ...], dtype: np.dtype) -> SparseGradient:
    """A row-sparse gradient checked against its parameter (``parameter_mismatch``), its rows
    cast to the parameter's dtype and duplicates summed (:func:`paramserver.sparse.combine`)."""
    if np.dtype(g.values.dtype) not in GRADIENT_DTYPES:
        raise GradientError(
            f"gradient {name!r} has dtype {g.values.dtype}; supported: float16, float32, "
            "float64, bfloat16"
        )
    if g.shape is not None and tuple(g.shape) != shape:
        raise GradientError(
            f"gradient {name!r} has shape {list(g.shape)}, parameter has {list(shape)}"
        )
    if not shape or tuple(g.values.shape[1:]) != shape[1:]:
        raise GradientError(
            f"gradient {name!r}: rows of shape {list(g.values.shape[1:])} do not fit parameter "
            f"{list(shape)} (a row-sparse gradient has rows of shape[1:])"
        )
    if g.indices.size and (int(g.indices.min()) < 0 or int(g.indices.max()) >= shape[0]):
        raise GradientError(f"gradient {name!r}: a row index is outside [0, {shape[0]})")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused after
        indices, rows = combine(g.indices, g.values, dtype)
    width = math.prod(shape[1:])
    # The kernels take aligned contiguous arrays (a body's views may be neither).
    rows = _aligned(rows).reshape(indices.shape[0], width)
    return SparseGradient(_aligned(indices), rows, width)


def _aligned(a: np.ndarray) -> np.ndarray:
    """``a`` itself when it is C-contiguous and aligned, else an aligned copy."""
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.array(a, order="C")


class KerasOptimizer:
    """A Keras 2.2.4 optimizer bound to a model's parameters; it owns the optimizer state.

    ``params`` gives the names, shapes and dtypes the optimizer serves (its values are not
    kept). :meth:`step` updates a mapping of parameters in place with one optimizer step.
    """

    def __init__(
        self,
        config: OptimizerConfig,
        params: Mapping[str, np.ndarray],
        *,
        backend: KernelBackend | None = None,
        sparse_updates: str = "exact",
    ) -> None:
        if isinstance(config, TFOptimizer) or config.class_name not in RULES:
            raise ValueError(f"{config.class_name} is not a Keras update rule")
        if not params:
            raise ValueError("an optimizer needs at least one parameter")
        self.config = config
        self.rule = RULES[config.class_name]
        self._cfg = config.get_config()
        self.backend = backend if backend is not None else default_backend()
        self.specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        #: Each parameter's update kernel, chosen here once (fused where the backend has one).
        self.kernels: dict[str, UpdateKernel] = {}
        self.rows_kernels: dict[str, RowsKernel] = {}
        for name, value in params.items():
            dtype = np.dtype(value.dtype)
            if dtype not in FLOAT_DTYPES:
                raise GradientError(
                    f"parameter {name!r} has dtype {dtype}; supported: float16, float32, float64"
                )
            self.specs[name] = (tuple(value.shape), dtype)
            self.kernels[name] = self.backend.kernel(self.rule, dtype)
            self.rows_kernels[name] = self.backend.rows_kernel(self.rule, dtype)
        # Keras computes its scalars in floatx; a model of one dtype computes in that dtype,
        # a mixed one in the widest of its dtypes.
        self.compute_dtype = np.result_type(*(d for _, d in self.specs.values()))
        self.slot_names = self.rule.slots(self._cfg)
        self.iterations = 0
        self.slots: dict[str, dict[str, np.ndarray]] = {
            slot: {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.specs.items()}
            for slot in self.slot_names
        }
        self.scalars: dict[str, Any] = {
            k: self.compute_dtype.type(v) for k, v in self.rule.initial_scalars.items()
        }
        self._cast_buffers: dict[str, np.ndarray] = {}
        #: The coefficients of the coming steps (rules whose coefficients depend on the
        #: iteration count alone): a step's dozen numpy scalar operations cost more than its
        #: whole kernel on a small model.
        self._schedule: CoefficientSchedule | None = None
        # The slots' bytes, kept (their arrays are never replaced): asked of every small push.
        self._slot_nbytes = sum(a.nbytes for per in self.slots.values() for a in per.values())
        #: "exact": a row-sparse gradient updates every row (Keras 2.2's dense semantics, the
        #: untouched rows with a zero gradient); "lazy": only its rows (LazyAdam).
        self.sparse_updates = sparse_updates
        self._zeros: dict[np.dtype, np.ndarray] = {}

    # --- stepping ----------------------------------------------------------------------------

    def check_gradients(self, grads: Mapping[str, np.ndarray]) -> PreparedGradients:
        """Validate ``grads`` against the parameters; return them prepared for :meth:`apply`.

        Raises :class:`GradientError` for a missing or extra name, a shape or dtype that does
        not fit, or a NaN/inf element (also one that appears when a gradient is cast to its
        parameter's dtype). Changes nothing. A gradient of another float dtype is cast first
        (into a reused buffer: the prepared gradients are valid until the next call), then
        checked, so that a finite float64 value that overflows float32 is refused like an inf.
        """
        return prepare_gradients(
            self.specs,
            grads,
            cast=self._as_dtype,
            sum_squares=self.backend.sum_squares,
            sparse_sum_squares=self.backend.sparse_sum_squares,
        )

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """Apply one optimizer step to ``params`` in place (Keras's ``get_updates``, once).

        Validates first: on :class:`GradientError` neither the parameters nor the state change.
        """
        self.check_params(params)
        self.apply(params, self.check_gradients(grads))

    def check_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`GradientError` unless ``params`` can be updated in place."""
        for name, (shape, dtype) in self.specs.items():
            p = params.get(name)
            # A numpy scalar or a read-only array cannot be updated in place: refused here, not
            # half-way through the step (a scalar would silently keep its value).
            if (
                not isinstance(p, np.ndarray)
                or p.shape != shape
                or p.dtype != dtype
                or not p.flags.c_contiguous
                or not p.flags.writeable
            ):
                raise GradientError(
                    f"parameter {name!r} must be a writable C-contiguous {dtype} array of shape "
                    f"{list(shape)}"
                )

    def apply(self, params: Mapping[str, np.ndarray], prepared: PreparedGradients) -> None:
        """One step with gradients from :meth:`check_gradients`, onto parameters that passed
        :meth:`check_params` (the trainer's own arrays); cannot fail half-way."""
        flat_grads, sum_sq = prepared.flat, prepared.sum_squares
        cfg = self._cfg
        dt = self.compute_dtype.type
        coeffs, new_scalars = self._coefficients()
        grad_scale_c: Any = None
        clipnorm = cfg.get("clipnorm")
        if clipnorm is not None:
            norm = dt(math.sqrt(sum_sq))
            c = dt(clipnorm)
            if norm >= c:
                grad_scale_c = c / norm
        clipvalue = cfg.get("clipvalue")
        for name, (_shape, dtype) in self.specs.items():
            ty = dtype.type
            p = _flat(params[name])
            g = flat_grads[name]
            kcoeffs = coeffs if dtype == self.compute_dtype else _cast_coeffs(coeffs, ty)
            slots = tuple(_flat(self.slots[s][name]) for s in self.slot_names)
            scale = None if grad_scale_c is None else ty(grad_scale_c)
            clip = None if clipvalue is None else ty(clipvalue)
            if isinstance(g, SparseGradient):
                if self.sparse_updates == "lazy":  # only its rows, in place (LazyAdam)
                    self.rows_kernels[name](
                        p, g.rows.reshape(-1), g.indices, g.width, slots, kcoeffs, scale, clip
                    )
                else:
                    self._apply_exact(self.kernels[name], p, g, slots, kcoeffs, scale, clip)
                continue
            self.kernels[name](p, g, slots, kcoeffs, scale, clip)
        self.iterations += 1
        self.scalars.update(new_scalars)

    def _coefficients(self) -> tuple[Coefficients, dict[str, Any]]:
        """This step's coefficients and new scalar state; from the rule's schedule when it
        has one (its next :data:`SCHEDULE_STEPS` steps computed at once)."""
        rule = self.rule
        if not rule.iterations_only:
            return rule.coefficients(self._cfg, self.iterations, self.scalars, self.compute_dtype)
        schedule = self._schedule
        if schedule is None or not schedule.covers(self.iterations):
            schedule = self._schedule = CoefficientSchedule(
                rule, self._cfg, self.iterations, SCHEDULE_STEPS, self.compute_dtype
            )
        return schedule.at(self.iterations), {}

    def _apply_exact(
        self,
        kernel: UpdateKernel,
        p: np.ndarray,
        g: SparseGradient,
        slots: tuple[np.ndarray, ...],
        coeffs: tuple[Any, ...],
        scale: Any,
        clip: Any,
    ) -> None:
        """The dense step of the gradient with zeros in the untouched rows, in one pass over
        the parameter and its slots, a chunk of rows at a time: each chunk's gradient is a
        zeroed buffer (in cache) with the chunk's touched rows written in; the dense
        gradient is never made."""
        width = g.width
        if not width or not p.size:
            return
        total_rows = p.size // width
        chunk_rows = max(1, SPARSE_CHUNK_ELEMENTS // width)
        zeros = self._zeros.get(p.dtype)
        if zeros is None or zeros.size < chunk_rows * width:
            zeros = self._zeros[p.dtype] = np.zeros(chunk_rows * width, p.dtype)
        starts = np.arange(0, total_rows + chunk_rows, chunk_rows)
        bounds = np.searchsorted(g.indices, starts)
        for c in range(len(starts) - 1):
            start = int(starts[c])
            stop = min(start + chunk_rows, total_rows)
            if start >= stop:
                break
            lo, hi = int(bounds[c]), int(bounds[c + 1])
            buf = zeros[: (stop - start) * width]
            touched = None
            if hi > lo:
                touched = g.indices[lo:hi] - start
                buf.reshape(-1, width)[touched] = g.rows[lo:hi]
            a, b = start * width, stop * width
            kernel(p[a:b], buf, tuple(s[a:b] for s in slots), coeffs, scale, clip)
            if touched is not None:
                buf.reshape(-1, width)[touched] = 0  # zeros again for the next chunk

    def _as_dtype(self, name: str, g: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """``g`` in ``dtype``: itself when it already is, else cast into a reused buffer."""
        if g.dtype == dtype:
            return g
        buf = self._cast_buffers.get(name)
        if buf is None or buf.dtype != dtype:
            buf = np.empty(g.size, dtype)
            self._cast_buffers[name] = buf
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused after
            np.copyto(buf, g, casting="unsafe")
        return buf

    def all_finite(self, params: Mapping[str, np.ndarray]) -> bool:
        """Whether ``params`` and every slot hold finite values only."""
        arrays = [params[n] for n in self.specs]
        arrays += [a for per in self.slots.values() for a in per.values()]
        return all(bool(np.isfinite(a).all()) for a in arrays)

    # --- state -------------------------------------------------------------------------------

    def get_state(self) -> OptimizerState:
        """A copy of the whole state: restoring it continues bit-for-bit."""
        return OptimizerState(
            iterations=self.iterations,
            slots={s: {n: a.copy() for n, a in per.items()} for s, per in self.slots.items()},
            scalars={k: float(v) for k, v in self.scalars.items()},
        )

    def set_state(self, state: OptimizerState) -> None:
        """Load a state exported by :meth:`get_state`; shapes, dtypes and names are checked.

        Raises :class:`StateError` and changes nothing when the state does not fit.
        """
        self.check_state(state)
        for slot in self.slot_names:
            for name in self.specs:
                np.copyto(self.slots[slot][name], state.slots[slot][name])
        self.iterations = int(state.iterations)
        self.scalars = {k: self.compute_dtype.type(state.scalars[k]) for k in self.scalars}

    def check_state(self, state: OptimizerState) -> None:
        """Raise :class:`StateError` unless ``state`` fits this optimizer exactly."""
        it = state.iterations
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or not 0 <= it < 2**53:
            raise StateError(f"iterations must be an integer in [0, 2**53), got {it!r}")
        if set(state.slots) != set(self.slot_names):
            raise StateError(
                f"{self.config.class_name} has slots {sorted(self.slot_names)}, "
                f"the state has {sorted(state.slots)}"
            )
        for slot in self.slot_names:
            per = state.slots[slot]
            if set(per) != set(self.specs):
                raise StateError(
                    f"slot {slot!r} must hold exactly the parameters {sorted(self.specs)}"
                )
            for name, (shape, dtype) in self.specs.items():
                arr = per[name]
                if not isinstance(arr, np.ndarray):
                    raise StateError(f"slot {slot!r} of {name!r} is not an array")
                if tuple(arr.shape) != shape or arr.dtype != dtype:
                    raise StateError(
                        f"slot {slot!r} of {name!r} has shape {list(arr.shape)} and dtype "
                        f"{arr.dtype}; expected {list(shape)} and {dtype}"
                    )
        if set(state.scalars) != set(self.scalars):
            raise StateError(
                f"{self.config.class_name} has scalar state {sorted(self.scalars)}, "
                f"the state has {sorted(state.scalars)}"
            )
        for key, value in state.scalars.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.floating))
                or not math.isfinite(float(value))
            ):
                raise StateError(f"scalar {key!r} must be a finite number, got {value!r}")

    @property
    def state_nbytes(self) -> int:
        """Bytes held by the slots and by the buffers that gradients of another dtype are cast
        into (made on the first such push, one per parameter, kept for the next)."""
        return self._slot_nbytes + sum(b.nbytes for b in self._cast_buffers.values())


def _flat(a: np.ndarray) -> np.ndarray:
    """A 1-D view of a C-contiguous array (a copy only if it is not contiguous)."""
    return a.reshape(-1)


def _cast_coeffs(coeffs: tuple[Any, ...], ty: Any) -> tuple[Any, ...]:
    return tuple(c if isinstance(c, bool) else ty(c) for c in coeffs)
