"""Row-sparse pushes of an embedding table: dense against sparse-exact against sparse-lazy.

A (1e6, 64) float32 embedding (256 MB), Adam, and pushes that touch 0.1 % and 1 % of its
rows. The row indices of a push are drawn uniformly with replacement, then 5 % of them are
overwritten with copies of others: duplicates, which the server sums, as a batch's repeated
tokens are. Three ways of stepping the table are compared, side by side in one run:

* ``dense``: the whole table's gradient (zeros in the untouched rows), the fused kernel's
  pass over every row;
* ``exact``: a :class:`paramserver.sparse.Rows` gradient in a session of
  ``sparse_updates="exact"`` (the default): Keras 2.2's dense semantics (every row's slots
  decay, the untouched rows step with a zero gradient), computed a chunk of rows at a time
  without making the dense gradient;
* ``lazy``: the same rows in a session of ``sparse_updates="lazy"``: only the touched rows
  and their slots step (LazyAdam's semantics).

**The step, in process** (``figure: "step"``): one
:class:`paramserver.server.optim.engine.KerasOptimizer` (Adam, the default backend: the fused
numba kernels) over one (rows, width) parameter. ``apply()`` is timed with a prepared dense
gradient (the dense kernel pass) and with prepared row gradients in exact mode and in lazy
mode (``optimizer.sparse_updates``), all on the same arrays. ``check_gradients()`` (the
checks, the duplicates summed, the float64 sum of squares: the rest of a server's step) is
timed too, for information: of the dense gradient, of the rows as arrays in memory, and of
the rows as the server's HTTP path gets them (views of a decoded msgpack body, whose values
may sit at unaligned offsets: ``body_values_aligned``).
Each row method cycles through a pool of distinct pushes covering at least
:data:`POOL_ROWS` rows, so that a lazy step does not find its rows in cache from the call
before. Samples of at least :data:`MIN_SAMPLE_NS` are taken in turn, every method once per
repeat, in this thread's CPU time (``clock="thread"``) after unmeasured calls (numba's
compile or cache load, the slots' first touch); each figure is the median of the repeats
(``stat="min"``: the fastest). The goals: exact / dense pass <= 1.2, and lazy / (the
touched rows' share of the table x the dense pass) <= 2. For reference, the **rows' floor**
(``rows_floor_ms``): a numba loop over the same rows that reads and writes what Adam's row
step does (each row's weights and both moments, the row's gradient) and leaves the values as
they are, like :mod:`benchmarks.kernels`' floors: what any lazy kernel costs in memory
traffic alone. ``rows_floor_vs_share`` above the goal means no kernel can meet it here.

**The push, end to end** (``figure: "push"``): a server subprocess (``python -m paramserver
serve``, default settings, data plane on) and our own ``Client(url)``. Two sessions hold the
table plus a small dense layer (64 -> 32: ``dense/kernel``, ``dense/bias``): one in exact
mode, into which the dense and the exact pushes go, one in lazy mode. Pushes:

* ``dense``: every tensor's whole gradient, answered with all the weights as new arrays
  (``session.push(grads)``), over the **data plane** (the client's default);
* ``exact`` and ``lazy``: ``Rows(indices, values)`` for the table and the dense layer's
  gradients, answered with only the touched rows and the dense layer
  (``returns={"emb": unique indices, "dense/kernel": None, "dense/bias": None}``), over
  **HTTP** (the client sends rows and ``returns`` over HTTP; the data plane's frames carry
  dense tensors).

Bytes up are the push's msgpack body (:func:`paramserver.messages.encode_push`; a dense
push over the data plane sends the same tensor bytes with a frame header of a few hundred
bytes instead); bytes down are the answer's body (the encoded answer, cross-checked with
the session's ``bytes_out`` counter of ``GET /stats``, which counts what the server sent).
Latencies (p50, p99) are pooled over ``rounds`` rounds, each round a burst of every method
in turn; CPU per push of the server process (every thread) and of this process are summed
over the bursts. Each session's iteration count must advance by exactly the pushes made.
The goal: bytes up of the dense push / of a row push >= 50 at 1 %.

Run ``python -m benchmarks.sparse`` (``--help`` for options); ``run()`` returns the rows.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import numba
import numpy as np

from paramserver import messages, optimizers, wire
from paramserver.client import Client, Rows
from paramserver.server.optim.engine import KerasOptimizer, PreparedGradients, SparseGradient

from .kernels import _FLOOR_OPTIONS, CLOCKS, STATISTICS
from .push import ServerProcess, format_table, percentile, transport_of

__all__ = [
    "COLUMNS",
    "DENSE_UNITS",
    "DUPLICATES",
    "GOAL_BYTES_UP",
    "GOAL_BYTES_UP_FRACTION",
    "GOAL_EXACT_VS_DENSE",
    "GOAL_LAZY_VS_SHARE",
    "MIN_SAMPLE_NS",
    "POOL_ROWS",
    "format_rows",
    "main",
    "push_indices",
    "run",
]

#: The goals of issue 18: a row push carries >= 50x fewer bytes up than the dense push at 1 %
#: of the rows; a lazy step costs <= 2x the touched rows' share of a dense kernel pass; an
#: exact step <= 1.2x a dense kernel pass.
GOAL_BYTES_UP = 50.0
GOAL_BYTES_UP_FRACTION = 0.01
GOAL_LAZY_VS_SHARE = 2.0
GOAL_EXACT_VS_DENSE = 1.2

#: The share of a push's indices overwritten with copies of its other indices.
DUPLICATES = 0.05
#: A row method's pool of distinct pushes covers at least this many rows (capped at the
#: table's): 32 MiB of float32 rows of 64, and as much again of each Adam slot.
POOL_ROWS = 1 << 17
_MAX_POOL = 256
#: An in-process sample lasts at least this long (several calls for a fast method).
MIN_SAMPLE_NS = 20_000_000
#: The dense layer next to the table in the end-to-end sessions: width -> DENSE_UNITS.
DENSE_UNITS = 32
#: Unmeasured pushes of each method before the rounds.
WARM_UP_PUSHES = 2


# ``x + g * zero`` as in benchmarks.kernels' floors: every array read and written as Adam's
# row step does (the weights and both moments of each row, the row's gradient), values kept.
@numba.njit(**_FLOOR_OPTIONS)
def _rows_floor(p, g, index, width, a, b, zero):  # type: ignore[no-untyped-def]
    # the kernels' row loop (app/optim/numba_kernels.py): unsigned indices and width
    at = width - width
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            gz = g[at + j] * zero
            k = base + j
            p[k] = p[k] + gz
            a[k] = a[k] + gz
            b[k] = b[k] + gz
        at += width


def push_indices(rng: np.random.Generator, rows: int, count: int) -> np.ndarray:
    """``count`` row indices of a table of ``rows``: uniform with replacement, then
    :data:`DUPLICATES` of them overwritten with copies of others (int64)."""
    indices = rng.integers(0, rows, size=count, dtype=np.int64)
    dup = int(count * DUPLICATES)
    if dup and count >= 2 * dup:
        indices[:dup] = indices[dup : 2 * dup]
    return indices


def _pushed_rows(rows: int, fraction: float) -> int:
    return max(1, round(rows * fraction))


def _pool_size(rows: int, count: int) -> int:
    return max(2, min(_MAX_POOL, math.ceil(min(POOL_ROWS, rows) / count)))


def _label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


# --- the step, in process ----------------------------------------------------------------


class _Timed:
    """One method under test: ``fn`` called in samples of ``calls`` (milliseconds per call)."""

    def __init__(self, name: str, fn: Callable[[], Any], clock: str) -> None:
        self.name, self.fn, self.clock = name, fn, CLOCKS[clock]
        self.samples: list[float] = []
        fn()  # compile or load the kernels, touch the pages
        t0 = time.perf_counter_ns()
        fn()
        once = max(time.perf_counter_ns() - t0, 1)
        self.calls = max(1, math.ceil(MIN_SAMPLE_NS / once))

    def sample(self) -> None:
        calls, fn, clock = self.calls, self.fn, self.clock
        t0 = clock()
        for _ in range(calls):
            fn()
        self.samples.append((clock() - t0) / calls / 1e6)


def _cycling(items: Sequence[Any], fn: Callable[[Any], Any]) -> Callable[[], Any]:
    """A no-argument callable applying ``fn`` to the next of ``items``, round and round."""
    pool: Iterator[Any] = itertools.cycle(items)
    return lambda: fn(next(pool))


def _unique_rows(prepared: PreparedGradients) -> int:
    g = prepared.flat["emb"]
    if not isinstance(g, SparseGradient):
        raise TypeError("the table's prepared gradient is not row-sparse")
    return int(g.indices.size)


def _aligned(g: Any) -> bool:
    """Whether a decoded row gradient's values sit at an aligned offset of their body."""
    return bool(g.values.flags.aligned) if isinstance(g, Rows) else bool(g.flags.aligned)


