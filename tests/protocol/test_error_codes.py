"""One enumeration of error codes feeds the server, the client and the documentation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from paramserver.client import errors as client_errors
from paramserver.codes import (
    SESSION_ID_PATTERN,
    STATUS,
    ErrorCode,
    MessageError,
    error_body,
    error_json,
    is_session_id,
    status_of,
)
from paramserver.server import errors as server_errors

REPO = Path(__file__).resolve().parents[2]


def test_every_code_has_a_status_and_a_row_in_the_protocol_docs() -> None:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_]+)`", text))
    missing = [code.value for code in ErrorCode if code.value not in documented]
    assert not missing, f"docs/protocol.md does not document {missing}"
    assert set(STATUS) == set(ErrorCode)
    assert all(400 <= status < 600 for status in STATUS.values())


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_the_client_maps_every_code_to_a_class_of_its_status(code: ErrorCode) -> None:
    cls = client_errors.error_for_status(STATUS[code], code.value)
    if STATUS[code] in (405, 406):  # no class of their own: ServerError keeps the status
        assert cls is client_errors.ServerError
        return
    assert cls.status == STATUS[code]
    error = cls("m", status=STATUS[code], code=code.value)
    assert error.code == code.value and error.status == STATUS[code]


def test_server_and_client_classes_agree_on_default_codes() -> None:
    pairs = {
        server_errors.BadRequest: client_errors.BadRequest,
        server_errors.Unauthorized: client_errors.Unauthorized,
        server_errors.Forbidden: client_errors.Forbidden,
        server_errors.SessionNotFound: client_errors.SessionNotFound,
        server_errors.SessionExists: client_errors.SessionExists,
        server_errors.RequestTimeout: client_errors.RequestTimeout,
        server_errors.PayloadTooLarge: client_errors.PayloadTooLarge,
        server_errors.UnsupportedMediaType: client_errors.UnsupportedMediaType,
        server_errors.InvalidRequest: client_errors.InvalidRequest,
        server_errors.ServiceUnavailable: client_errors.ServiceUnavailable,
        server_errors.InsufficientStorage: client_errors.InsufficientStorage,
    }
    for server_cls, client_cls in pairs.items():
        raised = server_cls("m")
        assert raised.code.value == client_cls.default_code
        assert raised.status == client_cls.status
        assert client_errors.error_for_status(raised.status, raised.code.value) is client_cls


def test_a_code_given_to_a_server_error_sets_its_status() -> None:
    err = server_errors.InvalidRequest("busy", code="session_busy")
    assert err.code is ErrorCode.SESSION_BUSY and err.status == 503
    with pytest.raises(ValueError):
        server_errors.InvalidRequest("x", code="no_such_code")


def test_the_error_body() -> None:
    assert error_body(ErrorCode.FORBIDDEN, "no") == {
        "error": {"code": "forbidden", "message": "no"}
    }
    assert json.loads(error_json(ErrorCode.SESSION_BUSY, "wait")) == {
        "error": {"code": "session_busy", "message": "wait"}
    }
    assert status_of("memory_quota_exceeded") == 507 and status_of("what") == 500
    err = MessageError("bad", code=ErrorCode.INVALID_TENSOR)
    assert isinstance(err, ValueError) and err.status == 422 and str(err) == "bad"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("a", True),
        ("run-1.2_x", True),
        ("A" * 128, True),
        ("...", True),
        (".", False),
        ("..", False),
        ("", False),
        ("A" * 129, False),
        ("a/b", False),
        ("a b", False),
        ("é", False),
        (3, False),
        (None, False),
    ],
)
def test_the_session_id_rule(value: object, valid: bool) -> None:
    assert is_session_id(value) is valid
    if isinstance(value, str):
        assert (re.fullmatch(SESSION_ID_PATTERN, value) is not None) is valid
