"""Sharded sessions: one session split over several servers, with the API of one.

::

    from paramserver.client import Client

    with Client(["http://ps-0:8000", "http://ps-1:8000", "http://ps-2:8000"]) as client:
        session = client.create_session(model.get_weights(), "adam")
        weights = session.push(gradients)      # every shard's part, in parallel

``Client(urls)`` (a list or tuple of URLs, in shard order) makes a :class:`ShardedClient`,
``AsyncClient(urls)`` an :class:`AsyncShardedClient`. Each server holds one ordinary session
with the session's id and a part of its parameters; the client owns the partition
(:func:`paramserver.sharding.partition`: whole tensors placed to balance bytes, tensors
larger than ``slice_bytes`` split along axis 0) and the servers never talk to each other.

What makes the result the single server's, bit for bit: each part of a push carries the whole
push's sum of squares when the optimizer clips with ``clipnorm`` (computed in numpy as the
server's numba kernel does) and the whole push's digest, which a sync round orders its sum
by. A push goes to every shard at once with one Idempotency-Key; a shard that stays down
raises :class:`~paramserver.client.errors.PushIncomplete` (retry with its key: the shards
that applied it replay their answer). Pulls, summaries and state exports check that every
shard is at the same iteration (:class:`~paramserver.client.errors.ShardsDiverged`), and
joining a session by id checks that the servers hold the shards of one layout, in order
(:class:`~paramserver.client.errors.LayoutMismatch`).

The operations are written once, as plans (generators that yield the calls to send to the
shards and receive their outcomes); the blocking twin sends them from a thread pool, the
asyncio twin with ``asyncio.gather``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from collections.abc import Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

import httpx
import numpy as np

from paramserver import optimizers, sparse, wire
from paramserver import training as modes
from paramserver.constraints import Constraint
from paramserver.constraints import get as get_constraint
from paramserver.messages import SessionState, encode_create, push_digest
from paramserver.reductions import push_sum_squares
from paramserver.sharding import (
    DEFAULT_SLICE_BYTES,
    Layout,
    LayoutError,
    Shard,
    layout_of_shards,
    partition,
)
from paramserver.sparse import Rows

from . import _base, errors
from ._base import (
    Call,
    OptimizerLike,
    Parameter,
    Reply,
    Safety,
    SessionCore,
    SessionInfo,
    TrainingLike,
    Weights,
    named_arrays,
    session_path,
    shape_weights,
)
from .aio import AsyncClient, AsyncSession
from .sync import Client, Session

__all__ = [
    "URLS_ENV",
    "AsyncShardedClient",
    "AsyncShardedSession",
    "ShardedClient",
    "ShardedSession",
    "urls_from_env",
]

T = TypeVar("T")

#: The environment variable that lists a sharded session's servers, in shard order.
URLS_ENV = "PARAMSERVER_URLS"


def urls_from_env(name: str = URLS_ENV) -> list[str]:
    """The server URLs in ``$PARAMSERVER_URLS`` (comma- or space-separated, in shard order):
    ``Client(urls_from_env())``. ValueError if it is unset or empty."""
    urls = [u for u in os.environ.get(name, "").replace(",", " ").split() if u]
    if not urls:
        raise ValueError(f"${name} is empty: set it to the servers' URLs, in shard order")
    return urls


@dataclass(frozen=True)
class Outcome:
    """What one shard's call gave: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


#: A plan: yields ``[(shard index, call), ...]`` and receives their outcomes, or yields a
#: number of seconds to pause (and receives ``[]``); returns the result.
Plan = Generator["list[tuple[int, Call[Any]]] | float", list[Outcome], T]
#: Pauses between summaries or states asked again while a shard catches up.
_PAUSES = (0.01, 0.02, 0.05, 0.1, 0.2)

#: Errors after which a shard has not applied a push and a retry with its key may: it is
#: down, slow or busy.
_TRANSIENT = (errors.TransportError, errors.RequestTimeout)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (errors.RoundTimeout, errors.RoundFull)):
        return False
    return isinstance(exc, _TRANSIENT) or isinstance(exc, errors.ServiceUnavailable)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


# --- what is the same for both twins -------------------------------------------------------


def model_of(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, wire.dtype_name(a.dtype, name), tuple(a.shape)) for name, a in arrays.items()]


def layout_for(
    model: Sequence[tuple[str, str, tuple[int, ...]]],
    optimizer: optimizers.Optimizer,
    constraints: Mapping[str, Constraint],
    count: int,
    slice_bytes: int,
) -> Layout:
    """The partition of a session: tensors with a norm-based constraint stay whole (their
    norms span the rows), and so does every tensor of a TFOptimizer session (TensorFlow's
    optimizers may compute per-variable norms: its clipnorm, Adafactor, LAMB)."""
    try:
        return partition(
            model,
            count,
            slice_bytes=slice_bytes,
            whole=[name for name, c in constraints.items() if c.norm_based],
            split=not isinstance(optimizer, optimizers.TFOptimizer),
        )
    except LayoutError as exc:
        raise ValueError(str(exc)) from None


def _split_constraints(
    layout: Layout, constraints: Mapping[str, Constraint]
) -> list[dict[str, Constraint]]:
    out: list[dict[str, Constraint]] = [{} for _ in range(layout.count)]
    for piece in layout.pieces:
        if piece.source in constraints:  # whole (norm-based) or elementwise on each slice
            out[piece.shard][piece.name] = constraints[piece.source]
    return out


def _join_constraints(
    layout: Layout, per_shard: Sequence[Mapping[str, Constraint]]
) -> dict[str, Constraint]:
    out: dict[str, Constraint] = {}
    for piece in layout.pieces:
        found = per_shard[piece.shard].get(piece.name)
        if found is not None:
            out[piece.source] = found
    return out


