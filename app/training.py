"""A model's weights together with the optimizer that updates them.

A :class:`Trainer` is what a session holds: the weights, the update rule and its state. The
Keras rules (:class:`KerasTrainer`) keep the weights as numpy arrays and update them in place
with :class:`~paramserver.server.optim.KerasOptimizer`; ``TFOptimizer`` sessions use a trainer
that keeps them as TensorFlow variables (:mod:`paramserver.server.tf_trainer`, imported only
when such a session is made).

A step is two calls: :meth:`Trainer.check_gradients` validates and prepares the gradients
(changing nothing), :meth:`Trainer.apply` applies the prepared gradients and cannot fail; the
journal logs a push between the two. Trainers are not thread-safe: the session serialises
access.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from paramserver.messages import SessionState
from paramserver.optimizers import Optimizer as OptimizerConfig
from paramserver.optimizers import TFOptimizer

from .optim import KerasOptimizer, OptimizerState, PreparedGradients, check_weights

__all__ = ["KerasTrainer", "Trainer", "build_trainer", "restore_trainer"]


class Trainer(Protocol):
    """Weights plus an update rule. Implementations: :class:`KerasTrainer`, ``TFTrainer``."""

    @property
    def optimizer(self) -> OptimizerConfig:
        """The session's optimizer configuration."""
        ...

    @property
    def iterations(self) -> int: ...

    def parameters(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every parameter, in the model's order."""
        ...

    def check_gradients(self, grads: Mapping[str, np.ndarray]) -> PreparedGradients:
        """The gradients prepared for :meth:`apply`; raises ``GradientError`` if they cannot
        be applied. Changes nothing."""
        ...

    def apply(self, prepared: PreparedGradients) -> None:
        """One optimizer step with gradients from :meth:`check_gradients` (the latest call)."""
        ...

    def weights(self) -> Mapping[str, np.ndarray]:
        """The current weights: live arrays, valid until the next step (hold the lock)."""
        ...

    def state(self) -> SessionState:
        """The state with live arrays (hold the lock while encoding it)."""
        ...

    def load_state(self, state: SessionState) -> None:
        """Load the optimizer state of an exported state (the weights are the constructor's);
        raises ``StateError`` and changes nothing when it does not fit."""
        ...

    def nbytes(self) -> int:
        """Bytes held by weights and optimizer state."""
        ...


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

    def check_gradients(self, grads: Mapping[str, np.ndarray]) -> PreparedGradients:
        return self.engine.check_gradients(grads)

    def apply(self, prepared: PreparedGradients) -> None:
        self.engine.apply(self._weights, prepared)

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


def build_trainer(optimizer: OptimizerConfig, weights: Mapping[str, np.ndarray]) -> Trainer:
    """A fresh trainer for ``optimizer`` over copies of ``weights``."""
    if isinstance(optimizer, TFOptimizer):
        # TensorFlow is imported only for these sessions. (tf_trainer does not import this
        # module: it implements the Trainer protocol structurally, so there is no cycle.)
        from .tf_trainer import TFTrainer

        return TFTrainer(optimizer, weights)
    return KerasTrainer(optimizer, weights)


def restore_trainer(state: SessionState) -> Trainer:
    """A trainer rebuilt from an exported state; raises ``StateError`` if it does not fit."""
    trainer = build_trainer(state.optimizer, state.weights)
    trainer.load_state(state)
    return trainer