def _step_rows(
    rows: int,
    width: int,
    fractions: Sequence[float],
    repeats: int,
    clock: str,
    stat: str,
    seed: int,
) -> list[dict[str, Any]]:
    """One row per fraction: the step's figures against the dense pass (shared by all)."""
    rng = np.random.default_rng(seed)
    shape = (rows, width)
    p = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
    params = {"emb": p}
    opt = KerasOptimizer(optimizers.Adam(), params)
    dense_grad = rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-2)
    dense = opt.check_gradients({"emb": dense_grad})

    def apply_in(mode: str) -> Callable[[PreparedGradients], None]:
        def apply(prepared: PreparedGradients) -> None:
            opt.sparse_updates = mode
            opt.apply(params, prepared)

        return apply

    flat = p.reshape(-1)
    moments = tuple(opt.slots[slot]["emb"].reshape(-1) for slot in opt.slot_names)
    assert len(moments) == 2, opt.slot_names  # Adam's m and v: the floor's two slots
    zero = np.float32(0.0)

    def floor_of(prepared: PreparedGradients) -> None:
        g = prepared.flat["emb"]
        assert isinstance(g, SparseGradient)
        index = g.indices.view(np.uint64)  # as the kernels take it: unsigned, vectorised
        _rows_floor(flat, g.rows.reshape(-1), index, np.uint64(g.width), *moments, zero)

    methods = [
        _Timed("dense", lambda: apply_in("exact")(dense), clock),
        _Timed("dense_prepare", lambda: opt.check_gradients({"emb": dense_grad}), clock),
    ]
    pools: dict[float, dict[str, Any]] = {}
    for fraction in fractions:
        count = _pushed_rows(rows, fraction)
        raw = []
        for _ in range(_pool_size(rows, count)):
            values = rng.standard_normal((count, width), dtype=np.float32) * np.float32(1e-2)
            raw.append({"emb": Rows(push_indices(rng, rows, count), values)})
        prepared = [opt.check_gradients(g) for g in raw]
        unique = [_unique_rows(g) for g in prepared]
        # the same pushes as the server's HTTP path gets them: views of a decoded body
        bodies = [messages.encode_push({"emb": g["emb"].with_shape(shape)}) for g in raw]
        decoded = [messages.decode_push(b, wire.DecodeLimits()) for b in bodies]
        aligned = all(_aligned(g["emb"]) for g in decoded)
        pools[fraction] = {"count": count, "pool": len(raw), "unique": unique, "aligned": aligned}
        methods += [
            _Timed(f"floor {fraction}", _cycling(prepared, floor_of), clock),
            _Timed(f"exact {fraction}", _cycling(prepared, apply_in("exact")), clock),
            _Timed(f"lazy {fraction}", _cycling(prepared, apply_in("lazy")), clock),
            _Timed(f"prepare {fraction}", _cycling(raw, opt.check_gradients), clock),
            _Timed(f"prepare body {fraction}", _cycling(decoded, opt.check_gradients), clock),
        ]
    for _ in range(max(1, repeats)):
        for m in methods:
            m.sample()
    figure = {m.name: STATISTICS[stat](m.samples) for m in methods}
    fastest = {m.name: min(m.samples) for m in methods}
    dense_ms, dense_prepare_ms = figure["dense"], figure["dense_prepare"]
    out = []
    for fraction in fractions:
        info = pools[fraction]
        share = statistics.mean(info["unique"]) / rows
        exact_ms, lazy_ms = figure[f"exact {fraction}"], figure[f"lazy {fraction}"]
        floor_ms = figure[f"floor {fraction}"]
        prepare_ms = figure[f"prepare {fraction}"]
        body_ms = figure[f"prepare body {fraction}"]
        share_ms = share * dense_ms
        out.append(
            {
                "benchmark": "sparse",
                "figure": "step",
                "optimizer": "Adam",
                "rows": rows,
                "width": width,
                "dtype": "float32",
                "fraction": fraction,
                "pushed_rows": info["count"],
                "unique_rows": statistics.mean(info["unique"]),
                "touched_share": share,
                "pool": info["pool"],
                "repeats": repeats,
                "clock": clock,
                "stat": stat,
                "dense_ms": dense_ms,
                "exact_ms": exact_ms,
                "lazy_ms": lazy_ms,
                "share_of_dense_ms": share_ms,
                "dense_prepare_ms": dense_prepare_ms,
                "prepare_ms": prepare_ms,
                "prepare_body_ms": body_ms,
                "body_values_aligned": info["aligned"],
                "dense_min_ms": fastest["dense"],
                "exact_min_ms": fastest[f"exact {fraction}"],
                "lazy_min_ms": fastest[f"lazy {fraction}"],
                "prepare_min_ms": fastest[f"prepare {fraction}"],
                "exact_vs_dense": exact_ms / dense_ms,
                "lazy_vs_share": lazy_ms / share_ms,
                # the same rows' memory traffic with no arithmetic: what any lazy kernel costs
                "rows_floor_ms": floor_ms,
                "rows_floor_vs_share": floor_ms / share_ms,
                "lazy_vs_rows_floor": lazy_ms / floor_ms,
                "lazy_vs_dense": lazy_ms / dense_ms,
                "prepare_vs_dense_prepare": prepare_ms / dense_prepare_ms,
                "prepare_body_vs_dense_prepare": body_ms / dense_prepare_ms,
                # the whole step (checks and apply) against the dense push's whole step
                "exact_step_vs_dense_step": (prepare_ms + exact_ms) / (dense_prepare_ms + dense_ms),
                "lazy_step_vs_share": (prepare_ms + lazy_ms)
                / (share * (dense_prepare_ms + dense_ms)),
                "lazy_ns_per_row": 1e6 * lazy_ms / statistics.mean(info["unique"]),
                "dense_ns_per_row": 1e6 * dense_ms / rows,
                "goal_exact_vs_dense": GOAL_EXACT_VS_DENSE,
                "goal_lazy_vs_share": GOAL_LAZY_VS_SHARE,
            }
        )
    return out


