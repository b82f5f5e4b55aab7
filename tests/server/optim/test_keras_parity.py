"""Every optimizer step equals Keras 2.2.4's, to float32 precision.

How the reference values are produced: ``tests/reference/keras_2_2_4_optimizers.py`` is Keras
2.2.4's own ``keras/optimizers.py``, copied unmodified from the ``keras==2.2.4`` wheel except
for its import lines, which point ``K`` (and the few ``tf`` names of ``clip_norm``) at
``tests/reference/numpy_graph_backend.py``. That backend is a lazy numpy graph with
TensorFlow 1.x graph semantics: Keras's real ``get_updates(loss, params)`` builds the update
graph once; ``K.gradients`` gives placeholders that each step feeds with that step's
gradients; one call of ``K.function(..., updates=...)`` evaluates every update from the values
the variables held before the step and then assigns them all, like one ``session.run``. Every
operation is computed in its tensor's dtype (``floatx``: float32, or float64 in the float64
cases), Python numbers are rounded to that dtype before they are combined (as
``tf.convert_to_tensor`` does), and ``K.variable(0.001)`` holds ``float32(0.001)``. None of our
engine's code (``paramserver.server.optim``) runs on the reference side.

Each case runs the same seeded parameters (a scalar, a vector, a matrix and a 4-D kernel) and
at least 50 steps of random gradients (their scale varies per step, so that clipnorm and
clipvalue are active in some steps only) through both, and compares after every step the
parameters, every slot, the iteration count and Nadam's ``m_schedule``. The parameters start
small (about 0.01), so that they are made of the steps taken: an error of 1e-4 in a step shows.

Tolerance: ``rtol=1e-5`` in float32 (1e-10 in float64) elementwise, plus an absolute floor of
1e-6 (1e-12) times the largest magnitude of that quantity over the model. The floor is there
because Keras takes clipnorm's global norm as a float32 ``reduce_sum`` and we take it in
float64: the clipped gradients then differ in the last bit, and a parameter that passes
through zero has no meaningful relative error. Where no clipnorm and no ``pow`` is involved
(SGD, RMSprop, Adagrad, Adadelta), the engine must even give the same bits as Keras's graph
(``test_rounding_order_is_kerass``): the kernels do Keras's IEEE operations in Keras's order.
The others use ``pow``, where libm and numpy's SIMD loops may differ by an ulp per machine.

Also here: steps continued from the same restored state late in training, random valid
configurations (hypothesis), and checks of the reference backend itself. The configurations
against Keras's (``get_config``, defaults, names) are in
``tests/protocol/test_optimizer_config_matches_keras.py``.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paramserver import optimizers
from paramserver.server.optim import KerasOptimizer, NumpyBackend, OptimizerState, default_backend
from tests.reference import keras_2_2_4_optimizers as keras_optimizers
from tests.reference import numpy_graph_backend as K

STEPS = 50
SHAPES: dict[str, tuple[int, ...]] = {
    "bias": (),
    "vector": (13,),
    "matrix": (5, 7),
    "kernel": (2, 3, 4, 5),
}
#: elementwise rtol, and the absolute floor as a fraction of the quantity's largest magnitude
TOLERANCE = {
    np.dtype(np.float32): (1e-5, 1e-6),
    np.dtype(np.float64): (1e-10, 1e-12),
}

#: 7 elements per chunk: every parameter but the scalar spans several chunks, the matrix
#: (35 elements) ends exactly on a chunk edge, the vector and the kernel do not.
BACKENDS: dict[str, Callable[[], Any]] = {
    "numpy-chunk7": lambda: NumpyBackend(chunk_elements=7),
    "numpy": lambda: NumpyBackend(),
    "default": default_backend,
}
backend_param = pytest.mark.parametrize("make_backend", BACKENDS.values(), ids=BACKENDS.keys())


# --- the reference -------------------------------------------------------------------------------


class KerasReference:
    """Keras 2.2.4's own optimizer code, run on the numpy graph backend.

    ``class_name`` and ``kwargs`` are given to the vendored Keras class as a Keras user would
    (``lr``, never ``learning_rate``; clip arguments only when set).
    """

    def __init__(
        self, class_name: str, kwargs: Mapping[str, Any], params: Mapping[str, np.ndarray]
    ) -> None:
        self.names = list(params)
        dtype = np.result_type(*params.values())
        with K.floatx_scope(dtype.name):
            self.variables = [K.variable(params[n].copy()) for n in self.names]
            self.optimizer = getattr(keras_optimizers, class_name)(**kwargs)
            self.loss = K.FedGradients()
            updates = self.optimizer.get_updates(self.loss, self.variables)
            self.train = K.function(self.loss, [], updates)

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        self.train([grads[n] for n in self.names])

    def params(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, K.batch_get_value(self.variables), strict=True))

    @property
    def iterations(self) -> int:
        return int(K.get_value(self.optimizer.iterations))

    def slot_variables(self, slot_names: tuple[str, ...]) -> dict[str, dict[str, K.Variable]]:
        """Keras's ``weights`` (minus ``iterations``) as ``{slot: {param: variable}}``.

        Keras lists slot variables slot by slot, each in parameter order; Adam without
        amsgrad adds unused ``vhats`` of shape (1,) at the end, which we do not have.
        """
        weights = list(self.optimizer.weights)
        if weights and weights[0] is self.optimizer.iterations:
            weights = weights[1:]
        n = len(self.names)
        return {
            slot: dict(zip(self.names, weights[i * n : (i + 1) * n], strict=True))
            for i, slot in enumerate(slot_names)
        }

    def slots(self, slot_names: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
        return {
            slot: dict(zip(per, K.batch_get_value(list(per.values())), strict=True))
            for slot, per in self.slot_variables(slot_names).items()
        }

    def load(self, state: OptimizerState, slot_names: tuple[str, ...]) -> None:
        """Keras's ``set_weights`` of our state (and its ``m_schedule``)."""
        pairs: list[tuple[Any, Any]] = [(self.optimizer.iterations, state.iterations)]
        for slot, per in self.slot_variables(slot_names).items():
            pairs += [(var, state.slots[slot][name]) for name, var in per.items()]
        if "m_schedule" in state.scalars:
            pairs.append((self.optimizer.m_schedule, state.scalars["m_schedule"]))
        K.batch_set_value(pairs)

    def scalars(self) -> dict[str, float]:
        if hasattr(self.optimizer, "m_schedule"):
            return {"m_schedule": float(K.get_value(self.optimizer.m_schedule))}
        return {}


