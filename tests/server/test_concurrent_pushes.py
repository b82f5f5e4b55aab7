"""The service under concurrent load, over real HTTP: no lost, doubled or torn steps.

Gradients and learning rates are chosen so that every intermediate value is exactly
representable: the expected weights are then exact, whatever order the server applies the
pushes in, and any lost, repeated or half-applied step shows as an inequality, not as noise
inside a tolerance.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness.http_api import (
    MSGPACK,
    array,
    create_session,
    gradients_body,
    packb,
    tensor,
    unpackb,
)
from tests.harness.models import engine_trajectory


def run_together(workers: list[Callable[[], Any]]) -> list[Any]:
    """Run every worker in its own thread, released at once; re-raise the first failure."""
    barrier = threading.Barrier(len(workers))

    def start(worker: Callable[[], Any]) -> Any:
        barrier.wait(timeout=30)
        return worker()

    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        futures = [pool.submit(start, w) for w in workers]
        return [f.result(timeout=120) for f in futures]


# --- one session, many pushers --------------------------------------------------------------

THREADS = 8
PUSHES = 100
LR = 0.5


def test_eight_threads_push_a_hundred_gradients_each_into_one_sgd_session(base_url: str) -> None:
    url = base_url
    rng = np.random.default_rng(2024)
    initial = {
        "kernel": rng.integers(-50, 50, size=(64, 32)).astype(np.float32),
        "bias": rng.integers(-50, 50, size=32).astype(np.float32),
    }
    sid = create_session(url, {"class_name": "SGD", "config": {"lr": LR}}, initial)["session_id"]
    # Small integer gradients: every partial sum times 0.5 is exact in float32, so the result
    # does not depend on the order the 800 steps are applied in.
    grads = [
        [
            {n: rng.integers(-4, 5, size=w.shape).astype(np.float32) for n, w in initial.items()}
            for _ in range(PUSHES)
        ]
        for _ in range(THREADS)
    ]

    def pusher(mine: list[dict[str, np.ndarray]]) -> Callable[[], list[int]]:
        def run() -> list[int]:
            seen = []
            with httpx.Client(base_url=url, timeout=60) as client:
                for i, g in enumerate(mine):
                    params = {"return_weights": "false"} if i % 2 else None
                    r = client.post(
                        f"/sessions/{sid}/gradients",
                        content=gradients_body(g),
                        headers=MSGPACK,
                        params=params,
                    )
                    assert r.status_code == 200, r.text
                    msg = unpackb(r.content)
                    assert ("weights" in msg) == (i % 2 == 0)
                    seen.append(msg["iterations"])
            return seen

        return run

    results = run_together([pusher(mine) for mine in grads])

    # Each push was exactly one step, and no two pushes saw the same step.
    answered = sorted(n for seen in results for n in seen)
    assert answered == list(range(1, THREADS * PUSHES + 1))
    for seen in results:  # one thread's pushes are applied in its order
        assert seen == sorted(seen)

    r = httpx.get(f"{url}/sessions/{sid}/weights", timeout=60)
    msg = unpackb(r.content)
    assert msg["iterations"] == THREADS * PUSHES
    for name, w0 in initial.items():
        total = sum(g[name].astype(np.float64) for mine in grads for g in mine)
        want = (w0 - LR * total).astype(np.float32)
        got = array(msg["weights"][name])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got, want)  # exact: see the module docstring
    summary = httpx.get(f"{url}/sessions/{sid}", timeout=60).json()
    assert summary["iterations"] == THREADS * PUSHES


# --- readers never see a half-applied step --------------------------------------------------

# With SGD lr=1 and every gradient element -1, after k steps every element of every parameter
# is exactly k. A read that catches a step half-way shows elements that disagree with each
# other or with the iteration count. The big parameter makes each step long enough to catch.
TORN_SHAPES: dict[str, tuple[tuple[int, ...], Any]] = {
    "big": ((400_000,), np.float32),
    "wide": ((300, 7), np.float64),
    "half": ((5, 3), np.float16),
    "scalar": ((), np.float32),
}
TORN_PUSHERS = 2
TORN_PUSHES = 40  # float16 counts exactly up to 2048


def _check_consistent(msg: Mapping[str, Any], where: str) -> int:
    k = msg["iterations"]
    assert set(msg["weights"]) == set(TORN_SHAPES), where
    for name, (shape, dtype) in TORN_SHAPES.items():
        w = array(msg["weights"][name])
        assert w.shape == shape and w.dtype == np.dtype(dtype), (where, name)
        bad = np.flatnonzero(w.reshape(-1) != k)
        assert bad.size == 0, (
            f"{where}: torn read at iterations={k}: {name}[{bad[:5].tolist()}] = "
            f"{w.reshape(-1)[bad[:5]].tolist()}"
        )
    return int(k)


@pytest.fixture
def torn_session(base_url: str) -> str:
    url = base_url
    weights = {n: np.zeros(shape, dtype) for n, (shape, dtype) in TORN_SHAPES.items()}
    return create_session(url, {"class_name": "SGD", "config": {"lr": 1.0}}, weights)["session_id"]


def test_concurrent_readers_never_see_a_half_applied_step(base_url: str, torn_session: str) -> None:
    url = base_url
    sid = torn_session
    body = gradients_body(
        {n: np.full(shape, -1, dtype) for n, (shape, dtype) in TORN_SHAPES.items()}
    )
    finished: list[None] = []  # one entry per pusher that has finished

    def pushing() -> bool:
        return len(finished) < TORN_PUSHERS

    def pusher() -> list[int]:
        seen = []
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(TORN_PUSHES):
                    r = client.post(f"/sessions/{sid}/gradients", content=body, headers=MSGPACK)
                    assert r.status_code == 200, r.text
                    seen.append(_check_consistent(unpackb(r.content), "push answer"))
        finally:
            finished.append(None)
        return seen

    def reader(path: str) -> list[int]:
        seen: list[int] = []
        with httpx.Client(base_url=url, timeout=60) as client:
            while pushing() or not seen:
                r = client.get(f"/sessions/{sid}/{path}")
                assert r.status_code == 200, r.text
                msg = unpackb(r.content)
                k = _check_consistent(msg, f"GET {path}")
                if path == "state":
                    # SGD keeps its moments: -lr*g each step, so exactly 1 everywhere.
                    for name, t in msg["slots"]["moment"].items():
                        expected = 1 if k else 0
                        assert (array(t) == expected).all(), f"moment of {name} at {k}"
                seen.append(k)
        return seen

    def summary_reader() -> list[int]:
        seen: list[int] = []
        with httpx.Client(base_url=url, timeout=60) as client:
            while pushing() or not seen:
                seen.append(client.get(f"/sessions/{sid}").json()["iterations"])
        return seen

    pushers = [pusher] * TORN_PUSHERS
    readers = [lambda: reader("weights"), lambda: reader("state"), summary_reader]
    results = run_together([*pushers, *readers])

    pushed = sorted(k for seen in results[:TORN_PUSHERS] for k in seen)
    assert pushed == list(range(1, TORN_PUSHERS * TORN_PUSHES + 1))
    for seen in results[TORN_PUSHERS:]:
        assert seen == sorted(seen), "a reader saw the iteration count go backwards"
        assert all(0 <= k <= TORN_PUSHERS * TORN_PUSHES for k in seen)
    observed = {k for seen in results[TORN_PUSHERS:] for k in seen}
    assert observed - {0, TORN_PUSHERS * TORN_PUSHES}, (
        "the readers only ever saw the start or the end: the test did not interleave"
    )
    final = unpackb(httpx.get(f"{url}/sessions/{sid}/weights", timeout=60).content)
    assert _check_consistent(final, "final") == TORN_PUSHERS * TORN_PUSHES


# --- different sessions at once -------------------------------------------------------------


def test_pushes_to_different_sessions_interleave_correctly(base_url: str) -> None:
    url = base_url
    rng = np.random.default_rng(77)
    steps = 30

    def model(dtype: Any) -> dict[str, np.ndarray]:
        return {
            "k": rng.standard_normal((64, 32)).astype(dtype),
            "b": rng.standard_normal(32).astype(dtype),
        }

    # Order-dependent optimizers: one pusher each, so each trajectory is determined.
    ordered = {
        "adam": ({"class_name": "Adam", "config": {"lr": 0.01, "amsgrad": True}}, np.float32),
        "nadam": ("nadam", np.float64),
        "momentum": (
            {"class_name": "SGD", "config": {"lr": 0.05, "momentum": 0.9, "nesterov": True}},
            np.float32,
        ),
    }
    cases: dict[str, tuple[Any, dict[str, np.ndarray], list[dict[str, np.ndarray]], str]] = {}
    for name, (optimizer, dtype) in ordered.items():
        weights = model(dtype)
        grads = [
            {n: rng.standard_normal(w.shape).astype(dtype) for n, w in weights.items()}
            for _ in range(steps)
        ]
        cases[name] = (
            optimizer,
            weights,
            grads,
            create_session(url, optimizer, weights)["session_id"],
        )

    # An order-independent one (plain SGD, exact gradients) pushed by two threads at once.
    sgd_weights = {"k": np.zeros((64, 32), np.float32)}
    sgd_grads = [
        [{"k": rng.integers(-3, 4, size=(64, 32)).astype(np.float32)} for _ in range(steps)]
        for _ in range(2)
    ]
    sgd_id = create_session(url, {"class_name": "SGD", "config": {"lr": 0.25}}, sgd_weights)[
        "session_id"
    ]

    def push_all(sid: str, grads: list[dict[str, np.ndarray]]) -> Callable[[], list[Any]]:
        def run() -> list[Any]:
            answers = []
            with httpx.Client(base_url=url, timeout=60) as client:
                for g in grads:
                    r = client.post(
                        f"/sessions/{sid}/gradients", content=gradients_body(g), headers=MSGPACK
                    )
                    assert r.status_code == 200, r.text
                    answers.append(unpackb(r.content))
            return answers

        return run

    workers = [push_all(sid, grads) for _, _, grads, sid in cases.values()]
    workers += [push_all(sgd_id, grads) for grads in sgd_grads]
    results = run_together(workers)

    ordered_results = results[: len(cases)]
    for (name, (optimizer, weights, grads, _)), answers in zip(
        cases.items(), ordered_results, strict=True
    ):
        want = engine_trajectory(optimizer, weights, grads)
        assert [a["iterations"] for a in answers] == list(range(1, steps + 1)), name
        for step, answer in enumerate(answers):
            for param, w in want[step].items():
                got = array(answer["weights"][param])
                assert got.tobytes() == w.tobytes(), f"{name}: step {step + 1}, {param}"

    sgd_answers = results[len(cases) :]
    assert sorted(a["iterations"] for answers in sgd_answers for a in answers) == list(
        range(1, 2 * steps + 1)
    )
    final = unpackb(httpx.get(f"{url}/sessions/{sgd_id}/weights", timeout=60).content)
    total = sum(g["k"] for grads in sgd_grads for g in grads)
    np.testing.assert_array_equal(array(final["weights"]["k"]), -0.25 * total)


def test_many_sessions_created_and_pushed_at_once(base_url: str) -> None:
    url = base_url

    # Creates, pushes, reads and deletes of distinct sessions, all at the same time.
    def lifecycle(i: int) -> Callable[[], None]:
        def run() -> None:
            w0 = np.full(100, float(i), np.float32)
            with httpx.Client(base_url=url, timeout=60) as client:
                body = packb(
                    {
                        "session_id": f"life-{i}",
                        "optimizer": {"class_name": "SGD", "config": {"lr": 1.0}},
                        "weights": {"w": tensor(w0)},
                    }
                )
                r = client.post("/sessions", content=body, headers=MSGPACK)
                assert r.status_code == 201, r.text
                for _ in range(10):
                    r = client.post(
                        f"/sessions/life-{i}/gradients",
                        content=gradients_body({"w": np.full(100, -1.0, np.float32)}),
                        headers=MSGPACK,
                        params={"return_weights": "false"},
                    )
                    assert r.status_code == 200, r.text
                msg = unpackb(client.get(f"/sessions/life-{i}/weights").content)
                assert msg["iterations"] == 10
                np.testing.assert_array_equal(array(msg["weights"]["w"]), w0 + 10)
                assert client.delete(f"/sessions/life-{i}").status_code == 204

        return run

    run_together([lifecycle(i) for i in range(8)])
    listed = httpx.get(f"{url}/sessions", timeout=60).json()["sessions"]
    assert not [s for s in listed if s["session_id"].startswith("life-")]
