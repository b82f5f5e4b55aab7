"""Routes of the sessions resource. Each reads its body, then runs the operation in a thread."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from paramserver.codes import SESSION_ID_PATTERN, SESSION_ID_RULE, ErrorCode
from paramserver.wire import MSGPACK_MEDIA_TYPE

from ..errors import InvalidRequest, ServiceUnavailable
from ..idempotency import check_key
from ..protocol import body_kind
from ..rounds import Ticket
from ..service import SessionService, round_answer
from ..sessions import Session
from . import schemas
from .bodies import read_body

router = APIRouter(prefix="/sessions", tags=["sessions"])

SessionId = Annotated[
    str,
    Path(description=f"{SESSION_ID_RULE} (pattern {SESSION_ID_PATTERN})"),
]


async def get_service(request: Request) -> SessionService:  # async: no threadpool hop
    service: SessionService = request.app.state.service
    return service


ServiceDep = Annotated[SessionService, Depends(get_service)]


async def get_session(session_id: SessionId, service: ServiceDep) -> Session:
    return service.store.get(session_id)


SessionDep = Annotated[Session, Depends(get_session)]


class MsgpackResponse(Response):
    """An answer whose body is already msgpack (encoded by :mod:`paramserver.messages`)."""

    media_type = MSGPACK_MEDIA_TYPE


@asynccontextmanager
async def turn(session: Session, service: SessionService) -> AsyncIterator[None]:
    """Wait (on the event loop) for the session's turn; 503 if it does not come in time."""
    try:
        if session.turn.locked():  # only a wait needs a deadline (fail_after costs a scope)
            with anyio.fail_after(service.settings.request_timeout_seconds):
                await session.turn.acquire()
        else:
            await session.turn.acquire()
    except TimeoutError:
        raise ServiceUnavailable(
            f"session {session.id!r} stayed busy for "
            f"{service.settings.request_timeout_seconds:g} s; retry later",
            code=ErrorCode.SESSION_BUSY,
            headers={"Retry-After": "1"},
        ) from None
    try:
        yield
    finally:
        session.turn.release()


async def body_of(
    request: Request, service: SessionService, *, json: bool = False
) -> bytearray | memoryview:
    settings = service.settings
    limit = settings.max_body_bytes
    if json:
        limit = min(limit, settings.max_json_body_bytes)
    return await read_body(request, limit, timeout=settings.request_timeout_seconds)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.CreateSessionResponse,
    response_model_exclude_none=True,
    summary="Create a session",
    description="Create an optimizer session from initial weights and an optimizer (a name "
    "with defaults, or a Keras config). The body is msgpack (tensor data as bin) or JSON "
    "(tensor data as a flat list of numbers).",
    openapi_extra=schemas.CREATE_BODY,
    responses=schemas.error_responses(400, 409, 413, 415, 422, 507),
)
async def create_session(request: Request, service: ServiceDep) -> dict[str, Any]:
    kind = body_kind(request.headers.get("content-type"), allow_json=True)
    body = await body_of(request, service, json=kind == "json")
    return await run_in_threadpool(service.create, body, kind)


@router.get(
    "",
    response_model=schemas.SessionList,
    response_model_exclude_none=True,
    summary="List sessions",
)
async def list_sessions(service: ServiceDep) -> dict[str, Any]:
    return {"sessions": await run_in_threadpool(service.list)}


@router.get(
    "/{session_id}",
    response_model=schemas.SessionSummary,
    response_model_exclude_none=True,
    summary="Describe a session",
    responses=schemas.error_responses(404),
)
async def get_session_summary(session: SessionDep, service: ServiceDep) -> dict[str, Any]:
    async with turn(session, service):
        return await run_in_threadpool(service.summary, session)


@router.delete(
    "/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a session",
    responses=schemas.error_responses(404),
)
async def delete_session(session_id: SessionId, service: ServiceDep) -> Response:
    await run_in_threadpool(service.delete, session_id)  # waits for the session's lock
    return Response(status_code=status.HTTP_204_NO_CONTENT)