def keras_kwargs(class_name: str, ours: Mapping[str, Any]) -> dict[str, Any]:
    """What a Keras 2.2.4 user writes for our configuration ``ours``.

    ``learning_rate`` becomes ``lr`` (Keras 2.2.4 has no alias); Nadam's ``schedule_decay``
    is always given, because our default (0.001) is not Keras's (0.004).
    """
    kwargs = dict(ours)
    if "learning_rate" in kwargs:
        kwargs["lr"] = kwargs.pop("learning_rate")
    if class_name == "Nadam":
        kwargs.setdefault("schedule_decay", optimizers.Nadam().schedule_decay)
    return kwargs


# --- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    class_name: str
    ours: tuple[tuple[str, Any], ...]
    #: Keras's arguments when they are not simply ``keras_kwargs(class_name, ours)``
    keras: tuple[tuple[str, Any], ...] | None = None

    @property
    def id(self) -> str:
        args = "-".join(f"{k}={v}" for k, v in self.ours) or "defaults"
        return f"{self.class_name}-{args}"

    def our_config(self) -> optimizers.Optimizer:
        return getattr(optimizers, self.class_name)(**dict(self.ours))

    def keras_kwargs(self) -> dict[str, Any]:
        if self.keras is not None:
            return dict(self.keras)
        return keras_kwargs(self.class_name, dict(self.ours))


def _case(class_name: str, keras: dict[str, Any] | None = None, **ours: Any) -> Case:
    return Case(class_name, tuple(ours.items()), None if keras is None else tuple(keras.items()))


# Thresholds sit inside the range of the per-step norms (about 1 to 120) and of the elements,
# so that clipping switches on and off during a run.
CLIPS: list[dict[str, Any]] = [
    {"clipnorm": 10.0},
    {"clipvalue": 0.5},
    {"clipnorm": 10.0, "clipvalue": 0.5},
]

