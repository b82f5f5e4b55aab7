"""Keras 2.2.4's weight constraints as configs shared by server and client.

Keras 2.2 applies a parameter's constraint inside the optimizer's update: after each step the
new value is passed through ``constraint(new_p)`` (``keras/optimizers.py``). A session does the
same on the server, so its weights stay constrained: a create body may carry ``"constraints":
{parameter name: {"class_name": ..., "config": {...}}}`` with these classes and Keras 2.2.4's
arguments and defaults (``keras/constraints.py``):

=============  ==================================================  ===========================
class          arguments (defaults)                                 after each step
=============  ==================================================  ===========================
``MaxNorm``    ``max_value=2``, ``axis=0``                          norms along ``axis`` at most
                                                                    ``max_value``
``NonNeg``     none                                                 negative weights set to 0
``UnitNorm``   ``axis=0``                                           norms along ``axis`` 1
``MinMaxNorm`` ``min_value=0.0``, ``max_value=1.0``, ``rate=1.0``,  norms moved (at ``rate``)
               ``axis=0``                                           into ``[min, max]``
=============  ==================================================  ===========================

Names are case-insensitive and Keras's aliases work (``max_norm``, ``maxnorm``, ...). ``axis``
is an integer or a list of integers (negative ones count from the end), checked against the
parameter's shape when the session is made. The math is in
:mod:`paramserver.server.optim.constraints`. Keras 2.2.4's ``TFOptimizer`` applies no
constraints, so a TFOptimizer session refuses them (422 ``invalid_constraint``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .codes import ErrorCode, MessageError

__all__ = [
    "NORM_CONSTRAINTS",
    "Constraint",
    "MaxNorm",
    "MinMaxNorm",
    "NonNeg",
    "UnitNorm",
    "check_axes",
    "decode_constraints",
    "get",
]


def _error(message: str) -> MessageError:
    return MessageError(message, code=ErrorCode.INVALID_CONSTRAINT)


def _number(cls: str, name: str, value: Any, *, low: float = -math.inf) -> float:
    try:
        finite = isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows 4300 digits)
        finite = False
    if isinstance(value, bool) or not finite:
        raise _error(f"{cls}: {name!r} must be a finite number, got {value!r}"[:200])
    if value < low:
        raise _error(f"{cls}: {name!r} must be >= {low:g}, got {value!r}")
    return float(value) if isinstance(value, float) else value


def _axis(cls: str, value: Any) -> int | tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(a, int) and not isinstance(a, bool) for a in value):
            if len(set(value)) != len(value):
                raise _error(f"{cls}: 'axis' repeats an axis: {list(value)}")
            return tuple(value)
    raise _error(
        f"{cls}: 'axis' must be an integer or a non-empty list of integers, got {value!r}"[:200]
    )


class Constraint:
    """Base of the constraint configs: ``class_name``, ``get_config()``, ``to_dict()``."""

    class_name: ClassVar[str]
    #: Whether the constraint looks at norms along an axis (a tensor it holds cannot be split
    #: along that axis, and rows cannot be updated lazily).
    norm_based: ClassVar[bool] = True

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"class_name": self.class_name, "config": self.get_config()}

    @property
    def axes(self) -> tuple[int, ...]:
        axis = getattr(self, "axis", ())
        return (axis,) if isinstance(axis, int) else tuple(axis)


@dataclass(frozen=True)
class MaxNorm(Constraint):
    """Norms along ``axis`` at most ``max_value`` (Keras 2.2.4 ``MaxNorm``)."""

    max_value: float = 2
    axis: int | tuple[int, ...] = 0
    class_name: ClassVar[str] = "MaxNorm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_value", _number("MaxNorm", "max_value", self.max_value))
        object.__setattr__(self, "axis", _axis("MaxNorm", self.axis))

    def get_config(self) -> dict[str, Any]:
        return {"max_value": self.max_value, "axis": _axis_out(self.axis)}


@dataclass(frozen=True)
class NonNeg(Constraint):
    """Negative weights become 0 (Keras 2.2.4 ``NonNeg``)."""

    class_name: ClassVar[str] = "NonNeg"
    norm_based: ClassVar[bool] = False

    def get_config(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class UnitNorm(Constraint):
    """Norms along ``axis`` become 1 (Keras 2.2.4 ``UnitNorm``)."""

    axis: int | tuple[int, ...] = 0
    class_name: ClassVar[str] = "UnitNorm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", _axis("UnitNorm", self.axis))

    def get_config(self) -> dict[str, Any]:
        return {"axis": _axis_out(self.axis)}


@dataclass(frozen=True)
class MinMaxNorm(Constraint):
    """Norms along ``axis`` moved into ``[min_value, max_value]``: to ``rate * clip(norm) +
    (1 - rate) * norm`` (Keras 2.2.4 ``MinMaxNorm``)."""

    min_value: float = 0.0
    max_value: float = 1.0
    rate: float = 1.0
    axis: int | tuple[int, ...] = 0
    class_name: ClassVar[str] = "MinMaxNorm"

    def __post_init__(self) -> None:
        for name in ("min_value", "max_value", "rate"):
            object.__setattr__(self, name, _number("MinMaxNorm", name, getattr(self, name)))
        object.__setattr__(self, "axis", _axis("MinMaxNorm", self.axis))

    def get_config(self) -> dict[str, Any]:
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rate": self.rate,
            "axis": _axis_out(self.axis),
        }


def _axis_out(axis: int | tuple[int, ...]) -> int | list[int]:
    return axis if isinstance(axis, int) else list(axis)


_CLASSES: dict[str, type[Constraint]] = {
    "maxnorm": MaxNorm,
    "max_norm": MaxNorm,
    "nonneg": NonNeg,
    "non_neg": NonNeg,
    "unitnorm": UnitNorm,
    "unit_norm": UnitNorm,
    "minmaxnorm": MinMaxNorm,
    "min_max_norm": MinMaxNorm,
}
#: The classes that look at norms along an axis.
NORM_CONSTRAINTS = frozenset({"MaxNorm", "UnitNorm", "MinMaxNorm"})


def get(obj: Any) -> Constraint:
    """A constraint from a config object, a name (defaults), ``{"class_name", "config"}``
    (Keras's serialized form), or an object with ``get_config()`` (a Keras constraint; its
    class name picks the class)."""
    name: Any
    config: Any
    if isinstance(obj, Constraint):
        return obj
    if isinstance(obj, str):
        name, config = obj, {}
    elif isinstance(obj, Mapping):
        name = obj.get("class_name")
        config = obj.get("config", {})
        extra = set(obj) - {"class_name", "config"}
        if extra or not isinstance(name, str) or not isinstance(config, Mapping):
            raise _error(
                "a constraint is a name such as 'MaxNorm' or {'class_name': 'MaxNorm', "
                f"'config': {{...}}}}, got {dict(obj)!r}"[:300]
            )
    elif callable(getattr(obj, "get_config", None)):
        name, config = type(obj).__name__, obj.get_config()
    else:
        raise _error(f"not a constraint: {obj!r}"[:200])
    cls = _CLASSES.get(name.lower())
    if cls is None:
        raise _error(
            f"unknown constraint {name!r}; the Keras 2.2 constraints are MaxNorm, NonNeg, "
            "UnitNorm and MinMaxNorm"
        )
    allowed = {"max_value", "axis"} if cls is MaxNorm else set()
    if cls is UnitNorm:
        allowed = {"axis"}
    if cls is MinMaxNorm:
        allowed = {"min_value", "max_value", "rate", "axis"}
    unknown = sorted(map(str, set(config) - allowed))
    if unknown:
        listed = ", ".join(map(repr, unknown[:10]))
        if len(unknown) > 10:
            listed += f" and {len(unknown) - 10} more"
        raise _error(
            f"{cls.class_name}: unknown argument(s) {listed[:400]}; it takes "
            f"{', '.join(sorted(allowed)) or 'none'}"
        )
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
    return cls(**kwargs)


def check_axes(name: str, constraint: Constraint, shape: tuple[int, ...]) -> None:
    """The constraint's ``axis`` must name axes of the parameter (``invalid_constraint``)."""
    if not constraint.norm_based:
        return
    ndim = len(shape)
    seen = set()
    for axis in constraint.axes:
        if not -ndim <= axis < ndim:
            raise _error(
                f"constraint {constraint.class_name} of parameter {name!r}: axis {axis} is out "
                f"of range for its shape {list(shape)}"
            )
        seen.add(axis % ndim)
    if len(seen) != len(constraint.axes):
        raise _error(f"constraint of parameter {name!r}: axis {list(constraint.axes)} repeats one")


def decode_constraints(obj: Any) -> dict[str, Constraint]:
    """The ``"constraints"`` of a create body or a state: parameter name -> constraint."""
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise _error("'constraints' must be a map of parameter name to constraint")
    return {name: get(value) for name, value in obj.items()}
