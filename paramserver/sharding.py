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

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .codes import ErrorCode, MessageError
from .sparse import Rows
from .wire import TENSOR_DTYPES

__all__ = [
    "DEFAULT_SLICE_BYTES",
    "MAX_SHARDS",
    "Layout",
    "LayoutError",
    "Part",
    "Piece",
    "Shard",
    "check_parts",
    "decode_round_order",
    "decode_shard",
    "decode_sum_squares",
    "layout_of_shards",
    "partition",
]

#: Shards of one session at most.
MAX_SHARDS = 1024
#: Bounds of a part's position in the model and of a slice's rows.
MAX_POSITION = 1 << 24
MAX_ROWS = 1 << 62
_LAYOUT = re.compile(r"[0-9a-f]{8,128}")


@dataclass(frozen=True)
class Part:
    """What one parameter of a shard's session is: the model's parameter ``source`` (the
    ``position``-th in the model's order) or, with ``rows``, rows ``[start, stop)`` of it."""

    source: str
    position: int
    rows: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "position": self.position}
        if self.rows is not None:
            out["rows"] = list(self.rows)
        return out


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a sharded session whose partition hashes to ``layout``;
    ``parts`` (when the client sent them) says what each of the shard's parameters is, in the
    shard's parameter order, so that a client joining by id can rebuild the model."""

    index: int
    count: int
    layout: str
    parts: tuple[tuple[str, Part], ...] | None = None

    def __post_init__(self) -> None:
        decode_shard(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "count": self.count, "layout": self.layout}
        if self.parts is not None:
            out["parts"] = {name: part.to_dict() for name, part in self.parts}
        return out


def _error(message: str) -> MessageError:
    return MessageError(message, code=ErrorCode.INVALID_REQUEST)


def decode_shard(obj: Any) -> Shard:
    """The ``"shard"`` object of a create body or a state (422 ``invalid_request``)."""
    keys = {"index", "count", "layout"}
    if not isinstance(obj, dict) or not keys <= set(obj) <= keys | {"parts"}:
        raise _error(
            "'shard' must be {'index': int, 'count': int, 'layout': hex string, 'parts'?: "
            "{name: {'source', 'position', 'rows'?}}}"
        )
    index, count, layout = obj["index"], obj["count"], obj["layout"]
    for name, value in (("index", index), ("count", count)):
        if not _is_int(value):
            raise _error(f"shard: {name!r} must be an integer, got {value!r}"[:200])
    if not 1 <= count <= MAX_SHARDS or not 0 <= index < count:
        raise _error(
            f"shard: 'count' must be in [1, {MAX_SHARDS}] and 'index' in [0, count), got "
            f"index {index}, count {count}"
        )
    if not isinstance(layout, str) or _LAYOUT.fullmatch(layout) is None:
        raise _error("shard: 'layout' must be 8-128 lowercase hex digits (the layout's hash)")
    parts = _decode_parts(obj["parts"]) if "parts" in obj else None
    shard = object.__new__(Shard)
    object.__setattr__(shard, "index", index)
    object.__setattr__(shard, "count", count)
    object.__setattr__(shard, "layout", layout)
    object.__setattr__(shard, "parts", parts)
    return shard


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode_parts(obj: Any) -> tuple[tuple[str, Part], ...]:
    if not isinstance(obj, dict) or not obj:
        raise _error("shard: 'parts' must be a non-empty map of parameter name -> part")
    out: list[tuple[str, Part]] = []
    for name, part in obj.items():
        what = f"shard: parts[{name!r}]"[:300]
        if not isinstance(part, dict) or not {"source", "position"} <= set(part) <= {
            "source",
            "position",
            "rows",
        }:
            raise _error(f"{what} must be {{'source': name, 'position': int, 'rows'?: [a, b]}}")
        source, position, rows = part["source"], part["position"], part.get("rows")
        if not isinstance(source, str) or not 1 <= len(source) <= 256 or not source.isprintable():
            raise _error(f"{what}: 'source' must be a parameter name (1-256 printable characters)")
        if not _is_int(position) or not 0 <= position < MAX_POSITION:
            raise _error(f"{what}: 'position' must be an integer in [0, {MAX_POSITION})")
        span: tuple[int, int] | None = None
        if rows is not None:
            if (
                not isinstance(rows, list)
                or len(rows) != 2
                or not all(_is_int(r) for r in rows)
                or not 0 <= rows[0] < rows[1] <= MAX_ROWS
            ):
                raise _error(f"{what}: 'rows' must be [start, stop] with 0 <= start < stop")
            span = (rows[0], rows[1])
        out.append((name, Part(source, position, span)))
    return tuple(out)


