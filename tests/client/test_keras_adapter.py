"""tf.keras through a session (``paramserver.client.keras``), against a real server.

``model.fit`` with a :class:`RemoteOptimizer` must train as the same model does locally with
the same Keras 2.2 optimizer: the reference here is Keras 2.2.4's own optimizer code
(``tests/reference/keras_2_2_4_optimizers.py`` on the numpy graph backend, as in
``tests/server/optim/test_keras_parity.py``) driven by a ``GradientTape`` loop over the same
batches from the same initial weights. Also: a BatchNormalization + Embedding model trains
(moving statistics stay local, an ``IndexedSlices`` gradient is made dense with its repeated
rows summed); parameter names do not depend on Keras's process-wide name counters, and
joining checks them; a ``None`` gradient is refused before sending, naming the parameter;
under ``MinMaxNorm(rate=0.5)`` the worker's weights equal the server's bit for bit (the
constraint is applied once, by the server); XLA is kept off; stale pushes pull.

CI installs the ``tensorflow`` extra and sets ``CI=true``: there these tests fail loudly when
TensorFlow is missing. Elsewhere they are skipped without it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserver import optimizers
from paramserver.client import Async, Client
from tests.harness.optional import import_or_skip
from tests.reference import keras_2_2_4_optimizers as keras_2_2_4
from tests.reference import numpy_graph_backend as K

pytestmark = pytest.mark.tensorflow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tf() -> Any:
    return import_or_skip("tensorflow")  # under CI a missing TensorFlow fails instead


@pytest.fixture(scope="module")
def keras(tf: Any) -> Any:
    import keras

    return keras


@pytest.fixture(scope="module")
def psk(tf: Any) -> Any:
    """``paramserver.client.keras`` (it imports TensorFlow)."""
    from paramserver.client import keras as adapter

    return adapter


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[Client]:
    with Client(base_url) as c:
        yield c


# --- data and models ------------------------------------------------------------------------


def blobs(n: int, *, seed: int = 0, dim: int = 8, classes: int = 4) -> tuple[np.ndarray, ...]:
    """``n`` float32 points in ``classes`` Gaussian blobs (fixed seed), split 3:1 into train
    and held-out: ``x_train, y_train, x_test, y_test``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.5, size=(classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    x = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
    cut = n * 3 // 4
    return x[:cut], y[:cut].astype(np.int32), x[cut:], y[cut:].astype(np.int32)


def mlp(keras: Any, *, dim: int = 8, hidden: int = 32, classes: int = 4, seed: int = 1) -> Any:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((dim,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(classes),
        ]
    )


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    logits = np.asarray(model(x, training=False))
    return float((logits.argmax(axis=1) == y).mean())


def compile_remote(keras: Any, model: Any, remote: Any, **options: Any) -> None:
    model.compile(
        optimizer=remote,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **options,
    )


# --- the local reference: Keras 2.2.4's optimizer in a GradientTape loop --------------------


class Keras224Step:
    """Keras 2.2.4's own ``get_updates`` for ``variables``, run on the numpy graph backend."""

    def __init__(self, config: optimizers.Optimizer, params: Mapping[str, np.ndarray]) -> None:
        self.names = list(params)
        kwargs = {k: v for k, v in config.get_config().items() if v is not None}
        with K.floatx_scope("float32"):
            self.variables = [K.variable(np.array(params[n])) for n in self.names]
            self.optimizer = getattr(keras_2_2_4, config.class_name)(**kwargs)
            loss = K.FedGradients()
            self.train = K.function(loss, [], self.optimizer.get_updates(loss, self.variables))

    def __call__(self, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.train([grads[n] for n in self.names])
        return dict(zip(self.names, K.batch_get_value(self.variables), strict=True))


def train_locally(
    tf: Any,
    keras: Any,
    model: Any,
    config: optimizers.Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch: int,
    epochs: int,
) -> None:
    """What ``model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False)`` does, with
    Keras 2.2.4's optimizer as the step."""
    variables = list(model.trainable_variables)
    names = [str(i) for i in range(len(variables))]
    step = Keras224Step(config, {n: v.numpy() for n, v in zip(names, variables, strict=True)})
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for _ in range(epochs):
        for start in range(0, len(x), batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, variables)
            new = step({n: g.numpy() for n, g in zip(names, grads, strict=True)})
            for n, v in zip(names, variables, strict=True):
                v.assign(new[n])


# --- fit through a session equals local Keras 2.2 training -----------------------------------


@pytest.mark.parametrize(
    "config",
    [optimizers.SGD(lr=0.05, momentum=0.9, nesterov=True), optimizers.Adam(lr=0.01)],
    ids=["sgd-nesterov", "adam"],
)
def test_fit_through_a_session_matches_local_keras_2_2_training(
    tf: Any, keras: Any, psk: Any, client: Client, config: optimizers.Optimizer
) -> None:
    x, y, x_test, y_test = blobs(2000)
    remote_model, local_model = mlp(keras), mlp(keras)
    for a, b in zip(remote_model.weights, local_model.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())  # the same initial weights
    before = accuracy(remote_model, x_test, y_test)

    remote = psk.create_session(client, remote_model, config)
    compile_remote(keras, remote_model, remote)
    history = remote_model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    train_locally(tf, keras, local_model, config, x, y, batch=32, epochs=3)

    steps = 3 * -(-len(x) // 32)
    assert remote.session.info().iterations == steps == int(remote.iterations.numpy())
    assert len(history.history["loss"]) == 3
    ours, theirs = accuracy(remote_model, x_test, y_test), accuracy(local_model, x_test, y_test)
    assert ours > max(0.85, before + 0.3), (before, ours)
    assert abs(ours - theirs) <= 0.01, (ours, theirs)
    for a, b in zip(remote_model.trainable_variables, local_model.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    remote.session.delete()


def test_run_eagerly_and_steps_per_execution_give_the_same_steps(
    keras: Any, psk: Any, client: Client
) -> None:
    """The py_function inside fit's graph (also several steps per graph call) and the plain
    eager call push the same gradients: the weights agree at the end."""
    x, y, _, _ = blobs(640)
    finals = []
    for options in ({"run_eagerly": True}, {}, {"steps_per_execution": 5}):
        model = mlp(keras)
        remote = psk.create_session(client, model, optimizers.SGD(lr=0.1, momentum=0.9))
        compile_remote(keras, model, remote, **options)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        assert remote.session.info().iterations == len(x) // 32
        finals.append(psk.model_weights(model))
        remote.session.delete()
    for other in finals[1:]:
        for name, value in finals[0].items():
            np.testing.assert_allclose(other[name], value, rtol=1e-5, atol=1e-6)


# --- BatchNormalization and Embedding ------------------------------------------------------


def test_batchnorm_and_embedding_model_trains(keras: Any, psk: Any, client: Client) -> None:
    """Token ids (through an Embedding) and numbers (through BatchNormalization): the session
    holds the trainable variables only; the moving statistics train locally."""
    rng = np.random.default_rng(3)
    n, length, vocab = 2400, 6, 20
    tokens = rng.integers(0, vocab, size=(n, length)).astype(np.int32)
    numbers = rng.normal(loc=5.0, scale=3.0, size=(n, 4)).astype(np.float32)
    y = (((tokens < 5).sum(axis=1) >= 2) ^ (numbers[:, 0] > 5.0)).astype(np.int32)

    keras.utils.set_random_seed(4)
    token_in = keras.Input((length,), dtype="int32")
    number_in = keras.Input((4,))
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(vocab, 8)(token_in))
    normed = keras.layers.BatchNormalization()(number_in)
    hidden = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()([pooled, normed]))
    model = keras.Model([token_in, number_in], keras.layers.Dense(2)(hidden))

    remote = psk.create_session(client, model, optimizers.Adam(lr=0.01))
    assert remote.names == (
        "embedding/embeddings",
        "batch_normalization/gamma",
        "batch_normalization/beta",
        "dense/kernel",
        "dense/bias",
        "dense_1/kernel",
        "dense_1/bias",
    )
    assert set(remote.session.info().parameters) == set(remote.names)  # no moving statistics
    compile_remote(keras, model, remote, metrics=["accuracy"])
    cut = n * 3 // 4
    model.fit([tokens[:cut], numbers[:cut]], y[:cut], batch_size=32, epochs=8, verbose=0)

    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    # The moving statistics were trained here (the numbers have mean 5, variance 9).
    assert abs(float(bn.moving_mean.numpy().mean()) - 5.0) < 1.0
    assert abs(float(bn.moving_variance.numpy().mean()) - 9.0) < 3.0
    _, test_accuracy = model.evaluate([tokens[cut:], numbers[cut:]], y[cut:], verbose=0)
    assert test_accuracy > 0.85
    pulled = remote.session.pull()
    for name, variable in psk.trainable_parameters(model).items():
        assert np.array_equal(pulled[name], variable.numpy())
    remote.session.delete()


def test_indexed_slices_gradient_is_dense_with_repeated_rows_summed(
    tf: Any, keras: Any, psk: Any, client: Client
) -> None:
    """One SGD(lr=1) step on the sum of an embedding lookup of ids [1, 1, 3]: row 1 moves by
    2 (two lookups), row 3 by 1, the other rows not at all."""
    keras.utils.set_random_seed(5)
    ids = keras.Input((3,), dtype="int32")
    model = keras.Model(ids, keras.layers.Embedding(5, 2)(ids))
    batch = np.array([[1, 1, 3]], np.int32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(batch))
    assert isinstance(tape.gradient(loss, model.trainable_variables)[0], tf.IndexedSlices)

    before = psk.model_weights(model)["embedding/embeddings"]
    remote = psk.create_session(client, model, optimizers.SGD(lr=1.0))
    model.compile(optimizer=remote, loss=lambda _, y_pred: keras.ops.sum(y_pred, axis=(1, 2)))
    model.fit(batch, np.zeros(1, np.float32), batch_size=1, epochs=1, verbose=0)

    moved = before - remote.session.pull()["embedding/embeddings"]
    np.testing.assert_allclose(moved, [[0, 0], [2, 2], [0, 0], [1, 1], [0, 0]], atol=1e-6)
    remote.session.delete()


# --- names ------------------------------------------------------------------------------------


def nested(keras: Any) -> Any:
    """A subclassed model holding a block of two Dense layers and a weight of its own."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.first = keras.layers.Dense(4)
            self.second = keras.layers.Dense(4)

        def build(self, input_shape: Any) -> None:
            self.offset = self.add_weight(shape=(4,), initializer="zeros")

        def call(self, x: Any) -> Any:
            return self.second(self.first(x)) + self.offset

    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()
            self.head = keras.layers.Dense(2, name="head")

        def call(self, x: Any) -> Any:
            return self.head(self.block(x))

    net = Net()
    net(np.zeros((1, 3), np.float32))
    return net


def test_names_do_not_depend_on_kerass_name_counters(keras: Any, psk: Any) -> None:
    first, second = mlp(keras), mlp(keras)
    assert [v.path for v in first.trainable_variables] != [
        v.path for v in second.trainable_variables
    ]  # Keras's own paths carry process-wide counters (sequential_1/dense_2/...)
    assert psk.parameter_names(first) == psk.parameter_names(second)
    assert psk.parameter_names(first) == [
        "dense/kernel",
        "dense/bias",
        "dense_1/kernel",
        "dense_1/bias",
    ]

    a, b = nested(keras), nested(keras)
    assert [v.path for v in a.trainable_variables] != [v.path for v in b.trainable_variables]
    assert psk.parameter_names(a) == psk.parameter_names(b)
    assert sorted(psk.parameter_names(a)) == [
        "block/dense/bias",
        "block/dense/kernel",
        "block/dense_1/bias",
        "block/dense_1/kernel",
        "block/variable",
        "head/bias",
        "head/kernel",
    ]


def test_bidirectional_names_do_not_depend_on_the_counter(keras: Any, psk: Any) -> None:
    """Bidirectional names its copies forward_<inner>/backward_<inner>, the inner name from
    the process-wide counter (lstm, lstm_2, ...): the names must not carry it."""

    def build() -> Any:
        model = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Embedding(20, 4),
                keras.layers.Bidirectional(keras.layers.LSTM(3)),
                keras.layers.Dense(2),
            ]
        )
        return model

    first, second = build(), build()
    assert psk.parameter_names(first) == psk.parameter_names(second)
    assert any(n.startswith("bidirectional/forward_lstm/") for n in psk.parameter_names(first))
    assert any(n.startswith("bidirectional/backward_lstm/") for n in psk.parameter_names(first))


def test_join_takes_the_sessions_weights_from_another_build(
    keras: Any, psk: Any, client: Client
) -> None:
    creator = mlp(keras, seed=1)
    remote = psk.create_session(client, creator, optimizers.SGD())
    joiner = mlp(keras, seed=2)  # other random weights, other Keras names
    assert not np.array_equal(creator.weights[0].numpy(), joiner.weights[0].numpy())

    joined = psk.join_session(client, joiner, remote.session.id)
    assert joined.names == remote.names
    for a, b in zip(creator.trainable_variables, joiner.trainable_variables, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    remote.session.delete()


def test_join_lists_every_mismatch(keras: Any, psk: Any, client: Client) -> None:
    remote = psk.create_session(client, mlp(keras), optimizers.SGD())
    keras.utils.set_random_seed(1)
    other = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(33, activation="tanh"),
            keras.layers.Dense(4, kernel_constraint=keras.constraints.NonNeg()),
            keras.layers.Dense(4),
        ]
    )
    with pytest.raises(psk.SessionMismatch) as info:
        psk.join_session(client, other, remote.session.id)
    problems = info.value.problems
    assert "dense/kernel: the model has float32[8, 33], the session float32[8, 32]" in problems
    assert "dense/bias: the model has float32[33], the session float32[32]" in problems
    assert "dense_1/kernel: the model has float32[33, 4], the session float32[32, 4]" in problems
    assert "dense_1/kernel: constraint NonNeg() in the model, none in the session" in problems
    assert "dense_2/kernel: in the model (float32[4, 4]), not in the session" in problems
    assert "dense_2/bias: in the model (float32[4]), not in the session" in problems
    assert len(problems) == 6, problems
    assert remote.session.id in str(info.value) and "dense_2/kernel" in str(info.value)
    remote.session.delete()


# --- refusals -----------------------------------------------------------------------------------


def test_none_gradient_is_refused_naming_the_parameter(
    keras: Any, psk: Any, client: Client
) -> None:
    class WithUnused(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.used = keras.layers.Dense(2, name="used")
            self.unused = keras.layers.Dense(2, name="unused")

        def build(self, input_shape: Any) -> None:
            self.used.build(input_shape)
            self.unused.build(input_shape)

        def call(self, x: Any) -> Any:
            return self.used(x)

    model = WithUnused()
    model.build((None, 3))
    remote = psk.create_session(client, model, optimizers.Adam())
    compile_remote(keras, model, remote)
    x, y = np.ones((8, 3), np.float32), np.zeros(8, np.int32)
    with pytest.raises(ValueError, match="no gradient for parameter") as info:
        model.fit(x, y, batch_size=4, verbose=0)
    assert "'unused/kernel', 'unused/bias'" in str(info.value)
    assert "used/kernel'" not in str(info.value).replace("unused/kernel'", "")
    assert remote.session.info().iterations == 0  # nothing was sent
    remote.session.delete()


def test_a_keras_optimizer_object_is_refused_with_the_way_out(
    keras: Any, psk: Any, client: Client
) -> None:
    with pytest.raises(TypeError, match=r"optimizers\.TFOptimizer\(that object\)") as info:
        psk.create_session(client, mlp(keras), keras.optimizers.Adam())
    assert "Adam" in str(info.value) and "optimizers.Adam(lr=1e-3)" in str(info.value)


def test_unsupported_constraints_are_refused_before_sending(
    keras: Any, psk: Any, client: Client
) -> None:
    class Clip(keras.constraints.Constraint):
        def __call__(self, w: Any) -> Any:
            return keras.ops.clip(w, -1.0, 1.0)

    class MyMaxNorm(keras.constraints.MaxNorm):
        pass

    before = {s.session_id for s in client.sessions()}
    for constraint, shown in ((Clip(), "Clip"), (MyMaxNorm(), "MyMaxNorm")):
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2, bias_constraint=constraint)]
        )
        with pytest.raises(ValueError, match=r"parameter 'dense/bias' .* has the constraint") as e:
            psk.create_session(client, model, optimizers.SGD())
        assert shown in str(e.value) and "MaxNorm, NonNeg, UnitNorm and MinMaxNorm" in str(e.value)
    assert {s.session_id for s in client.sessions()} == before


# --- constraints: applied once, by the server ---------------------------------------------------


def test_min_max_norm_worker_weights_equal_the_servers_bit_for_bit(
    keras: Any, psk: Any, client: Client
) -> None:
    """Keras 3 would apply the constraint again after the server did; at rate 0.5 that moves
    the norms once more, so the weights would differ. The adapter turns Keras's pass off."""
    constraint = keras.constraints.MinMaxNorm(min_value=1.0, max_value=2.0, rate=0.5, axis=0)
    keras.utils.set_random_seed(6)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", kernel_constraint=constraint),
            keras.layers.Dense(4, bias_constraint=keras.constraints.NonNeg()),
        ]
    )
    remote = psk.create_session(client, model, optimizers.SGD(lr=0.05, momentum=0.9))
    assert {n: c.to_dict() for n, c in remote.session.info().constraints.items()} == {
        "dense/kernel": {
            "class_name": "MinMaxNorm",
            "config": {"min_value": 1.0, "max_value": 2.0, "rate": 0.5, "axis": 0},
        },
        "dense_1/bias": {"class_name": "NonNeg", "config": {}},
    }
    compile_remote(keras, model, remote)
    x, y, _, _ = blobs(640, seed=7)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)

    pulled = remote.session.pull()
    for name, variable in psk.trainable_parameters(model).items():
        ours = variable.numpy()
        assert ours.tobytes() == pulled[name].tobytes(), name
    kernel = pulled["dense/kernel"]
    norms = np.sqrt((kernel.astype(np.float64) ** 2).sum(axis=0))
    assert norms.min() > 0.95  # pulled up from ~0.6 towards [1, 2] at every step
    again = np.asarray(constraint(kernel))
    assert not np.array_equal(again, kernel)  # applying it twice would have changed the bits
    assert (pulled["dense_1/bias"] >= 0).all()
    remote.session.delete()