# --- the push, end to end ----------------------------------------------------------------


def _session_counters(url: str, session_id: str) -> dict[str, int]:
    """The session's ``bytes_in``/``bytes_out``/``pushes`` from ``GET /stats``."""
    response = httpx.get(f"{url}/stats", timeout=60)
    response.raise_for_status()
    for s in response.json()["sessions"]:
        if s["session_id"] == session_id:
            return {k: int(s[k]) for k in ("bytes_in", "bytes_out", "pushes")}
    raise KeyError(f"session {session_id!r} is not in /stats")


class _PushMethod:
    """One way of pushing: its pushes, their latencies, CPU time and bytes."""

    def __init__(
        self,
        name: str,
        fraction: float | None,
        session: Any,
        pushes: Sequence[tuple[dict[str, Any], dict[str, Any] | None]],
    ) -> None:
        self.name, self.fraction, self.session = name, fraction, session
        self.pushes: Iterator[tuple[dict[str, Any], dict[str, Any] | None]] = itertools.cycle(
            pushes
        )
        self.first = pushes[0]
        self.times: list[float] = []
        self.server_cpu = 0.0
        self.worker_cpu = 0.0
        self.bytes_out = 0
        self.counted = 0
        self.answer: Any = None

    def push(self) -> Any:
        grads, returns = next(self.pushes)
        if returns is None:
            return self.session.push(grads)
        return self.session.push(grads, returns=returns)

    def burst(self, server: ServerProcess, count: int) -> None:
        before = _session_counters(server.url, self.session.id)
        s0, w0 = server.cpu_seconds(), time.process_time()
        for _ in range(count):
            t0 = time.perf_counter_ns()
            self.answer = self.push()
            self.times.append((time.perf_counter_ns() - t0) / 1e6)
        self.worker_cpu += time.process_time() - w0
        self.server_cpu += server.cpu_seconds() - s0
        after = _session_counters(server.url, self.session.id)
        if after["pushes"] - before["pushes"] != count:
            raise RuntimeError(
                f"{count} {self.name} pushes counted {after['pushes'] - before['pushes']}"
            )
        self.bytes_out += after["bytes_out"] - before["bytes_out"]
        self.counted += count


