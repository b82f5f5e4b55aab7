"""A lazy numpy graph that stands in for Keras 2.2.4's TensorFlow backend (``K``).

It implements exactly the ``K`` functions (and the few ``tf`` names) that the vendored, unmodified
``keras/optimizers.py`` uses, with TensorFlow 1.x graph-mode semantics, so that Keras's own
``get_updates`` code produces the reference numbers of our parity tests:

* ``get_updates`` builds a graph once: :class:`Tensor` nodes record an operation and its inputs
  and compute nothing. :func:`function` (Keras's ``K.function``) returns a callable that feeds
  the gradient placeholders, evaluates every update value from the variables' values *before*
  the run (all reads in one run see pre-step values, as in one ``session.run`` of Keras's
  ``tf.group`` of assignments), and only then assigns them all.
* Dtypes follow TensorFlow: ``K.variable(python_float)`` is ``floatx`` (float32 unless
  :func:`floatx_scope` says otherwise); a Python number combined with a tensor becomes a
  constant of that tensor's dtype first (``tf.convert_to_tensor(x, dtype=...)`` rounds to
  nearest); two tensors of different dtypes cannot be combined (TensorFlow raises, so do we);
  every operation is computed and rounded in its dtype, and the result dtype is asserted.
* ``K.sqrt`` clips to ``[0, inf]`` first and ``K.clip`` is ``tf.clip_by_value`` (a minimum
  then a maximum), as in ``keras/backend/tensorflow_backend.py`` of 2.2.4; ``K.sum`` is a
  float32 (or float64) reduction like ``tf.reduce_sum`` (numpy's pairwise order, not Eigen's:
  the sum can differ from TensorFlow's in the last bits).
* ``K.gradients(loss, params)`` returns one placeholder per parameter, fed by the caller at
  each run with that step's gradients: ``loss`` must be a :class:`FedGradients`.

The end of the module holds the non-backend names the vendored file imports (``tf``, ``six``,
``interfaces``, ``serialize_keras_object``, ``deserialize_keras_object``) as minimal shims.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

# --- configuration (keras/backend/common.py) -----------------------------------------------------

_FLOATX = "float32"
_EPSILON = 1e-7


def backend() -> str:
    """Keras asks this to choose its TensorFlow code paths (``clip_norm``); we mimic them."""
    return "tensorflow"


def floatx() -> str:
    return _FLOATX


def set_floatx(value: str) -> None:
    global _FLOATX
    if value not in {"float16", "float32", "float64"}:
        raise ValueError(f"Unknown floatx type: {value}")
    _FLOATX = str(value)


@contextlib.contextmanager
def floatx_scope(value: str) -> Iterator[None]:
    """``K.set_floatx(value)`` for the duration of a block (restored afterwards)."""
    previous = floatx()
    set_floatx(value)
    try:
        yield
    finally:
        set_floatx(previous)


def epsilon() -> float:
    return _EPSILON


def cast_to_floatx(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=_FLOATX)


@contextlib.contextmanager
def name_scope(name: str) -> Iterator[None]:
    """``tf.name_scope``: names do not matter here."""
    yield


# --- the graph -----------------------------------------------------------------------------------


def _constant(value: Any, dtype: np.dtype) -> Tensor:
    """``tf.convert_to_tensor(value, dtype=dtype)`` for a Python number or numpy array."""
    if isinstance(value, Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.kind == "b" or (array.dtype.kind == "f" and dtype.kind in "iu"):
        raise TypeError(f"cannot convert {value!r} to a {dtype} tensor")
    if array.dtype.kind == "f" and array.dtype != dtype and not isinstance(value, float):
        # TensorFlow refuses a numpy float array of another float dtype.
        raise TypeError(f"cannot convert a {array.dtype} array to a {dtype} tensor")
    return Tensor("const", (), dtype, array.shape, value=np.asarray(value, dtype=dtype))


def _tensor_dtype(*operands: Any) -> np.dtype:
    """The dtype a TensorFlow op infers: that of its first tensor (or numpy array) operand."""
    for x in operands:
        if isinstance(x, Tensor):
            return x.dtype
    for x in operands:
        if isinstance(x, np.ndarray | np.generic):
            return x.dtype
    return np.dtype(_FLOATX)


def _binary(op: str, x: Any, y: Any) -> Tensor:
    dtype = _tensor_dtype(x, y)
    a, b = _constant(x, dtype), _constant(y, dtype)
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: cannot combine {a.dtype} and {b.dtype} tensors")
    out_dtype = np.dtype(bool) if op == "greater_equal" else dtype
    return Tensor(op, (a, b), out_dtype, np.broadcast_shapes(a.shape, b.shape))


class Tensor:
    """A node of the graph: an operation on input nodes, evaluated only in :func:`function`."""

    # numpy defers to our reflected operators (``ndarray * Tensor`` builds a node).
    __array_ufunc__ = None

    def __init__(
        self,
        op: str,
        inputs: Sequence[Tensor],
        dtype: Any,
        shape: tuple[int, ...],
        **attrs: Any,
    ) -> None:
        self.op = op
        self.inputs = tuple(inputs)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        self.attrs = attrs

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def set_shape(self, shape: Sequence[int]) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(f"shape {tuple(shape)} is not compatible with {self.shape}")

    def __add__(self, other: Any) -> Tensor:
        return _binary("add", self, other)

    def __radd__(self, other: Any) -> Tensor:
        return _binary("add", other, self)

    def __sub__(self, other: Any) -> Tensor:
        return _binary("subtract", self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return _binary("subtract", other, self)

    def __mul__(self, other: Any) -> Tensor:
        return _binary("multiply", self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return _binary("multiply", other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return _binary("divide", self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return _binary("divide", other, self)

    def __neg__(self) -> Tensor:
        return Tensor("negative", (self,), self.dtype, self.shape)

    def __ge__(self, other: Any) -> Tensor:  # type: ignore[override]
        return _binary("greater_equal", self, other)

    def __bool__(self) -> bool:
        raise TypeError("a graph tensor has no truth value (use tf.cond / K.switch)")

    def __repr__(self) -> str:
        return f"<Tensor {self.op} shape={self.shape} dtype={self.dtype}>"


class Variable(Tensor):
    """A ``tf.Variable``: a node whose value lives between runs."""

    def __init__(self, value: np.ndarray, name: str | None = None) -> None:
        super().__init__("variable", (), value.dtype, value.shape)
        self.value = value
        self.name = name

    def __repr__(self) -> str:
        return f"<Variable {self.name} shape={self.shape} dtype={self.dtype}>"


class Placeholder(Tensor):
    """A ``tf.placeholder``: a node whose value is fed at each run."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        super().__init__("placeholder", (), dtype, shape)


