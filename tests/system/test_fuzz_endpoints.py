"""Property-based fuzzing of the decoder, the protocol parsers and the live endpoints.

* In process: random bytes and mutations of valid create, push and state bodies (at the level
  of the decoded objects, then of the bytes) go through :func:`paramserver.wire.unpack`, the tensor
  decoder and the protocol parsers. Only the protocol's own errors may come out.
* Over real HTTP: the same mutated bodies, with random content types, session ids, query
  strings and idempotency keys, against every write and read endpoint of a live server. Never
  a 5xx, and whenever the answer is not 2xx, no session changed.
* Schemathesis, when installed, generates requests from ``/openapi.json`` (valid and invalid
  per the schema) and checks that none gets a server error.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from paramserver.server.errors import ServiceError
from paramserver.server.protocol import decode_limits, parse_create, parse_gradients, parse_state
from paramserver.server.settings import Settings

from paramserver import wire
from tests.harness.servers import ServerThread, start_server_thread

LIMITS = decode_limits(Settings())
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HTTP_FUZZ = settings(FUZZ, max_examples=150)
MSGPACK = "application/msgpack"
PROTECTED = ("alpha", "beta")

# --- valid bodies and their mutations -------------------------------------------------------

ALPHA_WEIGHTS = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 10,
    "b": np.array([0.5, -0.5, 1.0], np.float32),
}
BETA_WEIGHTS = {"kernel": np.linspace(-1, 1, 4)}  # float64


def plain(value: Any) -> Any:
    """A decoded message with bins as bytes, so that it can be edited and packed again."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _valid_bodies() -> dict[str, Any]:
    from paramserver.server.training import build_trainer

    from paramserver.optimizers import get as get_optimizer

    trainer = build_trainer(get_optimizer("adam"), dict(ALPHA_WEIGHTS))
    trainer.apply({k: np.ones_like(v) for k, v in ALPHA_WEIGHTS.items()})
    state = trainer.state()
    state_body = wire.pack(
        {
            "iterations": state.iterations,
            "optimizer": state.optimizer.to_dict(),
            "weights": state.weights,
            "slots": state.slots,
            "scalars": state.scalars,
        }
    )
    return {
        "create": plain(
            wire.unpack(
                wire.pack({"session_id": "new", "optimizer": "adam", "weights": ALPHA_WEIGHTS})
            )
        ),
        "create_json": {
            "session_id": "new",
            "optimizer": {"class_name": "SGD", "config": {"lr": 0.1}},
            "weights": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}},
        },
        "push": plain(
            wire.unpack(
                wire.pack({"gradients": {k: np.ones_like(v) for k, v in ALPHA_WEIGHTS.items()}})
            )
        ),
        "push_beta": plain(wire.unpack(wire.pack({"gradients": {"kernel": np.full(4, 0.25)}}))),
        "state": plain(wire.unpack(state_body)),
    }


