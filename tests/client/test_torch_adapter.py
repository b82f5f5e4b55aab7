"""paramserver.client.torch: a torch.optim.Optimizer whose step is a push, against a real server.

CI installs the ``torch`` extra and sets ``CI=true``: there these tests fail loudly when torch
is missing. Elsewhere they are skipped without it (but for the two that check what happens
without torch, which run in a subprocess).
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import optimizers
from paramserver.client import Client, DictWeights, Session, StaleGradient, Sync
from tests.harness.optional import optional_import, requires

torch: Any = optional_import("torch")

if torch is not None:
    from paramserver.client.torch import (
        RemoteOptimizer,
        create_session,
        join_session,
        trainable_parameters,
    )

needs_torch = requires("torch")


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def client(base_url: str) -> Iterator[Client]:
    """A client of the module's server; the sessions a test creates are deleted after it."""
    with Client(base_url) as c:
        before = {s.session_id for s in c.sessions()}
        yield c
        for info in c.sessions():
            if info.session_id not in before:
                c.session(info.session_id).delete(missing_ok=True)


def mlp(seed: int, *, inputs: int = 3, hidden: int = 8, outputs: int = 2) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, outputs)
    )


def batches(n: int, seed: int = 0, *, inputs: int = 3, outputs: int = 2) -> list[tuple[Any, Any]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(16, inputs, generator=generator),
            torch.randint(0, outputs, (16,), generator=generator),
        )
        for _ in range(n)
    ]


def backward(model: Any, x: Any, y: Any) -> None:
    torch.nn.functional.cross_entropy(model(x), y).backward()


def raw(model: Any) -> dict[str, bytes]:
    """Every parameter's bytes, by name."""
    return {name: p.detach().numpy().tobytes() for name, p in model.named_parameters()}


def raw_arrays(arrays: DictWeights) -> dict[str, bytes]:
    return {name: a.tobytes() for name, a in arrays.items()}


def load(model: Any, weights: DictWeights) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(weights[name]))


def iterations(session: Session[Any]) -> int:
    return session.info().iterations


# --- steps --------------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize(
    "optimizer",
    [
        optimizers.Adam(lr=0.01, amsgrad=True),
        optimizers.SGD(lr=0.1, momentum=0.9, nesterov=True),
        optimizers.RMSprop(lr=0.01, decay=0.01),
    ],
    ids=["adam", "sgd-nesterov", "rmsprop"],
)
def test_step_matches_pushing_by_hand_bit_for_bit(
    client: Client, optimizer: optimizers.Optimizer
) -> None:
    """One model trained by RemoteOptimizer.step, its copy by the hand loop (gradients of the
    weights the last push answered, pushed with session.push) on a second session: the same
    gradients and the same weights, byte for byte, at every step."""
    model = mlp(0)
    by_hand = copy.deepcopy(model)
    opt = RemoteOptimizer(model, create_session(client, model, optimizer))
    manual = client.create_session(
        {name: p.detach().numpy().copy() for name, p in by_hand.named_parameters()}, optimizer
    )
    for x, y in batches(6):
        opt.zero_grad()
        backward(model, x, y)
        by_hand.zero_grad()
        backward(by_hand, x, y)
        grads = {name: p.grad.numpy().copy() for name, p in by_hand.named_parameters()}
        assert raw_arrays(grads) == {
            name: p.grad.numpy().tobytes() for name, p in model.named_parameters()
        }
        opt.step()
        weights = manual.push(grads)
        load(by_hand, weights)
        assert raw(model) == raw_arrays(weights)
    assert raw(model) == raw_arrays(opt.session.pull())
    assert iterations(opt.session) == iterations(manual) == 6