class Assign:
    """``tf.assign(variable, value)``: applied after every value of the run is computed."""

    def __init__(self, variable: Variable, value: Any) -> None:
        if not isinstance(variable, Variable):
            raise TypeError(f"can only assign to a variable, got {variable!r}")
        value = _constant(value, variable.dtype)
        if value.dtype != variable.dtype:
            raise TypeError(f"cannot assign a {value.dtype} value to a {variable.dtype} variable")
        if value.shape != variable.shape:  # tf.assign validates the shape by default
            raise ValueError(f"cannot assign shape {value.shape} to {variable!r}")
        self.variable = variable
        self.value = value


_UNARY: dict[str, Callable[[np.ndarray], Any]] = {
    "negative": np.negative,
    "sqrt": np.sqrt,
    "square": np.square,
    "abs": np.abs,
}

_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {
    "add": np.add,
    "subtract": np.subtract,
    "multiply": np.multiply,
    "divide": np.divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "greater_equal": np.greater_equal,
}


def _evaluate(node: Tensor, feeds: dict[int, np.ndarray], memo: dict[int, np.ndarray]) -> Any:
    """The value of ``node`` in this run (each node at most once; variables read pre-run)."""
    key = id(node)
    if key in memo:
        return memo[key]
    op = node.op
    if op == "variable":
        value = node.value.copy()  # type: ignore[attr-defined]
    elif op == "placeholder":
        if key not in feeds:
            raise KeyError(f"no value fed for {node!r}")
        value = feeds[key]
    elif op == "const":
        value = node.attrs["value"]
    elif op == "cond":
        pred = _evaluate(node.inputs[0], feeds, memo)
        branch = node.inputs[1] if bool(pred) else node.inputs[2]
        value = _evaluate(branch, feeds, memo)
    else:
        args = [_evaluate(x, feeds, memo) for x in node.inputs]
        if op in _UNARY:
            value = _UNARY[op](args[0])
        elif op in _BINARY:
            value = _BINARY[op](args[0], args[1])
        elif op == "cast":
            value = args[0].astype(node.dtype)
        elif op == "reduce_sum":
            value = np.sum(
                args[0], axis=node.attrs["axis"], keepdims=node.attrs["keepdims"], dtype=node.dtype
            )
        else:  # pragma: no cover - every op built above is handled
            raise NotImplementedError(op)
    value = np.asarray(value)
    if value.dtype != node.dtype or value.shape != node.shape:
        raise AssertionError(f"{node!r} evaluated to shape {value.shape} and dtype {value.dtype}")
    memo[key] = value
    return value


