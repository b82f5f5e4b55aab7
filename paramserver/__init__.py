"""paramserver: a parameter server with exact Keras 2.2 optimizer semantics.

One installed name, three parts:

* ``paramserver`` itself (this folder) holds what the server and the client share: the wire
  format (:mod:`paramserver.wire`), the optimizer configs and their validation
  (:mod:`paramserver.optimizers`), the training modes (:mod:`paramserver.training`), the
  protocol's messages (:mod:`paramserver.messages`) and its error codes
  (:mod:`paramserver.codes`);
* :mod:`paramserver.server` is the service (the ``app/`` folder of the repository);
* :mod:`paramserver.client` is the client library (the ``client/`` folder).

What a worker needs is importable from here::

    from paramserver import Client, optimizers

The client's names are loaded on first use (PEP 562): importing ``paramserver.server`` runs
this module too, and must not load the client's HTTP stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Async",
    "AsyncClient",
    "AsyncSession",
    "BadRequest",
    "Client",
    "Conflict",
    "DeadlineExceeded",
    "DEFAULT_DEADLINE",
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_TIMEOUT",
    "DictWeights",
    "Forbidden",
    "InsufficientStorage",
    "InternalServerError",
    "InvalidRequest",
    "LayoutMismatch",
    "ListWeights",
    "NotFound",
    "ParamServerError",
    "Parameter",
    "PayloadTooLarge",
    "ProtocolError",
    "PushIncomplete",
    "RequestTimeout",
    "RetryPolicy",
    "RoundAborted",
    "RoundFull",
    "RoundTimeout",
    "ServerError",
    "ServiceUnavailable",
    "Session",
    "SessionExists",
    "SessionInfo",
    "SessionNotFound",
    "SessionState",
    "ShardError",
    "ShardsDiverged",
    "StaleGradient",
    "Sync",
    "TransportError",
    "Unauthorized",
    "UnsupportedMediaType",
    "__version__",
    "codes",
    "errors",
    "messages",
    "optimizers",
    "training",
    "wire",
]

#: Shared submodules, loaded on first use.
_SUBMODULES = frozenset({"codes", "messages", "optimizers", "training", "wire"})
#: Names re-exported from :mod:`paramserver.client`, loaded on first use.
_CLIENT_EXPORTS = frozenset(__all__) - _SUBMODULES - {"__version__"}

if TYPE_CHECKING:
    from paramserver import codes, messages, optimizers, training, wire
    from paramserver.client import (
        DEFAULT_DEADLINE,
        DEFAULT_RETRY_POLICY,
        DEFAULT_TIMEOUT,
        Async,
        AsyncClient,
        AsyncSession,
        BadRequest,
        Client,
        Conflict,
        DeadlineExceeded,
        DictWeights,
        Forbidden,
        InsufficientStorage,
        InternalServerError,
        InvalidRequest,
        LayoutMismatch,
        ListWeights,
        NotFound,
        Parameter,
        ParamServerError,
        PayloadTooLarge,
        ProtocolError,
        PushIncomplete,
        RequestTimeout,
        RetryPolicy,
        RoundAborted,
        RoundFull,
        RoundTimeout,
        ServerError,
        ServiceUnavailable,
        Session,
        SessionExists,
        SessionInfo,
        SessionNotFound,
        SessionState,
        ShardError,
        ShardsDiverged,
        StaleGradient,
        Sync,
        TransportError,
        Unauthorized,
        UnsupportedMediaType,
        errors,
    )


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import paramserver.codes
        import paramserver.messages
        import paramserver.optimizers
        import paramserver.training
        import paramserver.wire

        return globals()[name]
    if name in _CLIENT_EXPORTS:
        import paramserver.client

        value = getattr(paramserver.client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'paramserver' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
