"""Sessions whose update rule is a native TensorFlow optimizer (Keras 2.2's ``TFOptimizer``).

Keras 2.2's ``TFOptimizer(optimizer)`` wraps a native TensorFlow optimizer so that Keras can
train with it. A :class:`TFTrainer` does the same for a session: the configuration
``{"optimizer": {"class_name": NAME, "config": {...}}}`` names one of

* the ``tf.compat.v1.train`` optimizers Keras 2.2 wrapped (:data:`V1_OPTIMIZERS`), built as
  ``cls(**config)``; or
* a ``tf.keras.optimizers`` class of the installed TensorFlow (Keras 3), built with
  ``cls.from_config(config)``, so the ``get_config()`` of a client's instance fits as it is;

and the trainer keeps the weights as TensorFlow variables, applies each push with the
optimizer's own ``apply_gradients`` (traced once per session with ``tf.function``), counts
iterations like every session and exports the optimizer's variables as the session state:

* ``slots[slot][param]``: every optimizer variable that belongs to one parameter, as an array
  of the parameter's shape (v1: ``opt.get_slot(var, slot)`` for ``opt.get_slot_names()``;
  Keras: the variables ``add_variable_from_reference`` names ``<param>_<slot>``);
* ``scalars[name]``: every other optimizer variable, which must be a scalar (v1 Adam's
  ``beta1_power`` and ``beta2_power``; Keras's ``iterations``, ``learning_rate`` and Nadam's
  ``u_product``, named by the optimizer's attribute). Integers travel as exact floats.

An optimizer with any other state (Adafactor's factored moments) is refused when the session
is created. Restoring the exported state continues bit for bit. See ``docs/tfoptimizer.md``.

TensorFlow is an optional extra: it is imported here, and this module is imported only when a
``TFOptimizer`` session is made, so a server without such sessions never loads it. Without it
the session is refused with code ``tensorflow_not_installed`` and the command that installs it.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.constraints import Constraint
from paramserver.messages import SessionState
from paramserver.optimizers import TFOptimizer
from paramserver.sharding import Shard
from paramserver.training import Async, Training

from .errors import InvalidRequest
from .optim import (
    FLOAT_DTYPES,
    NumpyBackend,
    PreparedGradients,
    StateError,
    check_weights,
    prepare_gradients,
)

__all__ = [
    "INSTALL_HINT",
    "V1_OPTIMIZERS",
    "TFTrainer",
    "check_gradients",
    "import_tensorflow",
    "optimizer_names",
]

#: The ``tf.compat.v1.train`` optimizers that Keras 2.2's ``TFOptimizer`` wrapped.
V1_OPTIMIZERS = (
    "GradientDescentOptimizer",
    "MomentumOptimizer",
    "AdagradOptimizer",
    "AdadeltaOptimizer",
    "RMSPropOptimizer",
    "AdamOptimizer",
    "FtrlOptimizer",
    "ProximalAdagradOptimizer",
    "ProximalGradientDescentOptimizer",
)

#: How to get TensorFlow onto a server that lacks it.
INSTALL_HINT = "pip install 'paramserver[tensorflow]'"

#: ``tf.keras.optimizers`` classes that are not an update rule on their own: the abstract base,
#: and the wrapper that needs a Python mapping from model variables to optimizers.
_NOT_SESSION_OPTIMIZERS = frozenset({"Optimizer", "MultiOptimizer"})

#: Keras names an optimizer variable made for a model variable ``<model variable>_<slot>``;
#: the trainer names its variables ``p0``, ``p1``, ... so the parameter is unambiguous.
_KERAS_SLOT_NAME = re.compile(r"p(\d+)_(.+)")
_KERAS_PARAMETER_NAME = re.compile(r"p(\d+)(?:_\d+)?")

#: Keras names an unnamed variable ``variable``, ``variable_1``, ... in the order it makes them.
_KERAS_AUTO_NAME = re.compile(r"^variable_\d+$")

_SUM_SQUARES = NumpyBackend().sum_squares  # float64, chunked; reads no shared scratch


def import_tensorflow() -> Any:
    """The ``tensorflow`` module; 422 ``tensorflow_not_installed`` when it cannot be imported."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise InvalidRequest(
            f"TFOptimizer sessions need TensorFlow, which this server cannot import ({exc}); "
            f"install the extra on the server: {INSTALL_HINT}",
            code="tensorflow_not_installed",
        ) from None
    return tf