def _shard_of(info: SessionInfo, index: int, url: str) -> Shard:
    if info.shard is None:
        raise errors.LayoutMismatch(
            f"server {index} ({url}) holds an ordinary session {info.session_id!r}, not a "
            "shard of a sharded session"
        )
    return info.shard


def _layout_of(infos: Sequence[SessionInfo], urls: Sequence[str]) -> Layout:
    shards = []
    for index, info in enumerate(infos):
        shard = _shard_of(info, index, urls[index])
        shards.append((shard, {n: (p.dtype, p.shape) for n, p in info.parameters.items()}))
    try:
        return layout_of_shards(shards)
    except LayoutError as exc:
        raise errors.LayoutMismatch(f"session {infos[0].session_id!r}: {exc}") from None


def _merged_info(layout: Layout, infos: Sequence[SessionInfo]) -> SessionInfo:
    """One summary of the whole session from its shards' (which agree on the iteration)."""
    first = infos[0]
    created = [i.created_at for i in infos if i.created_at is not None]
    updated = [i.updated_at for i in infos if i.updated_at is not None]
    return SessionInfo(
        session_id=first.session_id,
        optimizer=first.optimizer,
        iterations=min(i.iterations for i in infos),
        parameters={name: Parameter(dtype, shape) for name, dtype, shape in layout.model},
        created_at=min(created) if created else None,
        updated_at=max(updated) if updated else None,
        refuse_non_finite=first.refuse_non_finite,
        training=first.training,
        round=first.round,
        constraints=_join_constraints(layout, [i.constraints for i in infos]),
        shard=None,
        sparse_updates=first.sparse_updates,
    )


def _diverged(
    what: str, session_id: str, iterations: Sequence[int] | Mapping[int, int], why: str
) -> None:
    """Raise ShardsDiverged: ``iterations`` by shard (a sequence: every shard, in order)."""
    by_shard = dict(iterations) if isinstance(iterations, Mapping) else dict(enumerate(iterations))
    listed = ", ".join(f"shard {i}: {n}" for i, n in by_shard.items())
    raise errors.ShardsDiverged(
        f"{what}: the shards of session {session_id!r} are at different iterations "
        f"({listed}); {why}",
        iterations=by_shard,
    )


_BEHIND = (
    "a shard stayed behind the others (restarted from an older snapshot?): their weights are "
    "not one model's. Load a state into the session to go on"
)


def _same_iterations(what: str, session_id: str, iterations: Sequence[int]) -> None:
    if len(set(iterations)) > 1:
        _diverged(what, session_id, iterations, _BEHIND)


def _caught_up(iterations: Sequence[int], target: int, *, exact: bool) -> bool:
    """Sync rounds (``exact``): every shard at one iteration. Async: every shard has reached
    ``target``, the furthest one at the first answer (pushes in flight may carry some past
    it: each shard applies asynchronous pushes as they arrive)."""
    if exact:
        return len(set(iterations)) == 1
    return min(iterations) >= target


def _values(outcomes: Sequence[Outcome]) -> list[Any]:
    """Every outcome's value; the first error (by shard index) is raised."""
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
    return [outcome.value for outcome in outcomes]


