"""What a server knows of a sharded session: which part of it its session is.

A sharded session is one ordinary session per server, all with the same id, each holding a
part of the parameters; the client owns the partition and the servers never talk to each
other. Each shard's session is created with ``"shard": {"index": i, "count": n, "layout":
hash}`` (the layout hash names the partition the client computed), shows it in its summary
and carries it in its exported state, so that a client joining with another server list or
another layout is told so instead of mixing weights.

What a shard must do differently, so that a sharded session gives the single server's bits:
``clipnorm`` is a norm over the whole push, so each part of a push carries the push's sum of
squares (``"sum_squares"``, computed by :func:`paramserver.reductions.push_sum_squares`) and
the shard clips with it. Two combinations cannot be exact and are refused when the shard is
created (422): sync rounds with backup workers (M > N: two shards could average different
sets of workers) and sync rounds with ``clipnorm`` (the clip applies to the mean over the
workers, whose norm no single party sees).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .codes import ErrorCode, MessageError

__all__ = ["MAX_SHARDS", "Shard", "decode_shard", "decode_sum_squares"]

#: Shards of one session at most.
MAX_SHARDS = 1024
_LAYOUT = re.compile(r"[0-9a-f]{8,128}")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a sharded session whose partition hashes to ``layout``."""

    index: int
    count: int
    layout: str

    def __post_init__(self) -> None:
        decode_shard(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "count": self.count, "layout": self.layout}


def _error(message: str) -> MessageError:
    return MessageError(message, code=ErrorCode.INVALID_REQUEST)


def decode_shard(obj: Any) -> Shard:
    """The ``"shard"`` object of a create body or a state (422 ``invalid_request``)."""
    if not isinstance(obj, dict) or set(obj) != {"index", "count", "layout"}:
        raise _error("'shard' must be {'index': int, 'count': int, 'layout': hex string}")
    index, count, layout = obj["index"], obj["count"], obj["layout"]
    for name, value in (("index", index), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(f"shard: {name!r} must be an integer, got {value!r}"[:200])
    if not 1 <= count <= MAX_SHARDS or not 0 <= index < count:
        raise _error(
            f"shard: 'count' must be in [1, {MAX_SHARDS}] and 'index' in [0, count), got "
            f"index {index}, count {count}"
        )
    if not isinstance(layout, str) or _LAYOUT.fullmatch(layout) is None:
        raise _error("shard: 'layout' must be 8-128 lowercase hex digits (the layout's hash)")
    shard = object.__new__(Shard)
    object.__setattr__(shard, "index", index)
    object.__setattr__(shard, "count", count)
    object.__setattr__(shard, "layout", layout)
    return shard


def decode_sum_squares(value: Any) -> float:
    """A push's ``sum_squares``: a number >= 0 (422 ``invalid_request``). ``inf`` is one: the
    squares of huge float64 gradients overflow on the single server too."""
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        number = float(value) if ok else math.nan
    except OverflowError:
        number = math.nan
    if not number >= 0:  # NaN fails too
        raise _error(f"'sum_squares' must be a number >= 0, got {value!r}"[:200])
    return number