def _keras_optimizer_classes(tf: Any) -> dict[str, type]:
    """The ``tf.keras.optimizers`` classes a session can use (Keras 3 on TensorFlow only)."""
    keras = tf.keras
    if not hasattr(keras, "Variable") or keras.backend.backend() != "tensorflow":
        return {}  # Keras 2 (TensorFlow < 2.16) or a Keras 3 set to another backend
    module = keras.optimizers
    base = module.Optimizer
    return {
        name: obj
        for name in dir(module)
        if name not in _NOT_SESSION_OPTIMIZERS
        and isinstance(obj := getattr(module, name), type)
        and issubclass(obj, base)
    }


def optimizer_names(tf: Any | None = None) -> list[str]:
    """The names a ``TFOptimizer`` session accepts on this server: v1 first, then tf.keras."""
    tf = tf if tf is not None else import_tensorflow()
    return [*V1_OPTIMIZERS, *sorted(_keras_optimizer_classes(tf))]


def _unknown(name: Any, tf: Any) -> InvalidRequest:
    return InvalidRequest(
        f"TFOptimizer: unknown TensorFlow optimizer {name!r}; valid names: "
        f"{', '.join(optimizer_names(tf))}",
        code="unknown_optimizer",
    )


def _invalid(name: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"TFOptimizer: {name}: {problem}", code="invalid_optimizer")


#: Arguments that hold lists (Keras's ``exclude_layers``, PiecewiseConstantDecay's ``boundaries``
#: and ``values``) and arguments that hold a serialized Keras object, with where to find its class.
_LIST_ARGUMENTS = frozenset({"exclude_layers", "boundaries", "values"})
_OBJECT_ARGUMENTS = {"learning_rate": "schedules", "inner_optimizer": "optimizers"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _argument_rule(key: str, default: Any) -> tuple[str, Callable[[Any], bool]] | None:
    """What an argument may hold, read from its default; None when TensorFlow alone checks it.

    TensorFlow checks few types: a string learning rate fails only at the first step, and a
    list epsilon broadcasts silently. The rule is the type of the default (a required or
    ``None``-default argument is a number unless it is a name or a list).
    """
    optional = default is None
    if isinstance(default, bool):
        return "a boolean", lambda v: isinstance(v, bool)
    if isinstance(default, str) or key == "name" or key.endswith("_name"):
        return "a string", lambda v: isinstance(v, str) or (optional and v is None)
    if key in _LIST_ARGUMENTS:
        return (
            "a list of numbers or strings",
            lambda v: (
                (optional and v is None)
                or (isinstance(v, list) and all(_is_number(x) or isinstance(x, str) for x in v))
            ),
        )
    if optional:
        return "a finite number or null", lambda v: v is None or _is_number(v)
    if default is inspect.Parameter.empty or isinstance(default, (int, float)):
        return "a finite number", _is_number
    return None


def _check_arguments(
    owner: str, cls: type, config: Mapping[str, Any], nested: Mapping[str, Mapping[str, type]]
) -> None:
    """Check the arguments ``config`` gives ``cls`` by their defaults (see :func:`_argument_rule`).

    Unknown arguments are left to TensorFlow, which names them. A serialized Keras object is
    accepted only where Keras deserializes one (a learning-rate schedule, LossScaleOptimizer's
    ``inner_optimizer``), only of a class of ``nested[kind]``, and its arguments are checked
    too: a client must not make the server build anything else.
    """
    parameters = inspect.signature(cls).parameters
    for key, value in config.items():
        parameter = parameters.get(key)
        if parameter is None or parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if key in _OBJECT_ARGUMENTS and isinstance(value, Mapping):
            _check_object(owner, key, value, nested[_OBJECT_ARGUMENTS[key]], nested)
            continue
        rule = _argument_rule(key, parameter.default)
        if rule is not None and not rule[1](value):
            raise _invalid(owner, f"argument {key!r} must be {rule[0]}, got {value!r}")


def _check_object(
    owner: str,
    key: str,
    value: Mapping[str, Any],
    classes: Mapping[str, type],
    nested: Mapping[str, Mapping[str, type]],
) -> None:
    name, module, config = value.get("class_name"), value.get("module"), value.get("config", {})
    if (
        not isinstance(name, str)
        or name not in classes
        or not (module is None or (isinstance(module, str) and module.split(".", 1)[0] == "keras"))
    ):
        raise _invalid(
            owner,
            f"argument {key!r} may hold {'a number or ' if key == 'learning_rate' else ''}"
            f"a serialized Keras object of a class among {', '.join(sorted(classes))}; "
            f"got class {name!r} of module {module!r}",
        )
    if not isinstance(config, Mapping):
        raise _invalid(owner, f"argument {key!r}: 'config' must be an object")
    _check_arguments(owner, classes[name], config, nested)


def _build_optimizer(tf: Any, name: Any, config: Mapping[str, Any]) -> tuple[str, Any]:
    """``(family, optimizer)`` for a name and its arguments; 422 with TensorFlow's message."""
    if name in V1_OPTIMIZERS:
        cls = getattr(tf.compat.v1.train, name)
        _check_arguments(name, cls, config, {})
        try:
            return "v1", cls(**config)
        except Exception as exc:  # TensorFlow's own check of its arguments, whatever it raises
            raise _invalid(name, str(exc)) from None
    keras_classes = _keras_optimizer_classes(tf)
    if name not in keras_classes:
        raise _unknown(name, tf)
    module = tf.keras.optimizers.schedules
    schedules = {
        n: obj
        for n in dir(module)
        if isinstance(obj := getattr(module, n), type)
        and issubclass(obj, module.LearningRateSchedule)
        and obj is not module.LearningRateSchedule
    }
    _check_arguments(
        name, keras_classes[name], config, {"schedules": schedules, "optimizers": keras_classes}
    )
    try:
        optimizer = keras_classes[name].from_config(copy.deepcopy(dict(config)))  # type: ignore[attr-defined]
        return "keras", optimizer
    except Exception as exc:
        raise _invalid(name, str(exc)) from None


def _np_dtype(variable: Any) -> np.dtype:
    """A TensorFlow or Keras variable's dtype as numpy's."""
    dtype = variable.dtype
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def _shape(variable: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in variable.shape)


@dataclass(frozen=True)
class _StateVariable:
    """One optimizer variable: where it goes in the exported state, and what it must hold."""

    variable: Any
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, variable: Any) -> _StateVariable:
        return cls(variable, _shape(variable), _np_dtype(variable))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def check_gradients(
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], grads: Mapping[str, np.ndarray]
) -> PreparedGradients:
    """The numpy engine's rules (:func:`paramserver.server.optim.engine.prepare_gradients`) for
    ``specs``; returns the gradients cast to their parameters' dtypes (flat). Changes nothing."""

    def cast(name: str, g: np.ndarray, dtype: np.dtype) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused after
            return g.astype(dtype, copy=False)

    return prepare_gradients(specs, grads, cast=cast, sum_squares=_SUM_SQUARES)