CASES: list[Case] = [
    _case("SGD"),
    _case("SGD", momentum=0.9),
    _case("SGD", momentum=0.9, nesterov=True),
    _case("SGD", nesterov=True),
    _case("SGD", decay=0.05),
    _case("SGD", momentum=0.5, nesterov=True, decay=0.01),
    _case("SGD", learning_rate=0.05, momentum=0.3),
    *[_case("SGD", momentum=0.9, **c) for c in CLIPS],
    _case("RMSprop"),
    _case("RMSprop", rho=0.5, epsilon=1e-4),
    _case("RMSprop", decay=0.05),
    _case("RMSprop", learning_rate=0.01),
    *[_case("RMSprop", **c) for c in CLIPS],
    _case("Adagrad"),
    _case("Adagrad", epsilon=1e-3),
    _case("Adagrad", decay=0.05),
    _case("Adagrad", learning_rate=0.1),
    *[_case("Adagrad", **c) for c in CLIPS],
    _case("Adadelta"),
    _case("Adadelta", rho=0.5, epsilon=1e-5),
    _case("Adadelta", decay=0.05),
    _case("Adadelta", learning_rate=0.5),
    *[_case("Adadelta", **c) for c in CLIPS],
    _case("Adam"),
    _case("Adam", amsgrad=True),
    _case("Adam", decay=0.05),
    _case("Adam", beta_1=0.5, beta_2=0.9, epsilon=1e-4),
    _case("Adam", amsgrad=True, decay=0.01, clipnorm=10.0),
    _case("Adam", learning_rate=0.01),
    *[_case("Adam", **c) for c in CLIPS],
    _case("Adamax"),
    _case("Adamax", decay=0.05),
    _case("Adamax", beta_1=0.5, beta_2=0.9, epsilon=1e-4),
    _case("Adamax", learning_rate=0.01),
    *[_case("Adamax", **c) for c in CLIPS],
    _case("Nadam"),  # our default schedule_decay, 0.001, given to Keras explicitly
    _case("Nadam", keras={}, schedule_decay=0.004),  # Keras's own default, not given to it
    _case("Nadam", schedule_decay=0.0),
    _case("Nadam", beta_1=0.5, beta_2=0.9, epsilon=1e-4),
    _case("Nadam", learning_rate=0.01),
    *[_case("Nadam", **c) for c in CLIPS],
]
case_param = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
dtype_param = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])


def make_run(
    seed: int, dtype: Any, steps: int, shapes: Mapping[str, tuple[int, ...]] = SHAPES
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Seeded initial parameters and ``steps`` gradients whose scale varies ~100x per step."""
    rng = np.random.default_rng(seed)
    params = {n: np.asarray(0.01 * rng.standard_normal(s), dtype=dtype) for n, s in shapes.items()}
    grads = []
    for _ in range(steps):
        scale = 10.0 ** rng.uniform(-1.0, 1.0)
        grads.append(
            {n: np.asarray(scale * rng.standard_normal(s), dtype=dtype) for n, s in shapes.items()}
        )
    return params, grads


@dataclass(frozen=True)
class Snapshot:
    params: dict[str, np.ndarray]
    slots: dict[str, dict[str, np.ndarray]]
    iterations: int
    scalars: dict[str, float]


@dataclass(frozen=True)
class Trajectory:
    initial: dict[str, np.ndarray]
    grads: list[dict[str, np.ndarray]]
    after: list[Snapshot]  # after[i]: the state after step i + 1
    start: OptimizerState | None = None  # the optimizer state before the first step


def reference_trajectory(
    class_name: str,
    keras: Mapping[str, Any],
    slot_names: tuple[str, ...],
    initial: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    start: OptimizerState | None = None,
) -> Trajectory:
    """Keras's steps from ``initial`` (and the optimizer state ``start``, if given)."""
    ref = KerasReference(class_name, keras, initial)
    if start is not None:
        ref.load(start, slot_names)
    after = []
    for g in grads:
        ref.step(g)
        after.append(Snapshot(ref.params(), ref.slots(slot_names), ref.iterations, ref.scalars()))
    return Trajectory(initial, grads, after, start)


@functools.cache
def case_trajectory(case: Case, dtype_name: str) -> Trajectory:
    """The Keras trajectory of ``case`` (computed once, shared by every backend)."""
    dtype = np.dtype(dtype_name)
    initial, grads = make_run(zlib.crc32(case.id.encode()), dtype, STEPS)
    slot_names = slot_names_of(case.our_config(), initial)
    return reference_trajectory(case.class_name, case.keras_kwargs(), slot_names, initial, grads)


def slot_names_of(
    config: optimizers.Optimizer, params: Mapping[str, np.ndarray]
) -> tuple[str, ...]:
    return KerasOptimizer(config, params, backend=NumpyBackend()).slot_names


# --- comparison ----------------------------------------------------------------------------------


def assert_matches(
    ours: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], what: str, exact: bool
) -> None:
    """Elementwise ``rtol``, with an absolute floor relative to the model-wide magnitude."""
    assert ours.keys() == ref.keys(), what
    scale = max(float(np.max(np.abs(r), initial=0.0)) for r in ref.values())
    for name, r in ref.items():
        o = ours[name]
        assert o.dtype == r.dtype and o.shape == r.shape, f"{what} {name!r}"
        rtol, floor = (0.0, 0.0) if exact else TOLERANCE[r.dtype]
        atol = floor * scale
        # the same test as assert_allclose, which is only called (for its report) on failure
        if not np.all(np.abs(o - r) <= atol + rtol * np.abs(r)):
            np.testing.assert_allclose(o, r, rtol=rtol, atol=atol, err_msg=f"{what} {name!r}")
            raise AssertionError(f"{what} {name!r}: {o!r} != {r!r}")