VALID = _valid_bodies()

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=24),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Values that look like parts of a tensor map: the validation a random value rarely reaches.
near_misses = st.one_of(
    st.sampled_from(["float32", "float64", "float16", "int32", "<f4", "f4", "", "FLOAT32"]),
    st.lists(st.integers(-3, 2**33), max_size=4),
    st.lists(st.sampled_from([0, 1, 2, 3, 2**31, 2**62]), max_size=34),
    st.binary(max_size=64),
    st.sampled_from([math.nan, math.inf, -math.inf, 2**70, -1, True, 1e308]),
    st.sampled_from(["sgd", "adam", "nadam", "nope", {"class_name": "SGD", "config": {}}]),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    out = list(value)
    out[head] = _replace(value[head], rest, new)
    return out


def _delete(value: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k != path[0]}
        return [v for i, v in enumerate(value) if i != path[0]]
    head = path[0]
    return _replace(value, (head,), _delete(value[head], path[1:]))


@st.composite
def mutated_object(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with up to three values replaced, deleted or added somewhere in its tree."""
    value = base
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(value))
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "near", "delete", "add"]))
        if action == "delete" and path:
            value = _delete(value, path)
        elif action == "add":
            target = value
            for step in path:
                target = target[step]
            if isinstance(target, dict):
                extra = draw(st.text(max_size=8))
                value = _replace(value, path, {**target, extra: draw(msgpack_values)})
            elif isinstance(target, list):
                value = _replace(value, path, [*target, draw(msgpack_values)])
        else:
            new = draw(near_misses if action == "near" else msgpack_values)
            value = _replace(value, path, new)
    return value


def pack_any(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return b"\xc1"


edit = st.tuples(
    st.sampled_from(["set", "insert", "delete", "cut"]),
    st.integers(0, 2**20),
    st.binary(min_size=1, max_size=8),
)


def edited(body: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(body)
    for kind, pos, data in edits:
        i = pos % (len(out) + 1)
        if kind == "set":
            out[i : i + len(data)] = data
        elif kind == "insert":
            out[i:i] = data
        elif kind == "delete":
            del out[i : i + len(data)]
        else:
            del out[i:]
    return bytes(out)


@st.composite
def mutated_body(draw: st.DrawFn, name: str) -> bytes:
    """A valid body of kind ``name``, mutated as an object and then as bytes."""
    base = VALID[name]
    value = draw(mutated_object(base))
    body = json.dumps(value, default=str).encode() if name == "create_json" else pack_any(value)
    return edited(body, draw(st.lists(edit, max_size=3)))


# --- the decoder and the parsers, in process ------------------------------------------------


def unpack_and_decode(body: bytes) -> None:
    """The wire layer alone: only MalformedBody and TensorError may come out."""
    value = wire.unpack(body, LIMITS)
    if isinstance(value, dict):
        for part in value.values():
            if isinstance(part, dict):
                try:
                    arrays = wire.decode_tensor_map(part, field="x", limits=LIMITS)
                except wire.TensorError:
                    continue
                for name, arr in arrays.items():
                    tensor = part[name]
                    assert arr.dtype == wire.TENSOR_DTYPES[tensor["dtype"]]
                    assert list(arr.shape) == tensor["shape"]
                    assert arr.nbytes == len(tensor["data"])


@FUZZ
@given(
    st.binary(max_size=300) | mutated_body("push") | mutated_body("state") | mutated_body("create")
)
def test_the_wire_layer_raises_only_its_own_errors(body: bytes) -> None:
    try:
        unpack_and_decode(body)
    except (wire.MalformedBody, wire.TensorError):
        pass


@FUZZ
@given(st.data())
def test_the_parsers_raise_only_protocol_errors(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["create", "create_json", "push", "state"]))
    body = data.draw(mutated_body(name))
    try:
        if name == "push":
            parse_gradients(body, LIMITS)
        elif name == "state":
            parse_state(body, LIMITS)
        else:
            parse_create(body, "json" if name == "create_json" else "msgpack", LIMITS)
    except ServiceError as exc:
        assert exc.status in (400, 422), exc
        assert "Traceback" not in exc.message


def test_the_valid_bodies_parse() -> None:
    """The fuzzers start from valid bodies: check that they are."""
    parse_gradients(pack_any(VALID["push"]), LIMITS)
    parse_state(pack_any(VALID["state"]), LIMITS)
    parse_create(pack_any(VALID["create"]), "msgpack", LIMITS)
    parse_create(json.dumps(VALID["create_json"]).encode(), "json", LIMITS)


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "dtype": near_misses | msgpack_values,
            "shape": near_misses | msgpack_values,
            "data": near_misses | msgpack_values,
            "extra": msgpack_values,
        },
    )
)
def test_decode_tensor_raises_only_tensor_error(obj: dict[str, Any]) -> None:
    try:
        arr = wire.decode_tensor(obj, limits=LIMITS)
    except wire.TensorError:
        return
    assert arr.nbytes == len(obj["data"])
    assert list(arr.shape) == obj["shape"]


# --- the endpoints, over HTTP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    srv = start_server_thread()
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
            r = client.post("/sessions", content=body, headers={"Content-Type": MSGPACK})
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
        MSGPACK,
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
            content_types | st.just("application/json" if kind == "create_json" else MSGPACK)
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


# --- schemathesis ---------------------------------------------------------------------------


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

    @schemathesis.serializer(MSGPACK, "application/x-msgpack")
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