@needs_torch
def test_weights_are_written_in_place(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same Parameter objects and memory after steps, holding the session's weights, with
    no copy beyond the wire (the data plane receives into the parameters: no np.copyto); the
    version counter moves, so autograd refuses a graph that saved the old values."""
    model = mlp(1)
    params = list(model.parameters())
    pointers = [p.data_ptr() for p in params]
    before = raw(model)
    opt = RemoteOptimizer(model.named_parameters(), create_session(client, model, "adam"))
    copies: list[Any] = []
    real_copyto = np.copyto

    def copyto(dst: Any, src: Any, *args: Any, **kwargs: Any) -> None:
        copies.append(dst)
        real_copyto(dst, src, *args, **kwargs)

    monkeypatch.setattr(np, "copyto", copyto)
    for x, y in batches(3):
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    monkeypatch.undo()
    assert copies == []
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert raw(model) != before
    assert raw(model) == raw_arrays(opt.session.pull())
    assert opt.iterations == 3

    x, y = batches(1, seed=1)[0]
    backward(model, x, y)
    stale = torch.nn.functional.cross_entropy(model(x), y)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


@needs_torch
def test_step_with_a_closure_returns_its_loss(client: Client) -> None:
    model = mlp(2)
    opt = RemoteOptimizer(model, create_session(client, model, "sgd"))
    x, y = batches(1)[0]

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert iterations(opt.session) == 1
    assert raw(model) == raw_arrays(opt.session.pull())


@needs_torch
def test_a_missing_gradient_is_refused_before_sending(client: Client) -> None:
    """A parameter the loss did not use has .grad None: refused, naming it; the server's
    iterations and weights unchanged (zeros would still move Adam's weights)."""

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = torch.nn.Linear(3, 2)
            self.unused = torch.nn.Linear(3, 2)

        def forward(self, x: Any) -> Any:
            return self.used(x)

    torch.manual_seed(3)
    model = TwoHeads()
    session = create_session(client, model, "adam")
    opt = RemoteOptimizer(model, session)
    before = raw(model)
    x, y = batches(1)[0]
    backward(model, x, y)
    with pytest.raises(ValueError, match=r"\['unused.weight', 'unused.bias'\] got no gradient"):
        opt.step()
    assert iterations(session) == 0
    assert raw_arrays(session.pull()) == before == raw(model)

    backward(model, x, y)
    opt.zero_grad()  # after backward: every gradient is None again
    with pytest.raises(ValueError, match="'used.weight'.*got no gradient"):
        opt.step()
    assert iterations(session) == 0


@needs_torch
def test_frozen_parameters_are_not_in_the_session(client: Client) -> None:
    model = mlp(4)
    model[0].requires_grad_(False)
    frozen = raw(model)
    session = create_session(client, model, "adam")
    assert session.names == ("2.weight", "2.bias")
    assert [name for name, _ in trainable_parameters(model)] == ["2.weight", "2.bias"]
    opt = RemoteOptimizer(model.named_parameters(), session)  # frozen ones left out here too
    x, y = batches(1)[0]
    backward(model, x, y)
    opt.step()
    after = raw(model)
    assert after["0.weight"] == frozen["0.weight"] and after["0.bias"] == frozen["0.bias"]
    assert after["2.weight"] != frozen["2.weight"]


@needs_torch
def test_sparse_gradients_are_pushed_dense(client: Client) -> None:
    torch.manual_seed(5)
    model = torch.nn.Embedding(10, 4, sparse=True)
    opt = RemoteOptimizer(model, create_session(client, model, "sgd"))
    before = model.weight.detach().clone()
    model(torch.tensor([1, 2, 2])).sum().backward()
    assert model.weight.grad is not None and model.weight.grad.is_sparse
    opt.step()
    changed = (model.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [i in (1, 2) for i in range(10)]
    assert raw(model) == raw_arrays(opt.session.pull())


# --- state_dict ---------------------------------------------------------------------------


@needs_torch
def test_state_dict_round_trip_continues_bit_for_bit(client: Client) -> None:
    """Train 3 steps, save (torch.save / torch.load(weights_only=True)), train 3 more; a new
    model and session loading the checkpoint take the same 3 steps to the same bytes."""
    steps = batches(6, seed=7)
    model = mlp(6)
    opt = RemoteOptimizer(model, create_session(client, model, optimizers.Adam(lr=0.01)))

    def train(model: Any, opt: RemoteOptimizer, data: list[tuple[Any, Any]]) -> None:
        for x, y in data:
            opt.zero_grad()
            backward(model, x, y)
            opt.step()

    train(model, opt, steps[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    train(model, opt, steps[3:])
    expected = raw(model)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["param_names"] == list(opt.names)
    fresh = mlp(60)  # other initial weights: the state's replace them
    fresh_opt = RemoteOptimizer(fresh, create_session(client, fresh, "sgd"))
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    assert iterations(fresh_opt.session) == 3
    assert fresh_opt.session.info().optimizer["class_name"] == "Adam"
    train(fresh, fresh_opt, steps[3:])
    assert raw(fresh) == expected

    opt.load_state_dict(checkpoint["optimizer"])  # back in time, in the first session too
    train(model, opt, steps[3:])
    assert raw(model) == expected
    assert iterations(opt.session) == 6


@needs_torch
def test_load_state_dict_refuses_what_does_not_fit(client: Client) -> None:
    model = mlp(8)
    session = create_session(client, model, "adam")
    opt = RemoteOptimizer(model, session)
    with pytest.raises(ValueError, match="no 'session_state'.*torch.optim"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())

    wider = mlp(8, hidden=9)
    other = RemoteOptimizer(wider, create_session(client, wider, "adam"))
    before = raw(model)
    with pytest.raises(ValueError, match=r"'0.weight' \[8, 3\] vs \[9, 3\]"):
        opt.load_state_dict(other.state_dict())
    assert raw(model) == before and iterations(session) == 0


# --- sessions from models -----------------------------------------------------------------


@needs_torch
def test_join_by_id_loads_the_sessions_weights(client: Client) -> None:
    model = mlp(9)
    session = create_session(client, model, "adam")
    worker = mlp(10)
    joined = join_session(client, worker, session.id)
    assert joined.id == session.id and joined.base_iterations == 0
    assert raw(worker) == raw(model)
    opt = RemoteOptimizer(worker, joined)
    x, y = batches(1)[0]
    backward(worker, x, y)
    opt.step()
    assert iterations(session) == 1


@needs_torch
def test_join_by_id_with_another_model_names_each_mismatch(client: Client) -> None:
    session = create_session(client, mlp(11), "adam")
    other = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2), torch.nn.Linear(2, 2)
    )
    before = raw(other)
    with pytest.raises(ValueError) as caught:
        join_session(client, other, session.id)
    message = str(caught.value)
    assert f"session {session.id!r} does not fit" in message
    assert "missing from it: ['3.weight', '3.bias']" in message
    assert "'0.weight' [5, 3] vs [8, 3]" in message and "'2.weight' [2, 5] vs [2, 8]" in message
    assert raw(other) == before  # nothing written

    with pytest.raises(ValueError, match="does not fit"):
        RemoteOptimizer(other, client.session(session.id))

    class Wrapped(torch.nn.Module):  # as DistributedDataParallel names them: "module.0.weight"
        def __init__(self, module: Any) -> None:
            super().__init__()
            self.module = module

    with pytest.raises(ValueError, match="extra 'module.'"):
        join_session(client, Wrapped(mlp(12)), session.id)
    with pytest.raises(ValueError, match="float64 vs float32"):
        join_session(client, mlp(12).double(), session.id)


@needs_torch
def test_sync_session_stale_gradient_then_pull(client: Client) -> None:
    """In a sync session a gradient of old weights is refused (StaleGradient), the parameters
    untouched; pull() brings the session's weights and the next step is applied."""
    first, second = mlp(16), mlp(17)
    session = create_session(
        client, first, "sgd", training=Sync(replicas_to_aggregate=1, total_num_replicas=2)
    )
    fast = RemoteOptimizer(first, session)
    slow = RemoteOptimizer(second, join_session(client, second, session.id))
    x, y = batches(1)[0]
    backward(first, x, y)
    fast.step()
    backward(second, x, y)
    before = raw(second)
    with pytest.raises(StaleGradient) as caught:
        slow.step()
    assert caught.value.iterations == 1 and raw(second) == before
    slow.pull()
    assert slow.iterations == 1 and raw(second) == raw(first)
    slow.zero_grad()
    backward(second, x, y)
    slow.step()
    assert slow.iterations == 2


@needs_torch
def test_a_torch_optimizer_is_refused_pointing_to_keras_optimizers(client: Client) -> None:
    model = mlp(13)
    count = len(client.sessions())
    with pytest.raises(TypeError, match=r"PyTorch optimizer \(Adam\).*paramserver.optimizers"):
        create_session(client, model, torch.optim.Adam(model.parameters()))
    with pytest.raises(TypeError, match=r"PyTorch optimizer \(SGD\)"):
        create_session(client, model, torch.optim.SGD)
    assert len(client.sessions()) == count


@needs_torch
def test_parameters_must_be_named_and_fixed(client: Client) -> None:
    model = mlp(14)
    session = create_session(client, model, "sgd")
    with pytest.raises(TypeError, match="by name"):
        RemoteOptimizer(model.parameters(), session)
    with pytest.raises(TypeError, match="parameter groups do not apply"):
        RemoteOptimizer([{"params": list(model.named_parameters())}], session)
    opt = RemoteOptimizer(model, session)
    with pytest.raises(ValueError, match="fixed when it is created"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(TypeError, match="bfloat16"):
        create_session(client, mlp(14).to(torch.bfloat16), "sgd")


@needs_torch
def test_a_small_mlp_learns_through_the_session(client: Client) -> None:
    """Two-layer MLP, four Gaussian classes in 8 dimensions: held-out accuracy above 90%."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(4, 8)).astype(np.float32)
    labels = rng.integers(0, 4, size=3000)
    points = (centres[labels] + rng.normal(size=(3000, 8))).astype(np.float32)
    x, y = torch.from_numpy(points), torch.from_numpy(labels)
    x_test, y_test, x_train, y_train = x[:1000], y[:1000], x[1000:], y[1000:]
    model = mlp(15, inputs=8, hidden=32, outputs=4)
    opt = RemoteOptimizer(model, create_session(client, model, optimizers.Adam(lr=0.01)))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(y_train), generator=generator).split(64):
            opt.zero_grad()
            backward(model, x_train[idx], y_train[idx])
            opt.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    assert accuracy > 0.9, accuracy


# --- without torch ------------------------------------------------------------------------


def test_the_client_does_not_import_torch() -> None:
    code = "import sys, paramserver.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_torch_the_adapter_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n"
        "    import paramserver.client.torch\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "pip install 'paramserver[torch]'" in done.stdout, done.stdout + done.stderr


@needs_torch
def test_sparse_embedding_gradients_travel_as_rows_and_match_the_dense_step(
    client: Client,
) -> None:
    """Embedding(sparse=True) pushes only the rows the batch touched (repeated ids summed by
    the server); the step is the dense one, bit for bit (Adam moves every row's moments)."""

    def train(sparse: bool) -> tuple[list[bytes], str]:
        emb = torch.nn.Embedding(200, 4, sparse=sparse)
        head = torch.nn.Linear(4, 2)
        with torch.no_grad():
            emb.weight.copy_(torch.arange(800, dtype=torch.float32).reshape(200, 4) / 800)
            head.weight.fill_(0.1)
            head.bias.zero_()
        model = torch.nn.Sequential(emb, head)
        opt = RemoteOptimizer(model, create_session(client, model, "adam"))
        for _ in range(3):
            opt.zero_grad()
            x, y = torch.tensor([[1, 2, 2, 7], [3, 1, 9, 9]]), torch.tensor([0, 1])
            torch.nn.functional.cross_entropy(model(x).mean(1), y).backward()
            opt.step()
        return [p.detach().numpy().tobytes() for p in model.parameters()], opt.session.id

    sparse, sparse_id = train(True)
    dense, dense_id = train(False)
    assert sparse == dense
    stats = {
        s["session_id"]: s
        for s in httpx.get(f"{str(client.base_url).rstrip('/')}/stats", timeout=30).json()[
            "sessions"
        ]
    }
    table = 200 * 4 * 4
    assert stats[dense_id]["bytes_in"] >= 3 * table
    # 8 looked-up rows (repeats included: torch's sparse gradient is uncoalesced) of 4
    # float32 and their int64 indices, plus the Linear's 8 + 2 floats, per push
    assert stats[sparse_id]["bytes_in"] == 3 * (8 * 4 * 4 + 8 * 8 + 2 * 4 * 4 + 2 * 4)