def _push_rows(
    rows: int,
    width: int,
    fractions: Sequence[float],
    samples: int,
    dense_samples: int,
    rounds: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The dense row, then per fraction an exact and a lazy row."""
    rng = np.random.default_rng(seed + 1)
    shape = (rows, width)
    layer = {"dense/kernel": (width, DENSE_UNITS), "dense/bias": (DENSE_UNITS,)}
    weights: dict[str, np.ndarray] = {
        "emb": rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05),
        **{n: rng.standard_normal(s, dtype=np.float32) * np.float32(0.1) for n, s in layer.items()},
    }

    def layer_grads() -> dict[str, np.ndarray]:
        return {
            n: rng.standard_normal(s, dtype=np.float32) * np.float32(1e-2) for n, s in layer.items()
        }

    dense_push = {
        "emb": rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-2),
        **layer_grads(),
    }
    row_pushes: dict[float, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for fraction in fractions:
        count = _pushed_rows(rows, fraction)
        pool = []
        for _ in range(min(_pool_size(rows, count), max(2, samples))):
            indices = push_indices(rng, rows, count)
            values = rng.standard_normal((count, width), dtype=np.float32) * np.float32(1e-2)
            returns = {"emb": np.unique(indices), "dense/kernel": None, "dense/bias": None}
            pool.append(({"emb": Rows(indices, values), **layer_grads()}, returns))
        row_pushes[fraction] = pool
    out: list[dict[str, Any]] = []
    with ServerProcess.paramserver() as server, Client(server.url) as client:
        exact = client.create_session(weights, "adam")
        lazy = client.create_session(weights, "adam", sparse_updates="lazy")
        del weights
        try:
            methods = [_PushMethod("dense", None, exact, [(dense_push, None)])]
            for fraction in fractions:
                methods.append(_PushMethod("exact", fraction, exact, row_pushes[fraction]))
                methods.append(_PushMethod("lazy", fraction, lazy, row_pushes[fraction]))
            start = {s.id: s.info().iterations for s in (exact, lazy)}
            for m in methods:
                for _ in range(WARM_UP_PUSHES):
                    m.answer = m.push()
            dense_transport = transport_of(client)
            rounds = max(1, rounds)
            for r in range(rounds):
                for m in methods if r % 2 == 0 else methods[::-1]:
                    total = dense_samples if m.fraction is None else samples
                    count = total // rounds + (1 if r < total % rounds else 0)
                    if count:
                        m.burst(server, count)
            if transport_of(client) != dense_transport:
                dense_transport = "mixed"
            for s in (exact, lazy):
                made = sum(m.counted + WARM_UP_PUSHES for m in methods if m.session is s)
                if s.info().iterations - start[s.id] != made:
                    raise RuntimeError(f"{made} pushes advanced session {s.id} otherwise")
            for m in methods:
                out.append(_push_row(m, shape, dense_transport))
                m.answer = None
        finally:
            exact.delete(missing_ok=True)
            lazy.delete(missing_ok=True)
    dense_row = out[0]
    for row in out:
        row["up_vs_dense"] = dense_row["up_bytes"] / row["up_bytes"]  # x fewer bytes up
        row["down_vs_dense"] = dense_row["down_bytes"] / row["down_bytes"]
        row["p50_vs_dense"] = row["p50_ms"] / dense_row["p50_ms"]
        row["goal_up_vs_dense"] = (
            GOAL_BYTES_UP
            if row["fraction"] is not None and math.isclose(row["fraction"], GOAL_BYTES_UP_FRACTION)
            else None
        )
    return out


def _push_row(m: _PushMethod, shape: tuple[int, ...], dense_transport: str) -> dict[str, Any]:
    grads, returns = m.first
    sent = {n: g.with_shape(shape) if isinstance(g, Rows) else g for n, g in grads.items()}
    up = len(messages.encode_push(sent, returns=returns))
    it = m.session.last_iterations or 0
    down = len(messages.encode_weights(it, m.answer))
    rows = grads["emb"]
    n = len(m.times)
    return {
        "benchmark": "sparse",
        "figure": "push",
        "method": m.name,
        "mode": "lazy" if m.name == "lazy" else "exact",
        "transport": dense_transport if m.name == "dense" else "http",
        "rows": shape[0],
        "width": shape[1],
        "dense_units": DENSE_UNITS,
        "fraction": m.fraction,
        "pushed_rows": None if m.fraction is None else int(rows.indices.size),
        "returned_rows": None if returns is None else int(np.asarray(returns["emb"]).size),
        "samples": n,
        "up_bytes": up,
        "down_bytes": down,
        "down_bytes_counted": m.bytes_out / m.counted,
        "p50_ms": percentile(m.times, 50),
        "p99_ms": percentile(m.times, 99),
        "min_ms": min(m.times),
        "server_cpu_ms": 1e3 * m.server_cpu / n,
        "worker_cpu_ms": 1e3 * m.worker_cpu / n,
    }


# --- the benchmark -----------------------------------------------------------------------


def run(
    *,
    rows: int = 10**6,
    width: int = 64,
    fractions: Sequence[float] = (0.001, 0.01),
    step_repeats: int = 9,
    push_samples: int = 40,
    dense_samples: int = 8,
    push_rounds: int = 4,
    clock: str = "thread",
    stat: str = "median",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The step rows (one per fraction), then the push rows (dense, then exact and lazy per
    fraction). ``push_samples`` pushes per row method and fraction, ``dense_samples`` dense
    pushes, in ``push_rounds`` rounds; ``push_samples=0`` skips the end-to-end part."""
    out = _step_rows(rows, width, fractions, step_repeats, clock, stat, seed)
    if push_samples > 0:
        out += _push_rows(
            rows, width, fractions, push_samples, max(1, dense_samples), push_rounds, seed
        )
    return out


# --- the report --------------------------------------------------------------------------

#: The columns of the step rows (ms) and of the push rows (MB, ms).
COLUMNS = {
    "step": [
        ("fraction", "rows", "{:.1%}"),
        ("unique_rows", "unique", "{:.0f}"),
        ("dense_ms", "dense", "{:.3f}"),
        ("exact_ms", "exact", "{:.3f}"),
        ("lazy_ms", "lazy", "{:.3f}"),
        ("share_of_dense_ms", "share x dense", "{:.3f}"),
        ("exact_vs_dense", "exact/dense", "{:.2f}"),
        ("lazy_vs_share", "lazy/share", "{:.2f}"),
        ("rows_floor_ms", "rows floor", "{:.3f}"),
        ("rows_floor_vs_share", "floor/share", "{:.2f}"),
        ("dense_prepare_ms", "check dense", "{:.3f}"),
        ("prepare_ms", "check rows", "{:.3f}"),
        ("prepare_body_ms", "check body rows", "{:.3f}"),
    ],
    "push": [
        ("method", "push", "{}"),
        ("fraction", "rows", "{:.1%}"),
        ("transport", "transport", "{}"),
        ("samples", "n", "{}"),
        ("up_mb", "up MB", "{:.3f}"),
        ("down_mb", "down MB", "{:.3f}"),
        ("up_vs_dense", "dense/up", "{:.1f}"),
        ("down_vs_dense", "dense/down", "{:.1f}"),
        ("p50_ms", "p50", "{:.2f}"),
        ("p99_ms", "p99", "{:.2f}"),
        ("p50_vs_dense", "p50/dense", "{:.3f}"),
        ("server_cpu_ms", "server cpu", "{:.2f}"),
        ("worker_cpu_ms", "worker cpu", "{:.2f}"),
    ],
}


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The step rows (ms per call) and the push rows (bytes in MB, ms), as two tables."""
    steps = [r for r in rows if r["figure"] == "step"]
    pushes = [
        {**r, "up_mb": r["up_bytes"] / 1e6, "down_mb": r["down_bytes"] / 1e6}
        for r in rows
        if r["figure"] == "push"
    ]
    parts = []
    if steps:
        s = steps[0]
        parts.append(
            f"step of a {s['rows']:.0e} x {s['width']} float32 Adam parameter (ms, {s['stat']} "
            f"of {s['repeats']}, {s['clock']} clock):\n" + format_table(steps, COLUMNS["step"])
        )
    if pushes:
        parts.append(
            "pushes (p50/p99 ms, CPU ms per push):\n" + format_table(pushes, COLUMNS["push"])
        )
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=lambda s: int(float(s)), default=10**6)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument(
        "--fractions",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.001, 0.01],
        help="shares of the rows per push",
    )
    parser.add_argument("--repeats", type=int, default=9, help="samples of each step method")
    parser.add_argument("--samples", type=int, default=40, help="pushes per row method (0: none)")
    parser.add_argument("--dense-samples", type=int, default=8, help="dense pushes")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread")
    parser.add_argument("--stat", choices=sorted(STATISTICS), default="median")
    args = parser.parse_args(argv)
    rows = run(
        rows=args.rows,
        width=args.width,
        fractions=args.fractions,
        step_repeats=args.repeats,
        push_samples=args.samples,
        dense_samples=args.dense_samples,
        push_rounds=args.rounds,
        clock=args.clock,
        stat=args.stat,
    )
    print(format_rows(rows))


if __name__ == "__main__":
    main()
