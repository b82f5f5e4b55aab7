"""Routes of the sessions resource. Each reads its body, then runs the operation in a thread."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from client.wire import MSGPACK_MEDIA_TYPE

from ..protocol import body_kind
from ..service import SessionService
from ..sessions import SESSION_ID_PATTERN, Session
from . import schemas
from .bodies import read_body

router = APIRouter(prefix="/sessions", tags=["sessions"])

SessionId = Annotated[
    str,
    Path(description=f"1-128 characters of [A-Za-z0-9._-] (pattern {SESSION_ID_PATTERN})"),
]


def get_service(request: Request) -> SessionService:
    service: SessionService = request.app.state.service
    return service


ServiceDep = Annotated[SessionService, Depends(get_service)]


def get_session(session_id: SessionId, service: ServiceDep) -> Session:
    return service.store.get(session_id)


SessionDep = Annotated[Session, Depends(get_session)]


def msgpack_response(content: bytes, status_code: int = 200) -> Response:
    return Response(content=content, status_code=status_code, media_type=MSGPACK_MEDIA_TYPE)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.CreateSessionResponse,
    summary="Create a session",
    description="Create an optimizer session from initial weights and an optimizer (a name "
    "with defaults, or a Keras config). The body is msgpack (tensor data as bin) or JSON "
    "(tensor data as a flat list of numbers).",
    openapi_extra=schemas.CREATE_BODY,
    responses=schemas.error_responses(400, 409, 413, 415, 422, 507),
)
async def create_session(request: Request, service: ServiceDep) -> dict:  # type: ignore[type-arg]
    kind = body_kind(request.headers.get("content-type"), allow_json=True)
    body = await read_body(request, service.settings.max_body_bytes)
    return await run_in_threadpool(service.create, body, kind)


@router.get(
    "",
    response_model=schemas.SessionList,
    summary="List sessions",
)
async def list_sessions(service: ServiceDep) -> dict:  # type: ignore[type-arg]
    return {"sessions": await run_in_threadpool(service.list)}


@router.get(
    "/{session_id}",
    response_model=schemas.SessionSummary,
    summary="Describe a session",
    responses=schemas.error_responses(404),
)
async def get_session_summary(session: SessionDep, service: ServiceDep) -> dict:  # type: ignore[type-arg]
    async with session.turn:
        return await run_in_threadpool(service.summary, session)


@router.delete(
    "/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a session",
    responses=schemas.error_responses(404),
)
async def delete_session(session_id: SessionId, service: ServiceDep) -> Response:
    service.store.delete(session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{session_id}/gradients",
    summary="Push gradients: one optimizer step",
    description="Apply exactly one optimizer step with a gradient for every parameter "
    "(any supported float dtype; cast to the parameter's). Answers the new weights, or only "
    "the iteration count with return_weights=false. An error changes nothing.",
    openapi_extra=schemas.GRADIENTS_BODY,
    response_class=Response,
    responses={200: schemas.WEIGHTS_RESPONSE, **schemas.error_responses(400, 404, 413, 415, 422)},
)
async def push_gradients(
    request: Request,
    session: SessionDep,
    service: ServiceDep,
    return_weights: Annotated[
        bool, Query(description="Answer the weights after the step (default) or only iterations.")
    ] = True,
) -> Response:
    body_kind(request.headers.get("content-type"), allow_json=False)
    body = await read_body(request, service.settings.max_body_bytes)
    async with session.turn:
        content = await run_in_threadpool(
            service.push, session, body, return_weights=return_weights
        )
    return msgpack_response(content)


@router.get(
    "/{session_id}/weights",
    summary="Pull the weights",
    response_class=Response,
    responses={200: schemas.WEIGHTS_RESPONSE, **schemas.error_responses(404)},
)
async def get_weights(session: SessionDep, service: ServiceDep) -> Response:
    async with session.turn:
        return msgpack_response(await run_in_threadpool(service.weights, session))


@router.get(
    "/{session_id}/state",
    summary="Export the whole state",
    description="Weights, optimizer config, slots, scalars and iterations: enough to rebuild "
    "the session exactly with PUT.",
    response_class=Response,
    responses={200: schemas.STATE_RESPONSE, **schemas.error_responses(404)},
)
async def get_state(session: SessionDep, service: ServiceDep) -> Response:
    async with session.turn:
        return msgpack_response(await run_in_threadpool(service.state, session))


@router.put(
    "/{session_id}/state",
    response_model=schemas.SessionSummary,
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
) -> dict:  # type: ignore[type-arg]
    body_kind(request.headers.get("content-type"), allow_json=False)
    body = await read_body(request, service.settings.max_body_bytes)
    existing = service.store.find(session_id)
    if existing is not None:
        async with existing.turn:
            summary, created = await run_in_threadpool(service.load_state, session_id, body)
    else:
        summary, created = await run_in_threadpool(service.load_state, session_id, body)
    if created:
        response.status_code = status.HTTP_201_CREATED
    return summary
