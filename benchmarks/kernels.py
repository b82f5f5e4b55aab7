"""Nanoseconds per element of one optimizer step, against the memory-traffic floor.

For each Keras rule and each size (float32, 1-D), this times, single-threaded:

* ``numba``: :meth:`NumbaBackend.update`, the fused kernel alone;
* ``step``: the whole :meth:`KerasOptimizer.step` on one parameter of that size (validation,
  the float64 sum of squares of the gradient, coefficients, the kernel);
* ``numpy``: :meth:`NumpyBackend.update`, the chunked numpy kernel;
* ``floor``: a numba loop over the same arrays, reading and writing exactly what the rule
  reads and writes (``p``, ``g`` and its slots in; ``p`` and its slots out) with one add per
  written array: the cost of the memory traffic alone;
* ``torch``: for Adam, ``torch.optim.Adam(fused=True)`` (``foreach`` where fused is not
  available) with ``torch.set_num_threads(1)``, when torch is installed.

Each figure is the median over ``repeats`` samples (``stat="min"``: the fastest sample, the
better estimate on a machine shared with other work), the methods sampled in turn so that a
change of machine load hits all of them alike. Samples are timed in this thread's CPU time by
default (``clock="thread"``: every method runs in the calling thread, torch included with one
thread), so that time-slicing by other processes on a shared machine is not counted; their
use of caches and memory bandwidth still is. ``clock="wall"`` uses ``perf_counter``.

A row ``sum_squares`` times the gradient check (numba lanes vs the numpy backend's chunked
``np.dot``, which may use BLAS threads).

Run ``python -m benchmarks.kernels`` (``--help`` for options); ``run()`` returns the rows.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np

from paramserver import optimizers
from paramserver.server.optim.engine import KerasOptimizer, NumpyBackend
from paramserver.server.optim.numba_kernels import JIT_OPTIONS, NumbaBackend
from paramserver.server.optim.rules import RULES

from .push import format_table as push_table

torch: Any = None
try:  # optional: only for the torch column
    torch = importlib.import_module("torch")
except ImportError:  # pragma: no cover - depends on the environment
    pass

__all__ = ["OPTIMIZERS", "format_table", "goal_report", "main", "run"]

#: The configurations measured, by row label.
OPTIMIZERS: dict[str, Callable[[], optimizers.Optimizer]] = {
    "SGD": lambda: optimizers.SGD(lr=0.01, momentum=0.9),
    "SGD nesterov": lambda: optimizers.SGD(lr=0.01, momentum=0.9, nesterov=True),
    "RMSprop": lambda: optimizers.RMSprop(),
    "Adagrad": lambda: optimizers.Adagrad(),
    "Adadelta": lambda: optimizers.Adadelta(),
    "Adam": lambda: optimizers.Adam(),
    "Adam amsgrad": lambda: optimizers.Adam(amsgrad=True),
    "Adamax": lambda: optimizers.Adamax(),
    "Nadam": lambda: optimizers.Nadam(),
}

#: The goals of the performance issue: fused kernel / floor at 1e6 and 1e7 elements.
FLOOR_GOAL = {"Adam": 1.2}
FLOOR_GOAL_OTHERS = 1.3
TORCH_GOAL = 1.0

#: A sample lasts at least this long (many calls for small sizes).
MIN_SAMPLE_NS = 20_000_000

_FLOOR_OPTIONS = dict(JIT_OPTIONS, cache=False)  # compiled on first call, never cached


# --- the same-traffic floors: read p, g and k slots, write p and the k slots --------------
#
# ``x + g * zero`` (``zero`` an argument, so nothing folds) reads and writes every array like
# the rule does while leaving the values as they are, so the floor can run on the very arrays
# the kernels use: the same pages (huge or not), the same cache state.


@numba.njit(**_FLOOR_OPTIONS)
def _floor_1(p, g, a, zero):  # type: ignore[no-untyped-def]
    for i in range(p.size):
        gz = g[i] * zero
        p[i] = p[i] + gz
        a[i] = a[i] + gz


@numba.njit(**_FLOOR_OPTIONS)
def _floor_2(p, g, a, b, zero):  # type: ignore[no-untyped-def]
    for i in range(p.size):
        gz = g[i] * zero
        p[i] = p[i] + gz
        a[i] = a[i] + gz
        b[i] = b[i] + gz


@numba.njit(**_FLOOR_OPTIONS)
def _floor_3(p, g, a, b, c, zero):  # type: ignore[no-untyped-def]
    for i in range(p.size):
        gz = g[i] * zero
        p[i] = p[i] + gz
        a[i] = a[i] + gz
        b[i] = b[i] + gz
        c[i] = c[i] + gz


_FLOORS: dict[int, Callable[..., None]] = {1: _floor_1, 2: _floor_2, 3: _floor_3}


# --- timing -----------------------------------------------------------------------------


CLOCKS: dict[str, Callable[[], int]] = {
    "thread": time.thread_time_ns,
    "wall": time.perf_counter_ns,
}


class _Timed:
    """One method under test: a no-argument callable and its samples (ns per element)."""

    def __init__(self, name: str, fn: Callable[[], Any], n: int, clock: str) -> None:
        self.name, self.fn, self.n = name, fn, n
        self.clock = CLOCKS[clock]
        self.samples: list[float] = []
        fn()  # compile, load, fault the pages in
        t0 = time.perf_counter_ns()
        fn()
        once = max(time.perf_counter_ns() - t0, 1)
        self.calls = max(1, math.ceil(MIN_SAMPLE_NS / once))

    def sample(self) -> None:
        calls, fn, clock = self.calls, self.fn, self.clock
        t0 = clock()
        for _ in range(calls):
            fn()
        self.samples.append((clock() - t0) / calls / self.n)


STATISTICS: dict[str, Callable[[Sequence[float]], float]] = {
    "median": statistics.median,
    "min": min,
}


def _sample_in_turn(methods: Sequence[_Timed], repeats: int, stat: str) -> dict[str, float]:
    for _ in range(repeats):
        for m in methods:
            m.sample()
    return {m.name: STATISTICS[stat](m.samples) for m in methods}


# --- the methods: all on one set of arrays ---------------------------------------------


class _Problem:
    """One optimizer at one size: a parameter, its gradient and the optimizer's own slots.

    Every method runs on these same arrays, so page placement (huge pages or not) and cache
    state, which change streaming speed by several percent from one array to another, are
    the same for all. The methods step the values on in turn; they stay finite and normal
    (gradients ~1e-2: no subnormals, no overflow, however many steps).
    """

    def __init__(self, config: optimizers.Optimizer, n: int, backend: Any) -> None:
        rng = np.random.default_rng(n)
        self.config = config
        self.cfg = config.get_config()
        self.rule = RULES[config.class_name]
        self.p = rng.standard_normal(n, dtype=np.float32)
        self.g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2)
        self.optimizer = KerasOptimizer(config, {"w": self.p}, backend=backend)
        self.slot_names = self.optimizer.slot_names
        self.slots = tuple(self.optimizer.slots[s]["w"] for s in self.slot_names)
        scalars = {k: np.float32(v) for k, v in self.rule.initial_scalars.items()}
        self.coeffs, _ = self.rule.coefficients(self.cfg, 10, scalars, np.dtype(np.float32))

    def backend_update(self, backend: Any) -> Callable[[], None]:
        rule, p, g, slots, coeffs = self.rule, self.p, self.g, self.slots, self.coeffs

        def update() -> None:
            backend.update(rule, p, g, slots, coeffs, None, None)

        return update

    def optimizer_step(self) -> Callable[[], None]:
        step, params, grads = self.optimizer.step, {"w": self.p}, {"w": self.g}
        return lambda: step(params, grads)

    def floor(self) -> Callable[[], None]:
        kernel, p, g, slots = _FLOORS[len(self.slots)], self.p, self.g, self.slots
        zero = np.float32(0)
        return lambda: kernel(p, g, *slots, zero)

    def torch_adam(self) -> tuple[Callable[[], None], str] | None:
        """``torch.optim.Adam`` over the same memory (its moments are our slots), fused where
        torch supports it, else foreach."""
        if torch is None or self.config.class_name != "Adam":
            return None
        cfg = self.cfg
        param = torch.nn.Parameter(torch.from_numpy(self.p))
        param.grad = torch.from_numpy(self.g)
        kwargs: dict[str, Any] = {
            "lr": cfg["lr"],
            "betas": (cfg["beta_1"], cfg["beta_2"]),
            "eps": cfg["epsilon"],
            "amsgrad": cfg["amsgrad"],
        }
        names = {"m": "exp_avg", "v": "exp_avg_sq", "vhat": "max_exp_avg_sq"}
        for impl in ("fused", "foreach"):
            try:
                opt = torch.optim.Adam([param], **kwargs, **{impl: True})
                opt.step()  # creates the state, which then points at our slots
            except (RuntimeError, ValueError):
                continue
            state = opt.state[param]
            for slot, array in zip(self.slot_names, self.slots, strict=True):
                state[names[slot]] = torch.from_numpy(array)
            return opt.step, impl
        return None


# --- the benchmark ----------------------------------------------------------------------


def run(
    sizes: Sequence[int] = (10**5, 10**6, 10**7),
    repeats: int = 9,
    *,
    optimizers_: Sequence[str] | None = None,
    with_torch: bool = True,
    clock: str = "thread",
    stat: str = "median",
) -> list[dict[str, Any]]:
    """Measure every optimizer (or those named) at each size; one dict per (optimizer, size).

    Values are ns per element (``stat`` of the samples); ``*_ratio`` are ours over the floor
    or torch, None where a column was not measured.
    """
    names = list(OPTIMIZERS) if optimizers_ is None else list(optimizers_)
    numba_backend = NumbaBackend(fallback=NumpyBackend())
    numba_backend.warm_up()
    numpy_backend = NumpyBackend()
    torch_threads = None
    if torch is not None and with_torch:
        torch.set_num_threads(1)
        torch_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for name in names:
            config = OPTIMIZERS[name]()
            problem = _Problem(config, n, numba_backend)
            methods = [
                _Timed("numba", problem.backend_update(numba_backend), n, clock),
                _Timed("step", problem.optimizer_step(), n, clock),
                _Timed("numpy", problem.backend_update(numpy_backend), n, clock),
                _Timed("floor", problem.floor(), n, clock),
            ]
            torch_impl = None
            made = problem.torch_adam() if with_torch else None
            if made is not None:
                fn, torch_impl = made
                methods.append(_Timed("torch", fn, n, clock))
            ns = _sample_in_turn(methods, repeats, stat)
            torch_ns = ns.get("torch")
            rows.append(
                {
                    "benchmark": "kernels",
                    "optimizer": name,
                    "dtype": "float32",
                    "elements": n,
                    "repeats": repeats,
                    "clock": clock,
                    "stat": stat,
                    "numba_ns": ns["numba"],
                    "step_ns": ns["step"],
                    "numpy_ns": ns["numpy"],
                    "floor_ns": ns["floor"],
                    "torch_ns": torch_ns,
                    "torch_impl": torch_impl,
                    "torch_threads": torch_threads if torch_ns is not None else None,
                    "floor_ratio": ns["numba"] / ns["floor"],
                    "step_floor_ratio": ns["step"] / ns["floor"],
                    "torch_ratio": None if torch_ns is None else ns["numba"] / torch_ns,
                    "step_torch_ratio": None if torch_ns is None else ns["step"] / torch_ns,
                    "numpy_speedup": ns["numpy"] / ns["numba"],
                    "goal_floor_ratio": FLOOR_GOAL.get(config.class_name, FLOOR_GOAL_OTHERS),
                }
            )
            del methods, problem
        rows.append(_sum_squares_row(numba_backend, numpy_backend, n, repeats, clock, stat))
    return rows


def _sum_squares_row(
    numba_backend: NumbaBackend,
    numpy_backend: NumpyBackend,
    n: int,
    repeats: int,
    clock: str,
    stat: str,
) -> dict[str, Any]:
    g = np.random.default_rng(n).standard_normal(n, dtype=np.float32)
    methods = [
        _Timed("numba", lambda: numba_backend.sum_squares(g), n, clock),
        _Timed("numpy", lambda: numpy_backend.sum_squares(g), n, clock),
    ]
    ns = _sample_in_turn(methods, repeats, stat)
    return {
        "benchmark": "kernels",
        "optimizer": "sum_squares",
        "dtype": "float32",
        "elements": n,
        "repeats": repeats,
        "clock": clock,
        "stat": stat,
        "numba_ns": ns["numba"],
        "step_ns": None,
        "numpy_ns": ns["numpy"],
        "floor_ns": None,
        "torch_ns": None,
        "torch_impl": None,
        "torch_threads": None,
        "floor_ratio": None,
        "step_floor_ratio": None,
        "torch_ratio": None,
        "step_torch_ratio": None,
        "numpy_speedup": ns["numpy"] / ns["numba"],
        "goal_floor_ratio": None,
    }


# --- the report -------------------------------------------------------------------------

_COLUMNS = [
    ("optimizer", "optimizer", "{}"),
    ("elements", "elements", "{:.0e}"),
    ("numba_ns", "numba", "{:.3f}"),
    ("step_ns", "step", "{:.3f}"),
    ("numpy_ns", "numpy", "{:.3f}"),
    ("floor_ns", "floor", "{:.3f}"),
    ("torch_ns", "torch", "{:.3f}"),
    ("floor_ratio", "numba/floor", "{:.2f}"),
    ("step_floor_ratio", "step/floor", "{:.2f}"),
    ("torch_ratio", "numba/torch", "{:.2f}"),
    ("step_torch_ratio", "step/torch", "{:.2f}"),
    ("numpy_speedup", "numpy/numba", "{:.1f}"),
]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`run`'s rows (ns per element; ratios; '-' = not measured)."""
    return push_table(rows, _COLUMNS)


