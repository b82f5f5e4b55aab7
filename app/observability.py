"""What the server tells its operators: Prometheus metrics, JSON logs, per-session statistics
and the points workers report with their pushes.

* :class:`SessionStats`: one session's counters (pushes, replays, stale refusals, bytes in and
  out, push and round durations as histograms) and its last minute of pushes (``/stats``).
  It lives on the :class:`~paramserver.server.sessions.Session`, so a deleted session's series
  leave ``/metrics`` with it: label cardinality stays bounded by ``--max-sessions``.
* :class:`WorkerPoints`: the last 10,000 points (name, value, iterations, time) the workers
  reported with applied pushes (``"metrics": {"loss": 0.31}``), in preallocated arrays whose
  bytes count in the session's memory.
* :class:`ServerMetrics`: the server's own series (requests by route template and status,
  errors by code, requests in flight, refusals, journal fsyncs, snapshots) in a registry of
  its own (several apps may share a process), and a collector that reads the sessions' series
  at scrape time. Names follow Prometheus' conventions: ``paramserver_`` prefix, base units,
  ``_total`` for counters.
* :class:`RequestMetrics`: the ASGI middleware that counts requests, gives each an
  ``X-Request-ID`` (a valid incoming one is kept) and writes the access log line.
* :class:`JsonFormatter`: ``--log-format json``, one object per line.
"""

from __future__ import annotations

import bisect
import contextvars
import itertools
import json
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "DURATION_BUCKETS",
    "JsonFormatter",
    "RequestMetrics",
    "RequestRecord",
    "ServerMetrics",
    "SessionStats",
    "WorkerPoints",
    "current_request",
]

#: Seconds: a small push over loopback (~0.5 ms) to a sync round waiting its full timeout.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    600.0,
)
#: The window of ``/stats``.
WINDOW_SECONDS = 60.0
#: Pushes of one session that the window keeps at most (their time and duration).
WINDOW_PUSHES = 4096


