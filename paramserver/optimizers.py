"""Keras 2.2 optimizer descriptions: names, arguments, defaults and the rules that check them.

This module is the single definition of what an optimizer configuration may hold. Workers use
it to build a configuration the Keras way (``optimizers.Adam(amsgrad=True, clipnorm=1.0)``) and
the server uses the very same classes to validate what arrives over the network, so the two can
never disagree. It holds no math: the update rules live in ``paramserver.server.optim``.

Arguments and defaults follow ``keras==2.2.4`` (``keras/optimizers.py``), with one documented
difference: Nadam's ``schedule_decay`` defaults to 0.001 here (Keras 2.2.4 shipped 0.004).
``epsilon=None`` means ``K.epsilon()`` (1e-7) and the configuration then reports 1e-07.
``learning_rate`` is accepted as an alias of ``lr``; the configuration always says ``lr``.
``clipnorm`` and ``clipvalue`` appear in a configuration only when they are set, as in Keras.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "Adamax",
    "InvalidOptimizerConfig",
    "Nadam",
    "Optimizer",
    "RMSprop",
    "TFOptimizer",
    "UnknownOptimizer",
    "deserialize",
    "get",
    "optimizer_names",
    "serialize",
]

#: Keras's ``K.epsilon()``: the fuzz factor used when ``epsilon=None``.
DEFAULT_EPSILON = 1e-7


class InvalidOptimizerConfig(ValueError):
    """An optimizer argument is unknown, of the wrong type, or out of its allowed range."""


class UnknownOptimizer(ValueError):
    """No optimizer has that name; the message lists the valid names."""


@dataclass(frozen=True)
class _Argument:
    """One constructor argument: its default and the rule it must satisfy."""

    name: str
    default: Any
    kind: str  # "float", "optional_float" or "bool"
    check: Callable[[float], bool] | None = None
    allowed: str = ""  # the allowed range, in words, for error messages


def _non_negative(name: str, default: Any, kind: str = "float") -> _Argument:
    return _Argument(name, default, kind, lambda x: x >= 0.0, "a finite float >= 0")


def _unit_interval_open(name: str, default: float) -> _Argument:
    return _Argument(name, default, "float", lambda x: 0.0 <= x < 1.0, "a float in [0, 1)")


def _unit_interval_closed(name: str, default: float) -> _Argument:
    return _Argument(name, default, "float", lambda x: 0.0 <= x <= 1.0, "a float in [0, 1]")


def _positive_or_none(name: str) -> _Argument:
    return _Argument(name, None, "optional_float", lambda x: x > 0.0, "a finite float > 0, or null")


def _flag(name: str) -> _Argument:
    return _Argument(name, False, "bool", None, "a boolean (true or false)")


_LR_ALIAS = "learning_rate"
_CLIP_ARGUMENTS = (_positive_or_none("clipnorm"), _positive_or_none("clipvalue"))


def _check_value(owner: str, arg: _Argument, value: Any) -> Any:
    """Return ``value`` normalised for ``arg`` or raise :class:`InvalidOptimizerConfig`."""

    def fail(problem: str) -> InvalidOptimizerConfig:
        return InvalidOptimizerConfig(
            f"{owner}: argument '{arg.name}' {problem}; it must be {arg.allowed}"
        )

    if arg.kind == "bool":
        if isinstance(value, np.bool_):
            value = bool(value)
        if not isinstance(value, bool):
            raise fail(f"got {value!r} of type {type(value).__name__}")
        return value
    if value is None:
        if arg.kind == "optional_float":
            return None
        if arg.name == "epsilon":
            return DEFAULT_EPSILON
        raise fail("got null")
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise fail(f"got {value!r} of type {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float64's range
        raise fail("got an integer too large for a float") from None
    if not math.isfinite(number):
        raise fail(f"got {number!r}")
    if arg.check is not None and not arg.check(number):
        raise fail(f"got {number!r}")
    return number


class Optimizer:
    """A validated optimizer configuration, written the way Keras 2.2 writes it.

    Subclasses declare ``_arguments`` (their own constructor arguments, in Keras's order); every
    optimizer also takes ``clipnorm`` and ``clipvalue``. Construction validates everything and
    raises :class:`InvalidOptimizerConfig` naming the argument and its allowed range.
    ``get_config()`` / ``from_config()`` round-trip with Keras's keys.
    """

    class_name: ClassVar[str] = ""
    _arguments: ClassVar[tuple[_Argument, ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if type(self) is Optimizer:
            raise TypeError("Optimizer is abstract: use SGD, Adam, ... or optimizers.get(name)")
        own = self._arguments
        if len(args) > len(own):
            raise InvalidOptimizerConfig(
                f"{self.class_name} takes at most {len(own)} positional arguments "
                f"({', '.join(a.name for a in own)}), got {len(args)}"
            )
        given: dict[str, Any] = {}
        for arg, value in zip(own, args, strict=False):
            given[arg.name] = value
        for key, value in kwargs.items():
            if key in given:
                raise InvalidOptimizerConfig(f"{self.class_name}: argument '{key}' given twice")
            given[key] = value
        if _LR_ALIAS in given:
            if "lr" in given:
                raise InvalidOptimizerConfig(
                    f"{self.class_name}: give either 'lr' or its alias 'learning_rate', not both"
                )
            given["lr"] = given.pop(_LR_ALIAS)
        known = {a.name: a for a in (*own, *_CLIP_ARGUMENTS)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise InvalidOptimizerConfig(
                f"{self.class_name}: unknown argument(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(known)} (and 'learning_rate' as an alias of 'lr')"
            )
        config: dict[str, Any] = {}
        for arg in own:
            config[arg.name] = _check_value(self.class_name, arg, given.get(arg.name, arg.default))
        for arg in _CLIP_ARGUMENTS:
            value = _check_value(self.class_name, arg, given.get(arg.name))
            if value is not None:
                config[arg.name] = value
        self._config = config

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("_config")
        if config is not None and name in config:
            return config[name]
        if name in ("clipnorm", "clipvalue"):
            return None
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def get_config(self) -> dict[str, Any]:
        """The whole configuration with Keras's keys (``lr``, ...), defaults filled in."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Optimizer:
        """Rebuild an optimizer from :meth:`get_config` output (or any Keras-style config)."""
        if not isinstance(config, Mapping):
            raise InvalidOptimizerConfig(
                f"{cls.class_name}: config must be an object, got {type(config).__name__}"
            )
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        """Keras's serialized form: ``{"class_name": ..., "config": {...}}``."""
        return {"class_name": self.class_name, "config": self.get_config()}

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Optimizer)
            and type(other) is type(self)
            and (other.get_config() == self.get_config())
        )

    def __hash__(self) -> int:
        return hash((self.class_name, tuple(sorted(self._config.items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        return f"{self.class_name}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, learning-rate decay and Nesterov momentum.

    Keras 2.2.4 keeps lr inside the velocity: ``v = momentum*m - lr*g``; ``p += v`` (or, with
    Nesterov, ``p += momentum*v - lr*g``). ``lr`` decays as ``lr / (1 + decay*iterations)``.
    """

    class_name = "SGD"
    _arguments = (
        _non_negative("lr", 0.01),
        _non_negative("momentum", 0.0),
        _non_negative("decay", 0.0),
        _flag("nesterov"),
    )


class RMSprop(Optimizer):
    """RMSprop (Tieleman and Hinton, 2012): divide the gradient by a running RMS of its size."""

    class_name = "RMSprop"
    _arguments = (
        _non_negative("lr", 0.001),
        _unit_interval_closed("rho", 0.9),
        _non_negative("epsilon", None),
        _non_negative("decay", 0.0),
    )


class Adagrad(Optimizer):
    """Adagrad (Duchi et al., 2011): per-parameter rates shrinking with the summed squared grads."""

    class_name = "Adagrad"
    _arguments = (
        _non_negative("lr", 0.01),
        _non_negative("epsilon", None),
        _non_negative("decay", 0.0),
    )


class Adadelta(Optimizer):
    """Adadelta (Zeiler, 2012): Adagrad with a moving window and a unit-correcting numerator."""

    class_name = "Adadelta"
    _arguments = (
        _non_negative("lr", 1.0),
        _unit_interval_closed("rho", 0.95),
        _non_negative("epsilon", None),
        _non_negative("decay", 0.0),
    )


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2014), with the AMSGrad variant (Reddi et al., 2018)."""

    class_name = "Adam"
    _arguments = (
        _non_negative("lr", 0.001),
        _unit_interval_open("beta_1", 0.9),
        _unit_interval_open("beta_2", 0.999),
        _non_negative("epsilon", None),
        _non_negative("decay", 0.0),
        _flag("amsgrad"),
    )


class Adamax(Optimizer):
    """Adamax (Kingma and Ba, 2014, section 7): Adam with the infinity norm."""

    class_name = "Adamax"
    _arguments = (
        _non_negative("lr", 0.002),
        _unit_interval_open("beta_1", 0.9),
        _unit_interval_open("beta_2", 0.999),
        _non_negative("epsilon", None),
        _non_negative("decay", 0.0),
    )


class Nadam(Optimizer):
    """Nadam (Dozat, 2015): Adam with Nesterov momentum and a warming momentum schedule.

    Our default ``schedule_decay`` is 0.001; Keras 2.2.4 shipped 0.004. Keras's Nadam has no
    ``decay`` argument.
    """

    class_name = "Nadam"
    _arguments = (
        _non_negative("lr", 0.002),
        _unit_interval_open("beta_1", 0.9),
        _unit_interval_open("beta_2", 0.999),
        _non_negative("epsilon", None),
        _non_negative("schedule_decay", 0.001),
    )


class TFOptimizer(Optimizer):
    """A native TensorFlow optimizer run on the server (Keras 2.2's ``TFOptimizer``).

    ``TFOptimizer("AdamOptimizer", learning_rate=0.01)`` names a ``tf.compat.v1.train``
    optimizer or a ``tf.keras.optimizers`` class and its arguments; ``TFOptimizer(instance)``
    takes a ``tf.keras`` optimizer instance and reads its configuration. The server checks the
    name and arguments against the TensorFlow it runs (the client may not have TensorFlow).
    The configuration is ``{"optimizer": {"class_name": NAME, "config": {...}}}``.
    """

    class_name = "TFOptimizer"

    def __init__(self, optimizer: Any = None, /, **kwargs: Any) -> None:
        if isinstance(optimizer, Mapping) and not kwargs:
            spec = dict(optimizer)
        elif isinstance(optimizer, str):
            spec = {"class_name": optimizer, "config": dict(kwargs)}
        elif optimizer is not None and hasattr(optimizer, "get_config") and not kwargs:
            spec = {"class_name": type(optimizer).__name__, "config": optimizer.get_config()}
        else:
            raise InvalidOptimizerConfig(
                "TFOptimizer: argument 'optimizer' must be a TensorFlow optimizer class name "
                "(with its arguments as keywords), a {'class_name', 'config'} object, or a "
                f"tf.keras optimizer instance; got {optimizer!r}"
            )
        unknown = sorted(set(spec) - {"class_name", "config"})
        if unknown:
            raise InvalidOptimizerConfig(
                f"TFOptimizer: unknown key(s) {', '.join(map(repr, unknown))} in 'optimizer'; "
                "allowed: 'class_name', 'config'"
            )
        name = spec.get("class_name")
        if not isinstance(name, str) or not name:
            raise InvalidOptimizerConfig(
                f"TFOptimizer: 'optimizer.class_name' must be a non-empty string, got {name!r}"
            )
        config = spec.get("config", {})
        if config is None:
            config = {}
        if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
            raise InvalidOptimizerConfig(
                "TFOptimizer: 'optimizer.config' must be an object with string keys"
            )
        self._config = {"optimizer": {"class_name": name, "config": _plain(dict(config))}}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Optimizer:
        if not isinstance(config, Mapping):
            raise InvalidOptimizerConfig(
                f"TFOptimizer: config must be an object, got {type(config).__name__}"
            )
        unknown = sorted(set(config) - {"optimizer"})
        if unknown or "optimizer" not in config:
            raise InvalidOptimizerConfig(
                "TFOptimizer: config must be {'optimizer': {'class_name': NAME, 'config': {...}}}"
            )
        return cls(config["optimizer"])

    def __hash__(self) -> int:
        return hash((self.class_name, repr(self._config)))


def _plain(value: Any) -> Any:
    """Turn numpy scalars and tuples in a TensorFlow config into JSON/msgpack-able values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value


_KERAS_OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.class_name.lower(): cls
    for cls in (SGD, RMSprop, Adagrad, Adadelta, Adam, Adamax, Nadam, TFOptimizer)
}


def optimizer_names() -> list[str]:
    """The valid optimizer class names, in Keras's spelling."""
    return [cls.class_name for cls in _KERAS_OPTIMIZERS.values()]


def _lookup(name: Any) -> type[Optimizer]:
    if isinstance(name, str) and name.lower() in _KERAS_OPTIMIZERS:
        return _KERAS_OPTIMIZERS[name.lower()]
    raise UnknownOptimizer(
        f"unknown optimizer {name!r}; valid names (case-insensitive): "
        f"{', '.join(optimizer_names())}"
    )


def deserialize(config: Mapping[str, Any]) -> Optimizer:
    """Build an optimizer from Keras's serialized form ``{"class_name": ..., "config": {...}}``.

    ``class_name`` is matched case-insensitively; ``config`` may be omitted (defaults).
    """
    if not isinstance(config, Mapping):
        raise InvalidOptimizerConfig(
            f"optimizer must be a name or a {{'class_name', 'config'}} object, got {config!r}"
        )
    unknown = sorted(set(config) - {"class_name", "config"})
    if unknown:
        raise InvalidOptimizerConfig(
            f"optimizer object has unknown key(s) {', '.join(map(repr, unknown))}; "
            "allowed: 'class_name', 'config'"
        )
    if "class_name" not in config:
        raise InvalidOptimizerConfig("optimizer object needs a 'class_name'")
    cls = _lookup(config["class_name"])
    inner = config.get("config")
    if inner is None:
        inner = {}
    if not isinstance(inner, Mapping):
        raise InvalidOptimizerConfig(
            f"{cls.class_name}: 'config' must be an object, got {type(inner).__name__}"
        )
    if cls is not TFOptimizer and not all(isinstance(k, str) for k in inner):
        raise InvalidOptimizerConfig(f"{cls.class_name}: config keys must be strings")
    return cls.from_config(inner)


def get(identifier: str | Mapping[str, Any] | Optimizer) -> Optimizer:
    """Keras's ``optimizers.get``: a name (defaults), a serialized config, or an instance."""
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, str):
        return _lookup(identifier)()
    if isinstance(identifier, Mapping):
        return deserialize(identifier)
    module = type(identifier).__module__ or ""
    kind = type(identifier).__name__
    if module.split(".")[0] in ("keras", "tensorflow", "tf_keras"):
        raise InvalidOptimizerConfig(
            f"a TensorFlow/Keras optimizer object ({module}.{kind}) cannot be sent as it is: "
            f"use paramserver.optimizers.{kind}(...) for the Keras 2.2 rule of that name (the "
            "server runs it), or paramserver.optimizers.TFOptimizer(<that instance>) to run "
            "TensorFlow's own optimizer on the server"
        )
    if module.split(".")[0] == "torch":
        raise InvalidOptimizerConfig(
            f"a PyTorch optimizer ({module}.{kind}) cannot run on the server: give the "
            "session a Keras 2.2 optimizer (paramserver.optimizers.SGD, Adam, ...; the server "
            "runs it) and use paramserver.client.torch.RemoteOptimizer on the worker"
        )
    raise InvalidOptimizerConfig(
        "optimizer must be a name such as 'adam', a {'class_name', 'config'} object, or a "
        f"paramserver.optimizers instance; got {kind}"
    )


def serialize(optimizer: Optimizer) -> dict[str, Any]:
    """Keras's ``optimizers.serialize``: ``{"class_name": ..., "config": {...}}``."""
    return optimizer.to_dict()