class SnapshotTaken(BaseModel):
    session_id: str
    iterations: int = Field(description="The iteration count the snapshot holds.")
    lsn: int = Field(description="The journal LSN up to which the snapshot holds changes.")
    file: str | None = Field(
        description="The snapshot file's name in the snapshot directory; null when a "
        "concurrent snapshot of a newer state made this one unnecessary."
    )
    bytes: int = Field(description="Size of the encoded state.")


@router.post(
    "/{session_id}/snapshot",
    response_model=SnapshotTaken,
    summary="Snapshot a session now",
    description="Write the session's whole state to the snapshot directory (crash-safely) "
    "and answer once it is on disk. 409 `snapshots_disabled` if the server was started "
    "without --snapshot-dir. 503 `snapshot_failed` / `journal_failed` when the disk failed; "
    "503 `session_busy` (Retry-After) when a push's idempotency digest is still not recorded "
    "after 5 s: nothing was saved, retry.",
    responses={
        **schemas.error_responses(404),
        409: {"model": schemas.ErrorBody, "description": "The server keeps no snapshots."},
        503: {
            "model": schemas.ErrorBody,
            "description": "Nothing was saved: the disk failed, or the session is busy.",
        },
    },
)
async def snapshot_session(session: SessionDep, service: ServiceDep) -> dict[str, Any]:
    return await run_in_threadpool(service.snapshot, session)


@router.post(
    "/{session_id}/gradients",
    summary="Push gradients: one optimizer step",
    description="Apply exactly one optimizer step with a gradient for every parameter "
    "(any supported float dtype; cast to the parameter's). Answers the new weights, or only "
    "the iteration count with return_weights=false. An error changes nothing. The body may "
    "carry base_iterations, the iteration count of the weights the gradient was computed on "
    "(required by sync sessions and by max_staleness: 409 stale_gradient when too old). In a "
    "sync session the push waits for its round: once replicas_to_aggregate gradients of the "
    "current weights have arrived, their mean is applied as one step and every push of the "
    "round gets the same answer; a round not full within round_timeout_seconds answers 503 "
    "round_timeout and applies nothing.",
    openapi_extra=schemas.GRADIENTS_BODY,
    response_class=Response,
    responses={
        200: schemas.WEIGHTS_RESPONSE,
        **schemas.error_responses(400, 404, 409, 413, 415, 422, 503),
    },
)
async def push_gradients(
    request: Request,
    session: SessionDep,
    service: ServiceDep,
    return_weights: Annotated[
        bool, Query(description="Answer the weights after the step (default) or only iterations.")
    ] = True,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="1-255 printable ASCII characters. A key seen again on this session "
            "within the window applies nothing and replays the first answer (with the "
            "response header Idempotent-Replayed: true)."
        ),
    ] = None,
) -> Response:
    body_kind(request.headers.get("content-type"), allow_json=False)
    if idempotency_key is not None and not check_key(idempotency_key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters",
            code=ErrorCode.INVALID_IDEMPOTENCY_KEY,
        )
    body = await body_of(request, service)
    async with turn(session, service):
        outcome = await run_in_threadpool(
            service.push,
            session,
            body,
            return_weights=return_weights,
            idempotency_key=idempotency_key,
        )
    # A push waiting in a sync round needs its body no more (its gradient is in the round's
    # rows): not kept for the round's whole wait, by each of its retries neither.
    del body
    content, replayed = await push_answer(session, outcome, return_weights)
    return MsgpackResponse(content, headers={"Idempotent-Replayed": "true"} if replayed else None)


async def push_answer(
    session: Session, outcome: tuple[bytes, bool] | Ticket, return_weights: bool
) -> tuple[bytes, bool]:
    """A push's answer and whether it is a replay, from :meth:`SessionService.push`."""
    if not isinstance(outcome, Ticket):
        return outcome
    # A sync round: wait for it here, on the event loop, holding no thread and not the
    # session's turn (the other pushes of the round need it); only the round's timeout
    # bounds this wait.
    result = await outcome.wait_async()
    content = round_answer(result, return_weights, outcome.returns)
    session.stats.sent(len(content))
    return content, False


