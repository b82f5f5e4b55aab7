"""Fuzzing the protocol's parsers in process: mutated bodies raise only protocol errors.

Mutations of valid create (msgpack and JSON), push and state bodies
(:mod:`tests.harness.body_mutations`) go through ``parse_create``, ``parse_gradients`` and
``parse_state`` with the server's request limits: only a ``ServiceError`` of status 400 or 422
may come out, and its message holds no traceback.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from paramserver.server.errors import ServiceError
from paramserver.server.protocol import decode_limits, parse_create, parse_gradients, parse_state
from paramserver.server.settings import Settings

from tests.harness.body_mutations import FUZZ, VALID, mutated_body, pack_any

LIMITS = decode_limits(Settings())


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
