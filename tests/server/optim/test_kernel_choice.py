"""The kernel of each parameter is chosen once, when the optimizer is bound to its parameters,
and a step prepares its gradients once (journal mode included)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from paramserver import optimizers
from paramserver.server.optim import KerasOptimizer, NumpyBackend, UpdateKernel, UpdateRule
from paramserver.server.optim.numba_kernels import NumbaBackend
from paramserver.server.training import KerasTrainer


class CountingBackend(NumbaBackend):
    """Counts the choices and the sums of squares it is asked for."""

    def __init__(self) -> None:
        super().__init__(fallback=NumpyBackend())
        self.choices: list[tuple[str, str]] = []
        self.sums = 0

    def kernel(self, rule: UpdateRule, dtype: np.dtype) -> UpdateKernel:
        self.choices.append((rule.name, np.dtype(dtype).name))
        return super().kernel(rule, dtype)

    def sum_squares(self, g: np.ndarray) -> float:
        self.sums += 1
        return super().sum_squares(g)


def params() -> dict[str, np.ndarray]:
    return {
        "a": np.ones(5, np.float32),
        "b": np.ones((2, 2), np.float64),
        "c": np.ones(3, np.float16),
    }


def test_each_parameter_gets_its_kernel_once() -> None:
    backend = CountingBackend()
    weights = params()
    engine = KerasOptimizer(optimizers.Adam(), weights, backend=backend)
    assert backend.choices == [("Adam", "float32"), ("Adam", "float64"), ("Adam", "float16")]
    # float32/64 run the fused kernels, float16 the numpy fallback's.
    kernels: dict[str, Any] = engine.kernels
    assert isinstance(kernels["a"], functools.partial) and kernels["a"].func == backend._fused
    assert kernels["c"].func == backend.fallback.update  # type: ignore[attr-defined]
    for _ in range(3):
        engine.step(weights, {n: np.full_like(w, 0.1) for n, w in weights.items()})
    assert len(backend.choices) == 3  # no choice made per step
    assert engine.iterations == 3


def test_a_step_prepares_its_gradients_once() -> None:
    trainer = KerasTrainer(optimizers.SGD(clipnorm=1.0), params())
    backend = CountingBackend()
    trainer.engine = KerasOptimizer(trainer.optimizer, trainer.weights(), backend=backend)
    grads = {n: np.full_like(w, 2.0) for n, w in params().items()}
    prepared = trainer.check_gradients(grads)  # what the journal's write-ahead path calls
    assert backend.sums == 3
    assert trainer.iterations == 0  # checking changed nothing
    trainer.apply(prepared)
    assert backend.sums == 3  # apply used the prepared gradients and their sum of squares
    assert trainer.iterations == 1
    assert prepared.sum_squares == 2.0**2 * (5 + 4 + 3)


def test_strided_gradients_are_made_contiguous_for_the_fused_kernels() -> None:
    weights = {"a": np.ones(4, np.float32)}
    engine = KerasOptimizer(optimizers.SGD(lr=0.5), weights, backend=NumbaBackend())
    strided = np.arange(8, dtype=np.float32)[::2]  # 0, 2, 4, 6; not contiguous
    engine.step(weights, {"a": strided})
    np.testing.assert_array_equal(weights["a"], 1 - 0.5 * np.array([0, 2, 4, 6], np.float32))