def _run(
    fetches: Sequence[Tensor], updates: Sequence[Assign], feeds: dict[int, np.ndarray]
) -> list[np.ndarray]:
    """One ``session.run``: compute every fetch and update value, then assign the updates."""
    memo: dict[int, np.ndarray] = {}
    # Floating-point trouble in the reference is a test failure, not a silent NaN (underflow,
    # e.g. beta ** t for a large t, is normal).
    with np.errstate(over="raise", divide="raise", invalid="raise", under="ignore"):
        outputs = [_evaluate(t, feeds, memo).copy() for t in fetches]
        new_values = [_evaluate(u.value, feeds, memo) for u in updates]
    targets = [id(u.variable) for u in updates]
    if len(set(targets)) != len(targets):
        raise ValueError("a variable is assigned twice in one run")
    for update, value in zip(updates, new_values, strict=True):
        update.variable.value = value.copy()
    return outputs


# --- Keras backend functions (keras/backend/tensorflow_backend.py) -------------------------------


def variable(value: Any, dtype: str | None = None, name: str | None = None) -> Variable:
    if dtype is None:
        dtype = floatx()
    if isinstance(value, Tensor):
        raise TypeError("variable() takes a Python or numpy value here")
    return Variable(np.array(value, dtype=np.dtype(dtype)), name=name)


def zeros(shape: int | Sequence[int], dtype: str | None = None, name: str | None = None) -> Any:
    if dtype is None:
        dtype = floatx()
    return variable(np.zeros(shape, dtype=np.dtype(dtype)), dtype=dtype, name=name)


def update(x: Variable, new_x: Any) -> Assign:
    return Assign(x, new_x)


def update_add(x: Variable, increment: Any) -> Assign:
    return Assign(x, x + increment)


def cast(x: Any, dtype: str) -> Tensor:
    x = _constant(x, _tensor_dtype(x))
    return Tensor("cast", (x,), np.dtype(dtype), x.shape)


def pow(x: Any, a: Any) -> Tensor:
    return _binary("pow", x, a)


def clip_by_value(x: Tensor, clip_min: Any, clip_max: Any) -> Tensor:
    """``tf.clip_by_value``: ``maximum(minimum(x, max), min)``."""
    return _binary("maximum", _binary("minimum", x, clip_max), clip_min)


def sqrt(x: Tensor) -> Tensor:
    x = clip_by_value(x, _constant(0.0, x.dtype), _constant(np.inf, x.dtype))
    return Tensor("sqrt", (x,), x.dtype, x.shape)


def square(x: Tensor) -> Tensor:
    return Tensor("square", (x,), x.dtype, x.shape)


def abs(x: Tensor) -> Tensor:
    return Tensor("abs", (x,), x.dtype, x.shape)