def check_parts(shard: Shard, shapes: Mapping[str, tuple[int, ...]], *, slices: bool) -> None:
    """A shard's ``parts`` against its session's parameters (their names, in order, and
    shapes): one part per parameter, a slice's rows as many as its tensor's first axis.
    ``slices=False``: no tensor may be split (a TFOptimizer: TensorFlow's optimizers may
    compute per-variable norms). Raises ``MessageError`` (422 ``invalid_request``)."""
    if shard.parts is None:
        return
    names = [name for name, _ in shard.parts]
    if names != list(shapes):
        raise _error(
            "shard: 'parts' must name the session's parameters, in their order "
            f"(got {names[:5]}..., parameters {list(shapes)[:5]}...)"[:400]
        )
    _check_claims(shard.parts)
    for name, part in shard.parts:
        if part.rows is None:
            continue
        if not slices:
            raise _error(
                f"shard: parts[{name!r}] is a slice of {part.source!r}; a TFOptimizer "
                "session's tensors cannot be split (TensorFlow's optimizers may use "
                "per-variable norms): keep every tensor whole"[:400]
            )
        shape = shapes[name]
        if not shape or shape[0] != part.rows[1] - part.rows[0]:
            raise _error(
                f"shard: parts[{name!r}] holds rows {list(part.rows)} of {part.source!r}, "
                f"but the parameter has shape {list(shape)}"[:400]
            )


def _check_claims(parts: tuple[tuple[str, Part], ...]) -> None:
    """No two parts claim the same piece of a source tensor: a whole tensor once, slices of
    one tensor without overlap and never beside it whole; a source has one position, and two
    sources never share one (a joining client places tensors by it)."""
    spans: dict[str, list[tuple[int, int] | None]] = {}
    source_at: dict[int, str] = {}
    position_of: dict[str, int] = {}
    for name, part in parts:
        other = source_at.setdefault(part.position, part.source)
        position = position_of.setdefault(part.source, part.position)
        if other != part.source or position != part.position:
            raise _error(
                f"shard: parts[{name!r}] gives {part.source!r} position {part.position}; "
                f"position {part.position} is {other!r}'s, {part.source!r} is at {position}"[:400]
            )
        claimed = spans.setdefault(part.source, [])
        for span in claimed:
            if (
                span is None
                or part.rows is None
                or (span[0] < part.rows[1] and part.rows[0] < span[1])
            ):
                raise _error(
                    f"shard: parts[{name!r}] claims rows of {part.source!r} that another part "
                    "of this shard holds already"[:400]
                )
        claimed.append(part.rows)


_ORDER = re.compile(r"[0-9a-f]{1,128}")


def decode_round_order(value: Any) -> str:
    """A push's ``round_order``: 1-128 lowercase hex digits (422 ``invalid_request``). A
    sync round sums its gradients in the order of these keys; a sharded push sends every
    part with the whole push's digest, so each shard sums in the single server's order."""
    if not isinstance(value, str) or _ORDER.fullmatch(value) is None:
        raise _error("'round_order' must be 1-128 lowercase hex digits (the push's digest)")
    return value


