"""The routes: ``/health`` answers, and the OpenAPI schema documents every route and the
msgpack bodies (the error answers of unknown routes: ``test_error_bodies.py``).
"""

from __future__ import annotations

import json

import httpx

from tests.harness.http_api import MSGPACK_TYPE


def test_health(api: httpx.Client) -> None:
    r = api.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_openapi_documents_every_route_and_the_msgpack_bodies(api: httpx.Client) -> None:
    r = api.get("/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    paths = schema["paths"]
    routes = {(path, method) for path, ops in paths.items() for method in ops}
    assert routes >= {
        ("/health", "get"),
        ("/sessions", "get"),
        ("/sessions", "post"),
        ("/sessions/{session_id}", "get"),
        ("/sessions/{session_id}", "delete"),
        ("/sessions/{session_id}/gradients", "post"),
        ("/sessions/{session_id}/weights", "get"),
        ("/sessions/{session_id}/state", "get"),
        ("/sessions/{session_id}/state", "put"),
    }

    def body_types(path: str, method: str) -> set[str]:
        return set(paths[path][method]["requestBody"]["content"])

    assert body_types("/sessions", "post") >= {
        MSGPACK_TYPE,
        "application/x-msgpack",
        "application/json",
    }
    assert body_types("/sessions/{session_id}/gradients", "post") >= {
        MSGPACK_TYPE,
        "application/x-msgpack",
    }
    assert body_types("/sessions/{session_id}/state", "put") >= {
        MSGPACK_TYPE,
        "application/x-msgpack",
    }
    gradients = paths["/sessions/{session_id}/gradients"]["post"]["requestBody"]["content"][
        MSGPACK_TYPE
    ]
    text = json.dumps(gradients)
    assert "gradients" in text and "dtype" in text and "shape" in text and "binary" in text
    for path in (
        "/sessions/{session_id}/weights",
        "/sessions/{session_id}/state",
        "/sessions/{session_id}/gradients",
    ):
        method = "post" if path.endswith("gradients") else "get"
        assert MSGPACK_TYPE in paths[path][method]["responses"]["200"]["content"], path
    for path, method, status in [
        ("/sessions", "post", "409"),
        ("/sessions", "post", "413"),
        ("/sessions", "post", "415"),
        ("/sessions", "post", "422"),
        ("/sessions/{session_id}/gradients", "post", "404"),
        ("/sessions/{session_id}/gradients", "post", "400"),
        ("/sessions/{session_id}/state", "put", "413"),
        ("/sessions/{session_id}", "delete", "404"),
    ]:
        assert status in paths[path][method]["responses"], (path, method, status)
    # The JSON create body is described by a model in the components.
    json_schema = paths["/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = json_schema["$ref"].rsplit("/", 1)[-1]
    assert {"optimizer", "weights"} <= set(schema["components"]["schemas"][ref]["properties"])
