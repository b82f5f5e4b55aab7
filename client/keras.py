"""tf.keras (Keras 3 on TensorFlow) through a session: ``model.fit`` trains on the server.

::

    from paramserver import optimizers
    from paramserver.client import Client
    from paramserver.client import keras as ps_keras

    with Client("http://127.0.0.1:8000") as client:
        remote = ps_keras.create_session(client, model, optimizers.Adam(lr=1e-3))
        model.compile(optimizer=remote, loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=5)           # every step: push the gradients, take the weights

    # in any other process, after building the same model with the same code:
        remote = ps_keras.join_session(client, model, session_id)

:class:`RemoteOptimizer` is a ``keras.optimizers.Optimizer`` whose step sends the gradients
to the session (one push) and assigns the weights the server answers to the model's
variables. The update rule is the session's Keras 2.2.4 optimizer, run on the server; the
Keras-side ``learning_rate`` only shows the session's ``lr`` (callbacks that change it change
nothing). ``docs/frameworks.md`` has the whole story; in short:

* **Parameters** are the model's *trainable* variables, named by their path in the model
  (:func:`parameter_names`): the layer names down from the model (not the model's own name),
  then the variable's (``dense/kernel``, ``block/dense_1/bias``). A name Keras made up
  (``dense_7``: the class's snake-case name and a process-wide counter) is renumbered by
  position among its siblings, so every process that builds the same model code gets the same
  names; names given by hand are kept. Joining checks names, shapes, dtypes and constraints
  and lists every difference (:class:`SessionMismatch`).
* **Non-trainable state stays on the worker**: BatchNormalization's moving mean and variance,
  and any other non-trainable variable, are updated locally by the forward pass and never sent;
  each worker process keeps its own.
* **Gradients**: an ``IndexedSlices`` gradient (an Embedding layer's) travels as its rows
  (``paramserver.client.Rows``: only the rows the batch touched; the server sums repeated
  indices, as densifying would, and by default applies the dense step: docs/protocol.md,
  "Row-sparse tensors"); a variable without a gradient
  (``None``: the loss does not depend on it) is refused before anything is sent, naming it,
  since zeros are not a neutral step for momentum or Adam.
* **Constraints**: each trainable variable's constraint (``kernel_constraint=`` and co.:
  ``MaxNorm``, ``NonNeg``, ``UnitNorm``, ``MinMaxNorm``) is sent with the session and applied
  by the server after every step, with Keras 2.2.4's math; the worker does not apply it again
  (Keras 3 applies ``variable.constraint`` at the end of ``BaseOptimizer.apply``, which this
  class replaces), so its weights equal the server's bit for bit. Other constraints are
  refused.
* **Inside fit's compiled function**: the step is a ``tf.py_function`` in fit's
  ``tf.function`` graph (or a plain call with ``run_eagerly=True``), which XLA cannot compile:
  binding a model marks it ``supports_jit = False``, so ``jit_compile="auto"`` (XLA on GPU
  machines) resolves to ``False`` and ``jit_compile=True`` falls back with Keras's warning.

Importing this module imports TensorFlow; the rest of :mod:`paramserver.client` does not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import keras
    import tensorflow as tf
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without TensorFlow
    raise ImportError(
        "paramserver.client.keras needs TensorFlow (with Keras 3): "
        "pip install 'paramserver[tensorflow]'"
    ) from exc

from paramserver import constraints as weight_constraints
from paramserver import optimizers
from paramserver.sparse import Rows

from . import errors
from ._base import DictWeights, OptimizerLike, TrainingLike
from .sync import Client, Session

__all__ = [
    "KERAS_CONSTRAINTS",
    "RemoteOptimizer",
    "SessionMismatch",
    "check_session",
    "create_session",
    "join_session",
    "model_constraints",
    "model_weights",
    "parameter_names",
    "pull_weights",
    "trainable_parameters",
]

if not keras.version().startswith("3."):  # pragma: no cover - depends on the installed Keras
    raise ImportError(
        f"paramserver.client.keras needs Keras 3 (TensorFlow >= 2.16); found Keras "
        f"{keras.version()}: pip install 'paramserver[tensorflow]'"
    )

#: The Keras 3 constraint classes the server applies, by the Keras 2.2.4 name it applies them
#: under (their configs have Keras 2.2.4's keys: ``max_value``, ``min_value``, ``rate``,
#: ``axis``). Only these exact classes: a subclass may compute something else.
KERAS_CONSTRAINTS: dict[type[Any], str] = {
    keras.constraints.MaxNorm: "MaxNorm",
    keras.constraints.NonNeg: "NonNeg",
    keras.constraints.UnitNorm: "UnitNorm",
    keras.constraints.MinMaxNorm: "MinMaxNorm",
}


class SessionMismatch(ValueError):
    """The session's parameters are not the model's: ``problems`` lists every difference
    (a name on one side only, another shape, dtype or constraint)."""

    def __init__(self, session_id: str, problems: Sequence[str]) -> None:
        self.session_id = session_id
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(
            f"session {session_id!r} does not hold this model's trainable variables "
            f"(build the model with the same code in every process):\n  {shown}{more}"
        )


# --- names --------------------------------------------------------------------------------


def _snake_case(name: str) -> str:
    """The prefix Keras's ``auto_name`` makes of a class name (``keras/src/utils/naming.py``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _local_names(items: Sequence[tuple[str, str]], where: str) -> list[str]:
    """Names for one layer's sublayers or variables, given ``(keras name, auto prefix)`` each.

    A name that looks made by Keras's counter (the prefix, or the prefix and ``_N``) becomes
    the prefix numbered by position among the siblings that share it: ``dense``, ``dense_1``,
    ...; any other name is kept. Two siblings of one name raise ``ValueError``.
    """
    counts: dict[str, int] = {}
    out: list[str] = []
    for name, prefix in items:
        # Bidirectional names its copies of the wrapped layer forward_<name>/backward_<name>,
        # the inner name from the same counter: the direction is kept, the counter renumbered.
        match = re.fullmatch(r"(forward_|backward_)?" + re.escape(prefix) + r"(_\d+)?", name)
        if match:
            stem = (match.group(1) or "") + prefix
            n = counts.get(stem, 0)
            counts[stem] = n + 1
            name = stem if n == 0 else f"{stem}_{n}"
        out.append(name)
    seen: set[str] = set()
    for name in out:
        if name in seen:
            raise ValueError(
                f"two parts of {where or 'the model'} are both named {name!r}: give the "
                "layers distinct names (name=...), so that every process finds the same "
                "parameter names"
            )
        seen.add(name)
    return out