def sum(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    """``tf.reduce_sum`` in the tensor's dtype: over every axis, or over ``axis`` (an int or a
    list, as keras/constraints.py passes it), keeping the reduced axes with ``keepdims``."""
    if axis is None:
        axes = tuple(range(len(x.shape)))
    else:
        axes = tuple(a % len(x.shape) for a in ((axis,) if isinstance(axis, int) else axis))
    if keepdims:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    return Tensor("reduce_sum", (x,), x.dtype, shape, axis=axes, keepdims=keepdims)


def maximum(x: Any, y: Any) -> Tensor:
    return _binary("maximum", x, y)


def greater_equal(x: Any, y: Any) -> Tensor:
    return _binary("greater_equal", x, y)


def clip(x: Tensor, min_value: Any, max_value: Any) -> Tensor:
    if max_value is not None and max_value < min_value:
        max_value = min_value
    if max_value is None:
        max_value = np.inf
    return clip_by_value(x, _constant(min_value, x.dtype), _constant(max_value, x.dtype))


def switch(condition: Tensor, then_expression: Any, else_expression: Any) -> Tensor:
    """``K.switch`` with a scalar condition (all that ``keras/optimizers.py`` needs)."""
    if condition.shape != ():
        raise NotImplementedError("only a scalar condition is supported")
    return _cond(condition, lambda: then_expression, lambda: else_expression)


def int_shape(x: Tensor) -> tuple[int, ...]:
    return x.shape


def dtype(x: Tensor) -> str:
    return x.dtype.name


def get_value(x: Tensor) -> np.ndarray:
    return batch_get_value([x])[0]


def batch_get_value(ops: Sequence[Tensor]) -> list[np.ndarray]:
    return _run(list(ops), [], {})


def set_value(x: Variable, value: Any) -> None:
    batch_set_value([(x, value)])


def batch_set_value(tuples: Sequence[tuple[Variable, Any]]) -> None:
    for x, value in tuples:
        value = np.asarray(value, dtype=x.dtype)
        if value.shape != x.shape:
            raise ValueError(f"cannot set {x!r} to shape {value.shape}")
        x.value = value.copy()


class FedGradients:
    """A stand-in loss: ``K.gradients(loss, params)`` gives placeholders fed at each run."""

    def __init__(self) -> None:
        self.placeholders: list[Placeholder] = []

    def feed(self, grads: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
        """Feeds for one run: ``grads[i]`` for the gradient of ``params[i]``."""
        if len(grads) != len(self.placeholders):
            raise ValueError(f"expected {len(self.placeholders)} gradients, got {len(grads)}")
        feeds = {}
        for ph, g in zip(self.placeholders, grads, strict=True):
            g = np.asarray(g)
            if g.dtype != ph.dtype or g.shape != ph.shape:
                raise ValueError(f"gradient of shape {g.shape} and dtype {g.dtype} for {ph!r}")
            feeds[id(ph)] = g
        return feeds


def gradients(loss: FedGradients, variables: Sequence[Tensor]) -> list[Placeholder]:
    if not isinstance(loss, FedGradients):
        raise TypeError("this backend cannot differentiate: pass a FedGradients as the loss")
    loss.placeholders = [Placeholder(v.shape, v.dtype) for v in variables]
    return list(loss.placeholders)


class Function:
    """``K.function(inputs, outputs, updates)``: one call is one ``session.run``."""

    def __init__(
        self, loss: FedGradients, outputs: Sequence[Tensor], updates: Sequence[Any]
    ) -> None:
        self.loss = loss
        self.outputs = list(outputs)
        # Keras turns (variable, value) pairs in ``updates`` into tf.assign ops.
        self.updates = [u if isinstance(u, Assign) else Assign(u[0], u[1]) for u in updates]

    def __call__(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        return _run(self.outputs, self.updates, self.loss.feed(grads))


def function(loss: FedGradients, outputs: Sequence[Tensor], updates: Sequence[Any]) -> Function:
    return Function(loss, outputs, updates)


# --- the tf names keras/optimizers.py uses (clip_norm, get) --------------------------------------


class IndexedSlices:
    """Never built here (no sparse gradients); ``clip_norm`` only tests ``isinstance``."""


def _cond(pred: Tensor, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Tensor:
    """``tf.cond``: evaluates the predicate, then only the branch it selects."""
    if pred.dtype != np.dtype(bool) or pred.shape != ():
        raise TypeError("tf.cond needs a scalar boolean predicate")
    then_value, else_value = true_fn(), false_fn()
    dt = _tensor_dtype(then_value, else_value)
    a, b = _constant(then_value, dt), _constant(else_value, dt)
    if a.dtype != b.dtype or a.shape != b.shape:
        raise TypeError("tf.cond branches differ in dtype or shape")
    return Tensor("cond", (pred, a, b), a.dtype, a.shape)


def _tf_cast(x: Any, dtype: Any) -> Tensor:
    return cast(x, np.dtype(dtype).name)


def _scalar_mul(scalar: Any, x: Tensor) -> Tensor:
    """``tf.scalar_mul``: the scalar is converted to ``x``'s dtype; then ``scalar * x``."""
    s = _constant(scalar, x.dtype)
    if s.shape != ():
        raise ValueError(f"Only scalar multiply works, got shape {s.shape}")
    return s * x


class _TFOptimizer:
    """``tf.train.Optimizer``: no instance exists here, so ``optimizers.get`` never wraps one."""


tf = SimpleNamespace(
    Tensor=Tensor,
    IndexedSlices=IndexedSlices,
    bool=np.dtype(bool),
    cast=_tf_cast,
    cond=_cond,
    scalar_mul=_scalar_mul,
    train=SimpleNamespace(Optimizer=_TFOptimizer),
)


# --- the other names keras/optimizers.py imports -------------------------------------------------

six = SimpleNamespace(string_types=(str,))


def _legacy_get_updates_support(func: Callable[..., Any]) -> Callable[..., Any]:
    """Keras's decorator only converts Keras 1 call signatures; ``get_updates(loss, params)``
    is passed through unchanged."""
    return func


interfaces = SimpleNamespace(legacy_get_updates_support=_legacy_get_updates_support)


def serialize_keras_object(instance: Any) -> dict[str, Any]:
    """``keras.utils.generic_utils.serialize_keras_object`` for an object with a config."""
    return {"class_name": instance.__class__.__name__, "config": instance.get_config()}


def deserialize_keras_object(
    identifier: dict[str, Any],
    module_objects: dict[str, Any] | None = None,
    custom_objects: dict[str, Any] | None = None,
    printable_module_name: str = "object",
) -> Any:
    """``deserialize_keras_object`` for the ``{"class_name", "config"}`` form only."""
    objects = {**(module_objects or {}), **(custom_objects or {})}
    name = identifier["class_name"]
    if name not in objects:
        raise ValueError(f"Unknown {printable_module_name}: {name}")
    return objects[name].from_config(identifier.get("config", {}))
