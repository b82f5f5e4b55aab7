"""Training modes of a session: asynchronous (with an optional staleness bound) or synchronous
rounds. Server and client share these configs; ``POST /sessions`` takes one as ``"training"``.

* :class:`Async` (the default): every push is one step on whatever weights are current, as in
  TensorFlow's asynchronous parameter-server training. With ``max_staleness=S`` a push whose
  gradient was computed on weights more than ``S`` steps old (its ``base_iterations``) is
  refused with 409 ``stale_gradient``, as TensorFlow's ``DropStaleGradientOptimizer`` drops it.
* :class:`Sync`: a round collects ``replicas_to_aggregate`` (N) gradients computed on the
  current weights and applies their mean as one step, as TensorFlow's
  ``SyncReplicasOptimizer`` and MXNet's ``dist_sync`` do; ``total_num_replicas`` (M >= N)
  workers push, so M - N of them are backups whose late gradients are refused as stale. A round
  that does not fill within ``round_timeout_seconds`` applies nothing and answers its pushes 503
  ``round_timeout``.

Both are plain frozen records with Keras-style ``get_config`` / ``from_config``; :func:`get`
accepts a record, its wire form (``{"mode": ..., ...}``) or anything with ``get_config``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .codes import ErrorCode, MessageError

__all__ = [
    "DEFAULT_ROUND_TIMEOUT_SECONDS",
    "MAX_REPLICAS",
    "MAX_ROUND_TIMEOUT_SECONDS",
    "Async",
    "Sync",
    "Training",
    "decode_training",
    "get",
]

#: A sync round waits this long for its gradients unless the session says otherwise.
DEFAULT_ROUND_TIMEOUT_SECONDS = 600.0
#: At most one day: a round is a step of training, not a job queue.
MAX_ROUND_TIMEOUT_SECONDS = 86_400.0
#: Workers of one sync session: each waiting push holds a connection (and its gradient: a
#: round holds up to N gradients in memory).
MAX_REPLICAS = 1024
_MAX_STALENESS = 2**53 - 1


def _count(obj: Mapping[str, Any], key: str, low: int, high: int, *, default: int | None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MessageError(
            f"training: {key!r} must be an integer in [{low}, {high}], got {value!r}",
            code=ErrorCode.INVALID_TRAINING,
        )
    return value


@dataclass(frozen=True)
class Async:
    """Asynchronous training: each push is one step. ``max_staleness``: refuse a push whose
    ``base_iterations`` is more than this many steps behind the session (None: no bound)."""

    max_staleness: int | None = None
    mode: Literal["async"] = "async"

    def __post_init__(self) -> None:
        if self.max_staleness is not None:
            _count(self.to_dict(), "max_staleness", 0, _MAX_STALENESS, default=None)

    @property
    def needs_base(self) -> bool:
        """Whether every push must say which weights it was computed on."""
        return self.max_staleness is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": "async"}
        if self.max_staleness is not None:
            out["max_staleness"] = self.max_staleness
        return out

    def get_config(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Async:
        training = decode_training(dict(config))
        if not isinstance(training, Async):
            raise MessageError("not an async training config", code=ErrorCode.INVALID_TRAINING)
        return training


@dataclass(frozen=True)
class Sync:
    """Synchronous rounds of ``replicas_to_aggregate`` gradients (N) from
    ``total_num_replicas`` workers (M >= N, default N), each round bounded by
    ``round_timeout_seconds``."""

    replicas_to_aggregate: int
    total_num_replicas: int | None = None
    round_timeout_seconds: float = DEFAULT_ROUND_TIMEOUT_SECONDS
    mode: Literal["sync"] = "sync"

    def __post_init__(self) -> None:
        if self.total_num_replicas is None:
            object.__setattr__(self, "total_num_replicas", self.replicas_to_aggregate)
        obj = self.to_dict()
        n = _count(obj, "replicas_to_aggregate", 1, MAX_REPLICAS, default=None)
        _count(obj, "total_num_replicas", n, MAX_REPLICAS, default=None)
        t = self.round_timeout_seconds
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not math.isfinite(t)
            or not 0 < t <= MAX_ROUND_TIMEOUT_SECONDS
        ):
            raise MessageError(
                "training: 'round_timeout_seconds' must be a number in "
                f"(0, {MAX_ROUND_TIMEOUT_SECONDS:g}], got {t!r}",
                code=ErrorCode.INVALID_TRAINING,
            )
        object.__setattr__(self, "round_timeout_seconds", float(t))

    @property
    def needs_base(self) -> bool:
        return True

    @property
    def backups(self) -> int:
        """M - N: the workers whose gradients a round does not wait for."""
        assert self.total_num_replicas is not None
        return self.total_num_replicas - self.replicas_to_aggregate

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "sync",
            "replicas_to_aggregate": self.replicas_to_aggregate,
            "total_num_replicas": self.total_num_replicas,
            "round_timeout_seconds": self.round_timeout_seconds,
        }

    def get_config(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Sync:
        training = decode_training(dict(config))
        if not isinstance(training, Sync):
            raise MessageError("not a sync training config", code=ErrorCode.INVALID_TRAINING)
        return training


Training = Async | Sync

_KEYS = {
    "async": frozenset({"mode", "max_staleness"}),
    "sync": frozenset(
        {"mode", "replicas_to_aggregate", "total_num_replicas", "round_timeout_seconds"}
    ),
}


def decode_training(obj: Any) -> Training:
    """The ``"training"`` object of a create body or a state; ``invalid_training`` (422) when
    it is not one. Absent keys take their defaults."""
    if not isinstance(obj, dict):
        raise MessageError(
            "'training' must be an object such as {'mode': 'sync', 'replicas_to_aggregate': 4}",
            code=ErrorCode.INVALID_TRAINING,
        )
    mode = obj.get("mode", "async")
    if not isinstance(mode, str) or mode not in _KEYS:
        raise MessageError(
            f"training: 'mode' must be 'async' or 'sync', got {mode!r}",
            code=ErrorCode.INVALID_TRAINING,
        )
    extra = sorted(map(str, set(obj) - _KEYS[mode]))
    if extra:
        raise MessageError(
            f"training: unexpected key(s) {', '.join(map(repr, extra))} for mode {mode!r}; "
            f"allowed: {', '.join(map(repr, sorted(_KEYS[mode])))}",
            code=ErrorCode.INVALID_TRAINING,
        )
    if mode == "async":
        staleness = obj.get("max_staleness")
        if staleness is not None:
            staleness = _count(obj, "max_staleness", 0, _MAX_STALENESS, default=None)
        return Async(max_staleness=staleness)
    n = _count(obj, "replicas_to_aggregate", 1, MAX_REPLICAS, default=None)
    m = _count(obj, "total_num_replicas", n, MAX_REPLICAS, default=n)
    return Sync(
        replicas_to_aggregate=n,
        total_num_replicas=m,
        round_timeout_seconds=obj.get("round_timeout_seconds", DEFAULT_ROUND_TIMEOUT_SECONDS),
    )


def get(training: Any) -> Training:
    """A training config from a record, its wire form, or an object with ``get_config``."""
    if isinstance(training, (Async, Sync)):
        return training
    if training is None:
        return Async()
    if isinstance(training, Mapping):
        return decode_training(dict(training))
    get_config = getattr(training, "get_config", None)
    if callable(get_config):
        return decode_training(dict(get_config()))
    raise TypeError(
        "training must be paramserver.training.Sync(...) / Async(...), a {'mode': ...} "
        f"mapping or an object with get_config(); got {type(training).__name__}"
    )
