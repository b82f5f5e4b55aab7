"""The blocking client: :class:`Client` and its :class:`Session` handles, on ``httpx.Client``.

::

    from paramserver.client import Client, optimizers

    with Client("http://127.0.0.1:8000") as client:
        session = client.create_session(model.get_weights(), optimizers.Adam(lr=1e-3))
        weights = session.push(gradients)      # one optimizer step; the new weights

One ``Client`` keeps a pool of keep-alive connections and may be shared by threads. What is
retried, and when, is described in :mod:`paramserver.client._base` and ``docs/client.md``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar, cast, overload

import httpx

from . import _base
from ._base import (
    DEFAULT_DEADLINE,
    DEFAULT_RETRY_POLICY,
    DEFAULT_TIMEOUT,
    ArrayLike,
    Attempts,
    BodyBuffer,
    Call,
    DictWeights,
    LeanAnswer,
    ListWeights,
    OptimizerLike,
    Reply,
    RetryPolicy,
    SessionInfo,
    SessionState,
    TrainingLike,
    W,
    Weights,
)
from .dataplane import DataPlaneChannel, PlaneBusy, channel_from_announcement, usable_for

__all__ = ["Client", "Session"]

T = TypeVar("T")


class Session(_base.SessionCore[W]):
    """A handle on one server session. Made by :class:`Client`; holds no weights itself.

    ``id`` is the session id, ``names`` the parameter names in the model's order, ``as_list``
    whether weights come back as a list in that order (``Session[ListWeights]``, the form of
    a session created from a list) or as a dict (``Session[DictWeights]``).
    """

    _client: Client

    @overload
    def push(
        self,
        gradients: Weights,
        *,
        return_weights: Literal[True] = ...,
        idempotency_key: str | None = ...,
        out: Weights | None = ...,
        base_iterations: int | None = ...,
        metrics: Mapping[str, float] | None = ...,
        returns: Mapping[str, Any] | None = ...,
    ) -> W: ...

    @overload
    def push(
        self,
        gradients: Weights,
        *,
        return_weights: Literal[False],
        idempotency_key: str | None = ...,
        out: Weights | None = ...,
        base_iterations: int | None = ...,
        metrics: Mapping[str, float] | None = ...,
        returns: Mapping[str, Any] | None = ...,
    ) -> int: ...

    @overload
    def push(
        self,
        gradients: Weights,
        *,
        return_weights: bool,
        idempotency_key: str | None = ...,
        out: Weights | None = ...,
        base_iterations: int | None = ...,
        metrics: Mapping[str, float] | None = ...,
        returns: Mapping[str, Any] | None = ...,
    ) -> W | int: ...

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
    ) -> W | int:
        """Apply one optimizer step; returns the new weights, or the iteration count.

        ``gradients`` is a dict of name -> array or a list in the session's order. The push
        carries an ``Idempotency-Key`` (fresh unless given) and is retried with it after a
        transport failure or a 503: the server applies it at most once. If the server replays
        an earlier answer to that key without its weights (it keeps a bounded amount), the
        weights are pulled.

        With ``out`` (arrays in the session's form, e.g. the worker's own weights) the new
        weights are written into them and ``out`` is returned; over the data plane they are
        received straight into those arrays. Without it the arrays returned are new and
        belong to the caller: no later call changes them.

        The push says which weights the gradient was computed on: ``base_iterations``, by
        default the handle's (the iteration count of the weights it last received). In a sync
        session it returns once its round is applied, with the round's weights (the read
        timeout and deadline grow by the round timeout); a gradient of older weights raises
        ``StaleGradient`` (its ``iterations`` is the session's: pull and compute again), a
        round that does not fill in time ``RoundTimeout``.

        A gradient may be ``paramserver.client.Rows(indices, values)``: only those rows of
        an embedding table (duplicates summed; over HTTP). ``returns={"emb": indices,
        "dense/kernel": None}`` asks for only those weights in the answer (a dict, row
        subsets as ``Rows``) instead of all of them.

        ``metrics`` (``{"loss": 0.31, "accuracy": 0.9}``: at most 16 names of at most 64
        characters, finite numbers) are recorded by the server with the iteration the push
        applied (``GET /sessions/{id}/metrics``, the dashboard); a replay records none.
        """
        iterations, weights = self._client._run(
            self._push_call(
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
        if weights is None:  # a replay whose weights the server no longer kept: applied once
            return self.pull(rows=returns) if returns is not None else self.pull(out=out)
        return weights

    def pull(
        self,
        *,
        out: Weights | None = None,
        min_iterations: int | None = None,
        wait: float | None = None,
        rows: Mapping[str, Any] | None = None,
    ) -> W:
        """The current weights (dict, or list in the session's order); with ``out``, written
        into those arrays, which are returned. With ``min_iterations`` (and ``wait`` seconds,
        at most the server's request timeout) the server answers once the session reaches
        that iteration, or after ``wait`` with what it has: compare ``last_iterations``.

        ``rows={"emb": indices, "dense/kernel": None}``: a partial pull of only those tensors
        (over HTTP): a dict with ``Rows(indices, values)`` for the tensors given indices and
        whole arrays for those given ``None``."""
        if rows is not None:
            if out is not None or min_iterations is not None:
                raise TypeError("rows= is a partial pull: without out= or min_iterations=")
            selected: Any = self._client._run(self._query_call(rows))
            return cast(W, selected)
        return self._client._run(self._pull_call(out, min_iterations=min_iterations, wait=wait))

    def info(self) -> SessionInfo:
        """The session's summary: optimizer, iterations, parameters, timestamps."""
        return self._client._run(self._info_call())

    def state(self) -> SessionState:
        """The whole state (weights, optimizer, slots, scalars, iterations) for checkpoints."""
        return self._client._run(self._state_call())

    def load_state(self, state: SessionState) -> SessionInfo:
        """Replace the session's state with ``state`` (recreating it if it was deleted)."""
        return self._client._run(self._load_state_call(state))

    def delete(self, *, missing_ok: bool = False) -> None:
        """Delete the session. ``missing_ok=True`` accepts that it is already gone (404)."""
        self._client._run(self._delete_call(missing_ok=missing_ok))


class Client(_base.ClientCore["Session[Any]"]):
    """A blocking client of one parameter server.

    ``timeout`` is seconds or an ``httpx.Timeout`` (``None``: no timeouts); ``deadline`` the
    most seconds one call may take in all, retries and waits included (``None``: none);
    ``retries`` a count or a :class:`RetryPolicy`; ``token`` is sent as
    ``Authorization: Bearer <token>``.
    ``verify`` checks the server's TLS certificate (True: the usual roots; a path: that PEM CA
    bundle; an ``ssl.SSLContext``; False: not at all), ``cert`` is the client's certificate
    (a PEM file with its key, or ``(certfile, keyfile)``) for a server that asks for one.
    ``data_plane=False`` keeps push and pull on HTTP; by default they use the server's data
    plane (``GET /data-plane``) when it can serve the URL (no proxy, path prefix or custom
    transport), falling back to HTTP.
    ``transport`` and ``limits`` go to ``httpx.Client`` (a custom transport, pool sizes).
    Use it as a context manager, or call :meth:`close`.
    """

    _session_type = Session

    #: What ``Client([url0, url1, ...])`` makes: :class:`paramserver.client.sharded.ShardedClient`,
    #: which sets this when it is imported (``paramserver.client`` imports it).
    _sharded_type: ClassVar[type[Client] | None] = None

    def __new__(cls, base_url: Any = None, *args: Any, **kwargs: Any) -> Client:
        # a list of URLs: a sharded session's servers, in shard order
        if cls is Client and isinstance(base_url, (list, tuple)) and cls._sharded_type:
            return super().__new__(cls._sharded_type)
        return super().__new__(cls)

    def __init__(
        self,
        base_url: str | httpx.URL,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = DEFAULT_RETRY_POLICY,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        limits: httpx.Limits | None = None,
        deadline: float | None = DEFAULT_DEADLINE,
        transport: httpx.BaseTransport | None = None,
        verify: _base.Verify = True,
        cert: _base.Cert | None = None,
        data_plane: bool = True,
    ) -> None:
        super().__init__(
            base_url,
            timeout=timeout,
            retries=retries,
            token=token,
            headers=headers,
            limits=limits,
            deadline=deadline,
            verify=verify,
            cert=cert,
            data_plane=data_plane and usable_for(httpx.URL(str(base_url)), transport=transport),
        )
        self._http = httpx.Client(transport=transport, **self._httpx_options())
        self._plane_lock = threading.Lock()

    # --- lifecycle ---

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections. The client cannot be used afterwards."""
        if self._plane:
            self._plane.close()
        self._http.close()

    @property
    def closed(self) -> bool:
        return self._http.is_closed

    # --- operations ---

    @overload
    def create_session(
        self,
        weights: Mapping[str, ArrayLike],
        optimizer: OptimizerLike,
        session_id: str | None = ...,
        *,
        refuse_non_finite: bool = ...,
        training: TrainingLike | None = ...,
        constraints: Mapping[str, Any] | None = ...,
        sparse_updates: str = ...,
        **training_options: Any,
    ) -> Session[DictWeights]: ...

    @overload
    def create_session(
        self,
        weights: Sequence[ArrayLike],
        optimizer: OptimizerLike,
        session_id: str | None = ...,
        *,
        refuse_non_finite: bool = ...,
        training: TrainingLike | None = ...,
        constraints: Mapping[str, Any] | None = ...,
        sparse_updates: str = ...,
        **training_options: Any,
    ) -> Session[ListWeights]: ...

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
    ) -> Session[Any]:
        """Create a session from initial weights and an optimizer; returns its handle.

        ``weights``: a dict of name -> array, or a list (``model.get_weights()`` order, named
        "0", "1", ...); the session answers in the same form. ``optimizer``: a name such as
        ``"adam"`` (Keras defaults), an ``optimizers.*`` object, or a Keras config dict.
        ``refuse_non_finite``: the server refuses (``InvalidRequest`` ``non_finite_result``,
        nothing changed) a step whose weights or slots would hold NaN or inf.

        ``training``: the training mode, ``Sync(replicas_to_aggregate=4, total_num_replicas=5)``
        or ``Async(max_staleness=8)`` (a ``{"mode": ...}`` dict or an object with
        ``get_config()`` also do), or the same as keyword arguments
        (``replicas_to_aggregate=4`` makes a sync session, ``max_staleness=8`` an async one).
        Default: asynchronous, each push one step.

        ``constraints``: parameter name -> a Keras 2.2.4 constraint
        (``paramserver.constraints.MaxNorm(max_value=2.0)``, ``NonNeg()``, ``UnitNorm()``,
        ``MinMaxNorm(...)``, their ``{"class_name", "config"}`` form or a Keras constraint
        object), applied by the server after every step as Keras's update does.
        """
        return self._run(
            self._create_call(
                weights,
                optimizer,
                session_id,
                refuse_non_finite=refuse_non_finite,
                training=_base.training_of(training, training_options),
                constraints=constraints,
                sparse_updates=sparse_updates,
            )
        )

    @overload
    def session(
        self, session_id: str, *, as_list: Literal[False] = ...
    ) -> Session[DictWeights]: ...

    @overload
    def session(self, session_id: str, *, as_list: Literal[True]) -> Session[ListWeights]: ...

    @overload
    def session(self, session_id: str, *, as_list: bool) -> Session[Any]: ...

    def session(self, session_id: str, *, as_list: bool = False) -> Session[Any]:
        """Attach to an existing session (raises ``SessionNotFound`` if there is none)."""
        return self._run(self._attach_call(session_id, as_list=as_list))

    @overload
    def restore_session(
        self,
        state: SessionState,
        session_id: str | None = ...,
        *,
        as_list: Literal[False] = ...,
    ) -> Session[DictWeights]: ...

    @overload
    def restore_session(
        self, state: SessionState, session_id: str | None = ..., *, as_list: Literal[True]
    ) -> Session[ListWeights]: ...

    @overload
    def restore_session(
        self, state: SessionState, session_id: str | None = ..., *, as_list: bool
    ) -> Session[Any]: ...

    def restore_session(
        self, state: SessionState, session_id: str | None = None, *, as_list: bool = False
    ) -> Session[Any]:
        """Create (or replace) session ``session_id`` from an exported state."""
        return self._run(self._restore_call(state, session_id, as_list=as_list))

    def sessions(self) -> list[SessionInfo]:
        """The summaries of every session on the server, oldest first."""
        return self._run(self._list_call())

    def health(self) -> dict[str, Any]:
        """``GET /health``: ``{"status": "ok"}`` when the server is up."""
        return self._run(self._health_call())

    # --- sending ---

    def _run(self, call: Call[T]) -> T:
        attempts = self._attempts(call)
        while True:
            try:
                reply = self._send(call, attempts)
            except httpx.RequestError as exc:
                delay = attempts.after_exception(exc)
            else:
                if isinstance(reply, LeanAnswer):
                    return call.finish_lean(reply)
                retry_in = attempts.after_reply(reply)
                if retry_in is None:
                    return call.finish(reply)
                delay = retry_in
            time.sleep(delay)

    def _data_plane(self, attempts: Attempts) -> DataPlaneChannel | None:
        """The data-plane channel, asked for once (``GET /data-plane``); None: use HTTP."""
        if self._plane is None:
            with self._plane_lock:  # threads share a client: one question, one channel
                if self._plane is None:
                    try:
                        # the HTTP path: bounded by the call's deadline like the call itself
                        reply = self._send_http(_base.ANNOUNCEMENT_CALL, attempts)
                    except httpx.RequestError:
                        return None  # ask again on the next call; this one goes over HTTP
                    self._plane = channel_from_announcement(
                        self.base_url,
                        verify=self._verify,
                        token=self._token,
                        status=reply.status,
                        body=bytes(reply.body),
                    )
        return self._usable_plane()

    def _send(self, call: Call[Any], attempts: Attempts) -> Reply | LeanAnswer:
        attempts.check_deadline()
        if call.lean is not None:
            plane = self._data_plane(attempts)
            if plane is not None:
                try:
                    return plane.exchange(call.lean, attempts)
                except PlaneBusy:
                    pass  # all its connections are busy: over HTTP
        return self._send_http(call, attempts)

    def _send_http(self, call: Call[Any], attempts: Attempts) -> Reply:
        attempts.check_deadline()
        request = self._http.build_request(
            call.method,
            call.path,
            params=call.params,
            content=call.content(),
            headers=call.headers(),
            timeout=attempts.timeout(),
        )
        response = self._http.send(request, stream=True)
        try:
            body = BodyBuffer(response.headers)
            for chunk in response.iter_bytes():
                body.feed(chunk)
                attempts.check_deadline()  # an answer that trickles in ends at the deadline
        finally:
            response.close()
        return Reply(response.status_code, response.headers, body.value())