def _walk(layer: Any, prefix: str, names: dict[int, str], seen: set[int]) -> None:
    """Name every variable owned by ``layer`` and its sublayers, depth first."""
    own = [*layer._trainable_variables, *layer._non_trainable_variables]
    local = _local_names([(str(v.name), "variable") for v in own], prefix.rstrip("/"))
    for variable, name in zip(own, local, strict=True):
        names.setdefault(id(variable), prefix + name)
    children = []
    for child in layer._layers:
        if id(child) not in seen:
            seen.add(id(child))
            children.append(child)
    local = _local_names(
        [(str(c.name), _snake_case(type(c).__name__)) for c in children], prefix.rstrip("/")
    )
    for child, name in zip(children, local, strict=True):
        _walk(child, f"{prefix}{name}/", names, seen)


def trainable_parameters(model: Any) -> dict[str, Any]:
    """The model's trainable variables by parameter name, in ``model.trainable_variables``
    order (the module docstring says how the names are made)."""
    variables = list(model.trainable_variables)
    if not variables:
        if not model.built:
            raise ValueError(
                "the model is not built yet: give it an Input, call model.build(input_shape) "
                "or call it on a batch, then make the session"
            )
        raise ValueError("the model has no trainable variables")
    names: dict[int, str] = {}
    _walk(model, "", names, {id(model)})
    out: dict[str, Any] = {}
    model_prefix = f"{model.name}/"
    for variable in variables:
        name = names.get(id(variable))
        if name is None:  # a variable no layer owns: its path, without the model's name
            path = str(variable.path)
            name = path[len(model_prefix) :] if path.startswith(model_prefix) else path
        if name in out:
            raise ValueError(
                f"two trainable variables would both be named {name!r} ({out[name].path} and "
                f"{variable.path}): give the layers distinct names"
            )
        out[name] = variable
    return out


def parameter_names(model: Any) -> list[str]:
    """The session parameter names of the model's trainable variables, in their order."""
    return list(trainable_parameters(model))


def model_weights(model: Any) -> DictWeights:
    """The model's trainable weights by parameter name (numpy copies)."""
    return {name: np.array(v.numpy()) for name, v in trainable_parameters(model).items()}