# --- fit's compiled function ------------------------------------------------------------------


def test_jit_compile_falls_back_to_the_graph_without_xla(
    keras: Any, psk: Any, client: Client
) -> None:
    """XLA cannot compile the py_function of the step: a bound model says it does not
    support jit, so ``jit_compile=True`` falls back (Keras warns) and ``"auto"`` resolves to
    False on any machine. Forcing it anyway gets a clear error, not XLA's."""
    x, y, _, _ = blobs(320)
    model = mlp(keras)
    remote = psk.create_session(client, model, optimizers.SGD(lr=0.1))
    with pytest.warns(UserWarning, match="doesn't support `jit_compile=True`"):
        compile_remote(keras, model, remote, jit_compile=True)
    assert model.jit_compile is False
    model.fit(x, y, batch_size=32, verbose=0)
    assert remote.session.info().iterations == -(-len(x) // 32)

    model.supports_jit = True
    model.jit_compile = True
    model.train_function = None  # fit makes a new one, now with XLA
    with pytest.raises(RuntimeError, match=r"jit_compile=True\): compile the model with"):
        model.fit(x, y, batch_size=32, verbose=0)
    remote.session.delete()


def test_a_stale_push_pulls_the_sessions_weights(keras: Any, psk: Any, client: Client) -> None:
    """Two workers of an ``Async(max_staleness=0)`` session: the second's gradient was computed
    on weights one step old, so it is dropped and the worker takes the session's weights."""
    x, y, _, _ = blobs(64)
    first = mlp(keras)
    remote = psk.create_session(
        client, first, optimizers.SGD(lr=0.1), training=Async(max_staleness=0)
    )
    second = mlp(keras, seed=9)
    joined = psk.join_session(client, second, remote.session.id)
    for model, optimizer in ((first, remote), (second, joined)):
        compile_remote(keras, model, optimizer)
    first.fit(x[:32], y[:32], batch_size=32, verbose=0)
    second.fit(x[32:], y[32:], batch_size=32, verbose=0)

    assert (remote.stale_gradients, joined.stale_gradients) == (0, 1)
    assert remote.session.info().iterations == 1
    for a, b in zip(first.trainable_variables, second.trainable_variables, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    remote.session.delete()


# --- without TensorFlow ----------------------------------------------------------------------


def test_importing_without_tensorflow_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
        "try:\n"
        "    import paramserver.client.keras\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "import paramserver.client\n"  # the rest of the client does not need it
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'paramserver[tensorflow]'" in done.stdout


def test_an_error_of_the_step_inside_fit_names_its_cause(
    tf: Any, keras: Any, psk: Any, client: Client
) -> None:
    """Inside fit's graph the step is a py_function: its exception reaches the caller as a
    TensorFlow ``OpError`` whose message carries it; the exception itself is kept."""
    from paramserver.client import SessionNotFound

    x, y, _, _ = blobs(128)
    model = mlp(keras)
    remote = psk.create_session(client, model, optimizers.SGD())
    compile_remote(keras, model, remote)
    model.fit(x[:32], y[:32], batch_size=32, verbose=0)
    remote.session.delete()
    with pytest.raises(tf.errors.OpError, match="SessionNotFound: 404 session_not_found"):
        model.fit(x, y, batch_size=32, verbose=0)
    assert isinstance(remote.last_error, SessionNotFound)


def test_a_saved_model_is_loaded_without_compiling_and_joined(
    keras: Any, psk: Any, client: Client, tmp_path: Path
) -> None:
    x, y, _, _ = blobs(128)
    model = mlp(keras)
    remote = psk.create_session(client, model, optimizers.SGD())
    compile_remote(keras, model, remote)
    model.fit(x[:64], y[:64], batch_size=32, verbose=0)
    model.save(tmp_path / "model.keras")

    with pytest.raises(TypeError, match="load the model with compile=False, then join"):
        keras.models.load_model(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    joined = psk.join_session(client, loaded, remote.session.id)
    assert joined.names == remote.names
    for a, b in zip(model.trainable_variables, loaded.trainable_variables, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    remote.session.delete()


def test_indexed_slices_travel_as_their_rows(tf: Any, keras: Any, psk: Any, client: Client) -> None:
    """An Embedding's gradient is pushed as the rows the batch looked up (Rows), not as the
    whole table: the server received 3 rows of 8 float32 and their indices, not 1000 rows."""
    import httpx

    keras.utils.set_random_seed(6)
    ids = keras.Input((3,), dtype="int32")
    model = keras.Model(ids, keras.layers.Embedding(1000, 8)(ids))
    before = psk.model_weights(model)["embedding/embeddings"]
    remote = psk.create_session(client, model, optimizers.SGD(lr=1.0))
    model.compile(optimizer=remote, loss=lambda _, y_pred: keras.ops.sum(y_pred, axis=(1, 2)))
    model.fit(np.array([[1, 1, 3]], np.int32), np.zeros(1, np.float32), batch_size=1, verbose=0)
    base = str(client.base_url).rstrip("/")
    stats = {s["session_id"]: s for s in httpx.get(f"{base}/stats", timeout=30).json()["sessions"]}
    assert stats[remote.session.id]["bytes_in"] == 3 * 8 * 4 + 3 * 8
    moved = before - remote.session.pull()["embedding/embeddings"]
    np.testing.assert_allclose(moved[1], 2 * np.ones(8), rtol=1e-6)
    np.testing.assert_allclose(moved[3], np.ones(8), rtol=1e-6)
    assert not moved[np.setdiff1d(np.arange(1000), [1, 3])].any()
    remote.session.delete()
