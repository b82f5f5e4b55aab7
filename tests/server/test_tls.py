"""TLS: ``paramserver serve --ssl-certfile/--ssl-keyfile`` (and client certificates with
``--ssl-ca-certs``), the clients' ``verify=`` and ``cert=``, with certificates made at test time
by trustme and servers run as processes on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trustme

from paramserver.client import AsyncClient, Client, errors
from tests.harness.servers import HOST, ServerProcess, start_paramserver

WEIGHTS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(3, np.float32)]
GRADS = [np.ones((2, 3), np.float32), np.full(3, 0.5, np.float32)]


class Certificates:
    """A CA, the server's certificate for 127.0.0.1, and client certificates (one from the
    same CA, one from a stranger's), as PEM files in a directory."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        server = self.ca.issue_cert(HOST, "localhost")
        self.ca_pem = directory / "ca.pem"
        self.server_cert = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.client_pem = directory / "client.pem"  # certificate and key in one file
        self.stranger_pem = directory / "stranger.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        server.private_key_pem.write_to_path(str(self.server_key))
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        for pem in server.cert_chain_pems[1:]:
            pem.write_to_path(str(self.server_cert), append=True)
        self.ca.issue_cert("worker-1@example.org").private_key_and_cert_chain_pem.write_to_path(
            str(self.client_pem)
        )
        stranger = trustme.CA().issue_cert("mallory@example.org")
        stranger.private_key_and_cert_chain_pem.write_to_path(str(self.stranger_pem))

    def client_context(self, cert: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        if cert is not None:
            context.load_cert_chain(str(cert))
        return context

    def server_options(self) -> dict[str, str]:
        return {"ssl_certfile": str(self.server_cert), "ssl_keyfile": str(self.server_key)}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(
    certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = start_paramserver(
        tmp_path_factory.mktemp("tls-server"),
        tls=certs.client_context(),
        tokens="tls-secret",
        header_timeout_seconds=1,
        **certs.server_options(),
    )
    yield server
    server.stop()


def _train(client: Client) -> None:
    session = client.create_session(WEIGHTS, "adam")
    pushed = session.push(GRADS)
    assert session.last_iterations == 1
    pulled = session.pull()
    for a, b in zip(pushed, pulled, strict=True):
        np.testing.assert_array_equal(a, b)
    state = session.state()
    session.load_state(state)
    assert session.info().iterations == 1
    session.delete()


def test_the_server_serves_https_and_the_client_verifies_it_against_a_ca_file(
    tls_server: ServerProcess, certs: Certificates
):
    assert tls_server.url.startswith("https://")
    with Client(tls_server.url, token="tls-secret", verify=str(certs.ca_pem)) as client:
        _train(client)
    with Client(tls_server.url, token="tls-secret", verify=certs.client_context()) as client:
        _train(client)


def test_the_async_client_speaks_tls_on_every_call(tls_server: ServerProcess, certs: Certificates):
    async def run() -> None:
        async with AsyncClient(tls_server.url, token="tls-secret", verify=certs.ca_pem) as client:
            session = await client.create_session(WEIGHTS, "sgd")
            weights = await session.push(GRADS)
            np.testing.assert_allclose(weights[0], WEIGHTS[0] - 0.01, rtol=1e-6)
            assert (await session.info()).iterations == 1
            await session.load_state(await session.state())
            await session.delete()

    asyncio.run(run())


def test_a_certificate_the_client_does_not_trust_fails_at_once_and_is_not_retried(
    tls_server: ServerProcess,
):
    with Client(tls_server.url, token="tls-secret", retries=3) as client:  # default roots
        with pytest.raises(errors.TransportError) as info:
            client.health()
    assert info.value.attempts == 1
    assert "TLS failure" in str(info.value) and "verify=" in str(info.value)


def test_verify_false_skips_the_check(tls_server: ServerProcess):
    with Client(tls_server.url, token="tls-secret", verify=False) as client:
        assert client.health()["status"] == "ok"


def test_plain_http_to_a_tls_port_gets_no_answer(tls_server: ServerProcess):
    with Client(tls_server.url.replace("https", "http"), retries=0) as client:
        with pytest.raises(errors.TransportError):
            client.health()


def test_a_bad_ca_file_or_client_certificate_is_a_clear_value_error(certs: Certificates, tmp_path):
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="cannot load the CA bundle"):
        Client("https://127.0.0.1:1", verify=str(missing))
    with pytest.raises(ValueError, match="cannot load the certificate"):
        Client("https://127.0.0.1:1", verify=str(certs.ca_pem), cert=str(missing))


def test_a_tls_connection_that_never_handshakes_is_closed_at_the_header_timeout(
    tls_server: ServerProcess,
):
    with socket.create_connection((HOST, tls_server.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server, no byte of a handshake sent
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_client_certificates(mode: str, certs: Certificates, tmp_path):
    server = start_paramserver(
        tmp_path,
        tls=certs.client_context(certs.client_pem),
        ssl_ca_certs=str(certs.ca_pem),
        ssl_client_cert=mode,
        **certs.server_options(),
    )
    try:
        with Client(server.url, verify=certs.ca_pem, cert=certs.client_pem) as client:
            _train(client)
        with Client(server.url, verify=certs.ca_pem, retries=2) as client:
            if mode == "required":
                # TLS 1.3 refuses the missing certificate after the client's side of the
                # handshake: the client sees the connection closed (or the alert).
                with pytest.raises(errors.TransportError):
                    client.health()
            else:
                _train(client)
        with Client(server.url, verify=certs.ca_pem, cert=certs.stranger_pem) as client:
            with pytest.raises(errors.TransportError):  # a certificate of another CA
                client.health()
        assert f"client certificates {mode}" in server.log
    finally:
        server.stop()


def test_tokens_without_tls_on_a_network_address_are_warned_about(certs: Certificates, tmp_path):
    warning = "tokens are set but TLS is not"
    plain = ServerProcess.paramserver(
        log_dir=tmp_path, host="0.0.0.0", tokens_file=_tokens(tmp_path), warm_up_kernels=False
    )
    with plain:
        assert warning in plain.log
    with ServerProcess.paramserver(
        log_dir=tmp_path,
        tls=certs.client_context(),
        host="0.0.0.0",
        tokens_file=_tokens(tmp_path),
        warm_up_kernels=False,
        **certs.server_options(),
    ) as secure:
        assert "TLS on" in secure.log
        assert "Uvicorn running on https://0.0.0.0:" in secure.log
        assert warning not in secure.log
    loopback = ServerProcess.paramserver(
        log_dir=tmp_path, tokens_file=_tokens(tmp_path), warm_up_kernels=False
    )
    with loopback:
        assert warning not in loopback.log


def _tokens(directory: Path) -> str:
    path = directory / "tokens"
    path.write_text("a-token\n")
    return str(path)


def test_a_certificate_that_does_not_load_stops_the_start_with_exit_2(
    certs: Certificates, tmp_path
):
    server = ServerProcess.paramserver(
        log_dir=tmp_path,
        ssl_certfile=str(certs.ca_pem),  # a certificate without its key
        warm_up_kernels=False,
    ).launch()
    assert server.wait_exit() == 2
    assert "cannot load the certificate" in server.log
    server.stop()


def test_a_key_or_ca_file_without_a_certificate_is_refused(tmp_path):
    server = ServerProcess.paramserver(
        log_dir=tmp_path, ssl_keyfile=str(tmp_path / "key.pem"), warm_up_kernels=False
    ).launch()
    assert server.wait_exit() == 2
    assert "need ssl_certfile" in server.log
    server.stop()


def _health(server: ServerProcess, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``paramserver health`` with the server's settings in the environment, as in a container."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVER_")}
    environment.update(PARAMSERVER_PORT=str(server.port), **env)
    return subprocess.run(
        [sys.executable, "-m", "paramserver", "health", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_health_command_checks_plain_and_tls_servers(
    tls_server: ServerProcess, certs: Certificates, tmp_path
):
    tls_env = {"PARAMSERVER_SSL_CERTFILE": str(certs.server_cert)}
    assert _health(tls_server, **tls_env).returncode == 0
    assert _health(tls_server).returncode == 1  # plain http to a TLS port
    with ServerProcess.paramserver(log_dir=tmp_path, warm_up_kernels=False) as plain:
        assert _health(plain).returncode == 0
        port = plain.port
    nothing = _health(plain)
    assert nothing.returncode == 1 and "refused" in nothing.stderr.lower(), (port, nothing)


def test_the_health_command_presents_a_client_certificate_when_one_is_required(
    certs: Certificates, tmp_path
):
    server = start_paramserver(
        tmp_path,
        tls=certs.client_context(certs.client_pem),
        ssl_ca_certs=str(certs.ca_pem),
        **certs.server_options(),
    )
    try:
        env = {"PARAMSERVER_SSL_CERTFILE": str(certs.server_cert)}
        assert _health(server, "--cert", str(certs.client_pem), **env).returncode == 0
        assert _health(server, **env).returncode == 1
    finally:
        server.stop()


def test_the_data_plane_speaks_tls_too_and_the_client_takes_it(
    tls_server: ServerProcess, certs: Certificates
):
    from paramserver.client.dataplane import DataPlaneChannel

    with Client(tls_server.url, token="tls-secret", verify=certs.ca_pem) as client:
        announced = client._http.get("/data-plane").json()
        assert announced["tls"] is True
        session = client.create_session(WEIGHTS, "sgd")
        out = [np.empty_like(w) for w in WEIGHTS]
        session.push(GRADS, out=out)
        np.testing.assert_allclose(out[0], WEIGHTS[0] - 0.01, rtol=1e-6)
        assert isinstance(client._plane, DataPlaneChannel) and client._plane.tls is not None
        session.delete()
    with socket.create_connection((HOST, announced["port"]), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""  # no handshake: closed at the header timeout (1 s)
        assert time.monotonic() - started < 5
    with Client(tls_server.url, token="tls-secret", retries=0) as untrusting:
        with pytest.raises(errors.TransportError):  # default roots: the CA is not trusted
            untrusting.health()


def test_small_http_pushes_served_by_the_connection_speak_tls(
    certs: Certificates, tmp_path: Path
) -> None:
    """With the kernels warm, a small HTTP push is answered by the connection itself (below
    ASGI): over TLS its answers are the data plane's, bit for bit, and a read-only token is
    refused without a step."""
    server = start_paramserver(
        tmp_path,
        tls=certs.client_context(),
        tokens="tls-secret,tls-reader:ro",
        warm_up_kernels=True,
        **certs.server_options(),
    )
    try:
        server.wait_warm()  # only then are small pushes served below ASGI
        with (
            Client(server.url, token="tls-secret", verify=certs.ca_pem, data_plane=False) as http,
            Client(server.url, token="tls-secret", verify=certs.ca_pem) as plane,
        ):
            over_http = http.create_session(WEIGHTS, "adam")
            over_plane = plane.create_session(WEIGHTS, "adam")
            for step in range(1, 21):
                grads = [g * np.float32(step) for g in GRADS]
                a, b = over_http.push(grads), over_plane.push(grads)
                for x, y in zip(a, b, strict=True):
                    np.testing.assert_array_equal(x, y)
            assert over_http.last_iterations == 20 == over_plane.last_iterations
            with Client(
                server.url, token="tls-reader", verify=certs.ca_pem, data_plane=False, retries=0
            ) as reader:
                with pytest.raises(errors.Forbidden):
                    reader.session(over_http.id).push(GRADS)
            assert over_http.info().iterations == 20
    finally:
        server.stop()