_TRACE_LOCK = threading.Lock()


@contextmanager
def _forgetting_custom_gradients() -> Iterator[None]:
    """Trace inside this: drop the gradient functions the trace registers with TensorFlow.

    ``tf.custom_gradient`` in a traced graph registers its gradient function in TensorFlow's
    process-wide gradient registry, which then keeps the graph, and the variables it captured,
    alive forever: Keras's TF optimizers all-reduce the gradients through one, so every session
    would leak about three times its parameters. A session never differentiates its step, so
    the registrations made while tracing it are removed (traces are serialised so that the
    difference is only this trace's).
    """
    from tensorflow.python.framework import ops  # the registry has no public API

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    if not isinstance(registry, dict):
        yield
        return
    with _TRACE_LOCK:
        before = set(registry)
        try:
            yield
        finally:
            for key in set(registry) - before:
                if key.startswith("CustomGradient-"):
                    registry.pop(key, None)


class TFTrainer:
    """Weights in TensorFlow variables, updated by a native TensorFlow optimizer.

    ``optimizer`` is the session's :class:`paramserver.optimizers.TFOptimizer` configuration. The
    constructor imports TensorFlow, builds the optimizer (422 ``unknown_optimizer`` or
    ``invalid_optimizer`` with TensorFlow's message), creates its slots and traces the step once,
    so that an optimizer that cannot update these parameters (ProximalAdagradOptimizer and
    float64 weights) is refused now rather than halfway through a push.
    """

    #: TensorFlow applies a step in place: there is no saved copy to go back to.
    refuse_non_finite = False
    #: Row-sparse gradients are applied as their dense equivalent (TensorFlow's optimizers
    #: would otherwise take their own sparse paths, with their own semantics).
    sparse_updates = "exact"

    def __init__(
        self,
        optimizer: TFOptimizer,
        weights: Mapping[str, np.ndarray],
        *,
        restoring: bool = False,
        training: Training | None = None,
    ) -> None:
        check_weights(weights, finite=not restoring)
        self.training: Training = Async() if training is None else training
        self.constraints: dict[str, Constraint] = {}  # Keras 2.2.4's TFOptimizer has none
        self.shard: Shard | None = None
        tf = import_tensorflow()
        spec = optimizer.get_config()["optimizer"]
        name, config = spec["class_name"], spec["config"]
        self.optimizer = optimizer
        self._specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            n: (tuple(w.shape), np.dtype(w.dtype.name)) for n, w in weights.items()
        }
        self._family, self._opt = _build_optimizer(tf, name, config)
        make_variable = tf.Variable if self._family == "v1" else tf.keras.Variable
        self._variables = {
            n: make_variable(
                np.ascontiguousarray(weights[n], dtype=dtype), name=f"p{i}", dtype=dtype
            )
            for i, (n, (_shape, dtype)) in enumerate(self._specs.items())
        }
        variables = list(self._variables.values())
        try:
            if self._family == "v1":
                self._opt._create_slots(variables)  # what apply_gradients does on its first call
            else:
                self._opt.build(variables)
        except Exception as exc:
            raise _invalid(name, f"cannot build its state for these parameters: {exc}") from None
        self._slots, self._scalars = self._state_variables(name)

        opt = self._opt  # the traced step must not hold the trainer (no reference cycle)

        def step(grads: list[Any]) -> None:
            opt.apply_gradients(list(zip(grads, variables, strict=True)))

        signature = [
            tf.TensorSpec(shape, tf.as_dtype(dtype)) for shape, dtype in self._specs.values()
        ]
        self._step: Callable[[list[Any]], None] = tf.function(
            step, input_signature=[signature], autograph=False
        )
        with _forgetting_custom_gradients():
            try:
                self._step.get_concrete_function()
            except Exception as exc:
                raise _invalid(name, f"cannot update these parameters: {exc}") from None
        self._tf = tf
        self._iterations = 0
        self._weights: dict[str, np.ndarray] | None = None

    def _state_variables(
        self, name: str
    ) -> tuple[dict[str, dict[str, _StateVariable]], dict[str, _StateVariable]]:
        """Sort the optimizer's variables into per-parameter slots and scalars."""
        params = list(self._specs)
        slots: dict[str, dict[str, _StateVariable]] = {}
        scalars: dict[str, _StateVariable] = {}
        others: list[tuple[str, Any]] = []
        if self._family == "v1":
            taken: set[int] = set()
            for slot in self._opt.get_slot_names():
                for param, variable in self._variables.items():
                    var = self._opt.get_slot(variable, slot)
                    if var is not None:
                        slots.setdefault(slot, {})[param] = _StateVariable.of(var)
                        taken.add(id(var))
            for var in self._opt.variables():
                if id(var) not in taken:
                    others.append((var.name.split(":", 1)[0], var))
        else:
            # Scalars go by the optimizer's attribute (Nadam's unnamed ``_u_product`` gets a
            # process-wide unique name such as ``variable_3``), else by their own name.
            attributes = {id(v): k.lstrip("_") for k, v in vars(self._opt).items()}
            for var in self._opt.variables:
                match = _KERAS_SLOT_NAME.fullmatch(var.name)
                if match and int(match[1]) < len(params):
                    param, slot = params[int(match[1])], match[2]
                    if param not in slots.get(slot, {}) and _shape(var) == self._specs[param][0]:
                        slots.setdefault(slot, {})[param] = _StateVariable.of(var)
                        continue
                key = attributes.get(id(var)) or _KERAS_AUTO_NAME.sub("variable", var.name)
                others.append((key, var))
        for key, var in others:
            item = _StateVariable.of(var)
            # A variable named after a parameter but not of its shape (Adafactor's factored
            # moments, even the placeholders it makes for vectors) is per-parameter state
            # that does not fit a slot.
            match = _KERAS_PARAMETER_NAME.fullmatch(var.name)
            owner = (
                params[int(match[1])]
                if self._family == "keras" and match and int(match[1]) < len(params)
                else None
            )
            if owner is not None or item.shape != () or item.dtype.kind not in "fiu":
                what = f"for parameter {owner!r} " if owner is not None else ""
                raise _invalid(
                    name,
                    f"its state variable {var.name!r} {what}(shape {list(item.shape)}, dtype "
                    f"{item.dtype}) is neither a per-parameter slot of the parameter's shape nor "
                    "a numeric scalar, so the session state cannot carry it; this optimizer is "
                    "not supported",
                )
            unique, k = key, 0
            while unique in scalars:
                k += 1
                unique = f"{key}_{k}"
            scalars[unique] = item
        for slot, per in slots.items():
            for param, item in per.items():
                if item.dtype not in FLOAT_DTYPES:
                    raise _invalid(
                        name,
                        f"its slot {slot!r} of {param!r} has dtype {item.dtype}; "
                        "the session state carries float16/32/64 slots only",
                    )
        return slots, scalars

    # --- the Trainer protocol ----------------------------------------------------------------

    @property
    def iterations(self) -> int:
        return self._iterations

    def parameters(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {n: (dtype, shape) for n, (shape, dtype) in self._specs.items()}

    def check_gradients(self, grads: Mapping[str, np.ndarray]) -> PreparedGradients:
        return check_gradients(self._specs, grads)

    def apply(self, prepared: PreparedGradients) -> None:
        """One ``apply_gradients`` with the prepared gradients (cast to the parameters' dtypes)."""
        flat = prepared.dense(self._specs)  # a row-sparse gradient as its dense equivalent
        tensors = [
            self._tf.convert_to_tensor(flat[n].reshape(shape))
            for n, (shape, _dtype) in self._specs.items()
        ]
        self._weights = None
        self._step(tensors)
        self._iterations += 1

    def rollback(self) -> None:
        raise RuntimeError("TFOptimizer sessions cannot roll a step back")

    def weights(self) -> Mapping[str, np.ndarray]:
        if self._weights is None:
            self._weights = {n: v.numpy() for n, v in self._variables.items()}
        return self._weights

    def state(self) -> SessionState:
        return SessionState(
            optimizer=self.optimizer,
            weights=dict(self.weights()),
            iterations=self._iterations,
            slots={
                slot: {param: item.variable.numpy() for param, item in per.items()}
                for slot, per in self._slots.items()
            },
            scalars={key: _scalar(item) for key, item in self._scalars.items()},
            training=self.training,
            shard=self.shard,
        )

    def load_state(self, state: SessionState) -> None:
        """Load the slots, scalars and iterations of an exported state (the weights are the
        constructor's). Raises :class:`StateError` and changes nothing when it does not fit."""
        values = self._check_state(state)
        for item, value in values:
            item.variable.assign(value)
        self._iterations = int(state.iterations)
        self._weights = None

    def _check_state(self, state: SessionState) -> list[tuple[_StateVariable, np.ndarray]]:
        it = state.iterations
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 0:
            raise StateError(f"iterations must be an integer >= 0, got {it!r}")
        name = self.optimizer.get_config()["optimizer"]["class_name"]
        if set(state.slots) != set(self._slots):
            raise StateError(
                f"TFOptimizer {name} has slots {sorted(self._slots)}, "
                f"the state has {sorted(state.slots)}"
            )
        values: list[tuple[_StateVariable, np.ndarray]] = []
        for slot, per in self._slots.items():
            given = state.slots[slot]
            if set(given) != set(per):
                raise StateError(f"slot {slot!r} must hold exactly the parameters {sorted(per)}")
            for param, item in per.items():
                arr = given[param]
                if not isinstance(arr, np.ndarray):
                    raise StateError(f"slot {slot!r} of {param!r} is not an array")
                if tuple(arr.shape) != item.shape or np.dtype(arr.dtype.name) != item.dtype:
                    raise StateError(
                        f"slot {slot!r} of {param!r} has shape {list(arr.shape)} and dtype "
                        f"{arr.dtype}; expected {list(item.shape)} and {item.dtype}"
                    )
                values.append((item, np.ascontiguousarray(arr, dtype=item.dtype)))
        if set(state.scalars) != set(self._scalars):
            raise StateError(
                f"TFOptimizer {name} has scalar state {sorted(self._scalars)}, "
                f"the state has {sorted(state.scalars)}"
            )
        for key, item in self._scalars.items():
            values.append((item, _scalar_value(key, item, state.scalars[key])))
        return values

    def nbytes(self) -> int:
        weights = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self._specs.values())
        slots = sum(item.nbytes for per in self._slots.values() for item in per.values())
        return weights + slots + sum(item.nbytes for item in self._scalars.values())


def _scalar(item: _StateVariable) -> float:
    """A scalar variable's value as a float (exact for float16/32/64 and |ints| < 2**53)."""
    return float(np.asarray(item.variable.numpy()).item())


def _scalar_value(key: str, item: _StateVariable, value: Any) -> np.ndarray:
    """An exported scalar as a 0-d array of the variable's dtype; StateError if it cannot be."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(float(value))
    ):
        raise StateError(f"scalar {key!r} must be a finite number, got {value!r}")
    if item.dtype.kind in "iu":
        info = np.iinfo(item.dtype)
        if float(value) != int(value) or not info.min <= int(value) <= info.max:
            raise StateError(
                f"scalar {key!r} must be an integer in [{info.min}, {info.max}], got {value!r}"
            )
        return np.asarray(int(value), dtype=item.dtype)
    return np.asarray(value, dtype=item.dtype)
