"""Fuzzing the protocol's parsers in process: mutated bodies raise only protocol errors.

Mutations of valid create (msgpack and JSON), push and state bodies
(:mod:`tests.harness.body_mutations`) go through ``decode_create``, ``decode_push`` and
``decode_state`` with the server's request limits: only a ``MessageError`` of status 400 or 422
may come out, and its message holds no traceback.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from paramserver.codes import MessageError
from paramserver.messages import decode_create, decode_push, decode_state
from paramserver.server.protocol import decode_limits
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
            decode_push(body, LIMITS)
        elif name == "state":
            decode_state(body, LIMITS)
        else:
            decode_create(body, "json" if name == "create_json" else "msgpack", LIMITS)
    except MessageError as exc:
        assert exc.status in (400, 422), exc
        assert "Traceback" not in exc.message


def test_the_valid_bodies_parse() -> None:
    """The fuzzers start from valid bodies: check that they are."""
    decode_push(pack_any(VALID["push"]), LIMITS)
    decode_state(pack_any(VALID["state"]), LIMITS)
    decode_create(pack_any(VALID["create"]), "msgpack", LIMITS)
    decode_create(json.dumps(VALID["create_json"]).encode(), "json", LIMITS)
