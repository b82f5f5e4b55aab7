"""Fuzzing a live server over real HTTP: never a 5xx, and a refusal changes no session.

* Mutated bodies (:mod:`tests.harness.body_mutations`) with random content types, session ids,
  query strings and idempotency keys, against every write and read endpoint: whenever the
  answer is not 2xx, the sessions ``alpha`` and ``beta`` and the list of sessions are unchanged.
* Schemathesis generates requests from ``/openapi.json`` (valid and invalid per the schema) and
  checks that none gets a server error.

The same mutations in process, against the decoder and the parsers:
``tests/protocol/test_fuzz_wire.py`` and ``tests/server/test_fuzz_parsers.py``.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from paramserver import wire
from paramserver.server.settings import Settings
from tests.harness.body_mutations import (
    ALPHA_WEIGHTS,
    BETA_WEIGHTS,
    FUZZ,
    PROTECTED,
    mutated_body,
    pack_any,
)
from tests.harness.http_api import MSGPACK_TYPE
from tests.harness.servers import ServerThread, start_server_thread

HTTP_FUZZ = settings(FUZZ, max_examples=150)


# --- the endpoints, over HTTP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    # A waiting pull may wait up to the request timeout (wait_seconds is bounded by it): kept
    # well under the fuzzer's own read timeout (30 s), so a valid long wait is not a failure.
    srv = start_server_thread(request_timeout_seconds=2.0)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(fuzz_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        for sid, optimizer, weights in (
            ("alpha", "adam", ALPHA_WEIGHTS),
            ("beta", "sgd", BETA_WEIGHTS),
        ):
            body = wire.pack({"session_id": sid, "optimizer": optimizer, "weights": weights})
            r = client.post("/sessions", content=body, headers={"Content-Type": MSGPACK_TYPE})
            assert r.status_code == 201, r.text
        yield client


def observed(http: httpx.Client) -> dict[str, Any]:
    """The ids of all sessions and the full state of the protected ones."""
    listing = http.get("/sessions")
    assert listing.status_code == 200, listing.text
    out: dict[str, Any] = {"ids": sorted(s["session_id"] for s in listing.json()["sessions"])}
    for sid in PROTECTED:
        r = http.get(f"/sessions/{sid}/state")
        assert r.status_code == 200, r.text
        out[sid] = r.content
    return out


content_types = st.sampled_from(
    [
        MSGPACK_TYPE,
        "application/x-msgpack",
        "application/msgpack; charset=utf-8",
        "Application/MsgPack",
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "",
    ]
) | st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=30).map(str.strip)


session_ids = (
    st.sampled_from([*PROTECTED, "missing", "a" * 128, "a" * 129, ".", "..", "-", "_x.y-z"])
    | st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)
    | st.text(max_size=20)
)


idempotency_keys = st.none() | st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=20
)


@st.composite
def http_requests(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(["create", "create_json", "push", "push_beta", "state", "read", "delete"])
    )
    sid = draw(session_ids)
    path_sid = quote(sid, safe="") or "%20"
    headers: dict[str, str | bytes] = {}
    params: dict[str, str] = {}
    content: bytes | None = None
    if kind == "read":
        method = "GET"
        path = draw(
            st.sampled_from(
                ["/sessions", "/sessions/{}", "/sessions/{}/weights", "/sessions/{}/state"]
            )
        ).format(path_sid)
    elif kind == "delete":
        method, path = "DELETE", f"/sessions/{path_sid}"
        if sid in PROTECTED or sid == "":
            path = f"/sessions/{path_sid}-gone"
    else:
        content = draw(mutated_body(kind))
        headers["Content-Type"] = draw(
            content_types | st.just("application/json" if kind == "create_json" else MSGPACK_TYPE)
        )
        if kind.startswith("create"):
            method, path = "POST", "/sessions"
        elif kind.startswith("push"):
            target = "beta" if kind == "push_beta" else sid
            method, path = "POST", f"/sessions/{quote(target, safe='') or '%20'}/gradients"
            key = draw(idempotency_keys)
            if key is not None:
                headers["Idempotency-Key"] = key.encode("latin-1")
            choice = draw(st.sampled_from([None, "true", "false", "0", "1", "", "maybe"]))
            if choice is not None:
                params["return_weights"] = choice
        else:
            method, path = "PUT", f"/sessions/{path_sid}/state"
    return {"method": method, "url": path, "content": content, "headers": headers, "params": params}


def check_error_body(r: httpx.Response) -> None:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert "Traceback" not in r.text and 'File "' not in r.text


@HTTP_FUZZ
@given(request=http_requests())
def test_endpoints_never_5xx_and_refusals_change_nothing(
    http: httpx.Client, request: dict[str, Any]
) -> None:
    before = observed(http)
    try:
        r = http.request(**request)
    except httpx.LocalProtocolError:
        return  # a header value httpx itself will not send
    assert r.status_code < 500, (request["method"], request["url"], r.status_code, r.text)
    event(f"{request['method']} -> {r.status_code}")
    if r.status_code >= 300:
        if r.status_code >= 400 and r.headers.get("content-type") == "application/json":
            check_error_body(r)
        assert observed(http) == before, (request["method"], request["url"], r.status_code)


# --- schemathesis -----------------------------------------------------------------------------


def _operations() -> list[tuple[str, str]]:
    """(label, generation mode) for every operation of the OpenAPI schema.

    Negative cases need something the schema constrains: a body, a query or a header (a
    path's session id is any string, so there is no invalid one to generate).
    """
    from paramserver.server.main import create_app

    schema = create_app(Settings(warm_up_kernels=False)).openapi()
    out = []
    for path, operations in schema["paths"].items():
        for method, spec in operations.items():
            label = f"{method.upper()} {path}"
            out.append((label, "positive"))
            constrained = [p for p in spec.get("parameters", []) if p["in"] != "path"]
            if "requestBody" in spec or constrained:
                out.append((label, "negative"))
    return sorted(out)


ST_CASES = _operations()


@pytest.fixture(scope="module")
def openapi_schema(fuzz_server: ServerThread, http: httpx.Client) -> Any:
    schemathesis = pytest.importorskip("schemathesis")

    @schemathesis.serializer(MSGPACK_TYPE, "application/x-msgpack")
    def _msgpack(ctx: Any, value: Any) -> bytes:
        return pack_any(value)

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = {result.ok().label: result.ok() for result in schema.get_all_operations()}
    assert set(operations) == {label for label, _ in ST_CASES}
    return operations


@pytest.mark.parametrize(("label", "mode"), ST_CASES, ids=[f"{lb} {m}" for lb, m in ST_CASES])
def test_schemathesis_finds_no_server_error(
    openapi_schema: dict[str, Any],
    fuzz_server: ServerThread,
    http: httpx.Client,
    label: str,
    mode: str,
) -> None:
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    operation = openapi_schema[label]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    # Aim half of the session routes at a live session, and never delete one of those.
    aim = st.sampled_from([None, *PROTECTED]) if "{session_id}" in label else st.none()

    @settings(
        max_examples=25,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # a failure is reported, not shrunk for minutes
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=strategy, target=aim)
    def run(case: Any, target: str | None) -> None:
        params = dict(case.path_parameters or {})
        if label.startswith("DELETE"):
            if params.get("session_id") in PROTECTED:
                params["session_id"] = "not-protected"
        elif target is not None:
            params["session_id"] = target
        case.path_parameters = params
        before = observed(http)
        response = case.call(base_url=fuzz_server.url, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            assert observed(http) == before, (label, response.status_code)

    try:
        run()
    except Unsatisfiable:
        pytest.skip(f"no {mode} case can be generated for {label}")
