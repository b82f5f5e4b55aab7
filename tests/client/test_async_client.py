"""The asyncio client against a real server on loopback: the same operations as the blocking
client, both weight forms, error mapping and retries. Each test runs its coroutine with
``asyncio.run`` (no pytest plugin needed)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np
import pytest

from paramserver.client import (
    AsyncClient,
    AsyncSession,
    InvalidRequest,
    RetryPolicy,
    ServiceUnavailable,
    SessionExists,
    SessionInfo,
    SessionNotFound,
    SessionState,
    TransportError,
    optimizers,
)
from tests.harness.faults import FAST, AsyncFaultyTransport, is_create, is_push
from tests.harness.models import small_gradients, small_weights


def test_dict_form_every_method(base_url: str) -> None:
    async def main() -> None:
        async with AsyncClient(base_url, retries=FAST) as client:
            assert await client.health() == {"status": "ok"}
            session = await client.create_session(small_weights(), optimizers.SGD(lr=0.1))
            assert isinstance(session, AsyncSession)
            assert session.names == ("kernel", "bias") and not session.as_list

            weights = await session.push(small_gradients())
            assert isinstance(weights, dict) and list(weights) == ["kernel", "bias"]
            np.testing.assert_allclose(
                weights["kernel"], small_weights()["kernel"] - np.float32(0.1)
            )
            assert all(a.flags.writeable for a in weights.values())
            assert await session.push(small_gradients(), return_weights=False) == 2
            pulled = await session.pull()
            assert isinstance(pulled, dict) and set(pulled) == {"kernel", "bias"}

            info = await session.info()
            assert isinstance(info, SessionInfo)
            assert info.iterations == 2 and info.names == ("kernel", "bias")
            assert info.optimizer == optimizers.SGD(lr=0.1).to_dict()

            state = await session.state()
            assert isinstance(state, SessionState) and state.iterations == 2
            await session.push(small_gradients())
            assert (await session.load_state(state)).iterations == 2

            listed = await client.sessions()
            assert session.id in {s.session_id for s in listed}
            attached = await client.session(session.id)
            assert attached.names == session.names and not attached.as_list

            copy = await client.restore_session(state, f"copy-{uuid.uuid4().hex[:8]}")
            assert (await copy.info()).iterations == 2
            await copy.delete()

            await session.delete()
            with pytest.raises(SessionNotFound):
                await session.pull()
            with pytest.raises(SessionNotFound):
                await session.delete()
            await session.delete(missing_ok=True)

    asyncio.run(main())


def test_list_form_every_method(base_url: str) -> None:
    async def main() -> None:
        async with AsyncClient(base_url, retries=FAST) as client:
            initial = [np.ones((3, 2), np.float32), np.zeros(2, np.float32)]
            session = await client.create_session(initial, "adam")
            assert session.as_list and session.names == ("0", "1")
            grads = [np.ones((3, 2), np.float32), np.ones(2, np.float32)]
            weights = await session.push(grads)
            assert isinstance(weights, list) and [w.shape for w in weights] == [(3, 2), (2,)]
            assert isinstance(await session.pull(), list)
            with pytest.raises(ValueError, match="list of 1 arrays"):
                await session.push(grads[:1])
            state = await session.state()
            assert set(state.weights) == {"0", "1"}
            assert (await session.load_state(state)).iterations == 1

            attached = await client.session(session.id, as_list=True)
            pulled = await attached.pull()
            assert isinstance(pulled, list)
            np.testing.assert_array_equal(pulled[0], weights[0])
            restored = await client.restore_session(state, as_list=True)
            assert isinstance(await restored.push(grads), list)
            await restored.delete()
            await session.delete()

    asyncio.run(main())


def test_errors_are_mapped(base_url: str) -> None:
    async def main() -> None:
        async with AsyncClient(base_url, retries=FAST) as client:
            sid = f"async-{uuid.uuid4().hex[:8]}"
            session = await client.create_session(small_weights(), "sgd", session_id=sid)
            with pytest.raises(SessionExists):
                await client.create_session(small_weights(), "sgd", session_id=sid)
            with pytest.raises(InvalidRequest) as err:
                await session.push({"kernel": small_gradients()["kernel"]})
            assert err.value.code == "parameter_mismatch" and err.value.status == 422
            with pytest.raises(InvalidRequest) as err:
                await session.push(
                    {
                        "kernel": np.full((2, 3), np.nan, np.float32),
                        "bias": small_gradients()["bias"],
                    }
                )
            assert err.value.code == "non_finite_gradient"
            await session.delete()
            with pytest.raises(SessionNotFound) as missing:
                await client.session(sid)
            assert missing.value.code == "session_not_found"

    asyncio.run(main())


def test_many_concurrent_pushes(base_url: str) -> None:
    async def main() -> None:
        async with AsyncClient(base_url, retries=FAST) as client:
            session = await client.create_session(small_weights(), optimizers.SGD(lr=0.001))
            results = await asyncio.gather(
                *(session.push(small_gradients(), return_weights=False) for _ in range(50))
            )
            assert sorted(results) == list(range(1, 51))
            assert (await session.info()).iterations == 50
            await session.delete()

    asyncio.run(main())


def test_push_is_retried_with_the_same_key(base_url: str) -> None:
    async def main() -> None:
        transport = AsyncFaultyTransport(is_push, ["drop", "503"])
        async with AsyncClient(base_url, transport=transport, retries=FAST) as client:
            session = await client.create_session(small_weights(), "sgd")
            weights = await session.push(small_gradients())
            assert isinstance(weights, dict)
            pushes = [r for r in transport.requests if is_push(r)]
            assert len(pushes) == 3
            assert len({r.headers["idempotency-key"] for r in pushes}) == 1
            assert transport.responses[-1].headers["idempotent-replayed"] == "true"
            assert (await session.info()).iterations == 1
            await session.delete()

    asyncio.run(main())


def test_create_retries_only_when_unsent(base_url: str) -> None:
    async def main() -> None:
        transport = AsyncFaultyTransport(is_create, ["refuse", "503"])
        async with AsyncClient(base_url, transport=transport, retries=FAST) as client:
            session = await client.create_session(small_weights(), "sgd")  # refuse, 503, then sent
            assert len(transport.requests) == 3
            transport.faults = []
            await session.delete()
            transport.faults = ["drop"]
            with pytest.raises(TransportError, match="the session may exist"):
                await client.create_session(small_weights(), "sgd")

    asyncio.run(main())


def test_retries_run_out(base_url: str) -> None:
    async def main() -> None:
        transport = AsyncFaultyTransport(lambda r: True, ["503"] * 5)
        policy = RetryPolicy(2, 0.001, 0.001)
        async with AsyncClient(base_url, transport=transport, retries=policy) as client:
            with pytest.raises(ServiceUnavailable):
                await client.sessions()
        assert len(transport.requests) == 3

    asyncio.run(main())


def test_context_manager_closes(base_url: str) -> None:
    async def main() -> AsyncClient:
        async with AsyncClient(base_url) as client:
            assert not client.closed
        assert client.closed
        with pytest.raises(RuntimeError):
            await client.health()
        return client

    asyncio.run(main())


def test_same_methods_as_the_blocking_client() -> None:
    from paramserver.client import Client, Session

    def public(cls: type[Any]) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(Client) - {"close"} == public(AsyncClient) - {"aclose"}
    assert public(Session) == public(AsyncSession)
    for name in public(AsyncSession) | public(AsyncClient):
        member = getattr(AsyncSession, name, None) or getattr(AsyncClient, name)
        if callable(member) and not isinstance(member, type):
            assert asyncio.iscoroutinefunction(member), name