def model_constraints(model: Any) -> dict[str, dict[str, Any]]:
    """The constraints of the model's trainable variables, as a create body carries them:
    ``{name: {"class_name": "MaxNorm", "config": {...}}}``. Raises ``ValueError`` for a
    constraint the server cannot apply (not one of :data:`KERAS_CONSTRAINTS`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, variable in trainable_parameters(model).items():
        constraint = getattr(variable, "constraint", None)
        if constraint is None:
            continue
        class_name = KERAS_CONSTRAINTS.get(type(constraint))
        if class_name is None:
            raise ValueError(
                f"parameter {name!r} ({variable.path}) has the constraint "
                f"{type(constraint).__module__}.{type(constraint).__qualname__}: the server "
                "applies Keras 2.2.4's MaxNorm, NonNeg, UnitNorm and MinMaxNorm only "
                "(keras.constraints' own classes, not subclasses); use one of those or none"
            )
        spec = {"class_name": class_name, "config": dict(constraint.get_config())}
        out[name] = weight_constraints.get(spec).to_dict()  # checked before anything is sent
    return out


# --- the optimizer ------------------------------------------------------------------------


def _refuse_framework_optimizer(optimizer: Any) -> None:
    """A TensorFlow or Keras optimizer object is not a session's optimizer: say what is."""
    module = type(optimizer).__module__.split(".")[0]
    if module in ("keras", "tensorflow", "tf_keras") and not isinstance(
        optimizer, optimizers.Optimizer
    ):
        raise TypeError(
            f"optimizer: got the TensorFlow/Keras object {type(optimizer).__name__}; the "
            "session's update rule runs on the server: pass a Keras 2.2 optimizer "
            "(paramserver.optimizers.SGD, RMSprop, Adagrad, Adadelta, Adam, Adamax, Nadam, "
            "e.g. optimizers.Adam(lr=1e-3)), or optimizers.TFOptimizer(that object) to run "
            "that TensorFlow optimizer itself on the server"
        )


@dataclass
class _Binding:
    """What a :class:`RemoteOptimizer` is bound to (kept out of TensorFlow's tracking)."""

    model: Any
    session: Session[DictWeights]
    names: tuple[str, ...]
    variables: list[Any]
    index: dict[int, int] = field(default_factory=dict)