def decode_sum_squares(value: Any) -> float:
    """A push's ``sum_squares``: a finite number >= 0 (422 ``invalid_request``). ``inf`` (the
    squares of huge float64 gradients overflowing) is 422 ``non_finite_gradient``, as the single
    server refuses such a push: no shard applies it."""
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        number = float(value) if ok else math.nan
    except OverflowError:
        number = math.nan
    if not number >= 0:  # NaN fails too
        raise _error(f"'sum_squares' must be a number >= 0, got {value!r}"[:200])
    if math.isinf(number):
        raise MessageError(
            "gradients are too large: their global norm overflows float64",
            code=ErrorCode.NON_FINITE_GRADIENT,
        )
    return number


# --- the partition (the client's side) ------------------------------------------------------

#: Tensors larger than this are split along axis 0 into slices of about this size (BytePS
#: partitions in ~4 MB pieces).
DEFAULT_SLICE_BYTES = 4 << 20
_LAYOUT_FORMAT = 1


class LayoutError(ValueError):
    """A model cannot be partitioned so, or shards do not describe one layout."""


@dataclass(frozen=True)
class Piece:
    """One parameter of one shard's session: the model's parameter ``source`` (the
    ``position``-th) whole, or its rows ``[start, stop)``, named ``name`` on shard ``shard``."""

    name: str
    source: str
    position: int
    rows: tuple[int, int] | None
    shard: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * TENSOR_DTYPES[self.dtype].itemsize

    @property
    def part(self) -> Part:
        return Part(self.source, self.position, self.rows)