def assert_follows(
    config: optimizers.Optimizer,
    backend: Any,
    trajectory: Trajectory,
    label: str,
    *,
    exact: bool = False,
) -> None:
    """Run our engine along ``trajectory``'s gradients and compare after every step."""
    params = {n: p.copy() for n, p in trajectory.initial.items()}
    engine = KerasOptimizer(config, params, backend=backend)
    if trajectory.start is not None:
        engine.set_state(trajectory.start)
    start = engine.iterations
    for i, (g, ref) in enumerate(zip(trajectory.grads, trajectory.after, strict=True)):
        engine.step(params, {n: a.copy() for n, a in g.items()})
        where = f"{label} [{backend.name}] step {start + i + 1}:"
        assert engine.iterations == ref.iterations == start + i + 1, where
        assert_matches(params, ref.params, f"{where} param", exact)
        assert set(engine.slots) == set(ref.slots), where
        for slot in engine.slot_names:
            assert_matches(engine.slots[slot], ref.slots[slot], f"{where} slot {slot!r} of", exact)
        assert engine.scalars.keys() == ref.scalars.keys(), where
        for key, value in ref.scalars.items():
            rtol = TOLERANCE[engine.compute_dtype][0]
            np.testing.assert_allclose(float(engine.scalars[key]), value, rtol=rtol, err_msg=where)


# --- tests ---------------------------------------------------------------------------------------


def test_every_optimizer_and_option_is_covered() -> None:
    names = {c.class_name for c in CASES}
    assert names == set(optimizers.optimizer_names()) - {"TFOptimizer"}
    for name in names:
        options = {k for c in CASES if c.class_name == name for k, _ in c.ours}
        own = set(getattr(optimizers, name)().get_config())
        assert options >= (own - {"lr"}) | {"clipnorm", "clipvalue", "learning_rate"}, name


@backend_param
@dtype_param
@case_param
def test_steps_match_keras(case: Case, dtype: Any, make_backend: Callable[[], Any]) -> None:
    trajectory = case_trajectory(case, np.dtype(dtype).name)
    assert_follows(case.our_config(), make_backend(), trajectory, case.id)


#: Cases whose every operation is an IEEE add, subtract, multiply, divide or sqrt (no pow, no
#: clipnorm reduction): Keras's order of operations, which paramserver.server.optim.rules follows,
#: then gives the same bits on any machine.
EXACT_CASES = [
    c
    for c in CASES
    if c.class_name in ("SGD", "RMSprop", "Adagrad", "Adadelta") and "clipnorm" not in dict(c.ours)
]


