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

import dataclasses
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from paramserver.codes import ErrorCode, MessageError
from paramserver.constraints import Constraint, check_axes
from paramserver.messages import SessionState
from paramserver.optimizers import Optimizer as OptimizerConfig
from paramserver.optimizers import TFOptimizer
from paramserver.sharding import Shard, check_parts
from paramserver.training import Async, Sync, Training

from .optim import (
    GradientError,
    KerasOptimizer,
    OptimizerState,
    PreparedGradients,
    StateError,
    check_weights,
    constrained,
)

__all__ = ["KerasTrainer", "Trainer", "build_trainer", "restore_trainer"]


class Trainer(Protocol):
    """Weights plus an update rule. Implementations: :class:`KerasTrainer`, ``TFTrainer``."""

    @property
    def optimizer(self) -> OptimizerConfig:
        """The session's optimizer configuration."""
        ...

    @property
    def iterations(self) -> int: ...

    #: The session's training mode (:mod:`paramserver.training`), carried by its state.
    training: Training
    #: Parameter name -> Keras 2.2.4 constraint applied after every step (carried by the
    #: state; empty for TFOptimizer sessions).
    constraints: dict[str, Constraint]
    #: Which part of a sharded session this is (None: a whole session); carried by the state.
    shard: Shard | None

    @property
    def sparse_updates(self) -> str:
        """How row-sparse gradients update: "exact" or "lazy" (carried by the state)."""
        ...

    def parameters(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every parameter, in the model's order."""
        ...

    def check_gradients(self, grads: Mapping[str, np.ndarray]) -> PreparedGradients:
        """The gradients prepared for :meth:`apply`; raises ``GradientError`` if they cannot
        be applied. Changes nothing."""
        ...

    def apply(self, prepared: PreparedGradients) -> None:
        """One optimizer step with gradients from :meth:`check_gradients` (the latest call).

        With :attr:`refuse_non_finite`, a step whose weights or slots would not be finite
        raises ``GradientError`` ``non_finite_result`` and changes nothing.
        """
        ...

    @property
    def refuse_non_finite(self) -> bool:
        """The session's setting: refuse steps whose result is not finite."""
        ...

    def rollback(self) -> None:
        """Undo the last :meth:`apply` (only with :attr:`refuse_non_finite`, which keeps what
        it needs for that): the journal calls it when it could not log an applied step."""
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
    """Numpy weights updated in place by a Keras 2.2.4 rule.

    ``refuse_non_finite``: each step first saves the weights and slots (into buffers kept for
    the next step: twice the session's memory, and a copy of it per step), then checks the
    result, and puts the saved values back if it is not finite. ``restoring``: the weights
    come from an exported state and may hold NaN or inf.
    """

    def __init__(
        self,
        optimizer: OptimizerConfig,
        weights: Mapping[str, np.ndarray],
        *,
        refuse_non_finite: bool = False,
        restoring: bool = False,
        training: Training | None = None,
        constraints: Mapping[str, Constraint] | None = None,
    ) -> None:
        check_weights(weights, finite=not restoring)
        self.training: Training = Async() if training is None else training
        self.constraints: dict[str, Constraint] = check_constraints(weights, constraints)
        self.shard: Shard | None = None
        # Own the weights: aligned, writable, native-endian, C-contiguous copies.
        self._weights = {
            name: np.array(value, dtype=value.dtype.newbyteorder("="), order="C", copy=True)
            for name, value in weights.items()
        }
        self._weights_nbytes = sum(w.nbytes for w in self._weights.values())
        self.optimizer = optimizer
        self.engine = KerasOptimizer(optimizer, self._weights)
        self._refuse_non_finite = refuse_non_finite
        self._saved: dict[str, np.ndarray] = {}
        self._saved_counters: tuple[int, dict[str, object]] | None = None

    @property
    def refuse_non_finite(self) -> bool:
        return self._refuse_non_finite

    @property
    def sparse_updates(self) -> str:
        return self.engine.sparse_updates

    @property
    def iterations(self) -> int:
        return self.engine.iterations

    def parameters(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {n: (w.dtype, w.shape) for n, w in self._weights.items()}

    def check_gradients(self, grads: Mapping[str, np.ndarray]) -> PreparedGradients:
        return self.engine.check_gradients(grads)

    def apply(self, prepared: PreparedGradients) -> None:
        if not self._refuse_non_finite:
            self.engine.apply(self._weights, prepared)
            self._constrain()
            return
        self._save()
        self.engine.apply(self._weights, prepared)
        self._constrain()
        if not self.engine.all_finite(self._weights):
            self.rollback()
            raise GradientError(
                "the step would make weights or optimizer slots NaN or infinite; it was not "
                "applied (the session refuses non-finite results: refuse_non_finite)",
                code=ErrorCode.NON_FINITE_RESULT,
            )

    def _constrain(self) -> None:
        """Each constrained parameter's new value through its constraint, as Keras 2.2.4's
        update passes ``new_p`` to ``p.constraint`` (after the step, in the step)."""
        for name, constraint in self.constraints.items():
            weight = self._weights[name]
            np.copyto(weight, constrained(constraint, weight))

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {f"w/{n}": w for n, w in self._weights.items()}
        for slot, per in self.engine.slots.items():
            out.update({f"{slot}/{n}": a for n, a in per.items()})
        return out

    def _save(self) -> None:
        for key, array in self._arrays().items():
            saved = self._saved.get(key)
            if saved is None:
                saved = self._saved[key] = np.empty_like(array)
            np.copyto(saved, array)
        self._saved_counters = (self.engine.iterations, dict(self.engine.scalars))

    def rollback(self) -> None:
        if self._saved_counters is None:
            raise RuntimeError("rollback() without a saved step (refuse_non_finite is off)")
        for key, array in self._arrays().items():
            np.copyto(array, self._saved[key])
        self.engine.iterations, scalars = self._saved_counters
        self.engine.scalars = dict(scalars)
        self._saved_counters = None

    def weights(self) -> Mapping[str, np.ndarray]:
        return self._weights

    def state(self) -> SessionState:
        return SessionState(
            optimizer=self.optimizer,
            weights=self._weights,
            iterations=self.engine.iterations,
            slots=self.engine.slots,
            scalars={k: float(v) for k, v in self.engine.scalars.items()},
            refuse_non_finite=self._refuse_non_finite,
            training=self.training,
            constraints=dict(self.constraints),
            shard=self.shard,
            sparse_updates=self.engine.sparse_updates,
        )

    def load_state(self, state: SessionState) -> None:
        self.engine.set_state(
            OptimizerState(iterations=state.iterations, slots=state.slots, scalars=state.scalars)
        )

    def nbytes(self) -> int:
        held = self._weights_nbytes + self.engine.state_nbytes
        if self._refuse_non_finite:  # the saved copy of weights and slots
            held *= 2
        return held


def check_constraints(
    weights: Mapping[str, np.ndarray], constraints: Mapping[str, Constraint] | None
) -> dict[str, Constraint]:
    """The constraints, each of a parameter of ``weights`` and with axes it has
    (``invalid_constraint`` otherwise)."""
    out = dict(constraints or {})
    for name, constraint in out.items():
        if name not in weights:
            raise StateError(
                f"constraint for {name!r}, which is not a parameter of the session "
                f"({', '.join(map(repr, list(weights)[:10]))})"[:400],
                code=ErrorCode.INVALID_CONSTRAINT,
            )
        try:
            check_axes(name, constraint, tuple(weights[name].shape))
        except ValueError as exc:
            raise StateError(str(exc), code=ErrorCode.INVALID_CONSTRAINT) from None
    return out


def build_trainer(
    optimizer: OptimizerConfig,
    weights: Mapping[str, np.ndarray],
    *,
    refuse_non_finite: bool = False,
    restoring: bool = False,
    training: Training | None = None,
    constraints: Mapping[str, Constraint] | None = None,
    shard: Shard | None = None,
    sparse_updates: str = "exact",
) -> Trainer:
    """A fresh trainer for ``optimizer`` over copies of ``weights`` (``training``: the
    session's mode, default asynchronous; ``shard``: the part of a sharded session it is;
    ``sparse_updates``: how row-sparse gradients update, "exact" or "lazy")."""
    if sparse_updates == "lazy":
        if isinstance(optimizer, TFOptimizer):
            raise StateError(
                "sparse_updates 'lazy' is for Keras 2.2 optimizers; a TFOptimizer applies "
                "row-sparse gradients as their dense equivalent (use 'exact')",
                code=ErrorCode.INVALID_OPTIMIZER,
            )
        normed = sorted(n for n, c in (constraints or {}).items() if c.norm_based)
        if normed:
            raise StateError(
                f"sparse_updates 'lazy' cannot keep norm-based constraints ({', '.join(normed)}):"
                " their norms span rows a lazy step leaves alone; use 'exact' or constrain on "
                "the worker",
                code=ErrorCode.INVALID_CONSTRAINT,
            )
    if shard is not None:
        check_shardable(optimizer, training)
        try:
            check_parts(
                shard,
                {name: np.shape(w) for name, w in weights.items()},
                slices=not isinstance(optimizer, TFOptimizer),
            )
        except MessageError as exc:
            raise StateError(str(exc), code=exc.code) from None
    trainer = _build_trainer(
        optimizer,
        weights,
        refuse_non_finite=refuse_non_finite,
        restoring=restoring,
        training=training,
        constraints=constraints,
    )
    trainer.shard = shard
    if isinstance(trainer, KerasTrainer):
        trainer.engine.sparse_updates = sparse_updates
    return trainer


def with_sum_squares(
    trainer: Trainer, prepared: PreparedGradients, sum_squares: float | None
) -> PreparedGradients:
    """``prepared`` clipping with the whole push's ``sum_squares`` (a shard's part of a
    sharded push) instead of its own; ``GradientError`` where that is not a shard's async
    push with clipnorm (the only place it means something)."""
    if sum_squares is None:
        return prepared
    if (
        trainer.shard is None
        or isinstance(trainer.training, Sync)
        or trainer.optimizer.get_config().get("clipnorm") is None
        or not isinstance(trainer, KerasTrainer)
    ):
        raise GradientError(
            "'sum_squares' is for a shard's part of a sharded push whose optimizer clips "
            "with clipnorm (asynchronous); this session is not one",
            code=ErrorCode.INVALID_REQUEST,
        )
    return dataclasses.replace(prepared, sum_squares=float(sum_squares))


def check_shardable(optimizer: OptimizerConfig, training: Training | None) -> None:
    """Refuse what a sharded session cannot do exactly (``paramserver.sharding``): sync rounds
    with backup workers or with clipnorm, and TensorFlow's global norm clipping."""
    if isinstance(training, Sync):
        if training.backups:
            raise StateError(
                "a sharded session cannot train in sync rounds with backup workers "
                f"(total_num_replicas {training.total_num_replicas} > replicas_to_aggregate "
                f"{training.replicas_to_aggregate}): each shard runs its own rounds, and two "
                "shards could average different sets of workers",
                code=ErrorCode.INVALID_TRAINING,
            )
        if optimizer.get_config().get("clipnorm") is not None:
            raise StateError(
                "a sharded session cannot combine sync rounds with clipnorm: the clip applies "
                "to the mean over the workers, whose norm no shard sees; clip on the workers, "
                "or train asynchronously (each push then carries its sum_squares)",
                code=ErrorCode.INVALID_TRAINING,
            )
    if isinstance(optimizer, TFOptimizer):
        inner = optimizer.get_config()["optimizer"].get("config", {})
        if inner.get("global_clipnorm") is not None:
            raise StateError(
                "a sharded TFOptimizer session cannot use global_clipnorm: TensorFlow clips "
                "with the norm of the shard's own variables (use clipnorm, per variable, or "
                "a Keras 2.2 optimizer with clipnorm)",
                code=ErrorCode.INVALID_OPTIMIZER,
            )


def _build_trainer(
    optimizer: OptimizerConfig,
    weights: Mapping[str, np.ndarray],
    *,
    refuse_non_finite: bool,
    restoring: bool,
    training: Training | None,
    constraints: Mapping[str, Constraint] | None,
) -> Trainer:
    if isinstance(optimizer, TFOptimizer):
        if constraints:
            raise StateError(
                "constraints are not available for TFOptimizer sessions: Keras 2.2.4's "
                "TFOptimizer applies no constraints (use a Keras 2.2 optimizer, or constrain "
                "the weights on the worker)",
                code=ErrorCode.INVALID_CONSTRAINT,
            )
        if refuse_non_finite:
            raise StateError(
                "refuse_non_finite is not available for TFOptimizer sessions (TensorFlow "
                "applies its steps in place); create the session without it"
            )
        # TensorFlow is imported only for these sessions. (tf_trainer does not import this
        # module: it implements the Trainer protocol structurally, so there is no cycle.)
        from .tf_trainer import TFTrainer

        return TFTrainer(optimizer, weights, restoring=restoring, training=training)
    return KerasTrainer(
        optimizer,
        weights,
        refuse_non_finite=refuse_non_finite,
        restoring=restoring,
        training=training,
        constraints=constraints,
    )


def restore_trainer(state: SessionState) -> Trainer:
    """A trainer rebuilt from an exported state; raises ``StateError`` if it does not fit."""
    trainer = build_trainer(
        state.optimizer,
        state.weights,
        refuse_non_finite=state.refuse_non_finite,
        restoring=True,
        training=state.training,
        constraints=state.constraints,
        shard=state.shard,
        sparse_updates=state.sparse_updates,
    )
    trainer.load_state(state)
    return trainer