def goal_report(rows: Sequence[dict[str, Any]], sizes: Sequence[int] = (10**6, 10**7)) -> str:
    """The issue's goals, one line each: fused kernel / floor per optimizer, Adam / torch."""
    lines = []
    for row in rows:
        if row["elements"] not in sizes or row["floor_ratio"] is None:
            continue
        where = f"{row['optimizer']} at {row['elements']:.0e}"
        goal = row["goal_floor_ratio"]
        verdict = "met" if row["floor_ratio"] <= goal else "NOT met"
        lines.append(f"{where}: numba/floor {row['floor_ratio']:.2f} <= {goal}: {verdict}")
        if row["torch_ratio"] is not None:
            verdict = "met" if row["torch_ratio"] <= TORCH_GOAL else "NOT met"
            lines.append(
                f"{where}: numba/torch {row['torch_ratio']:.2f} <= {TORCH_GOAL}: {verdict}"
            )
    return "\n".join(lines)


def _environment() -> str:
    parts = [
        f"python {platform.python_version()}",
        f"numpy {np.__version__}",
        f"numba {numba.__version__}",
        f"torch {torch.__version__}" if torch is not None else "torch not installed",
        f"cpu {platform.processor() or platform.machine()}",
    ]
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(float(x)) for x in s.split(",")],
        default=[10**5, 10**6, 10**7],
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--optimizers", help="comma-separated row labels, e.g. 'Adam,SGD'")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread")
    parser.add_argument("--stat", choices=sorted(STATISTICS), default="median")
    args = parser.parse_args(argv)
    chosen = None if args.optimizers is None else [s.strip() for s in args.optimizers.split(",")]
    rows = run(
        args.sizes,
        args.repeats,
        optimizers_=chosen,
        with_torch=not args.no_torch,
        clock=args.clock,
        stat=args.stat,
    )
    print(
        f"ns per element, float32, single thread, {args.stat} of {args.repeats} "
        f"samples ({args.clock} clock); {_environment()}"
    )
    print(format_table(rows))
    print()
    print(goal_report(rows))


if __name__ == "__main__":
    main()