@backend_param
@dtype_param
@pytest.mark.parametrize("case", EXACT_CASES, ids=[c.id for c in EXACT_CASES])
def test_rounding_order_is_kerass(case: Case, dtype: Any, make_backend: Callable[[], Any]) -> None:
    trajectory = case_trajectory(case, np.dtype(dtype).name)
    assert_follows(case.our_config(), make_backend(), trajectory, case.id, exact=True)


RESTORE_CONFIGS = {
    "SGD-momentum-decay": optimizers.SGD(momentum=0.9, decay=1e-3),
    "RMSprop-decay": optimizers.RMSprop(decay=1e-3),
    "Adagrad-decay": optimizers.Adagrad(decay=1e-3),
    "Adadelta-decay": optimizers.Adadelta(decay=1e-3),
    "Adam-amsgrad-decay": optimizers.Adam(amsgrad=True, decay=1e-3),
    "Adamax-decay": optimizers.Adamax(decay=1e-3),
    "Nadam": optimizers.Nadam(),
    "Nadam-0.004": optimizers.Nadam(schedule_decay=0.004),
}


@backend_param
@pytest.mark.parametrize("iterations", [1000, 2**24 + 1, 123_456_789])
@pytest.mark.parametrize("config", RESTORE_CONFIGS.values(), ids=RESTORE_CONFIGS.keys())
def test_steps_from_a_restored_state_match_keras(
    config: optimizers.Optimizer, iterations: int, make_backend: Callable[[], Any]
) -> None:
    """Continue from the same mid-run state, late in training (``t`` rounds in float32)."""
    initial, grads = make_run(iterations, np.float32, 10)
    engine = KerasOptimizer(config, initial, backend=NumpyBackend())
    rng = np.random.default_rng(iterations)
    state = OptimizerState(
        iterations=iterations,
        slots={
            slot: {
                n: np.asarray(rng.standard_normal(p.shape) * 0.1, np.float32)
                if slot in ("moment", "m")
                else np.asarray(np.abs(rng.standard_normal(p.shape)), np.float32)
                for n, p in initial.items()
            }
            for slot in engine.slot_names
        },
        scalars={"m_schedule": 0.03125} if isinstance(config, optimizers.Nadam) else {},
    )
    keras = keras_kwargs(config.class_name, config.get_config())
    trajectory = reference_trajectory(
        config.class_name, keras, engine.slot_names, initial, grads, state
    )
    assert_follows(config, make_backend(), trajectory, f"{config!r} from step {iterations}")


def test_clipping_switches_on_and_off_in_the_runs() -> None:
    """In every clipping case, some steps clip and some do not (norm, and element share)."""
    for case in CASES:
        clips = {k: v for k, v in case.ours if k in ("clipnorm", "clipvalue")}
        if not clips:
            continue
        grads = case_trajectory(case, "float32").grads
        if "clipnorm" in clips:
            norms = [
                np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in s.values()))
                for s in grads
            ]
            assert min(norms) < clips["clipnorm"] < max(norms), case.id
        if "clipvalue" in clips:
            share = [
                np.mean(
                    np.concatenate([np.abs(g).ravel() > clips["clipvalue"] for g in s.values()])
                )
                for s in grads
            ]
            assert min(share) < 0.5 < max(share), case.id


# --- random configurations -----------------------------------------------------------------------


def _log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(np.log10(lo), np.log10(hi)).map(lambda e: float(10.0**e))


def _maybe_zero(strategy: st.SearchStrategy[float]) -> st.SearchStrategy[float]:
    return st.one_of(st.just(0.0), strategy)


_unit = st.floats(0.0, 0.999)
_decay = _maybe_zero(_log_uniform(1e-4, 0.1))
_epsilon = st.one_of(st.none(), _log_uniform(1e-8, 1e-2))
_clips = st.fixed_dictionaries(
    {},
    optional={"clipnorm": _log_uniform(0.5, 50.0), "clipvalue": _log_uniform(0.05, 5.0)},
)

