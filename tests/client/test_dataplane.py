"""The clients' lean path: push and pull over the data plane, with every client behaviour kept
(errors, retries, deadline, tokens), ``out=``, ownership of returned arrays, and the fallback
to HTTP wherever the data plane cannot serve."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import msgpack
import numpy as np
import pytest

from paramserver.client import AsyncClient, Client, errors
from paramserver.client.dataplane import DataPlaneChannel

WEIGHTS = {
    "kernel": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "bias": np.zeros(4, np.float32),
}


def _grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {name: rng.normal(size=w.shape).astype(np.float32) for name, w in WEIGHTS.items()}


def test_push_and_pull_go_over_the_data_plane_and_match_http_bit_for_bit(server_factory):
    server = server_factory()
    with Client(server.url) as lean, Client(server.url, data_plane=False) as plain:
        a = lean.create_session(WEIGHTS, "nadam")
        b = plain.create_session(WEIGHTS, "nadam")
        for step in range(4):
            got = a.push(_grads(step))
            expected = b.push(_grads(step))
        assert isinstance(lean._plane, DataPlaneChannel) and plain._plane is False
        for name in WEIGHTS:
            assert got[name].tobytes() == expected[name].tobytes()
            assert a.pull()[name].tobytes() == b.pull()[name].tobytes()
        assert a.last_iterations == 4 and a.info().iterations == 4


def test_out_receives_the_weights_in_place(server_factory):
    server = server_factory()
    with Client(server.url) as client:
        session = client.create_session(WEIGHTS, "sgd")
        out = {name: np.empty_like(w) for name, w in WEIGHTS.items()}
        result = session.push(_grads(0), out=out)
        assert result is out
        expected = session.pull()
        for name in WEIGHTS:
            np.testing.assert_array_equal(out[name], expected[name])
        listed = client.create_session(list(WEIGHTS.values()), "sgd")
        targets = [np.empty_like(w) for w in WEIGHTS.values()]
        assert listed.push(list(_grads(0).values()), out=targets) is targets
        assert listed.pull(out=[np.empty_like(w) for w in WEIGHTS.values()])[0].shape == (3, 4)
        wide = {name: np.empty(w.shape, np.float64) for name, w in WEIGHTS.items()}
        session.pull(out=wide)  # another dtype: received, then copied (cast) into it
        np.testing.assert_array_equal(wide["kernel"], expected["kernel"].astype(np.float64))


def test_arrays_a_push_returns_belong_to_the_caller(server_factory):
    server = server_factory()
    with Client(server.url) as client:
        session = client.create_session(WEIGHTS, "sgd")
        first = session.push(_grads(0))
        kept = {name: a.copy() for name, a in first.items()}
        session.push(_grads(1))
        session.pull()
        for name in WEIGHTS:
            np.testing.assert_array_equal(first[name], kept[name])
            assert first[name].flags.writeable


def test_errors_over_the_data_plane_are_the_typed_errors(server_factory):
    server = server_factory()
    with Client(server.url) as client:
        session = client.create_session(WEIGHTS, "sgd")
        with pytest.raises(errors.InvalidRequest) as info:
            session.push({"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)})
        assert info.value.code == "parameter_mismatch"
        with pytest.raises(errors.InvalidRequest) as info:
            session.push(
                {"kernel": np.full((3, 4), np.inf, np.float32), "bias": np.zeros(4, np.float32)}
            )
        assert info.value.code == "non_finite_gradient"
        session.delete()
        with pytest.raises(errors.SessionNotFound):
            session.push(_grads(0))
        with pytest.raises(errors.SessionNotFound):
            session.pull()
        assert isinstance(client._plane, DataPlaneChannel)


def test_tokens_travel_in_the_hello(server_factory):
    server = server_factory(tokens="writer,reader:ro")
    with Client(server.url, token="writer") as writer:
        session = writer.create_session(WEIGHTS, "sgd")
        session.push(_grads(0))
        assert isinstance(writer._plane, DataPlaneChannel)
    with Client(server.url, token="reader") as reader:
        handle = reader.session(session.id)
        assert handle.pull()["bias"].shape == (4,)
        with pytest.raises(errors.Forbidden):
            handle.push(_grads(1))
        assert handle.info().iterations == 1
    with Client(server.url, token="wrong") as stranger, pytest.raises(errors.Unauthorized):
        stranger.session(session.id)


def test_a_retried_key_is_applied_once_and_its_weights_pulled(server_factory):
    server = server_factory()
    with Client(server.url) as client:
        session = client.create_session(WEIGHTS, "sgd")
        first = session.push(_grads(0), idempotency_key="same")
        again = session.push(_grads(0), idempotency_key="same")  # replayed: weights pulled
        assert session.info().iterations == 1
        for name in WEIGHTS:
            np.testing.assert_array_equal(first[name], again[name])
        with pytest.raises(errors.InvalidRequest) as info:
            session.push(_grads(5), idempotency_key="same")
        assert info.value.code == "idempotency_key_reused"


def test_without_a_data_plane_the_client_stays_on_http(server_factory):
    server = server_factory(data_plane=False)
    with Client(server.url) as client:
        session = client.create_session(WEIGHTS, "adam")
        session.push(_grads(0))
        assert client._plane is False and session.last_iterations == 1


def test_a_data_plane_that_refuses_connections_falls_back_to_http(server_factory):
    server = server_factory()
    with Client(server.url, retries=2) as client:
        session = client.create_session(WEIGHTS, "sgd")
        session.push(_grads(0))
        plane = client._plane
        assert isinstance(plane, DataPlaneChannel)
        plane.close()
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            plane.port = probe.getsockname()[1]
        session.push(_grads(1))  # the connect fails: retried, and served over HTTP
        assert session.info().iterations == 2
        assert not plane.available  # left alone for a while


def test_a_pooled_connection_the_server_closed_is_not_reused(server_factory):
    server = server_factory(idle_timeout_seconds=0.3)
    with Client(server.url, retries=0) as client:
        session = client.create_session(WEIGHTS, "sgd")
        session.push(_grads(0))
        time.sleep(1.0)  # the server closes the idle data-plane connection
        session.push(_grads(1))  # no retry allowed: a dead pooled socket would fail this
        assert session.info().iterations == 2


def test_a_data_plane_that_never_answers_ends_at_the_deadline(server_factory):
    server = server_factory()
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = silent.accept()
            except OSError:
                return
            accepted.append(conn)  # read nothing, answer nothing

    threading.Thread(target=accept, daemon=True).start()
    try:
        with Client(server.url, deadline=1.5) as client:
            session = client.create_session(WEIGHTS, "sgd")
            client._plane = DataPlaneChannel(
                "127.0.0.1",
                silent.getsockname()[1],
                tls=None,
                server_hostname="127.0.0.1",
                token=None,
            )
            started = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded) as info:
                session.push(_grads(0))
            assert time.monotonic() - started < 5
            assert info.value.idempotency_key is not None
    finally:
        silent.close()
        for conn in accepted:
            conn.close()


def test_the_async_client_takes_the_data_plane_too(server_factory):
    server = server_factory()

    async def run() -> None:
        async with (
            AsyncClient(server.url) as lean,
            AsyncClient(server.url, data_plane=False) as plain,
        ):
            a = await lean.create_session(WEIGHTS, "adam")
            b = await plain.create_session(WEIGHTS, "adam")
            out = {name: np.empty_like(w) for name, w in WEIGHTS.items()}
            for step in range(3):
                got = await a.push(_grads(step), out=out)
                expected = await b.push(_grads(step))
            assert got is out and isinstance(lean._plane, DataPlaneChannel)
            for name in WEIGHTS:
                assert out[name].tobytes() == expected[name].tobytes()
            pulled = await a.pull()
            assert pulled["kernel"].tobytes() == expected["kernel"].tobytes()
            await a.delete()
            with pytest.raises(errors.SessionNotFound):
                await a.push(_grads(0))

    asyncio.run(run())


def test_a_url_with_a_path_prefix_or_a_proxy_stays_on_http(monkeypatch):
    import httpx

    from paramserver.client.dataplane import usable_for

    assert usable_for(httpx.URL("http://10.0.0.5:8000"), transport=None)
    assert not usable_for(httpx.URL("http://10.0.0.5:8000/ps"), transport=None)
    assert not usable_for(
        httpx.URL("http://10.0.0.5:8000"), transport=httpx.MockTransport(lambda r: None)
    )  # type: ignore[arg-type,return-value]
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert not usable_for(httpx.URL("http://10.0.0.5:8000"), transport=None)
    monkeypatch.setenv("NO_PROXY", "10.0.0.5")
    assert usable_for(httpx.URL("http://10.0.0.5:8000"), transport=None)


@pytest.mark.parametrize("journal", [False, True])
def test_scalars_empty_tensors_every_dtype_and_big_endian_gradients_match_http(
    server_factory, tmp_path, journal
):
    settings = {"snapshot_dir": tmp_path, "durability": "journal"} if journal else {}
    server = server_factory(**settings)
    weights = {
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "half": np.ones(3, np.float16),
        "double": np.ones(2, np.float64),
    }
    grads = {
        "scalar": np.array(0.1, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "half": np.full(3, 0.5, np.float16),
        "double": np.array([1.0, -2.0], ">f8"),  # big-endian: sent as little-endian bytes
    }
    with Client(server.url) as lean, Client(server.url, data_plane=False) as plain:
        a = lean.create_session(weights, "adam")
        b = plain.create_session(weights, "adam")
        got, expected = a.push(grads), b.push(grads)
        assert isinstance(lean._plane, DataPlaneChannel)
        for name in weights:
            assert got[name].shape == weights[name].shape and got[name].dtype == weights[name].dtype
            assert got[name].tobytes() == expected[name].tobytes()
        assert a.pull()["scalar"].tobytes() == b.pull()["scalar"].tobytes()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself
def test_gradients_of_an_ndarray_subclass_push_as_over_http(server_factory):
    """An ``np.matrix`` does not flatten to one dimension: its bytes go out as a plain
    array's, and the push is the one HTTP makes."""
    server = server_factory()
    weights = {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}
    grads = {
        "kernel": np.matrix(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "bias": np.ones(3, np.float32),
    }
    with Client(server.url) as lean, Client(server.url, data_plane=False) as plain:
        a = lean.create_session(weights, "adam")
        b = plain.create_session(weights, "adam")
        got, expected = a.push(grads), b.push(grads)
        assert isinstance(lean._plane, DataPlaneChannel)
        for name in weights:
            assert got[name].tobytes() == expected[name].tobytes()
        assert a.pull()["kernel"].tobytes() == b.pull()["kernel"].tobytes()


def test_an_out_that_does_not_fit_is_a_value_error_after_the_push_was_applied(server_factory):
    server = server_factory()
    with Client(server.url) as client:
        session = client.create_session(WEIGHTS, "sgd")
        wrong = {"kernel": np.empty((4, 3), np.float32), "bias": np.empty(4, np.float32)}
        with pytest.raises(ValueError, match="out\\['kernel'\\] has shape"):
            session.push(_grads(0), out=wrong)
        assert session.info().iterations == 1  # applied: pull to see the weights
        with pytest.raises(TypeError, match="writable numpy array"):
            session.pull(out={"kernel": [[0.0] * 4] * 3, "bias": np.empty(4, np.float32)})


@pytest.mark.parametrize(
    "weights",
    [
        # an answer's prefix, header and body all come with the first read
        {"w": np.arange(10, dtype=np.float32)},
        # bodies ending around the read-ahead's end, over several arrays
        {f"t{i}": np.linspace(-1, 1, n, dtype=np.float32) for i, n in enumerate((1000, 3000, 90))},
        {"a": np.ones(4090, np.float32), "b": np.full(12, 2, np.float64)},
        # a zero-size tensor between two that share the read-ahead
        {"a": np.ones(100, np.float32), "z": np.zeros((0, 3), np.float32), "b": np.ones(7)},
        {"a": np.ones(2 * 4096, np.float32)},
        # a header longer than the read-ahead (many tensors with long names)
        {f"layer_{i:04d}/" + "k" * 60: np.full(3, i, np.float32) for i in range(300)},
    ],
    ids=["small", "straddling", "at-the-edge", "zero-size", "past-the-edge", "long-header"],
)
def test_answers_around_the_read_ahead_match_http_bit_for_bit(server_factory, weights):
    """``READ_AHEAD`` (16 KiB) bytes are asked for by an answer's first read: the cases are
    sized around it."""
    server = server_factory()
    with Client(server.url) as lean, Client(server.url, data_plane=False) as plain:
        a = lean.create_session(weights, "adam")
        b = plain.create_session(weights, "adam")
        grads = {n: np.full(w.shape, 0.5, w.dtype) for n, w in weights.items()}
        out = {n: np.empty_like(w) for n, w in weights.items()}
        for _ in range(2):
            got = a.push(grads)
            expected = b.push(grads)
        a.push(grads, out=out)
        again = b.push(grads)
        assert isinstance(lean._plane, DataPlaneChannel)
        for name in weights:
            assert got[name].tobytes() == expected[name].tobytes()
            assert out[name].tobytes() == again[name].tobytes()
            assert a.pull()[name].tobytes() == b.pull()[name].tobytes()


def test_bytes_after_an_answer_are_a_protocol_error():
    import httpx

    from paramserver import frames

    channel = DataPlaneChannel("127.0.0.1", 1, tls=None, server_hostname="127.0.0.1", token=None)
    head = frames.pack_header({"status": 200, "iterations": 3})
    answer = frames.pack_prefix(frames.RESPONSE, 7, len(head), 0) + head
    timeout = httpx.Timeout(5.0)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(answer)
        prefix, header, early = channel._read_head(ours, 7, timeout)
        assert header == {"status": 200, "iterations": 3} and not early
        theirs.sendall(answer + b"junk")
        time.sleep(0.05)  # both in the socket before the read
        with pytest.raises(httpx.RemoteProtocolError, match="bytes after the answer"):
            channel._read_head(ours, 7, timeout)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"base_iterations": 7},
        {"sum_squares": 2.5, "round_order": "ab" * 16},
        {"metrics": {"loss": 0.5}},
    ],
)
@pytest.mark.parametrize("return_weights", [True, False])
def test_a_push_frame_header_is_msgpack_of_its_fields(extra, return_weights):
    """The client puts a push's header together from parts packed once per session and
    layout: the bytes are those of msgpack.packb of the header, field for field."""
    from paramserver.client.sync import Session

    with Client("http://127.0.0.1:9", data_plane=False) as client:
        session: Session = Session(client, "s/ession", ["w", "b"], as_list=False)
        grads = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float16)}
        for key in ("k1", "x" * 255):
            call = session._push_call(
                grads, return_weights=return_weights, idempotency_key=key, **extra
            )
            assert call.lean is not None
            expected = {
                "op": "push",
                "session": "s/ession",
                "key": key,
                "return_weights": return_weights,
                "tensors": [["w", "float32", [2, 3]], ["b", "float16", [3]]],
                **extra,
            }
            assert call.lean.header == msgpack.packb(expected)
        session.id = "other"  # a handle's id is what its headers carry
        call = session._push_call(grads, return_weights=True, idempotency_key="k")
        assert msgpack.unpackb(call.lean.header)["session"] == "other"