@router.get(
    "/{session_id}/weights",
    summary="Pull the weights",
    description="The current weights and iteration count, a consistent view (never half a "
    "step). With min_iterations=K and wait_seconds=S the answer waits until the session reaches "
    "iteration K, or S seconds, whichever comes first.",
    response_class=Response,
    responses={200: schemas.WEIGHTS_RESPONSE, **schemas.error_responses(404, 422)},
)
async def get_weights(
    session: SessionDep,
    service: ServiceDep,
    min_iterations: Annotated[
        int | None,
        Query(
            ge=0,
            description="Answer once the session reaches this iteration count (or after "
            "wait_seconds with what it has: compare 'iterations').",
        ),
    ] = None,
    wait_seconds: Annotated[
        float,
        Query(
            ge=0,
            description="How long to wait for min_iterations, at most the server's "
            "request_timeout_seconds (default 0: answer at once). A waiting pull holds no "
            "thread.",
        ),
    ] = 0.0,
) -> Response:
    service.check_wait(min_iterations, wait_seconds)
    if min_iterations is not None:
        await session.wait_for_async(min_iterations, wait_seconds)
    async with turn(session, service):
        return MsgpackResponse(await run_in_threadpool(service.weights, session))


@router.post(
    "/{session_id}/weights/query",
    summary="Pull some weights: whole tensors, or only some rows of them",
    description="A partial pull (a read: a read-only token may call it). The msgpack body "
    "{'tensors': {name: {}, name: {'rows': <bin, int64 little-endian>}}} names the tensors "
    "to answer, and for each with 'rows' the rows to answer of it: the answer "
    "{'iterations', 'weights'} holds those tensors only, a row subset as {'dtype', 'shape' "
    "(the whole tensor's), 'indices', 'data' (len(rows) rows)}. Unknown names and rows out of "
    "range are 422 parameter_mismatch.",
    openapi_extra=schemas.QUERY_BODY,
    response_class=Response,
    responses={200: schemas.WEIGHTS_RESPONSE, **schemas.error_responses(404, 413, 415, 422)},
)
async def query_weights(request: Request, session: SessionDep, service: ServiceDep) -> Response:
    body_kind(request.headers.get("content-type"), allow_json=False)
    body = await body_of(request, service)
    async with turn(session, service):
        content = await run_in_threadpool(service.query, session, body)
    return MsgpackResponse(content)


@router.get(
    "/{session_id}/state",
    summary="Export the whole state",
    description="Weights, optimizer config, slots, scalars and iterations: enough to rebuild "
    "the session exactly with PUT.",
    response_class=Response,
    responses={200: schemas.STATE_RESPONSE, **schemas.error_responses(404)},
)
async def get_state(session: SessionDep, service: ServiceDep) -> Response:
    async with turn(session, service):
        return MsgpackResponse(await run_in_threadpool(service.state, session))


@router.put(
    "/{session_id}/state",
    response_model=schemas.SessionSummary,
    response_model_exclude_none=True,
    summary="Import a state",
    description="Replace the session's state with an exported one (200), or create the "
    "session from it if the id is free (201). The session then continues bit-for-bit as the "
    "exported one would.",
    openapi_extra=schemas.STATE_BODY,
    responses={
        201: {"model": schemas.SessionSummary, "description": "Created from the state."},
        **schemas.error_responses(400, 413, 415, 422, 507),
    },
)
async def put_state(
    session_id: SessionId, request: Request, response: Response, service: ServiceDep
) -> dict[str, Any]:
    body_kind(request.headers.get("content-type"), allow_json=False)
    body = await body_of(request, service)
    existing = service.store.find(session_id)
    if existing is not None:
        async with turn(existing, service):
            summary, created = await run_in_threadpool(service.load_state, session_id, body)
    else:
        summary, created = await run_in_threadpool(service.load_state, session_id, body)
    if created:
        response.status_code = status.HTTP_201_CREATED
    return summary