CONFIGS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "SGD": st.fixed_dictionaries(
        {
            "lr": _log_uniform(1e-4, 0.1),
            "momentum": _maybe_zero(st.floats(0.0, 0.99)),
            "decay": _decay,
            "nesterov": st.booleans(),
        }
    ),
    "RMSprop": st.fixed_dictionaries(
        {
            "lr": _log_uniform(1e-4, 0.1),
            "rho": _unit,
            "epsilon": _epsilon,
            "decay": _decay,
        }
    ),
    "Adagrad": st.fixed_dictionaries(
        {
            "lr": _log_uniform(1e-4, 0.5),
            "epsilon": _epsilon,
            "decay": _decay,
        }
    ),
    "Adadelta": st.fixed_dictionaries(
        {
            "lr": _log_uniform(1e-3, 2.0),
            "rho": _unit,
            "epsilon": _epsilon,
            "decay": _decay,
        }
    ),
    "Adam": st.fixed_dictionaries(
        {
            "lr": _log_uniform(1e-4, 0.1),
            "beta_1": _unit,
            "beta_2": _unit,
            "epsilon": _epsilon,
            "decay": _decay,
            "amsgrad": st.booleans(),
        }
    ),
    "Adamax": st.fixed_dictionaries(
        {
            "lr": _log_uniform(1e-4, 0.1),
            "beta_1": _unit,
            "beta_2": _unit,
            "epsilon": _epsilon,
            "decay": _decay,
        }
    ),
    "Nadam": st.fixed_dictionaries(
        {
            "lr": _log_uniform(1e-4, 0.1),
            "beta_1": _unit,
            "beta_2": _unit,
            "epsilon": _epsilon,
            "schedule_decay": _maybe_zero(_log_uniform(1e-4, 0.05)),
        }
    ),
}

HYPOTHESIS_STEPS = 8
HYPOTHESIS_SHAPES = {"bias": (), "vector": (9,), "kernel": (2, 3, 4)}


@pytest.mark.parametrize(
    "make_backend",
    [BACKENDS["numpy-chunk7"], BACKENDS["default"]],
    ids=["numpy-chunk7", "default"],
)
@pytest.mark.parametrize("class_name", list(CONFIGS))
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_configurations_match_keras(
    class_name: str, make_backend: Callable[[], Any], data: st.DataObject
) -> None:
    ours = data.draw(CONFIGS[class_name], label="config")
    ours.update(data.draw(_clips, label="clips"))
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    initial, grads = make_run(seed, np.float32, HYPOTHESIS_STEPS, HYPOTHESIS_SHAPES)
    config = getattr(optimizers, class_name)(**ours)
    keras = keras_kwargs(class_name, ours)
    slot_names = slot_names_of(config, initial)
    trajectory = reference_trajectory(class_name, keras, slot_names, initial, grads)
    assert_follows(config, make_backend(), trajectory, f"{class_name}{ours}")


# --- the reference backend itself ----------------------------------------------------------------


def test_python_floats_round_like_tensorflow_constants() -> None:
    """A Python float meets a float32 tensor as ``float32(x)`` (round to nearest).

    The backend converts explicitly (``tf.convert_to_tensor(x, dtype=float32)``); numpy 2's
    NEP 50 weak-scalar rule gives the same result when a float32 array meets a Python float.
    """
    rng = np.random.default_rng(1)
    a = rng.standard_normal(1000).astype(np.float32)
    for x in (0.1, 1e-7, 0.999, 1.0 / 3.0, 0.95, 2.0**-30 * 3.0):
        graph = K.function(K.FedGradients(), [K.variable(a) * x, x - K.variable(a)], [])([])
        assert np.array_equal(graph[0], a * np.float32(x))
        assert np.array_equal(graph[1], np.float32(x) - a)
        assert (a * x).dtype == np.float32
        assert np.array_equal(a * x, a * np.float32(x))  # NEP 50
        assert np.array_equal(x - a, np.float32(x) - a)
    assert K.variable(0.001).dtype == np.float32
    assert K.get_value(K.variable(0.001)) == np.float32(0.001)


def test_graph_runs_read_values_from_before_the_run() -> None:
    x = K.variable(np.float32(1.0))
    y = K.variable(np.float32(10.0))
    run = K.function(K.FedGradients(), [], [K.update(x, y + 1.0), K.update(y, x * 2.0)])
    run([])
    assert K.batch_get_value([x, y]) == [np.float32(11.0), np.float32(2.0)]


def test_graph_refuses_mixed_dtypes() -> None:
    with K.floatx_scope("float64"):
        x64 = K.variable(1.0)
    with pytest.raises(TypeError):
        K.variable(1.0) + x64
