"""A model's weights together with the optimizer that updates them.

A :class:`Trainer` is what a session holds: the weights, the update rule and its state. The
Keras rules (:class:`KerasTrainer`) keep the weights as numpy arrays and update them in place
with :class:`paramserver.server.optim.KerasOptimizer`; ``TFOptimizer`` sessions use a trainer that
keeps them as TensorFlow variables (:mod:`paramserver.server.tf_trainer`, imported only when such a
session is made).

Trainers are not thread-safe: the session serialises access.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from paramserver.optimizers import Optimizer as OptimizerConfig
from paramserver.optimizers import TFOptimizer

from .optim import FLOAT_DTYPES, KerasOptimizer, OptimizerState, StateError

__all__ = ["KerasTrainer", "SessionState", "Trainer", "build_trainer", "check_weights"]


@dataclass
class SessionState:
    """Everything needed to rebuild a session exactly (the body of the state endpoints)."""

    optimizer: OptimizerConfig
    weights: dict[str, np.ndarray]
    iterations: int
    slots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    """Weights plus an update rule. Implementations: :class:`KerasTrainer`, ``TFTrainer``."""

    optimizer: OptimizerConfig

    @property
    def iterations(self) -> int: ...

    def parameters(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every parameter, in the model's order."""
        ...

    def check_gradients(self, grads: Mapping[str, np.ndarray]) -> None:
        """Raise ``GradientError`` if ``grads`` cannot be applied; change nothing."""
        ...

    def apply(self, grads: Mapping[str, np.ndarray]) -> None:
        """One optimizer step. Validates first: on error nothing changes."""
        ...

    def weights(self) -> Mapping[str, np.ndarray]:
        """The current weights: live arrays, valid until the next step (hold the lock)."""
        ...

    def state(self) -> SessionState:
        """The state with live arrays (hold the lock while encoding it)."""
        ...

    def nbytes(self) -> int:
        """Bytes held by weights and optimizer state."""
        ...


def check_weights(weights: Mapping[str, np.ndarray]) -> None:
    """Weights are a non-empty map of finite float16/32/64 arrays."""
    if not weights:
        raise StateError("a session needs at least one parameter in 'weights'")
    for name, value in weights.items():
        if np.dtype(value.dtype) not in FLOAT_DTYPES:
            raise StateError(f"weight {name!r} has dtype {value.dtype}; use float16/32/64")
        if not np.isfinite(value).all():
            raise StateError(f"weight {name!r} contains NaN or infinite values")


class KerasTrainer:
    """Numpy weights updated in place by a Keras 2.2.4 rule."""

    def __init__(self, optimizer: OptimizerConfig, weights: Mapping[str, np.ndarray]) -> None:
        check_weights(weights)
        # Own the weights: aligned, writable, native-endian, C-contiguous copies.
        self._weights = {
            name: np.array(value, dtype=value.dtype.newbyteorder("="), order="C", copy=True)
            for name, value in weights.items()
        }
        self.optimizer = optimizer
        self.engine = KerasOptimizer(optimizer, self._weights)

    @property
    def iterations(self) -> int:
        return self.engine.iterations

    def parameters(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {n: (w.dtype, w.shape) for n, w in self._weights.items()}

    def check_gradients(self, grads: Mapping[str, np.ndarray]) -> None:
        self.engine.check_gradients(grads)

    def apply(self, grads: Mapping[str, np.ndarray]) -> None:
        self.engine.step(self._weights, grads)

    def weights(self) -> Mapping[str, np.ndarray]:
        return self._weights

    def state(self) -> SessionState:
        return SessionState(
            optimizer=self.optimizer,
            weights=self._weights,
            iterations=self.engine.iterations,
            slots=self.engine.slots,
            scalars={k: float(v) for k, v in self.engine.scalars.items()},
        )

    def load_state(self, state: SessionState) -> None:
        self.engine.set_state(
            OptimizerState(iterations=state.iterations, slots=state.slots, scalars=state.scalars)
        )

    def nbytes(self) -> int:
        return sum(w.nbytes for w in self._weights.values()) + self.engine.state_nbytes


def build_trainer(optimizer: OptimizerConfig, weights: Mapping[str, np.ndarray]) -> Any:
    """A fresh trainer for ``optimizer`` over copies of ``weights``."""
    if isinstance(optimizer, TFOptimizer):
        from .tf_trainer import TFTrainer  # TensorFlow is imported only for these sessions

        return TFTrainer(optimizer, weights)
    return KerasTrainer(optimizer, weights)


def restore_trainer(state: SessionState) -> Any:
    """A trainer rebuilt from an exported state; raises ``StateError`` if it does not fit."""
    trainer = build_trainer(state.optimizer, state.weights)
    trainer.load_state(state)
    return trainer
