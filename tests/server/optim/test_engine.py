"""The engine's state and its refusals (``paramserver.server.optim.engine.KerasOptimizer``).

* A state exported mid-run and imported (into the same optimizer or a fresh one) continues bit
  for bit.
* ``set_state`` and ``step`` refuse what does not fit and then have changed nothing.
* Gradients of another float dtype are cast; float64 models work.
* After the first step, a step allocates nothing proportional to the model's size.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from paramserver import optimizers
from paramserver.server.optim import (
    GradientError,
    KerasOptimizer,
    NumpyBackend,
    OptimizerState,
    StateError,
    default_backend,
)

SHAPES: dict[str, tuple[int, ...]] = {"bias": (), "vector": (11,), "kernel": (3, 4, 5)}

#: Every optimizer, with the options that add state or change the step.
CONFIGS: dict[str, optimizers.Optimizer] = {
    "SGD": optimizers.SGD(),
    "SGD-momentum-nesterov-decay": optimizers.SGD(momentum=0.9, nesterov=True, decay=0.01),
    "RMSprop": optimizers.RMSprop(decay=0.01, clipnorm=5.0),
    "Adagrad": optimizers.Adagrad(clipvalue=0.5),
    "Adadelta": optimizers.Adadelta(),
    "Adam": optimizers.Adam(),
    "Adam-amsgrad": optimizers.Adam(amsgrad=True, decay=0.01, clipnorm=5.0, clipvalue=1.0),
    "Adamax": optimizers.Adamax(),
    "Nadam": optimizers.Nadam(),
    "Nadam-keras-schedule": optimizers.Nadam(schedule_decay=0.004, clipnorm=5.0),
}
config_param = pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())

BACKENDS: dict[str, Callable[[], Any]] = {
    "numpy-chunk7": lambda: NumpyBackend(chunk_elements=7),
    "default": default_backend,
}
backend_param = pytest.mark.parametrize("make_backend", BACKENDS.values(), ids=BACKENDS.keys())


def make_params(dtype: Any = np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


def make_grads(steps: int, dtype: Any = np.float32, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {n: np.asarray(rng.standard_normal(s) * 3.0, dtype=dtype) for n, s in SHAPES.items()}
        for _ in range(steps)
    ]


def copy_params(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: p.copy() for n, p in params.items()}


def assert_same_arrays(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), name


def assert_same_state(a: OptimizerState, b: OptimizerState) -> None:
    assert a.iterations == b.iterations
    assert a.slots.keys() == b.slots.keys()
    for slot in a.slots:
        assert_same_arrays(a.slots[slot], b.slots[slot])
    assert a.scalars == b.scalars


# --- export and import ---------------------------------------------------------------------------


@backend_param
@config_param
def test_state_restored_into_a_fresh_optimizer_continues_bit_for_bit(
    config: optimizers.Optimizer, make_backend: Callable[[], Any]
) -> None:
    grads = make_grads(12)
    params = make_params()
    first = KerasOptimizer(config, params, backend=make_backend())
    for g in grads[:6]:
        first.step(params, g)
    state = first.get_state()
    checkpoint = copy_params(params)
    assert state.iterations == 6
    if isinstance(config, optimizers.Nadam):
        assert state.scalars["m_schedule"] != 1.0  # the schedule moved: it must be carried
    if config.get_config().get("amsgrad"):
        assert set(state.slots) == {"m", "v", "vhat"}
    for g in grads[6:]:
        first.step(params, g)

    restored = copy_params(checkpoint)
    second = KerasOptimizer(config, restored, backend=make_backend())
    second.set_state(state)
    assert_same_state(second.get_state(), state)
    for g in grads[6:]:
        second.step(restored, g)
    assert_same_arrays(restored, params)
    assert_same_state(second.get_state(), first.get_state())


@config_param
def test_state_reimported_into_the_same_optimizer_replays_bit_for_bit(
    config: optimizers.Optimizer,
) -> None:
    grads = make_grads(8)
    params = make_params()
    opt = KerasOptimizer(config, params, backend=NumpyBackend(chunk_elements=7))
    for g in grads[:4]:
        opt.step(params, g)
    state, checkpoint = opt.get_state(), copy_params(params)
    for g in grads[4:]:
        opt.step(params, g)
    end_params, end_state = copy_params(params), opt.get_state()

    opt.set_state(state)
    params = copy_params(checkpoint)
    for g in grads[4:]:
        opt.step(params, g)
    assert_same_arrays(params, end_params)
    assert_same_state(opt.get_state(), end_state)


@config_param
def test_numpy_and_default_backends_agree_bit_for_bit(config: optimizers.Optimizer) -> None:
    """The fused kernels are documented as bit-identical to the numpy ones."""
    grads = make_grads(6)
    results = []
    for backend in (NumpyBackend(chunk_elements=7), default_backend()):
        params = make_params()
        opt = KerasOptimizer(config, params, backend=backend)
        for g in grads:
            opt.step(params, g)
        results.append((params, opt.get_state()))
    assert_same_arrays(results[0][0], results[1][0])
    assert_same_state(results[0][1], results[1][1])


def test_exported_state_is_a_copy() -> None:
    params = make_params()
    opt = KerasOptimizer(optimizers.Adam(), params, backend=NumpyBackend())
    opt.step(params, make_grads(1)[0])
    state = opt.get_state()
    for per in state.slots.values():
        for arr in per.values():
            arr[...] = 42.0
    state.iterations = 99
    assert opt.iterations == 1
    assert not any(np.any(a == 42.0) for per in opt.slots.values() for a in per.values())


def test_imported_state_is_copied_in() -> None:
    params = make_params()
    opt = KerasOptimizer(optimizers.SGD(momentum=0.9), params, backend=NumpyBackend())
    state = opt.get_state()
    state.slots["moment"]["vector"][...] = 1.0
    opt.set_state(state)
    state.slots["moment"]["vector"][...] = 2.0
    assert np.all(opt.slots["moment"]["vector"] == 1.0)


def test_slots_start_at_zero_with_the_parameters_shapes_and_dtypes() -> None:
    params = make_params()
    params["wide"] = np.zeros((2, 2), np.float64)
    opt = KerasOptimizer(optimizers.Adam(amsgrad=True), params, backend=NumpyBackend())
    assert opt.slot_names == ("m", "v", "vhat")
    for per in opt.slots.values():
        for name, arr in per.items():
            assert arr.shape == params[name].shape and arr.dtype == params[name].dtype
            assert not arr.any()
    assert opt.iterations == 0


# --- set_state refusals --------------------------------------------------------------------------


def _stepped(config: optimizers.Optimizer) -> tuple[KerasOptimizer, OptimizerState]:
    params = make_params()
    opt = KerasOptimizer(config, params, backend=NumpyBackend())
    for g in make_grads(3):
        opt.step(params, g)
    return opt, opt.get_state()


def _with_slots(state: OptimizerState, slots: dict[str, dict[str, Any]]) -> OptimizerState:
    return dataclasses.replace(state, slots=slots)


def _edit_slot(state: OptimizerState, slot: str, param: str, value: Any) -> OptimizerState:
    slots = {s: dict(per) for s, per in state.slots.items()}
    slots[slot][param] = value
    return _with_slots(state, slots)


def _drop_param(state: OptimizerState, slot: str, param: str) -> OptimizerState:
    slots = {s: dict(per) for s, per in state.slots.items()}
    del slots[slot][param]
    return _with_slots(state, slots)


BAD_STATES: dict[str, Callable[[OptimizerState], OptimizerState]] = {
    "renamed slot": lambda s: _with_slots(
        s, {"velocity" if k == "v" else k: v for k, v in s.slots.items()}
    ),
    "missing slot": lambda s: _with_slots(s, {k: v for k, v in s.slots.items() if k != "v"}),
    "extra slot": lambda s: _with_slots(s, {**s.slots, "vhat": s.slots["v"]}),
    "missing param": lambda s: _drop_param(s, "v", "kernel"),
    "extra param": lambda s: _edit_slot(s, "m", "other", np.zeros(3, np.float32)),
    "wrong shape": lambda s: _edit_slot(s, "v", "kernel", np.zeros((3, 20), np.float32)),
    "transposed": lambda s: _edit_slot(s, "v", "kernel", np.zeros((5, 4, 3), np.float32)),
    "scalar as vector": lambda s: _edit_slot(s, "m", "bias", np.zeros((1,), np.float32)),
    "wrong dtype": lambda s: _edit_slot(s, "v", "vector", np.zeros(11, np.float64)),
    "float16": lambda s: _edit_slot(s, "m", "vector", np.zeros(11, np.float16)),
    "int dtype": lambda s: _edit_slot(s, "m", "vector", np.zeros(11, np.int32)),
    "list": lambda s: _edit_slot(s, "m", "vector", [0.0] * 11),
    "negative iterations": lambda s: dataclasses.replace(s, iterations=-1),
    "bool iterations": lambda s: dataclasses.replace(s, iterations=True),
    "float iterations": lambda s: dataclasses.replace(s, iterations=3.0),
    "string iterations": lambda s: dataclasses.replace(s, iterations="3"),
    "missing m_schedule": lambda s: dataclasses.replace(s, scalars={}),
    "extra scalar": lambda s: dataclasses.replace(s, scalars={**s.scalars, "beta": 0.5}),
    "nan m_schedule": lambda s: dataclasses.replace(s, scalars={"m_schedule": float("nan")}),
    "inf m_schedule": lambda s: dataclasses.replace(s, scalars={"m_schedule": float("inf")}),
    "string m_schedule": lambda s: dataclasses.replace(s, scalars={"m_schedule": "0.5"}),
}


@pytest.mark.parametrize("edit", BAD_STATES.values(), ids=BAD_STATES.keys())
def test_set_state_refuses_a_state_that_does_not_fit_and_changes_nothing(
    edit: Callable[[OptimizerState], OptimizerState],
) -> None:
    # Nadam has slots m and v and a scalar; its state from another run of the same shape
    opt, _ = _stepped(optimizers.Nadam())
    before = opt.get_state()
    _, other = _stepped(optimizers.Nadam(lr=0.1))
    bad = edit(other)
    with pytest.raises(StateError):
        opt.set_state(bad)
    with pytest.raises(StateError):
        opt.check_state(bad)
    assert_same_state(opt.get_state(), before)


def test_set_state_refuses_another_optimizers_state() -> None:
    opt, _ = _stepped(optimizers.Adam())
    before = opt.get_state()
    for other in (optimizers.Adam(amsgrad=True), optimizers.Adamax(), optimizers.SGD()):
        _, state = _stepped(other)
        with pytest.raises(StateError, match="slots"):
            opt.set_state(state)
    _, nadam = _stepped(optimizers.Nadam())
    with pytest.raises(StateError, match="scalar"):
        opt.set_state(nadam)  # same slot names, but Nadam carries m_schedule
    assert_same_state(opt.get_state(), before)


def test_set_state_refusals_name_what_is_wrong() -> None:
    opt, state = _stepped(optimizers.Nadam())
    with pytest.raises(StateError, match="iterations"):
        opt.set_state(dataclasses.replace(state, iterations=-1))
    with pytest.raises(StateError, match="'kernel'") as info:
        opt.set_state(_edit_slot(state, "v", "kernel", np.zeros((3, 20), np.float32)))
    assert "[3, 20]" in str(info.value) and "[3, 4, 5]" in str(info.value)
    with pytest.raises(StateError, match="float64"):
        opt.set_state(_edit_slot(state, "v", "vector", np.zeros(11, np.float64)))
    with pytest.raises(StateError, match="m_schedule"):
        opt.set_state(dataclasses.replace(state, scalars={"m_schedule": float("nan")}))


def test_set_state_accepts_numpy_integers_and_large_counts() -> None:
    opt, state = _stepped(optimizers.Adam())
    opt.set_state(dataclasses.replace(state, iterations=np.int64(10**6)))
    assert opt.iterations == 10**6 and type(opt.iterations) is int


# --- step refusals -------------------------------------------------------------------------------


def _grads_with(edit: Callable[[dict[str, np.ndarray]], None]) -> dict[str, np.ndarray]:
    grads = make_grads(1, seed=7)[0]
    edit(grads)
    return grads


def _set(name: str, value: Any) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(grads: dict[str, np.ndarray]) -> None:
        grads[name] = value

    return edit


def _poison(name: str, value: float) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(grads: dict[str, np.ndarray]) -> None:
        grads[name] = grads[name].copy()
        grads[name].reshape(-1)[-1] = value

    return edit


BAD_GRADIENTS: dict[str, tuple[Callable[[dict[str, np.ndarray]], None], str]] = {
    "missing": (lambda g: g.pop("kernel"), "parameter_mismatch"),
    "extra": (_set("other", np.zeros(3, np.float32)), "parameter_mismatch"),
    "wrong shape": (_set("kernel", np.zeros((3, 20), np.float32)), "parameter_mismatch"),
    "transposed": (_set("kernel", np.zeros((5, 4, 3), np.float32)), "parameter_mismatch"),
    "scalar as vector": (_set("bias", np.zeros(1, np.float32)), "parameter_mismatch"),
    "int dtype": (_set("vector", np.zeros(11, np.int64)), "parameter_mismatch"),
    "complex dtype": (_set("vector", np.zeros(11, np.complex64)), "parameter_mismatch"),
    "nan in the last parameter": (_poison("kernel", float("nan")), "non_finite_gradient"),
    "nan in the first parameter": (_poison("bias", float("nan")), "non_finite_gradient"),
    "inf": (_poison("vector", float("inf")), "non_finite_gradient"),
    "-inf": (_poison("kernel", float("-inf")), "non_finite_gradient"),
    "float64 nan": (_set("vector", np.full(11, np.nan)), "non_finite_gradient"),
    "float16 inf": (_set("vector", np.full(11, np.inf, np.float16)), "non_finite_gradient"),
}


@backend_param
@config_param
@pytest.mark.parametrize(("edit", "code"), BAD_GRADIENTS.values(), ids=BAD_GRADIENTS.keys())
def test_step_refuses_gradients_that_do_not_fit_and_changes_nothing(
    config: optimizers.Optimizer,
    make_backend: Callable[[], Any],
    edit: Callable[[dict[str, np.ndarray]], None],
    code: str,
) -> None:
    params = make_params()
    opt = KerasOptimizer(config, params, backend=make_backend())
    for g in make_grads(2):
        opt.step(params, g)
    before_params, before_state = copy_params(params), opt.get_state()
    with pytest.raises(GradientError) as info:
        opt.step(params, _grads_with(edit))
    assert info.value.code == code
    assert_same_arrays(params, before_params)
    assert_same_state(opt.get_state(), before_state)
    # and the optimizer still works
    opt.step(params, make_grads(1, seed=9)[0])
    assert opt.iterations == 3


def test_step_refusals_name_the_parameter() -> None:
    params = make_params()
    opt = KerasOptimizer(optimizers.Adam(), params, backend=NumpyBackend())
    for name, edit in [
        ("kernel", BAD_GRADIENTS["missing"][0]),
        ("other", BAD_GRADIENTS["extra"][0]),
        ("kernel", BAD_GRADIENTS["wrong shape"][0]),
        ("vector", BAD_GRADIENTS["int dtype"][0]),
        ("kernel", BAD_GRADIENTS["nan in the last parameter"][0]),
    ]:
        with pytest.raises(GradientError, match=f"'{name}'"):
            opt.step(params, _grads_with(edit))


# NumpyBackend.sum_squares lets numpy warn about the overflow before the engine refuses it.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_step_refuses_a_norm_that_overflows() -> None:
    """Finite float64 gradients whose sum of squares overflows: refused, nothing changed."""
    params = make_params(np.float64)
    opt = KerasOptimizer(optimizers.SGD(clipnorm=1.0), params, backend=NumpyBackend())
    before = copy_params(params)
    grads = {n: np.full(s, 1e200) for n, s in SHAPES.items()}
    with pytest.raises(GradientError) as info:
        opt.step(params, grads)
    assert info.value.code == "non_finite_gradient"
    assert_same_arrays(params, before)
    assert opt.iterations == 0


def test_step_refuses_parameters_that_do_not_fit() -> None:
    params = make_params()
    opt = KerasOptimizer(optimizers.SGD(), params, backend=NumpyBackend())
    grads = make_grads(1)[0]
    for bad in (
        {**params, "kernel": np.zeros((3, 20), np.float32)},
        {**params, "kernel": params["kernel"].astype(np.float64)},
        {**params, "kernel": np.asfortranarray(params["kernel"])},
        {k: v for k, v in params.items() if k != "kernel"},
    ):
        before = copy_params(bad)
        with pytest.raises(GradientError, match="'kernel'"):
            opt.step(bad, grads)
        assert_same_arrays(bad, before)
    assert opt.iterations == 0


@backend_param
def test_step_refuses_parameters_it_cannot_update_in_place(make_backend: Callable[[], Any]) -> None:
    """A numpy scalar (immutable) or a read-only array: refused before anything changes."""
    params = make_params()
    opt = KerasOptimizer(optimizers.SGD(momentum=0.9), params, backend=make_backend())
    opt.step(params, make_grads(1)[0])
    before_params, before_state = copy_params(params), opt.get_state()
    frozen = copy_params(params)
    frozen["kernel"].flags.writeable = False
    for bad in ({**params, "bias": np.float32(params["bias"])}, frozen):
        with pytest.raises(GradientError, match="writable"):
            opt.step(bad, make_grads(1, seed=3)[0])
        assert_same_arrays(params, before_params)
        assert_same_arrays(frozen, before_params)
        assert_same_state(opt.get_state(), before_state)


def test_step_leaves_the_gradients_alone_and_takes_read_only_ones() -> None:
    params = make_params()
    grads = make_grads(1)[0]
    frozen = {}
    for name, g in grads.items():
        frozen[name] = np.frombuffer(g.tobytes(), dtype=g.dtype).reshape(g.shape)  # read-only
        assert not frozen[name].flags.writeable
    expected = copy_params(params)
    KerasOptimizer(optimizers.Adam(clipvalue=0.1), expected, backend=NumpyBackend()).step(
        expected, copy_params(grads)
    )
    for backend in (NumpyBackend(chunk_elements=7), default_backend()):
        got = copy_params(params)
        KerasOptimizer(optimizers.Adam(clipvalue=0.1), got, backend=backend).step(got, frozen)
        assert_same_arrays(got, expected)
    assert_same_arrays(frozen, grads)


def test_non_contiguous_gradients_give_the_same_step() -> None:
    params = make_params()
    grads = make_grads(1)[0]
    strided = dict(grads)
    strided["kernel"] = np.asfortranarray(grads["kernel"])
    strided["vector"] = np.repeat(grads["vector"], 2)[::2]
    assert not strided["vector"].flags.c_contiguous
    assert not strided["kernel"].flags.c_contiguous
    a, b = copy_params(params), copy_params(params)
    KerasOptimizer(optimizers.RMSprop(), a, backend=NumpyBackend()).step(a, grads)
    KerasOptimizer(optimizers.RMSprop(), b, backend=NumpyBackend()).step(b, strided)
    assert_same_arrays(a, b)


# --- dtypes --------------------------------------------------------------------------------------


@backend_param
@config_param
@pytest.mark.parametrize("grad_dtype", [np.float16, np.float64], ids=["float16", "float64"])
def test_gradients_of_another_float_dtype_are_cast(
    config: optimizers.Optimizer, make_backend: Callable[[], Any], grad_dtype: Any
) -> None:
    """float16 or float64 gradients into float32 parameters: the same as casting them first."""
    grads = make_grads(3, dtype=grad_dtype)
    cast, direct = make_params(), make_params()
    opt_cast = KerasOptimizer(config, cast, backend=make_backend())
    opt_direct = KerasOptimizer(config, direct, backend=make_backend())
    for g in grads:
        opt_cast.step(cast, g)
        opt_direct.step(direct, {n: a.astype(np.float32) for n, a in g.items()})
    assert all(p.dtype == np.float32 for p in cast.values())
    assert_same_arrays(cast, direct)
    assert_same_state(opt_cast.get_state(), opt_direct.get_state())


@backend_param
@config_param
def test_float64_models_step_in_float64(
    config: optimizers.Optimizer, make_backend: Callable[[], Any]
) -> None:
    params = make_params(np.float64)
    start = copy_params(params)
    opt = KerasOptimizer(config, params, backend=make_backend())
    assert opt.compute_dtype == np.float64
    for g in make_grads(3, dtype=np.float64):
        opt.step(params, g)
    assert all(p.dtype == np.float64 for p in params.values())
    assert all(a.dtype == np.float64 for per in opt.slots.values() for a in per.values())
    assert all(np.all(np.isfinite(p)) for p in params.values())
    assert any(not np.array_equal(params[n], start[n]) for n in params)
    # float32 gradients into float64 parameters are cast up
    grads32 = make_grads(1, seed=5)[0]
    a, b = copy_params(params), copy_params(params)
    opt.set_state(state := opt.get_state())
    opt.step(a, grads32)
    opt.set_state(state)
    opt.step(b, {n: g.astype(np.float64) for n, g in grads32.items()})
    assert_same_arrays(a, b)


def test_parameters_of_an_unsupported_dtype_are_refused() -> None:
    with pytest.raises(GradientError, match="'ids'"):
        KerasOptimizer(optimizers.SGD(), {"ids": np.zeros(3, np.int32)}, backend=NumpyBackend())
    with pytest.raises(ValueError, match="at least one"):
        KerasOptimizer(optimizers.SGD(), {}, backend=NumpyBackend())
    with pytest.raises(ValueError, match="TFOptimizer"):
        KerasOptimizer(
            optimizers.TFOptimizer("AdamOptimizer"), make_params(), backend=NumpyBackend()
        )


# --- memory --------------------------------------------------------------------------------------

#: A 1e6-element float32 model (4 MB) in two parameters.
BIG_SHAPES = {"dense": (1000, 600), "embedding": (400_000,)}
BIG_ELEMENTS = 1_000_000

MEMORY_CONFIGS: dict[str, optimizers.Optimizer] = {
    "SGD": optimizers.SGD(momentum=0.9, nesterov=True, decay=0.01, clipnorm=1.0, clipvalue=0.1),
    "RMSprop": optimizers.RMSprop(decay=0.01, clipnorm=1.0, clipvalue=0.1),
    "Adagrad": optimizers.Adagrad(clipvalue=0.1),
    "Adadelta": optimizers.Adadelta(clipnorm=1.0),
    "Adam": optimizers.Adam(amsgrad=True, decay=0.01, clipnorm=1.0, clipvalue=0.1),
    "Adamax": optimizers.Adamax(),
    "Nadam": optimizers.Nadam(clipnorm=1.0),
}

MEMORY_BACKENDS: dict[str, Callable[[], Any]] = {
    "numpy": lambda: NumpyBackend(),
    "default": default_backend,
}


def _peak_bytes_of(action: Callable[[], None]) -> int:
    """The peak of traced allocations during ``action``, above what was traced before it."""
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        action()
        return tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("make_backend", MEMORY_BACKENDS.values(), ids=MEMORY_BACKENDS.keys())
@pytest.mark.parametrize("config", MEMORY_CONFIGS.values(), ids=MEMORY_CONFIGS.keys())
def test_a_step_allocates_nothing_proportional_to_the_model(
    config: optimizers.Optimizer, make_backend: Callable[[], Any]
) -> None:
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal(s, dtype=np.float32) for n, s in BIG_SHAPES.items()}
    grads = {n: rng.standard_normal(s, dtype=np.float32) for n, s in BIG_SHAPES.items()}
    assert sum(p.size for p in params.values()) == BIG_ELEMENTS
    param_bytes = sum(p.nbytes for p in params.values())
    opt = KerasOptimizer(config, params, backend=make_backend())
    opt.step(params, grads)  # the first step may allocate scratch buffers (and compile)

    peak = _peak_bytes_of(lambda: opt.step(params, grads))
    assert opt.iterations == 2
    # Chunked scratch is a few hundred kB at most; a temporary per parameter would be 2.4 MB.
    assert peak < param_bytes // 8, f"a step allocated {peak} bytes for a {param_bytes}-byte model"


@pytest.mark.parametrize("make_backend", MEMORY_BACKENDS.values(), ids=MEMORY_BACKENDS.keys())
def test_casting_gradients_allocates_only_on_the_first_step(
    make_backend: Callable[[], Any],
) -> None:
    """float16 gradients into float32 parameters: the cast buffers are made once."""
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal(s, dtype=np.float32) for n, s in BIG_SHAPES.items()}
    grads = {
        n: rng.standard_normal(s, dtype=np.float32).astype(np.float16)
        for n, s in BIG_SHAPES.items()
    }
    param_bytes = sum(p.nbytes for p in params.values())
    opt = KerasOptimizer(optimizers.Adam(clipnorm=1.0), params, backend=make_backend())
    opt.step(params, grads)
    peak = _peak_bytes_of(lambda: opt.step(params, grads))
    assert peak < param_bytes // 8, f"a step allocated {peak} bytes for a {param_bytes}-byte model"


def test_parallel_numpy_steps_of_different_sessions_do_not_share_scratch() -> None:
    # float16 runs on the shared numpy backend (numba has no float16 kernels): steps of four
    # sessions in parallel threads must give what the same steps give one after another.
    import threading

    from paramserver.server.optim import default_backend

    rng = np.random.default_rng(7)
    n = 200_000
    grads = [[rng.standard_normal(n).astype(np.float16) for _ in range(10)] for _ in range(4)]

    def run(parallel: bool) -> list[np.ndarray]:
        params = [{"w": np.ones(n, np.float16)} for _ in range(4)]
        opts = [KerasOptimizer(optimizers.RMSprop(), p, backend=default_backend()) for p in params]

        def steps(i: int) -> None:
            for g in grads[i]:
                opts[i].step(params[i], {"w": g})

        if parallel:
            threads = [threading.Thread(target=steps, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for i in range(4):
                steps(i)
        return [p["w"] for p in params]

    for seq, par in zip(run(False), run(True), strict=True):
        np.testing.assert_array_equal(seq, par)
