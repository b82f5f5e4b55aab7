"""paramserver's client library: what a worker imports to train against a parameter server.

::

    from paramserver.client import Client, optimizers

    with Client("http://127.0.0.1:8000") as client:
        session = client.create_session(model.get_weights(), optimizers.SGD(momentum=0.9))
        weights = session.pull()
        for batch in data:
            weights = session.push(compute_gradients(weights, batch))

* :class:`Client` / :class:`AsyncClient`: blocking and asyncio twins (``httpx`` underneath).
* :class:`Session` / :class:`AsyncSession`: push, pull, info, state, load_state, delete.
* :mod:`paramserver.optimizers`: Keras 2.2 optimizer objects, validated as the server does.
* ``Client([url0, url1, ...])`` (:class:`ShardedClient`, and its asyncio twin): one session
  split over several servers, with the same API (:mod:`paramserver.client.sharded`).
* :class:`Sync` / :class:`Async`: training modes (synchronous rounds, bounded staleness).
* :mod:`paramserver.client.keras` (tf.keras ``model.fit`` through a session) and
  :mod:`paramserver.client.torch` (a ``torch.optim.Optimizer`` over a session): the framework
  adapters, imported on their own (they import TensorFlow or torch; extras ``tensorflow`` and
  ``torch``; ``docs/frameworks.md``).
* :mod:`paramserver.client.errors`: one exception per error status, with the server's code and
  message.
* :mod:`paramserver.wire`: the msgpack tensor format, shared with the server.

See ``docs/client.md`` for the retry policy and the forms weights take.
"""

from paramserver import optimizers, wire
from paramserver.sparse import Rows
from paramserver.training import Async, Sync

from . import errors
from ._base import (
    DEFAULT_DEADLINE,
    DEFAULT_RETRY_POLICY,
    DEFAULT_TIMEOUT,
    DictWeights,
    ListWeights,
    Parameter,
    RetryPolicy,
    SessionInfo,
    SessionState,
)
from .aio import AsyncClient, AsyncSession
from .errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    Forbidden,
    InsufficientStorage,
    InternalServerError,
    InvalidRequest,
    LayoutMismatch,
    NotFound,
    ParamServerError,
    PayloadTooLarge,
    ProtocolError,
    PushIncomplete,
    RequestTimeout,
    RoundAborted,
    RoundFull,
    RoundTimeout,
    ServerError,
    ServiceUnavailable,
    SessionExists,
    SessionNotFound,
    ShardError,
    ShardsDiverged,
    StaleGradient,
    TransportError,
    Unauthorized,
    UnsupportedMediaType,
)
from .sharded import (
    URLS_ENV,
    AsyncShardedClient,
    AsyncShardedSession,
    ShardedClient,
    ShardedSession,
    urls_from_env,
)
from .sync import Client, Session

__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_TIMEOUT",
    "URLS_ENV",
    "Async",
    "AsyncClient",
    "AsyncSession",
    "AsyncShardedClient",
    "AsyncShardedSession",
    "BadRequest",
    "Client",
    "Conflict",
    "DeadlineExceeded",
    "DictWeights",
    "Forbidden",
    "InsufficientStorage",
    "InternalServerError",
    "InvalidRequest",
    "LayoutMismatch",
    "ListWeights",
    "NotFound",
    "Parameter",
    "ParamServerError",
    "PayloadTooLarge",
    "ProtocolError",
    "PushIncomplete",
    "RequestTimeout",
    "RetryPolicy",
    "RoundAborted",
    "RoundFull",
    "RoundTimeout",
    "Rows",
    "ServerError",
    "ServiceUnavailable",
    "Session",
    "SessionExists",
    "SessionInfo",
    "SessionNotFound",
    "SessionState",
    "ShardError",
    "ShardedClient",
    "ShardedSession",
    "ShardsDiverged",
    "StaleGradient",
    "Sync",
    "TransportError",
    "Unauthorized",
    "UnsupportedMediaType",
    "errors",
    "optimizers",
    "urls_from_env",
    "wire",
]