@dataclass(frozen=True)
class Layout:
    """Which shard holds which piece of which parameter. ``model`` is the model's parameters
    ``(name, dtype, shape)`` in order; ``pieces`` in the model's order (a split tensor's
    slices by rows); ``digest`` the hash every shard's session records."""

    count: int
    model: tuple[tuple[str, str, tuple[int, ...]], ...]
    pieces: tuple[Piece, ...]
    digest: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.model)

    def on(self, index: int) -> tuple[Piece, ...]:
        """Shard ``index``'s pieces, in its session's parameter order."""
        return tuple(p for p in self.pieces if p.shard == index)

    def shard(self, index: int) -> Shard:
        """The ``"shard"`` record of shard ``index``'s session."""
        parts = tuple((p.name, p.part) for p in self.on(index))
        return Shard(index, self.count, self.digest, parts)

    def bytes_per_shard(self) -> list[int]:
        out = [0] * self.count
        for p in self.pieces:
            out[p.shard] += p.nbytes
        return out

    def split(self, arrays: Mapping[str, Any]) -> list[dict[str, Any]]:
        """``arrays`` (by the model's names) as one dict per shard, by the pieces' names;
        slices are views along axis 0. Names ``arrays`` lacks are left out."""
        out: list[dict[str, Any]] = [{} for _ in range(self.count)]
        for p in self.pieces:
            if p.source in arrays:
                value = arrays[p.source]
                if p.rows is None:
                    out[p.shard][p.name] = value
                elif isinstance(value, Rows):  # a row-sparse gradient: the rows in the slice
                    a, b = p.rows
                    keep = (value.indices >= a) & (value.indices < b)
                    out[p.shard][p.name] = Rows(
                        value.indices[keep] - a, value.values[keep], (b - a, *p.shape[1:])
                    )
                else:
                    out[p.shard][p.name] = value[p.rows[0] : p.rows[1]]
        return out

    def join(
        self,
        parts: Sequence[Mapping[str, np.ndarray]],
        out: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The model's arrays from each shard's (by the pieces' names): a whole tensor as its
        shard answered it, a split one concatenated; with ``out``, the split tensors are
        written into ``out``'s arrays (which are returned for them)."""
        whole: dict[str, np.ndarray] = {}
        slices: dict[str, list[Piece]] = {}
        for p in self.pieces:
            if p.rows is None:
                whole[p.source] = parts[p.shard][p.name]
            else:
                slices.setdefault(p.source, []).append(p)
        result: dict[str, np.ndarray] = {}
        for name, _, shape in self.model:
            if name in whole:
                result[name] = whole[name]
                continue
            pieces = slices[name]
            first = parts[pieces[0].shard][pieces[0].name]
            target = None if out is None else out.get(name)
            if target is None:
                target = np.empty(shape, first.dtype)
            for p in pieces:
                assert p.rows is not None
                rows = target[p.rows[0] : p.rows[1]]
                got = parts[p.shard][p.name]
                if not _same_memory(rows, got):  # received in place already: nothing to copy
                    rows[...] = got
            result[name] = target
        return result


def _same_memory(a: np.ndarray, b: Any) -> bool:
    """Whether ``b`` is ``a``'s very memory (the same start, shape and strides)."""
    return (
        isinstance(b, np.ndarray)
        and a.shape == b.shape
        and a.strides == b.strides
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * TENSOR_DTYPES[dtype].itemsize


def _digest(
    count: int, model: Sequence[tuple[str, str, tuple[int, ...]]], pieces: Sequence[Piece]
) -> str:
    described = {
        "format": _LAYOUT_FORMAT,
        "count": count,
        "model": [[name, dtype, list(shape)] for name, dtype, shape in model],
        "pieces": [
            [p.name, p.position, None if p.rows is None else list(p.rows), p.shard] for p in pieces
        ],
    }
    text = json.dumps(described, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def partition(
    model: Sequence[tuple[str, str, tuple[int, ...]]],
    count: int,
    *,
    slice_bytes: int = DEFAULT_SLICE_BYTES,
    whole: Iterable[str] = (),
    split: bool = True,
) -> Layout:
    """The deterministic layout of ``model`` (``(name, dtype, shape)`` in the model's order)
    over ``count`` shards.

    A tensor larger than ``slice_bytes`` is split along axis 0, at row boundaries, into
    slices of at most ``slice_bytes`` (at least one row each), unless it is in ``whole``
    (norm-based constraints: their norms span the rows) or ``split`` is False (a TFOptimizer,
    whose optimizers may compute per-variable norms). The pieces, largest first (ties in the
    model's order), each go to the shard holding the fewest bytes so far (ties: the lowest
    index), which balances bytes. A shard left without a piece is a ``LayoutError``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SHARDS:
        raise LayoutError(f"the shard count must be in [1, {MAX_SHARDS}], got {count!r}")
    if isinstance(slice_bytes, bool) or not isinstance(slice_bytes, int) or slice_bytes < 1:
        raise LayoutError(f"slice_bytes must be a positive integer, got {slice_bytes!r}")
    keep_whole = set(whole)
    model = tuple((str(n), str(d), tuple(int(x) for x in s)) for n, d, s in model)
    names = [name for name, _, _ in model]
    if len(set(names)) != len(names):
        raise LayoutError("the model's parameter names must be distinct")
    drafts: list[tuple[str, str, int, tuple[int, int] | None, str, tuple[int, ...]]] = []
    for position, (name, dtype, shape) in enumerate(model):
        nbytes = _nbytes(dtype, shape)
        rows = shape[0] if shape else 0
        if split and name not in keep_whole and rows > 1 and nbytes > slice_bytes:
            per = max(1, slice_bytes // (nbytes // rows))
            if per < rows:
                for start in range(0, rows, per):
                    stop = min(start + per, rows)
                    piece_name = f"{name}[{start}:{stop}]"
                    if len(piece_name) > 256:
                        raise LayoutError(
                            f"parameter {name[:60]!r}...: its name is too long to name its "
                            "slices (256 characters at most); rename it or raise slice_bytes"
                        )
                    drafts.append(
                        (
                            piece_name,
                            name,
                            position,
                            (start, stop),
                            dtype,
                            (stop - start, *shape[1:]),
                        )
                    )
                continue
        drafts.append((name, name, position, None, dtype, shape))
    taken = set(names)
    for piece_name, source, *_ in drafts:
        if piece_name != source and piece_name in taken:
            raise LayoutError(
                f"a slice of {source!r} would be named {piece_name!r}, which is a parameter "
                "of the model: rename that parameter"
            )
    if len(drafts) < count:
        raise LayoutError(
            f"{count} shards, but the model splits into only {len(drafts)} pieces (tensors "
            f"larger than {slice_bytes} bytes are split): use at most {len(drafts)} shards"
        )
    loads = [0] * count
    placed = [0] * len(drafts)
    order = sorted(
        range(len(drafts)),
        key=lambda i: (-_nbytes(drafts[i][4], drafts[i][5]), drafts[i][2], drafts[i][3] or (0, 0)),
    )
    for i in order:
        target = min(range(count), key=lambda s: (loads[s], s))
        placed[i] = target
        loads[target] += max(1, _nbytes(drafts[i][4], drafts[i][5]))
    pieces = tuple(
        Piece(name, source, position, rows, placed[i], dtype, shape)
        for i, (name, source, position, rows, dtype, shape) in enumerate(drafts)
    )
    return Layout(count, model, pieces, _digest(count, model, pieces))


def layout_of_shards(
    shards: Sequence[tuple[Shard, Mapping[str, tuple[str, tuple[int, ...]]]]],
) -> Layout:
    """The layout that shards describe: each shard's record (with its ``parts``) and its
    session's parameters (``name -> (dtype, shape)``, in order), in shard order. Raises
    ``LayoutError`` when they are not the shards of one layout."""
    if not shards:
        raise LayoutError("no shards")
    count = len(shards)
    found: dict[str, list[tuple[Piece, tuple[int, ...]]]] = {}
    positions: dict[str, int] = {}
    for index, (shard, params) in enumerate(shards):
        if shard.index != index or shard.count != count:
            raise LayoutError(
                f"server {index} holds shard {shard.index} of {shard.count}, not shard "
                f"{index} of {count}: give the servers' URLs in shard order, all of them"
            )
        if shard.parts is None:
            raise LayoutError(f"shard {index} does not record its parts; it cannot be joined")
        if [name for name, _ in shard.parts] != list(params):
            raise LayoutError(f"shard {index}'s parts do not name its parameters")
        for name, part in shard.parts:
            dtype, shape = params[name]
            if positions.setdefault(part.source, part.position) != part.position:
                raise LayoutError(f"{part.source!r} has two positions in the shards' parts")
            piece = Piece(name, part.source, part.position, part.rows, index, dtype, shape)
            found.setdefault(part.source, []).append((piece, shape))
    if sorted(positions.values()) != list(range(len(positions))):
        raise LayoutError("the shards' parts do not number the model's parameters 0, 1, ...")
    model: list[tuple[str, str, tuple[int, ...]]] = []
    pieces: list[Piece] = []
    for source in sorted(found, key=positions.__getitem__):
        entries = sorted(found[source], key=lambda e: e[0].rows or (0, 0))
        first = entries[0][0]
        if first.rows is None:
            if len(entries) != 1:
                raise LayoutError(f"{source!r} is both whole and split in the shards' parts")
            model.append((source, first.dtype, first.shape))
            pieces.append(first)
            continue
        stop = 0
        for piece, shape in entries:
            if (
                piece.rows is None
                or piece.rows[0] != stop
                or piece.dtype != first.dtype
                or shape[1:] != first.shape[1:]
            ):
                raise LayoutError(f"the slices of {source!r} in the shards do not fit together")
            stop = piece.rows[1]
            pieces.append(piece)
        model.append((source, first.dtype, (stop, *first.shape[1:])))
    digest = _digest(count, model, pieces)
    for index, (shard, _) in enumerate(shards):
        if shard.layout != digest:
            raise LayoutError(
                f"shard {index} records layout {shard.layout}, but the shards together "
                f"describe layout {digest}: they are not the parts of one session"
            )
    return Layout(count, tuple(model), tuple(pieces), digest)