@keras.saving.register_keras_serializable(package="paramserver")
class RemoteOptimizer(keras.optimizers.Optimizer):
    """A Keras 3 optimizer whose step is one push to a session.

    ``apply(grads, variables)`` (what ``model.fit``'s train step calls) refuses ``None``
    gradients naming their parameters, makes ``IndexedSlices`` dense, pushes, and assigns the
    answered weights to the variables; a push refused as stale (``StaleGradient``: a sync
    round that went on without this worker, or an async ``max_staleness``) drops the gradient
    and assigns freshly pulled weights instead (counted in :attr:`stale_gradients`). It does
    not apply ``variable.constraint`` (the server did). In a compiled ``fit`` the step is a
    ``tf.py_function``; an error of the step (a transport failure, ``SessionNotFound``) then
    reaches the caller as a ``tf.errors.OpError`` whose message names it, and the exception
    itself is kept as :attr:`last_error`.

    Made by :func:`create_session` or :func:`join_session`; ``RemoteOptimizer(model,
    session)`` binds an existing handle after checking it holds the model's parameters (it
    does not change the model's weights: :func:`join_session` pulls them). ``model.save``
    works; a saved model is loaded with ``compile=False`` and joined again (a session is not
    something a file can reconnect to).
    """

    def __init__(self, model: Any, session: Session[DictWeights], *, name: str = "remote") -> None:
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                f"RemoteOptimizer needs Keras's TensorFlow backend; KERAS_BACKEND is "
                f"{keras.backend.backend()!r}"
            )
        params = trainable_parameters(model)
        info = session.info()
        check_session(model, info, session.id)
        config = info.optimizer.get("config") or {}
        lr = config.get("lr")
        super().__init__(
            learning_rate=float(lr) if isinstance(lr, (int, float)) else 0.0, name=name
        )
        variables = list(params.values())
        self._binding = _Binding(
            model=model,
            session=session,
            names=tuple(params),
            variables=variables,
            index={id(v): i for i, v in enumerate(variables)},
        )
        self.stale_gradients = 0
        self.last_error: BaseException | None = None
        # The step cannot be compiled by XLA (a tf.py_function): keep fit from asking for it.
        model.supports_jit = False

    # --- what it is bound to ---

    @property
    def session(self) -> Session[DictWeights]:
        """The session handle the steps are pushed to."""
        return self._binding.session

    @property
    def model(self) -> Any:
        return self._binding.model

    @property
    def names(self) -> tuple[str, ...]:
        """The parameter names, in ``model.trainable_variables`` order."""
        return self._binding.names

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config["session_id"] = self.session.id
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], custom_objects: Any = None) -> Any:
        raise TypeError(
            "a RemoteOptimizer cannot be rebuilt from a saved config: load the model with "
            "compile=False, then join the session (paramserver.client.keras.join_session) and "
            "compile again"
        )

    # --- the step ---

    def build(self, variables: Sequence[Any]) -> None:
        self._order(variables)
        super().build(variables)

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        """One step: push ``grads`` (one per variable) and assign the answered weights."""
        variables = (
            self._binding.variables if trainable_variables is None else list(trainable_variables)
        )
        if len(grads) != len(variables):
            raise ValueError(f"got {len(grads)} gradients for {len(variables)} variables")
        order = self._order(variables)
        if tf.distribute.has_strategy():
            raise RuntimeError(
                "RemoteOptimizer does not run under a tf.distribute strategy: use one worker "
                "process per device, each joining the session"
            )
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                super().build(self._binding.variables)
        names = self._binding.names
        by_position: list[Any] = [None] * len(names)
        for grad, i in zip(grads, order, strict=True):
            by_position[i] = grad
        missing = [names[i] for i, g in enumerate(by_position) if g is None]
        if missing:
            raise ValueError(
                f"no gradient for parameter(s) {', '.join(map(repr, missing))}: the loss does "
                "not depend on them (a layer the model does not use?). Nothing was sent: zeros "
                "are not a neutral step for momentum or Adam. Use the layer, or make it "
                "non-trainable (layer.trainable = False) before making the session"
            )
        # An IndexedSlices gradient (an Embedding's) travels as its rows (Rows: the server
        # sums duplicates, as densifying would); the others as dense tensors. The layout is
        # fixed when the step is traced; the py_function gets the flat list of tensors.
        dense: list[Any] = []
        layout: list[bool] = []
        for g, v in zip(by_position, self._binding.variables, strict=True):
            if isinstance(g, tf.IndexedSlices) and len(v.shape) >= 1:
                dense.append(tf.cast(g.indices, tf.int64))
                dense.append(tf.cast(g.values, v.dtype))
                layout.append(True)
            else:
                dense.append(tf.convert_to_tensor(g, dtype_hint=v.dtype))
                layout.append(False)
        self._rows_layout = layout
        targets = self._binding.variables
        if tf.executing_eagerly():
            weights = self._exchange(*dense)
            for variable, value in zip(targets, weights, strict=True):
                variable.assign(value)
        else:
            self._check_compilation()
            outputs = tf.py_function(self._exchange, dense, Tout=[v.dtype for v in targets])
            for variable, value in zip(targets, outputs, strict=True):
                value.set_shape(variable.shape)
                variable.assign(value)
        self._iterations.assign_add(1)

    def _order(self, variables: Sequence[Any]) -> list[int]:
        """Each variable's position among the bound ones; all of them must be there."""
        index = self._binding.index
        order = [index.get(id(v), -1) for v in variables]
        unknown = [v.path for v, i in zip(variables, order, strict=True) if i < 0]
        if unknown or len(set(order)) != len(index):
            absent = sorted(set(range(len(index))) - set(order))
            raise ValueError(
                "the model's trainable variables are not the ones the session was made for "
                f"(not in the session: {unknown[:5]}; not given: "
                f"{[self._binding.names[i] for i in absent][:5]}): changing layer.trainable "
                "after making the session, or compiling another model with this optimizer?"
            )
        return order

    def _check_compilation(self) -> None:
        """Refuse XLA at trace time, with a message better than XLA's own."""
        if getattr(self._binding.model, "jit_compile", False):
            raise RuntimeError(
                "the remote step cannot run inside an XLA-compiled function (jit_compile=True): "
                "compile the model with jit_compile=False (or run_eagerly=True)"
            )

    def _exchange(self, *grads: Any) -> list[np.ndarray]:
        """The push itself, in Python (eagerly, or inside the py_function): gradients in,
        the session's new weights out, in the variables' order."""
        session = self._binding.session
        names = self._binding.names
        try:
            arrays: dict[str, Any] = {}
            flat = iter(grads)
            layout = getattr(self, "_rows_layout", None) or [False] * len(names)
            for name, as_rows in zip(names, layout, strict=True):
                if as_rows:
                    indices = np.asarray(next(flat))
                    arrays[name] = Rows(indices, np.asarray(next(flat)))
                else:
                    arrays[name] = np.asarray(next(flat))
            try:
                weights = session.push(arrays)
            except errors.StaleGradient:
                self.stale_gradients += 1
                weights = session.pull()
            return [weights[name] for name in names]
        except BaseException as exc:
            self.last_error = exc
            raise