class _Histogram:
    """Cumulative bucket counts and a sum, for a collector to expose."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last: +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class SessionStats:
    """One session's counters and its last minute of pushes (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pushes = 0
        self.replays = 0
        self.stale = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.rounds = 0
        self.push_seconds = _Histogram()
        self.round_seconds = _Histogram()
        self.last_push: float | None = None  # time.time() of the last applied push
        self._recent: deque[tuple[float, float]] = deque(maxlen=WINDOW_PUSHES)
        self._created = time.monotonic()

    def pushed(self, seconds: float, nbytes: int, *, replayed: bool = False) -> None:
        """A push answered (applied, joined to a round that was applied, or replayed)."""
        now = time.monotonic()
        with self._lock:
            self.bytes_in += nbytes
            if replayed:
                self.replays += 1
                return
            self.pushes += 1
            self.push_seconds.observe(seconds)
            self.last_push = time.time()
            self._recent.append((now, seconds))

    def refused_stale(self) -> None:
        with self._lock:
            self.stale += 1

    def sent(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_out += nbytes

    def round_applied(self, seconds: float) -> None:
        with self._lock:
            self.rounds += 1
            self.round_seconds.observe(seconds)

    def window(self) -> dict[str, Any]:
        """The last minute: steps per second and push latency p50/p99 (seconds), with the
        totals and the last push's age."""
        now = time.monotonic()
        with self._lock:
            recent = [(t, d) for t, d in self._recent if now - t <= WINDOW_SECONDS]
            last = self.last_push
            totals = {
                "pushes": self.pushes,
                "replays": self.replays,
                "stale_refusals": self.stale,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
            }
        p50: float | None = None
        p99: float | None = None
        rate = 0.0
        if recent:
            # the last minute, or the session's life when it is younger; the window's own
            # span when it holds its most pushes
            span = min(WINDOW_SECONDS, now - self._created)
            if len(recent) == WINDOW_PUSHES:
                span = now - recent[0][0]
            span = max(span, 1e-3)
            durations = np.array([d for _, d in recent])
            p50, p99 = (float(x) for x in np.percentile(durations, [50, 99]))
            rate = len(recent) / span
        return {
            **totals,
            "steps_per_second": round(rate, 3),
            "push_seconds_p50": p50,
            "push_seconds_p99": p99,
            "last_push_age_seconds": None if last is None else round(time.time() - last, 3),
        }


class WorkerPoints:
    """The points workers report with applied pushes: the last :data:`CAPACITY` of them, in
    arrays allocated on the first point, as many as the session's memory budget allows."""

    CAPACITY = 10_000
    #: Distinct names one session may report over its life.
    MAX_NAMES = 256
    #: Bytes per point: name index, value, iterations, time.
    POINT_BYTES = 2 + 8 + 8 + 8
    #: The longest name (``paramserver.messages.MAX_METRIC_NAME``).
    NAME_BYTES = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._capacity = 0
        self._allocated = False
        self._start = 0
        self._count = 0
        self._name = np.empty(0, np.uint16)
        self._value = np.empty(0, np.float64)
        self._iterations = np.empty(0, np.int64)
        self._time = np.empty(0, np.float64)

    @property
    def nbytes(self) -> int:
        """The memory the points hold (counted in the session's bytes)."""
        arrays = self._name.nbytes + self._value.nbytes + self._iterations.nbytes
        return arrays + self._time.nbytes + sum(len(n) + 64 for n in self.names)

    def __len__(self) -> int:
        return self._count

    def fits(self, names: Iterable[str]) -> bool:
        """Whether these names fit in the names table (call before applying the push)."""
        new = {n for n in names if n not in self._index}
        return len(self.names) + len(new) <= self.MAX_NAMES

    def _allocate(self, budget: int | None) -> None:
        """The arrays, sized to the capacity or to what ``budget`` bytes allow (once, under
        the lock: the arrays exist before the capacity says so)."""
        capacity = self.CAPACITY
        if budget is not None:  # room for the names table at its largest, then the points
            room = budget - self.MAX_NAMES * (self.NAME_BYTES + 64)
            capacity = max(0, min(capacity, room // self.POINT_BYTES))
        self._name = np.zeros(capacity, np.uint16)
        self._value = np.zeros(capacity, np.float64)
        self._iterations = np.zeros(capacity, np.int64)
        self._time = np.zeros(capacity, np.float64)
        self._capacity = capacity
        self._allocated = True

    def add(
        self,
        metrics: Mapping[str, float],
        iterations: int,
        when: float | None = None,
        *,
        budget: int | None = None,
    ) -> None:
        """Record the points of one applied push; the first allocates the arrays within
        ``budget`` bytes (None: no limit)."""
        when = time.time() if when is None else when
        with self._lock:
            if not self._allocated:
                self._allocate(budget)
            for name, value in metrics.items():
                index = self._index.get(name)
                if index is None:
                    if len(self.names) >= self.MAX_NAMES:
                        continue  # refused before the push was applied; never reached
                    index = self._index[name] = len(self.names)
                    self.names.append(name)
                if not self._capacity:
                    continue  # a session whose memory budget leaves no room keeps no points
                slot = (self._start + self._count) % self._capacity
                if self._count == self._capacity:
                    self._start = (self._start + 1) % self._capacity
                else:
                    self._count += 1
                self._name[slot] = index
                self._value[slot] = value
                self._iterations[slot] = iterations
                self._time[slot] = when

    def points(
        self, *, name: str | None = None, since_iterations: int | None = None, limit: int | None
    ) -> list[dict[str, Any]]:
        """The points, oldest first; filtered by ``name`` and ``iterations > since``, the last
        ``limit`` of them."""
        with self._lock:
            order = (self._start + np.arange(self._count)) % max(self._capacity, 1)
            names = self._name[order]
            keep = np.ones(len(order), bool)
            if name is not None:
                index = self._index.get(name)
                keep &= names == (index if index is not None else -1)
            iterations = self._iterations[order]
            if since_iterations is not None:
                keep &= iterations > since_iterations
            chosen = order[keep]
            if limit is not None:
                chosen = chosen[-limit:] if limit else chosen[:0]
            return [
                {
                    "name": self.names[int(self._name[i])],
                    "value": float(self._value[i]),
                    "iterations": int(self._iterations[i]),
                    "time": datetime.fromtimestamp(float(self._time[i]), timezone.utc).isoformat(),
                }
                for i in chosen
            ]


# --- the server's series ---------------------------------------------------------------------


class _SessionCollector(Collector):
    """Every session's series, read from the store at scrape time."""

    def __init__(self, service_of: Any) -> None:
        self._service_of = service_of

    def collect(self) -> Iterator[Metric]:
        service = self._service_of()
        sessions = [] if service is None else service.store.list()
        labels = ["session", "optimizer"]

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"paramserver_session_{name}", doc, labels=labels)

        pushes = counter("pushes", "Pushes applied (a sync push: once its round is applied).")
        replays = counter("idempotent_replays", "Pushes answered from their Idempotency-Key.")
        stale = counter("stale_refusals", "Pushes refused as too stale (409 stale_gradient).")
        received = counter("received_bytes", "Gradient bytes received by pushes.")
        sent = counter("sent_bytes", "Weight bytes sent by pushes and pulls.")
        iterations = GaugeMetricFamily(
            "paramserver_session_iterations", "The session's iteration count.", labels=labels
        )
        held = GaugeMetricFamily(
            "paramserver_session_held_bytes",
            "Weights, optimizer slots and reported points the session holds.",
            labels=labels,
        )
        push_seconds = HistogramMetricFamily(
            "paramserver_session_push_duration_seconds",
            "Time on the server per applied push, from its decoded body to its answer (a "
            "sync push: until its round is applied).",
            labels=labels,
        )
        round_seconds = HistogramMetricFamily(
            "paramserver_session_round_duration_seconds",
            "Sync rounds: from the round's first gradient to its step.",
            labels=labels,
        )
        for session in sessions:
            stats: SessionStats = session.stats
            key = [session.id, type(session.trainer.optimizer).__name__]
            with stats._lock:
                pushes.add_metric(key, stats.pushes)
                replays.add_metric(key, stats.replays)
                stale.add_metric(key, stats.stale)
                received.add_metric(key, stats.bytes_in)
                sent.add_metric(key, stats.bytes_out)
                push_seconds.add_metric(key, stats.push_seconds.buckets(), stats.push_seconds.sum)
                if stats.rounds:
                    round_seconds.add_metric(
                        key, stats.round_seconds.buckets(), stats.round_seconds.sum
                    )
            iterations.add_metric(key, session.trainer.iterations)
            held.add_metric(key, session.held_bytes())
        yield from (pushes, replays, stale, received, sent, iterations, held)
        yield from (push_seconds, round_seconds)
        yield GaugeMetricFamily(
            "paramserver_sessions", "Sessions the server holds.", value=len(sessions)
        )
        yield GaugeMetricFamily(
            "paramserver_held_bytes",
            "Bytes all sessions hold (what --max-total-bytes bounds).",
            value=sum(s.held_bytes() for s in sessions),
        )


class ServerMetrics:
    """The server's registry: its own series and the sessions' collector."""

    def __init__(self, service_of: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "paramserver_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "paramserver_http_requests_in_flight", "HTTP requests being served.", registry=r
        )
        self.refusals = Counter(
            "paramserver_refusals",
            "Requests refused before any work: 503 (busy, shutting down), 413 (too large), "
            "408 (too slow), by status.",
            ["status"],
            registry=r,
        )
        self.errors = Counter(
            "paramserver_errors", "Error answers, by the error body's code.", ["code"], registry=r
        )
        self.fsync_seconds = Histogram(
            "paramserver_journal_fsync_duration_seconds",
            "Journal fsyncs.",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            "paramserver_snapshot_duration_seconds",
            "Writing one session's snapshot.",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=r,
        )
        self.last_snapshot = Gauge(
            "paramserver_last_snapshot_timestamp_seconds",
            "Unix time of the last successful snapshot (0: none yet).",
            registry=r,
        )
        r.register(_SessionCollector(service_of))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def error(self, code: str) -> None:
        self.errors.labels(code=code).inc()

    def snapshot_written(self, seconds: float) -> None:
        self.snapshot_seconds.observe(seconds)
        self.last_snapshot.set(time.time())


# --- requests ---------------------------------------------------------------------------------

#: The request being served (for the log lines written while it is).
current_request: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "paramserver_request", default=None
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A new request id: 32 hex digits, a random half per process and a count (uuid4 would read
# the kernel's random source for every request: 2-3 us of a 10-element push's ~100).
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count()
access_log = logging.getLogger("paramserver.access")
_MAX_COUNTERS = 4096


class RequestRecord:
    """What every HTTP request leaves behind, whichever way it is served (the ASGI
    middleware :class:`RequestMetrics`, or the connection's direct small push,
    :mod:`paramserver.server.api.fastpath`): its ``X-Request-ID`` (the incoming one when it is
    1-128 of ``[A-Za-z0-9._:-]``, else a new one), a count by its route's template
    (``/sessions/{session_id}``, never the raw path), method and status, the refusal and error
    counts, and one access line (``--log-format json``)."""

    def __init__(self, metrics: ServerMetrics, *, access_log: bool = False) -> None:
        self.metrics = metrics
        #: Log a line per request (``--log-format json``; the text format keeps uvicorn's).
        self.access_log = access_log
        # The request counter's children by (route, method, status): ``labels()`` costs 1.8 us
        # a request, a dict lookup 0.5. Routes, httptools' methods and statuses are few; the
        # bound only keeps a bug from growing it.
        self._counters: dict[tuple[str, str, int], Any] = {}

    @staticmethod
    def begin(scope: Scope) -> tuple[dict[str, Any], contextvars.Token[dict[str, Any] | None]]:
        """The request's record (its id under ``request_id``), made the current request for
        the log lines written while it is served; hand the token back to :meth:`end`."""
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        if incoming and _REQUEST_ID.fullmatch(incoming):
            request_id = incoming
        else:
            request_id = f"{_ID_PREFIX}{next(_ids):016x}"
        info: dict[str, Any] = {
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": None,
            "bytes": 0,
        }
        return info, current_request.set(info)

    def end(
        self,
        info: dict[str, Any],
        token: contextvars.Token[dict[str, Any] | None],
        *,
        started: float,
        template: str | None,
        session_id: str | None,
        error_code: str | None,
    ) -> None:
        """Count and log the answered request (``info["status"]`` None: it failed, 500)."""
        method = info["method"]
        status = info["status"] or 500
        template = template or "unmatched"
        counted = (template, method, status)
        counter = self._counters.get(counted)
        if counter is None:
            counter = self.metrics.requests.labels(
                route=template, method=method, status=str(status)
            )
            if len(self._counters) < _MAX_COUNTERS:
                self._counters[counted] = counter
        counter.inc()
        if status in (408, 413, 503):
            self.metrics.refusals.labels(status=str(status)).inc()
        if status >= 400:
            self.metrics.error(error_code or f"http_{status}")
        info["status"] = status
        info["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if session_id is not None:
            info["session_id"] = session_id
        if self.access_log:
            access_log.info(
                "%s %s %s %d %.1f ms",
                info["request_id"],
                method,
                info["path"],
                status,
                info["duration_ms"],
                extra={"request": dict(info)},
            )
        current_request.reset(token)


class RequestMetrics:
    """ASGI middleware: the :class:`RequestRecord` of every HTTP request, and its
    ``X-Request-ID`` on the answer."""

    def __init__(self, app: ASGIApp, record: RequestRecord) -> None:
        self.app = app
        self.record = record
        self.metrics = record.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        info, token = self.record.begin(scope)
        request_id = info["request_id"]
        scope.setdefault("state", {})["request_id"] = request_id
        error_head = bytearray()  # the start of an error answer's body: its code

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                info["bytes"] += len(body)
                if (info["status"] or 0) >= 400 and len(error_head) < 4096:
                    error_head.extend(body[: 4096 - len(error_head)])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            status = info["status"] or 500
            self.record.end(
                info,
                token,
                started=started,
                template=getattr(scope.get("route"), "path", None),
                session_id=scope.get("path_params", {}).get("session_id"),
                error_code=_error_code(bytes(error_head), status) if status >= 400 else None,
            )


def _error_code(body: bytes, status: int) -> str:
    """The ``code`` of an error body ``{"error": {"code", ...}}``, else ``http_<status>``."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"http_{status}"
    return code if isinstance(code, str) and len(code) <= 64 else f"http_{status}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and for lines about a request
    its request_id, session_id, method, path, status, duration_ms and bytes."""

    FIELDS = ("request_id", "session_id", "method", "path", "status", "duration_ms", "bytes")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request = getattr(record, "request", None) or current_request.get()
        if request:
            for field in self.FIELDS:
                if request.get(field) is not None:
                    out[field] = request[field]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