class _ShardedCore:
    """The sharded session's data and its plans, for both twins."""

    _subs: list[SessionCore[Any]]
    layout: Layout
    id: str
    names: tuple[str, ...]
    as_list: bool
    last_iterations: int | None
    base_iterations: int | None
    training: modes.Training | None

    def _setup(
        self,
        client: Any,
        session_id: str,
        layout: Layout,
        infos: Sequence[SessionInfo],
        *,
        as_list: bool,
        has_weights: bool,
    ) -> None:
        SessionCore.__init__(cast(Any, self), client, session_id, layout.names, as_list=as_list)
        self.layout = layout
        self._optimizer = optimizers.get(infos[0].optimizer)
        self._subs = []
        for index, info in enumerate(infos):
            sub_client = client._clients[index]
            sub = sub_client._session_type(
                sub_client, session_id, [p.name for p in layout.on(index)], as_list=False
            )
            sub.training = info.training
            sub._seen(info.iterations)
            sub._warned_float64 = True  # the sharded session warns, once
            if has_weights:
                sub.base_iterations = info.iterations
            self._subs.append(sub)
        self.training = infos[0].training
        cast(Any, self)._float64 = {n for n, d, _ in layout.model if d == "float64"}
        self._seen_all([i.iterations for i in infos], has_weights=has_weights)

    def _seen_all(self, iterations: Sequence[int], *, has_weights: bool) -> None:
        self.last_iterations = min(iterations)
        if has_weights:
            self.base_iterations = min(iterations)

    @property
    def urls(self) -> list[str]:
        return [str(c.base_url) for c in cast(Any, self)._client._clients]

    # --- push ---

    def _gradients(self, gradients: Weights) -> dict[str, np.ndarray]:
        grads, _ = named_arrays(gradients, self.names, "gradients")
        shapes = {name: shape for name, _, shape in self.layout.model}
        unknown = [n for n in grads if n not in shapes]
        if unknown:
            raise ValueError(
                f"gradients for parameters the session does not have: {unknown[:5]} "
                f"(it has {list(shapes)[:5]}...)"[:300]
            )
        missing = [n for n in shapes if n not in grads]
        if missing:
            raise ValueError(
                f"a sharded push needs every parameter's gradient; missing {missing[:5]}"
            )
        for name, g in grads.items():
            if isinstance(g, Rows):
                grads[name] = g = g.with_shape(shapes[name]) if g.shape is None else g
            if tuple(g.shape) != shapes[name]:
                raise ValueError(
                    f"gradients[{name!r}] has shape {list(g.shape)}; the parameter has "
                    f"{list(shapes[name])}"
                )
        return grads

    def _extras(self, grads: Mapping[str, np.ndarray]) -> tuple[float | None, str | None]:
        """The whole push's sum of squares (clipnorm, asynchronous, Keras optimizers) and
        its digest (the order of a sync round's sum)."""
        squares = None
        sync = isinstance(self.training, modes.Sync)
        clipnorm = self._optimizer.get_config().get("clipnorm")
        if (
            clipnorm is not None
            and not sync
            and not isinstance(self._optimizer, optimizers.TFOptimizer)
        ):
            dtypes = {name: dtype for name, dtype, _ in self.layout.model}
            squares = 0.0
            for name in self.names:  # as the single server sums them: in parameter order
                dtype = wire.TENSOR_DTYPES[dtypes[name]]
                g = grads[name]
                if isinstance(g, Rows):
                    indices, rows = sparse.combine(g.indices, g.values, dtype)
                    squares += sparse.sum_squares(indices, rows, g.shape or ())
                else:
                    squares += push_sum_squares([np.asarray(g, dtype)])
        order = push_digest(grads).hex() if sync else None
        return squares, order

    def _targets_by_name(self, out: Weights | None) -> dict[str, np.ndarray] | None:
        return cast(Any, self)._targets(out)

    def _fresh(self) -> dict[str, np.ndarray]:
        """New arrays for every parameter, for the shards' answers to be received into
        (the caller's to keep): each split tensor is received once, in place, instead of
        into a slice of its own and then copied."""
        return {
            name: np.empty(shape, wire.TENSOR_DTYPES[dtype])
            for name, dtype, shape in self.layout.model
        }

    def _push_plan(
        self,
        gradients: Weights,
        *,
        return_weights: bool,
        idempotency_key: str | None,
        out: Weights | None,
        base_iterations: int | None,
        metrics: Mapping[str, float] | None = None,
        returns: Mapping[str, Any] | None = None,
    ) -> Plan[tuple[int, Any]]:
        grads = self._gradients(gradients)
        core = cast(Any, self)
        if core._float64 and not core._warned_float64:
            core._warn_float64(grads)
        targets = self._targets_by_name(out)
        if targets is None and return_weights and returns is None:
            targets = self._fresh()
        key = uuid.uuid4().hex if idempotency_key is None else idempotency_key
        if base_iterations is None and self.training is not None and self.training.needs_base:
            base_iterations = self.base_iterations
        squares, order = self._extras(grads)
        selection = None if returns is None else self._selection(returns)
        parts = self.layout.split(grads)
        out_parts = self.layout.split(targets) if targets is not None else None
        calls = [
            (
                i,
                sub._push_call(
                    parts[i],
                    # with returns=, a shard holding none of them answers its iterations only
                    return_weights=return_weights and (selection is None or bool(selection[1][i])),
                    idempotency_key=key,
                    out=None if out_parts is None else out_parts[i],
                    base_iterations=base_iterations,
                    sum_squares=squares,
                    round_order=order,
                    metrics=metrics if i == 0 else None,  # recorded once: by shard 0
                    returns=None if selection is None or not selection[1][i] else selection[1][i],
                ),
            )
            for i, sub in enumerate(self._subs)
        ]
        outcomes = yield calls
        failed = {i: o.error for i, o in enumerate(outcomes) if o.error is not None}
        applied = [i for i, o in enumerate(outcomes) if o.error is None]
        if failed:
            if not applied:
                raise next(iter(failed.values()))
            listed = "; ".join(
                f"shard {i} ({self.urls[i]}): {_describe(e)}" for i, e in failed.items()
            )
            if all(_transient(e) for e in failed.values()):
                raise errors.PushIncomplete(
                    f"push {key} to session {self.id!r}: shards {applied} applied it, "
                    f"{sorted(failed)} did not answer ({listed}); push the same gradients "
                    f"again with idempotency_key={key!r} to complete it",
                    failed=failed,
                    applied=applied,
                    idempotency_key=key,
                )
            raise errors.ShardsDiverged(
                f"push {key} to session {self.id!r}: shards {applied} applied it, "
                f"{sorted(failed)} refused it ({listed}); the shards no longer hold one "
                "model's weights: load a state into the session to go on",
                iterations={
                    i: (None if o.error is not None else o.value[0]) for i, o in enumerate(outcomes)
                },
                errors=failed,
            )
        iterations = [o.value[0] for o in outcomes]
        if isinstance(self.training, modes.Sync):
            _same_iterations(f"push {key}", self.id, iterations)
        weights = [o.value[1] for o in outcomes]
        self.last_iterations = min(iterations)
        if not return_weights:
            return min(iterations), None
        if selection is not None:
            wanted, asks, placed = selection
            answers = {i: weights[i] for i in range(len(weights)) if asks[i]}
            if any(w is None for w in answers.values()):
                return min(iterations), None  # a replay kept without weights
            return min(iterations), self._joined_selection(wanted, placed, answers)
        if any(w is None for w in weights):
            return min(iterations), None  # a replay kept without weights: the twin pulls
        self.base_iterations = min(iterations)
        joined = self.layout.join(weights, out=targets)
        if targets is not None:
            for name, target in targets.items():
                if joined[name] is not target:
                    np.copyto(target, joined[name], casting="same_kind")
            if out is not None:
                return min(iterations), out
            return min(iterations), shape_weights(targets, self.names, self.as_list)
        return min(iterations), shape_weights(joined, self.names, self.as_list)

    # --- pull ---

    def _pull_plan(
        self,
        out: Weights | None,
        *,
        min_iterations: int | None,
        wait: float | None,
        catch_up: float,
    ) -> Plan[Any]:
        targets = self._targets_by_name(out)
        if targets is None:
            targets = self._fresh()
        out_parts = self.layout.split(targets)
        exact = isinstance(self.training, modes.Sync)
        answers: list[Any] = [None] * len(self._subs)
        got: list[int] = [-1] * len(self._subs)
        calls: list[tuple[int, Call[Any]]] = [
            (
                i,
                sub._pull_call(
                    None if out_parts is None else out_parts[i],
                    min_iterations=min_iterations,
                    wait=wait,
                ),
            )
            for i, sub in enumerate(self._subs)
        ]
        target = -1
        deadline = time.monotonic() + catch_up
        while True:
            outcomes = yield calls
            for (i, _), value in zip(calls, _values(outcomes), strict=True):
                answers[i] = value
                got[i] = self._subs[i].last_iterations or 0
            if target < 0:
                target = max(got)
            if _caught_up(got, target, exact=exact):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _diverged("pull", self.id, got, _BEHIND)
            # A shard behind may be applying a push the others have applied: ask it again,
            # answered once it reaches them (or when catch_up_seconds are over).
            top = max(got) if exact else target
            calls = [
                (
                    i,
                    self._subs[i]._pull_call(
                        None if out_parts is None else out_parts[i],
                        min_iterations=top,
                        wait=remaining,
                    ),
                )
                for i, n in enumerate(got)
                if n < top or (exact and n != top)
            ]
            if exact and not calls:  # a shard ahead of the furthest? ask every shard again
                calls = [
                    (
                        i,
                        sub._pull_call(
                            None if out_parts is None else out_parts[i],
                            min_iterations=top,
                            wait=remaining,
                        ),
                    )
                    for i, sub in enumerate(self._subs)
                ]
        self._seen_all(got, has_weights=True)
        joined = self.layout.join(answers, out=targets)
        for name, array in targets.items():
            if joined[name] is not array:
                np.copyto(array, joined[name], casting="same_kind")
        if out is not None:
            return out
        return shape_weights(targets, self.names, self.as_list)

    def _selection(
        self, tensors: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray | None], list[dict[str, Any]], list[tuple[Any, Any]]]:
        """A partial pull's (or a push's ``returns``) tensors and rows, split by shard: the
        rows asked of each model tensor, what to ask each shard, and which piece answers
        which of the rows."""
        if not isinstance(tensors, Mapping) or not tensors:
            raise ValueError("name at least one tensor: {name: row indices or None}")
        shapes = {name: shape for name, _, shape in self.layout.model}
        unknown = [n for n in tensors if n not in shapes]
        if unknown:
            raise ValueError(f"the session has no parameters {unknown[:5]}")
        wanted: dict[str, np.ndarray | None] = {
            n: None if r is None else np.asarray(r, dtype=np.int64).reshape(-1)
            for n, r in tensors.items()
        }
        for name, rows in wanted.items():
            if rows is not None and rows.size and (rows.min() < 0 or rows.max() >= shapes[name][0]):
                raise ValueError(f"rows of {name!r} must be in [0, {shapes[name][0]})")
        asks: list[dict[str, Any]] = [{} for _ in self._subs]
        placed: list[tuple[Any, Any]] = []  # (piece, mask of the wanted rows it holds)
        for piece in self.layout.pieces:
            if piece.source not in wanted:
                continue
            rows = wanted[piece.source]
            if piece.rows is None or rows is None:
                asks[piece.shard][piece.name] = rows
                placed.append((piece, None))
            else:
                a, b = piece.rows
                mask = (rows >= a) & (rows < b)
                if mask.any():
                    asks[piece.shard][piece.name] = rows[mask] - a
                    placed.append((piece, mask))
        return wanted, asks, placed

    def _joined_selection(
        self,
        wanted: Mapping[str, np.ndarray | None],
        placed: Sequence[tuple[Any, Any]],
        answers: Mapping[int, Mapping[str, Any]],
    ) -> dict[str, Any]:
        """The shards' answers to :meth:`_selection`'s asks, as one answer by model name."""
        shapes = {name: shape for name, _, shape in self.layout.model}
        dtypes = {name: dtype for name, dtype, _ in self.layout.model}
        out: dict[str, Any] = {}
        for name, rows in wanted.items():
            shape = shapes[name]
            pieces = [(p, m) for p, m in placed if p.source == name]
            if rows is None:
                whole = [answers[p.shard][p.name] for p, _ in pieces]
                single = len(whole) == 1 and pieces[0][0].rows is None
                out[name] = whole[0] if single else np.concatenate(whole, axis=0)
                continue
            values = None
            for piece, mask in pieces:
                got = answers[piece.shard][piece.name]
                if mask is None:  # a whole tensor on one shard
                    values = got.values
                    break
                if values is None:
                    values = np.empty((rows.size, *shape[1:]), got.values.dtype)
                values[mask] = got.values
            if values is None:  # no rows asked
                values = np.empty((0, *shape[1:]), wire.TENSOR_DTYPES[dtypes[name]])
            out[name] = Rows(rows, values, shape)
        return out

    def _query_plan(self, tensors: Mapping[str, Any], *, catch_up: float) -> Plan[dict[str, Any]]:
        """A partial pull over the shards: each piece asked for its part of the rows."""
        wanted, asks, placed = self._selection(tensors)
        shards = [i for i in range(len(self._subs)) if asks[i]]
        exact = isinstance(self.training, modes.Sync)
        deadline = time.monotonic() + catch_up
        target = -1
        answers: dict[int, Any] = {}
        got: dict[int, int] = {}
        for attempt in itertools.count():
            # Asked again (after a short pause) while a shard is behind the others, as a
            # pull's shards are caught up: one of them may be applying a push (or completing
            # a round) the others have applied.
            outcomes = yield [(i, self._subs[i]._query_call(asks[i])) for i in shards]
            answers = dict(zip(shards, _values(outcomes), strict=True))
            got = {i: self._subs[i].last_iterations or 0 for i in shards}
            if target < 0:
                target = max(got.values(), default=0)
            if not got or _caught_up(list(got.values()), target, exact=exact):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _diverged("pull", self.id, got, _BEHIND)
            yield min(_PAUSES[min(attempt, len(_PAUSES) - 1)], remaining)
        if got:
            self.last_iterations = min(got.values())
        return self._joined_selection(wanted, placed, answers)

    # --- summaries, states, delete ---

    def _settled(
        self, what: str, ask: Any, iterations_of: Any, *, catch_up: float, exact: bool
    ) -> Generator[Any, list[Outcome], list[Any]]:
        """Every shard's answer to ``ask(sub)``, asked again (after short pauses) until the
        shards are caught up (:func:`_caught_up`; ``exact``: at one iteration) or
        ``catch_up`` seconds are over (``ShardsDiverged``)."""
        deadline = time.monotonic() + catch_up
        target = -1
        for attempt in itertools.count():
            outcomes = yield [(i, ask(sub)) for i, sub in enumerate(self._subs)]
            answers = _values(outcomes)
            iterations = [iterations_of(a) for a in answers]
            if target < 0:
                target = max(iterations)
            if _caught_up(iterations, target, exact=exact):
                return answers
            if time.monotonic() >= deadline:
                why = _BEHIND
                if min(iterations) >= target:
                    why = (
                        "they kept moving apart while pushes were applied: export a state "
                        "while no worker pushes"
                    )
                _diverged(what, self.id, iterations, why)
            yield _PAUSES[min(attempt, len(_PAUSES) - 1)]
        raise AssertionError("unreachable")

    def _info_plan(self, catch_up: float) -> Plan[SessionInfo]:
        infos = yield from self._settled(
            "info",
            lambda sub: sub._info_call(),
            lambda info: info.iterations,
            catch_up=catch_up,
            exact=isinstance(self.training, modes.Sync),
        )
        layout = _layout_of(infos, self.urls)
        if layout.digest != self.layout.digest:
            raise errors.LayoutMismatch(
                f"session {self.id!r} now has layout {layout.digest}, this handle "
                f"{self.layout.digest}: its state was replaced; join it again"
            )
        self.training = infos[0].training
        self.last_iterations = min(i.iterations for i in infos)
        return _merged_info(layout, infos)

    def _state_plan(self, catch_up: float) -> Plan[SessionState]:
        # One state of the whole session needs every shard at one iteration.
        states: list[SessionState] = yield from self._settled(
            "state",
            lambda sub: sub._state_call(),
            lambda state: state.iterations,
            catch_up=catch_up,
            exact=True,
        )
        scalars = [s.scalars for s in states]
        if any(s != scalars[0] for s in scalars):
            raise errors.ShardsDiverged(
                f"state: the shards of session {self.id!r} hold different scalar state "
                f"({scalars[:3]}...)"[:300],
                iterations={i: s.iterations for i, s in enumerate(states)},
            )
        first = states[0]
        slots: dict[str, dict[str, np.ndarray]] = {}
        for slot in first.slots:
            per = [s.slots.get(slot, {}) for s in states]
            slots[slot] = self._join_slot(slot, per)
        self.last_iterations = first.iterations
        return SessionState(
            iterations=first.iterations,
            optimizer=first.optimizer,
            weights=self.layout.join([s.weights for s in states]),
            slots=slots,
            scalars=dict(first.scalars),
            refuse_non_finite=first.refuse_non_finite,
            training=first.training,
            constraints=_join_constraints(self.layout, [s.constraints for s in states]),
            sparse_updates=first.sparse_updates,
        )

    def _join_slot(
        self, slot: str, per: Sequence[Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        by_source: dict[str, list[tuple[Any, np.ndarray]]] = {}
        for piece in self.layout.pieces:
            value = per[piece.shard].get(piece.name)
            if value is None:
                continue
            if piece.rows is None:
                out[piece.source] = value
            else:
                if tuple(value.shape) != piece.shape:
                    raise errors.ProtocolError(
                        f"slot {slot!r} of {piece.name!r} has shape {list(value.shape)}, not "
                        f"the slice's {list(piece.shape)}: it cannot be joined"
                    )
                by_source.setdefault(piece.source, []).append((piece, value))
        shapes = {name: shape for name, _, shape in self.layout.model}
        for source, pieces in by_source.items():
            joined = np.empty(shapes[source], pieces[0][1].dtype)
            for piece, value in pieces:
                joined[piece.rows[0] : piece.rows[1]] = value
            out[source] = joined
        return {name: out[name] for name in self.names if name in out}

    def _load_state_plan(self, state: SessionState) -> Plan[SessionInfo]:
        client = cast(Any, self)._client
        layout, calls = client._state_calls(state, self.id, as_list=self.as_list)
        outcomes = yield calls
        infos = _values(outcomes)
        self._setup(client, self.id, layout, infos, as_list=self.as_list, has_weights=True)
        return _merged_info(layout, infos)

    def _delete_plan(self, *, missing_ok: bool) -> Plan[None]:
        def status(reply: Reply) -> int:
            if reply.status == 404:
                error = _base.server_error(reply, f"DELETE {session_path(self.id)}")
                if not isinstance(error, errors.SessionNotFound):
                    raise error
            return reply.status

        call: Call[int] = Call(
            "DELETE", session_path(self.id), status, expect=frozenset({204, 404})
        )
        outcomes = yield [(i, call) for i in range(len(self._subs))]
        statuses = _values(outcomes)
        if not missing_ok and all(s == 404 for s in statuses):
            raise errors.SessionNotFound(
                f"no session {self.id!r} on any shard", status=404, code="session_not_found"
            )


class _ShardedClientCore:
    """A sharded client's shard clients and its plans."""

    _clients: list[Any]

    def _check_urls(self, urls: Any) -> list[str]:
        if isinstance(urls, (str, httpx.URL)) or not isinstance(urls, (list, tuple)):
            raise TypeError(f"a sharded client takes a list of URLs, got {urls!r}"[:200])
        urls = [str(u) for u in urls]
        if not urls:
            raise ValueError("a sharded client needs at least one URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"the same server twice in {urls}: each shard needs its own")
        return urls

    @property
    def urls(self) -> list[str]:
        return [str(c.base_url) for c in self._clients]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.urls!r}>"

    def _new_session(
        self,
        session_id: str,
        layout: Layout,
        infos: Sequence[SessionInfo],
        *,
        as_list: bool,
        has_weights: bool,
    ) -> Any:
        session = object.__new__(cast(Any, self)._sharded_session_type)
        session._setup(self, session_id, layout, infos, as_list=as_list, has_weights=has_weights)
        return session

    def _create_plan(
        self,
        weights: Weights,
        optimizer: OptimizerLike,
        session_id: str | None,
        *,
        refuse_non_finite: bool,
        training: modes.Training,
        constraints: Mapping[str, Any] | None,
        slice_bytes: int,
        sparse_updates: str = "exact",
    ) -> Plan[Any]:
        arrays, as_list = named_arrays(weights, None, "weights")
        opt = optimizers.get(optimizer)
        given = {name: get_constraint(c) for name, c in (constraints or {}).items()}
        layout = layout_for(model_of(arrays), opt, given, len(self._clients), slice_bytes)
        session_id = uuid.uuid4().hex if session_id is None else session_id
        parts = layout.split(arrays)
        per_constraints = _split_constraints(layout, given)
        calls = []
        for i in range(layout.count):
            body = encode_create(
                opt,
                parts[i],
                session_id,
                refuse_non_finite=refuse_non_finite,
                training=training,
                constraints=per_constraints[i],
                shard=layout.shard(i),
                sparse_updates=sparse_updates,
            )
            call = Call(
                "POST",
                "/sessions",
                _summary,
                safety=Safety.UNSENT_ONLY,
                expect=frozenset({201}),
                body=body,
            )
            calls.append((i, call))
        outcomes = yield calls
        failed = [o.error for o in outcomes if o.error is not None]
        if failed:
            created = [i for i, o in enumerate(outcomes) if o.error is None]
            if created:  # leave no half-made session behind
                cleanup: Call[None] = Call(
                    "DELETE", session_path(session_id), lambda r: None, expect=frozenset({204, 404})
                )
                yield [(i, cleanup) for i in created]
            raise failed[0]
        infos = [o.value for o in outcomes]
        return self._new_session(session_id, layout, infos, as_list=as_list, has_weights=True)

    def _attach_plan(self, session_id: str, *, as_list: bool) -> Plan[Any]:
        call = Call("GET", session_path(session_id), _summary)
        outcomes = yield [(i, call) for i in range(len(self._clients))]
        missing = [i for i, o in enumerate(outcomes) if isinstance(o.error, errors.SessionNotFound)]
        if missing and len(missing) < len(outcomes):
            raise errors.LayoutMismatch(
                f"session {session_id!r} is on some servers but not on {missing} "
                f"({[self.urls[i] for i in missing]}): another server list, or a shard lost "
                "its session"
            )
        infos = _values(outcomes)
        layout = _layout_of(infos, self.urls)
        return self._new_session(session_id, layout, infos, as_list=as_list, has_weights=False)

    def _state_calls(
        self, state: SessionState, session_id: str, *, as_list: bool
    ) -> tuple[Layout, list[tuple[int, Call[Any]]]]:
        if not isinstance(state, SessionState):
            raise TypeError(
                f"state must be a SessionState (from session.state()), got {type(state).__name__}"
            )
        opt = optimizers.get(state.optimizer)
        arrays = {name: np.asarray(w) for name, w in state.weights.items()}
        layout = layout_for(
            model_of(arrays), opt, state.constraints, len(self._clients), DEFAULT_SLICE_BYTES
        )
        weights = layout.split(arrays)
        slots = {slot: layout.split(per) for slot, per in state.slots.items()}
        per_constraints = _split_constraints(layout, state.constraints)
        calls = []
        for i in range(layout.count):
            part = SessionState(
                iterations=state.iterations,
                optimizer=state.optimizer,
                weights=weights[i],
                slots={slot: per[i] for slot, per in slots.items() if per[i]},
                scalars=dict(state.scalars),
                refuse_non_finite=state.refuse_non_finite,
                training=state.training,
                constraints=per_constraints[i],
                shard=layout.shard(i),
                sparse_updates=state.sparse_updates,
            )
            calls.append((i, _base.load_state_call(session_id, part, _summary)))
        return layout, calls

    def _restore_plan(
        self, state: SessionState, session_id: str | None, *, as_list: bool
    ) -> Plan[Any]:
        session_id = uuid.uuid4().hex if session_id is None else session_id
        layout, calls = self._state_calls(state, session_id, as_list=as_list)
        outcomes = yield calls
        infos = _values(outcomes)
        return self._new_session(session_id, layout, infos, as_list=as_list, has_weights=True)

    def _list_plan(self) -> Plan[list[SessionInfo]]:
        outcomes = yield [(i, c._list_call()) for i, c in enumerate(self._clients)]
        lists: list[list[SessionInfo]] = _values(outcomes)
        by_id = [{info.session_id: info for info in found} for found in lists]
        out = []
        for info in lists[0]:
            infos = [found.get(info.session_id) for found in by_id]
            if any(i is None for i in infos):
                continue
            complete = cast(list[SessionInfo], infos)
            try:
                layout = _layout_of(complete, self.urls)
            except errors.LayoutMismatch:
                continue
            out.append(_merged_info(layout, complete))
        return out

    def _health_plan(self) -> Plan[dict[str, Any]]:
        outcomes = yield [(i, c._health_call()) for i, c in enumerate(self._clients)]
        shards = []
        for url, outcome in zip(self.urls, outcomes, strict=True):
            if outcome.error is None:
                shards.append({"url": url, **outcome.value})
            else:
                shards.append(
                    {"url": url, "status": "unreachable", "error": _describe(outcome.error)}
                )
        ok = all(s.get("status") == "ok" for s in shards)
        return {"status": "ok" if ok else "degraded", "shards": shards}


def _summary(reply: Reply) -> SessionInfo:
    return SessionInfo.from_json(json.loads(reply.body))


# --- the blocking twin ---------------------------------------------------------------------


class ShardedSession(_ShardedCore, Session[Any]):
    """A session split over several servers, with :class:`~paramserver.client.Session`'s
    API. ``layout`` is its partition (:class:`paramserver.sharding.Layout`); ``urls`` the
    servers, in shard order."""

    _client: ShardedClient

    def __repr__(self) -> str:
        return (
            f"<ShardedSession {self.id!r}: {len(self.names)} parameters over "
            f"{self.layout.count} shards>"
        )

    def push(
        self,
        gradients: Weights,
        *,
        return_weights: bool = True,
        idempotency_key: str | None = None,
        out: Weights | None = None,
        base_iterations: int | None = None,
        metrics: Mapping[str, float] | None = None,
        returns: Mapping[str, Any] | None = None,
    ) -> Any:
        """One step on every shard (see :meth:`Session.push`); a shard that stays down
        raises ``PushIncomplete`` (push again with its ``idempotency_key``). With other
        workers pushing asynchronously, the shards' answers may be a push or two apart
        (each applies pushes as they arrive); ``last_iterations`` is the lowest."""
        iterations, weights = self._client._drive(
            self._push_plan(
                gradients,
                return_weights=return_weights,
                idempotency_key=idempotency_key,
                out=out,
                base_iterations=base_iterations,
                metrics=metrics,
                returns=returns,
            )
        )
        if not return_weights:
            return iterations
        if weights is None:  # a replay whose weights were not kept
            return self.pull(rows=returns) if returns is not None else self.pull(out=out)
        return weights

    def pull(
        self,
        *,
        out: Weights | None = None,
        min_iterations: int | None = None,
        wait: float | None = None,
        rows: Mapping[str, Any] | None = None,
    ) -> Any:
        """Every shard's weights; a shard behind the others is asked again until it reaches
        them (sync rounds: one iteration), ``ShardsDiverged`` if it stays behind for
        ``catch_up_seconds``. ``rows=``: a partial pull (see ``Session.pull``), each shard
        asked for the rows it holds."""
        if rows is not None:
            plan = self._query_plan(rows, catch_up=self._client.catch_up_seconds)
            return self._client._drive(plan)
        return self._client._drive(
            self._pull_plan(
                out,
                min_iterations=min_iterations,
                wait=wait,
                catch_up=self._client.catch_up_seconds,
            )
        )

    def info(self) -> SessionInfo:
        return self._client._drive(self._info_plan(self._client.catch_up_seconds))

    def state(self) -> SessionState:
        """The whole session's state, as one server would export it (it loads into a
        sharded session of any shard count, or into one server)."""
        return self._client._drive(self._state_plan(self._client.catch_up_seconds))

    def load_state(self, state: SessionState) -> SessionInfo:
        return self._client._drive(self._load_state_plan(state))

    def delete(self, *, missing_ok: bool = False) -> None:
        self._client._drive(self._delete_plan(missing_ok=missing_ok))


class ShardedClient(_ShardedClientCore, Client):
    """A blocking client of a sharded session's servers: ``Client([url0, url1, ...])``.

    Takes :class:`~paramserver.client.Client`'s options (each shard gets a client of its own
    with them) and ``slice_bytes`` (tensors larger than this are split over the shards,
    default 4 MiB) and ``catch_up_seconds`` (how long a pull waits for a shard behind the
    others before ``ShardsDiverged``, default 5 s)."""

    _sharded_session_type = ShardedSession

    def __init__(
        self,
        base_url: Sequence[str | httpx.URL],
        *,
        slice_bytes: int = DEFAULT_SLICE_BYTES,
        catch_up_seconds: float = 5.0,
        **options: Any,
    ) -> None:
        urls = self._check_urls(base_url)
        self._clients = [Client(url, **options) for url in urls]
        self.slice_bytes = slice_bytes
        self.catch_up_seconds = float(catch_up_seconds)
        self._pool = ThreadPoolExecutor(256, thread_name_prefix="paramserver-shard")
        self.base_url = self._clients[0].base_url

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._pool.shutdown(wait=False)

    @property
    def closed(self) -> bool:
        return all(c.closed for c in self._clients)

    def _fan_out(self, calls: list[tuple[int, Call[Any]]]) -> list[Outcome]:
        def run(index: int, call: Call[Any]) -> Outcome:
            try:
                return Outcome(self._clients[index]._run(call))
            except Exception as exc:
                return Outcome(error=exc)

        if len(calls) == 1:
            return [run(*calls[0])]
        # The first shard's call runs in the calling thread, the others in the pool. The
        # pool is wide (its threads start only when needed): a sync push holds its threads
        # until the round is applied, and threads sharing this client push at once.
        futures = [self._pool.submit(run, i, call) for i, call in calls[1:]]
        first = run(*calls[0])
        return [first, *(f.result() for f in futures)]

    def _drive(self, plan: Plan[T]) -> T:
        try:
            step = next(plan)
            while True:
                if isinstance(step, float):
                    time.sleep(step)
                    step = plan.send([])
                else:
                    step = plan.send(self._fan_out(step))
        except StopIteration as stop:
            return cast(T, stop.value)

    def create_session(
        self,
        weights: Weights,
        optimizer: OptimizerLike,
        session_id: str | None = None,
        *,
        refuse_non_finite: bool = False,
        training: TrainingLike | None = None,
        constraints: Mapping[str, Any] | None = None,
        sparse_updates: str = "exact",
        **training_options: Any,
    ) -> ShardedSession:
        """Create the session on every shard, each with its part of ``weights`` (see
        :meth:`Client.create_session`); if a shard refuses, the others' parts are deleted."""
        return self._drive(
            self._create_plan(
                weights,
                optimizer,
                session_id,
                refuse_non_finite=refuse_non_finite,
                training=_base.training_of(training, training_options),
                constraints=constraints,
                slice_bytes=self.slice_bytes,
                sparse_updates=sparse_updates,
            )
        )

    def session(self, session_id: str, *, as_list: bool = False) -> ShardedSession:
        """Join a sharded session by id: the servers must hold its shards, in this order."""
        return self._drive(self._attach_plan(session_id, as_list=as_list))

    def restore_session(
        self, state: SessionState, session_id: str | None = None, *, as_list: bool = False
    ) -> ShardedSession:
        """Create (or replace) a sharded session from a state (from any shard count)."""
        return self._drive(self._restore_plan(state, session_id, as_list=as_list))

    def sessions(self) -> list[SessionInfo]:
        """The sharded sessions whose every shard answers, one summary each."""
        return self._drive(self._list_plan())

    def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "degraded", "shards": [each server's /health]}``."""
        return self._drive(self._health_plan())


# --- the asyncio twin ----------------------------------------------------------------------


class AsyncShardedSession(_ShardedCore, AsyncSession[Any]):
    """The asyncio twin of :class:`ShardedSession`."""

    _client: AsyncShardedClient

    def __repr__(self) -> str:
        return (
            f"<AsyncShardedSession {self.id!r}: {len(self.names)} parameters over "
            f"{self.layout.count} shards>"
        )

    async def push(
        self,
        gradients: Weights,
        *,
        return_weights: bool = True,
        idempotency_key: str | None = None,
        out: Weights | None = None,
        base_iterations: int | None = None,
        metrics: Mapping[str, float] | None = None,
        returns: Mapping[str, Any] | None = None,
    ) -> Any:
        iterations, weights = await self._client._drive(
            self._push_plan(
                gradients,
                return_weights=return_weights,
                idempotency_key=idempotency_key,
                out=out,
                base_iterations=base_iterations,
                metrics=metrics,
                returns=returns,
            )
        )
        if not return_weights:
            return iterations
        if weights is None:  # a replay whose weights were not kept
            if returns is not None:
                return await self.pull(rows=returns)
            return await self.pull(out=out)
        return weights

    async def pull(
        self,
        *,
        out: Weights | None = None,
        min_iterations: int | None = None,
        wait: float | None = None,
        rows: Mapping[str, Any] | None = None,
    ) -> Any:
        if rows is not None:
            plan = self._query_plan(rows, catch_up=self._client.catch_up_seconds)
            return await self._client._drive(plan)
        return await self._client._drive(
            self._pull_plan(
                out,
                min_iterations=min_iterations,
                wait=wait,
                catch_up=self._client.catch_up_seconds,
            )
        )

    async def info(self) -> SessionInfo:
        return await self._client._drive(self._info_plan(self._client.catch_up_seconds))

    async def state(self) -> SessionState:
        return await self._client._drive(self._state_plan(self._client.catch_up_seconds))

    async def load_state(self, state: SessionState) -> SessionInfo:
        return await self._client._drive(self._load_state_plan(state))

    async def delete(self, *, missing_ok: bool = False) -> None:
        await self._client._drive(self._delete_plan(missing_ok=missing_ok))


class AsyncShardedClient(_ShardedClientCore, AsyncClient):
    """The asyncio twin of :class:`ShardedClient`: ``AsyncClient([url0, url1, ...])``."""

    _sharded_session_type = AsyncShardedSession

    def __init__(
        self,
        base_url: Sequence[str | httpx.URL],
        *,
        slice_bytes: int = DEFAULT_SLICE_BYTES,
        catch_up_seconds: float = 5.0,
        **options: Any,
    ) -> None:
        urls = self._check_urls(base_url)
        self._clients = [AsyncClient(url, **options) for url in urls]
        self.slice_bytes = slice_bytes
        self.catch_up_seconds = float(catch_up_seconds)
        self.base_url = self._clients[0].base_url

    async def __aenter__(self) -> AsyncShardedClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    @property
    def closed(self) -> bool:
        return all(c.closed for c in self._clients)

    async def _fan_out(self, calls: list[tuple[int, Call[Any]]]) -> list[Outcome]:
        async def run(index: int, call: Call[Any]) -> Outcome:
            try:
                return Outcome(await self._clients[index]._run(call))
            except Exception as exc:
                return Outcome(error=exc)

        return list(await asyncio.gather(*(run(i, call) for i, call in calls)))

    async def _drive(self, plan: Plan[T]) -> T:
        try:
            step = next(plan)
            while True:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    step = plan.send([])
                else:
                    step = plan.send(await self._fan_out(step))
        except StopIteration as stop:
            return cast(T, stop.value)

    async def create_session(
        self,
        weights: Weights,
        optimizer: OptimizerLike,
        session_id: str | None = None,
        *,
        refuse_non_finite: bool = False,
        training: TrainingLike | None = None,
        constraints: Mapping[str, Any] | None = None,
        sparse_updates: str = "exact",
        **training_options: Any,
    ) -> AsyncShardedSession:
        return await self._drive(
            self._create_plan(
                weights,
                optimizer,
                session_id,
                refuse_non_finite=refuse_non_finite,
                training=_base.training_of(training, training_options),
                constraints=constraints,
                slice_bytes=self.slice_bytes,
                sparse_updates=sparse_updates,
            )
        )

    async def session(self, session_id: str, *, as_list: bool = False) -> AsyncShardedSession:
        return await self._drive(self._attach_plan(session_id, as_list=as_list))

    async def restore_session(
        self, state: SessionState, session_id: str | None = None, *, as_list: bool = False
    ) -> AsyncShardedSession:
        return await self._drive(self._restore_plan(state, session_id, as_list=as_list))

    async def sessions(self) -> list[SessionInfo]:
        return await self._drive(self._list_plan())

    async def health(self) -> dict[str, Any]:
        return await self._drive(self._health_plan())


Client._sharded_type = ShardedClient
AsyncClient._sharded_type = AsyncShardedClient