# --- sessions -----------------------------------------------------------------------------


def check_session(model: Any, info: Any, session_id: str) -> None:
    """Raise :class:`SessionMismatch` unless the session ``info`` describes holds the model's
    trainable variables: the same names, shapes, dtypes and constraints."""
    params = trainable_parameters(model)
    ours = model_constraints(model)
    theirs = {n: c.to_dict() for n, c in (getattr(info, "constraints", None) or {}).items()}
    problems: list[str] = []
    for name, variable in params.items():
        p = info.parameters.get(name)
        shape = tuple(int(d) for d in variable.shape)
        dtype = np.dtype(variable.dtype).name
        if p is None:
            problems.append(f"{name}: in the model ({dtype}{list(shape)}), not in the session")
            continue
        if tuple(p.shape) != shape or p.dtype != dtype:
            problems.append(
                f"{name}: the model has {dtype}{list(shape)}, the session {p.dtype}{list(p.shape)}"
            )
        if ours.get(name) != theirs.get(name):
            problems.append(
                f"{name}: constraint {_describe(ours.get(name))} in the model, "
                f"{_describe(theirs.get(name))} in the session"
            )
    for name, p in info.parameters.items():
        if name not in params:
            problems.append(f"{name}: in the session ({p.dtype}{list(p.shape)}), not in the model")
    if problems:
        raise SessionMismatch(session_id, problems)


def _describe(constraint: Mapping[str, Any] | None) -> str:
    if constraint is None:
        return "none"
    config = ", ".join(f"{k}={v!r}" for k, v in constraint["config"].items())
    return f"{constraint['class_name']}({config})"


def create_session(
    client: Client,
    model: Any,
    optimizer: OptimizerLike,
    session_id: str | None = None,
    *,
    refuse_non_finite: bool = False,
    training: TrainingLike | None = None,
    name: str = "remote",
    **training_options: Any,
) -> RemoteOptimizer:
    """Create a session from the model's trainable variables; returns the optimizer to
    ``model.compile`` with.

    The session holds :func:`model_weights` (the model's current values) under
    :func:`parameter_names`, with :func:`model_constraints`. ``optimizer`` is a Keras 2.2
    optimizer (``optimizers.Adam(lr=1e-3)``, a name, a config, or ``optimizers.TFOptimizer``);
    the other arguments are :meth:`Client.create_session`'s (``training=Sync(...)`` for
    synchronous rounds). The id is ``remote.session.id``.
    """
    _refuse_framework_optimizer(optimizer)
    constraints = model_constraints(model)
    session: Session[DictWeights] = client.create_session(
        model_weights(model),
        optimizer,
        session_id,
        refuse_non_finite=refuse_non_finite,
        training=training,
        constraints=constraints or None,
        **training_options,
    )
    return RemoteOptimizer(model, session, name=name)


def join_session(
    client: Client, model: Any, session_id: str, *, name: str = "remote"
) -> RemoteOptimizer:
    """Join session ``session_id`` from a model built by the same code: check that it holds
    the model's parameters (else :class:`SessionMismatch`, listing every difference), set the
    model's trainable variables to the session's weights, and return the optimizer to
    ``model.compile`` with. Non-trainable variables (BatchNormalization's statistics) keep
    the values this process gave them."""
    session: Session[DictWeights] = client.session(session_id)
    remote = RemoteOptimizer(model, session, name=name)
    pull_weights(remote)
    return remote


def pull_weights(
    remote: RemoteOptimizer, *, min_iterations: int | None = None, wait: float | None = None
) -> int:
    """Set the model's trainable variables to the session's current weights; returns their
    iteration count. With ``min_iterations`` (and ``wait`` seconds) the server answers once
    the session reaches that iteration, or after ``wait`` with what it has
    (:meth:`Session.pull`): an evaluator follows the workers this way."""
    weights = remote.session.pull(min_iterations=min_iterations, wait=wait)
    for name, variable in zip(remote.names, remote._binding.variables, strict=True):
        variable.assign(weights[name])
    return remote.session.base_iterations or 0
