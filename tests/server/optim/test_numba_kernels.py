"""The fused numba kernels give bit-identical results to the chunked numpy kernels.

Every rule (and its variants: SGD momentum and Nesterov, Adam AMSGrad, lr decay) runs several
consecutive steps on random data of odd sizes, with the fused gradient transform (clipnorm's
scale, clipvalue's clip) on and off, in float32 and float64; parameters and every slot must
match :class:`NumpyBackend` bit for bit. What the numba backend does not compile for (float16,
strided arrays, coefficients of another dtype) must reach the fallback and still match.
"""

from __future__ import annotations

import logging
import math
import platform
import re
import threading
import zlib
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import pytest

from paramserver import optimizers
from paramserver.server.optim import numba_kernels
from paramserver.server.optim.engine import KerasOptimizer, NumpyBackend
from paramserver.server.optim.numba_kernels import NumbaBackend
from paramserver.server.optim.rules import RULES

CONFIGS: dict[str, Callable[[], optimizers.Optimizer]] = {
    "sgd": lambda: optimizers.SGD(lr=0.05),
    "sgd_momentum_decay": lambda: optimizers.SGD(lr=0.05, momentum=0.9, decay=0.01),
    "sgd_nesterov": lambda: optimizers.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda: optimizers.RMSprop(decay=0.001),
    "adagrad": lambda: optimizers.Adagrad(),
    "adadelta": lambda: optimizers.Adadelta(decay=0.01),
    "adam": lambda: optimizers.Adam(lr=0.01),
    "adam_amsgrad": lambda: optimizers.Adam(lr=0.01, amsgrad=True, decay=0.001),
    "adamax": lambda: optimizers.Adamax(),
    "nadam": lambda: optimizers.Nadam(),
}

#: (grad_scale, grad_clip) as the engine passes them: None means the transform is off.
TRANSFORMS = {
    "plain": (None, None),
    "scale": (0.37, None),
    "clip": (None, 0.05),
    "scale_clip": (0.61, 0.02),
}

DTYPES = [np.float32, np.float64]
SIZES = [1, 7, 1000, 100003]
STEPS = 4


class _NoFallback(NumpyBackend):
    """A fallback that must not be reached: float32 and float64 run the fused kernels, so a
    silent fall back to numpy cannot make a bit-identity test pass."""

    def update(self, rule, p, g, slots, coeffs, grad_scale, grad_clip):  # type: ignore[no-untyped-def]
        raise AssertionError(f"{rule.name} on {p.dtype} fell back to the numpy kernel")

    def sum_squares(self, g: np.ndarray) -> float:
        raise AssertionError(f"sum_squares on {g.dtype} fell back to numpy")

    def update_rows(self, rule, p, rows, index, width, slots, coeffs, grad_scale, grad_clip):  # type: ignore[no-untyped-def]
        raise AssertionError(f"{rule.name} rows on {p.dtype} fell back to the numpy kernel")

    def sparse_sum_squares(self, index, rows, shape):  # type: ignore[no-untyped-def]
        raise AssertionError(f"sparse_sum_squares on {rows.dtype} fell back to numpy")


@pytest.fixture(scope="module")
def numba_backend() -> NumbaBackend:
    backend = NumbaBackend(fallback=_NoFallback())
    backend.warm_up()
    return backend


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float array: equal bits, not merely equal values (-0.0, NaN)."""
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bit_identical(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    mismatch = np.flatnonzero(_bits(actual) != _bits(expected))
    assert mismatch.size == 0, (
        f"{what}: {mismatch.size} of {actual.size} elements differ, first at {mismatch[0]}: "
        f"{actual[mismatch[0]]!r} != {expected[mismatch[0]]!r}"
    )


def _gradient(rng: np.random.Generator, size: int, dtype: Any) -> np.ndarray:
    """Normal gradients over several magnitudes, with exact zeros and signed zeros."""
    g = rng.standard_normal(size) * 10.0 ** rng.integers(-4, 2, size)
    g[rng.random(size) < 0.05] = 0.0
    g[rng.random(size) < 0.02] = -0.0
    return g.astype(dtype)


def _run_both(
    backend: NumbaBackend,
    config: optimizers.Optimizer,
    dtype: Any,
    size: int,
    grad_scale: float | None,
    grad_clip: float | None,
    seed: int,
    *,
    loaded_slots: bool = False,
) -> None:
    """``STEPS`` steps with both backends from the same start; every step bit-identical.

    ``loaded_slots`` starts from non-zero slots, as after loading a state, with signed zeros
    (``np.maximum`` picks between equal values in a way the kernels must follow).
    """
    rule = RULES[config.class_name]
    cfg = config.get_config()
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(size).astype(dtype)
    params = {"numpy": p0.copy(), "numba": p0.copy()}
    slot_names = rule.slots(cfg)
    initial = [np.zeros(size, dtype) for _ in slot_names]
    if loaded_slots:
        for slot in initial:
            slot[:] = np.abs(rng.standard_normal(size)) * 1e-3
            slot[rng.random(size) < 0.2] = -0.0
            slot[rng.random(size) < 0.1] = 0.0
    slots = {k: tuple(s.copy() for s in initial) for k in params}
    scalars: dict[str, Any] = {k: dt.type(v) for k, v in rule.initial_scalars.items()}
    reference = NumpyBackend()
    scale = None if grad_scale is None else dt.type(grad_scale)
    clip = None if grad_clip is None else dt.type(grad_clip)
    for step in range(STEPS):
        g = _gradient(rng, size, dtype)
        coeffs, new_scalars = rule.coefficients(cfg, step, scalars, dt)
        reference.update(rule, params["numpy"], g, slots["numpy"], coeffs, scale, clip)
        backend.update(rule, params["numba"], g, slots["numba"], coeffs, scale, clip)
        scalars.update(new_scalars)
        where = f"step {step}"
        assert_bit_identical(params["numba"], params["numpy"], f"params, {where}")
        for name, got, want in zip(slot_names, slots["numba"], slots["numpy"], strict=True):
            assert_bit_identical(got, want, f"slot {name!r}, {where}")
    assert not np.array_equal(params["numba"], p0) or size == 0


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("case", list(CONFIGS))
def test_bit_identical_to_numpy(
    numba_backend: NumbaBackend, case: str, transform: str, dtype: Any, size: int
) -> None:
    grad_scale, grad_clip = TRANSFORMS[transform]
    seed = zlib.crc32(f"{case} {transform} {size}".encode())
    _run_both(numba_backend, CONFIGS[case](), dtype, size, grad_scale, grad_clip, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(CONFIGS))
def test_bit_identical_from_loaded_slots(
    numba_backend: NumbaBackend, case: str, dtype: Any
) -> None:
    _run_both(numba_backend, CONFIGS[case](), dtype, 1009, None, None, 77, loaded_slots=True)


def test_every_rule_has_a_fused_kernel(numba_backend: NumbaBackend) -> None:
    for name in RULES:
        for dtype in DTYPES:
            assert numba_backend.supports(name, np.dtype(dtype))
        assert not numba_backend.supports(name, np.dtype(np.float16))
    assert not numba_backend.supports("Ftrl", np.dtype(np.float32))
    assert {CONFIGS[c]().class_name for c in CONFIGS} == set(RULES)


@pytest.mark.parametrize("key", list(numba_kernels._KERNELS))
def test_kernels_round_every_operation_in_float32(key: str) -> None:
    """No FMA contraction, no fast-math flags, no float64 arithmetic in a float32 kernel.

    Compiled here without the disk cache: numba cannot show the code of a cached kernel.
    """
    spec = numba_kernels._KERNELS[key]
    signature = numba_kernels._signature(spec, np.dtype(np.float32))
    options = dict(numba_kernels.JIT_OPTIONS, cache=False)
    kernel = numba.njit(signature, **options)(spec.py_func)
    ir = kernel.inspect_llvm(kernel.signatures[0])
    assert not re.search(r"llvm\.fma|fmuladd|\b(contract|reassoc|fast|afn|arcp)\b", ir)
    assert not re.search(r"\bfpext\b|f(add|sub|mul|div) double|llvm\.sqrt\.f64", ir)
    assert re.search(r"fdiv <\d+ x float>|fmul <\d+ x float>", ir), "the loop did not vectorise"
    if platform.machine() in ("x86_64", "AMD64"):
        asm = kernel.inspect_asm(kernel.signatures[0])
        assert not re.search(r"\bvfn?m(add|sub)", asm)


def test_read_only_gradient_runs_fused(numba_backend: NumbaBackend) -> None:
    """Gradients decoded from a request body are read-only; they use the same kernel."""
    spy = _SpyBackend()
    backend = NumbaBackend(fallback=spy)
    rule = RULES["Adam"]
    cfg = optimizers.Adam().get_config()
    rng = np.random.default_rng(3)
    g = rng.standard_normal(501).astype(np.float32)
    g.flags.writeable = False
    coeffs, _ = rule.coefficients(cfg, 0, {}, np.dtype(np.float32))
    p = rng.standard_normal(501).astype(np.float32)
    want = p.copy()
    slots = (np.zeros(501, np.float32), np.zeros(501, np.float32))
    want_slots = (np.zeros(501, np.float32), np.zeros(501, np.float32))
    backend.update(rule, p, g, slots, coeffs, None, None)
    NumpyBackend().update(rule, want, g, want_slots, coeffs, None, None)
    assert spy.calls == []
    assert_bit_identical(p, want, "params")


def test_python_float_coefficients_run_fused() -> None:
    """Python floats are weakly typed (NEP 50): numpy computes with them in the array dtype,
    so the fused kernel takes them, converted, and still matches."""
    spy = _SpyBackend()
    backend = NumbaBackend(fallback=spy)
    rule = RULES["Adamax"]
    coeffs, _ = rule.coefficients(optimizers.Adamax().get_config(), 2, {}, np.dtype(np.float32))
    py_coeffs = tuple(float(c) for c in coeffs)
    rng = np.random.default_rng(8)
    g = _gradient(rng, 3001, np.float32)
    p = rng.standard_normal(3001).astype(np.float32)
    want = p.copy()
    slots = tuple(np.zeros(3001, np.float32) for _ in range(2))
    want_slots = tuple(np.zeros(3001, np.float32) for _ in range(2))
    backend.update(rule, p, g, slots, py_coeffs, 0.3, 1e-3)
    NumpyBackend().update(rule, want, g, want_slots, py_coeffs, 0.3, 1e-3)
    assert spy.calls == []
    assert_bit_identical(p, want, "params")
    for got, expected in zip(slots, want_slots, strict=True):
        assert_bit_identical(got, expected, "slots")


class _SpyBackend(NumpyBackend):
    """A numpy backend that records what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def update(self, rule, p, g, slots, coeffs, grad_scale, grad_clip):  # type: ignore[no-untyped-def]
        self.calls.append(f"update {rule.name} {p.dtype}")
        super().update(rule, p, g, slots, coeffs, grad_scale, grad_clip)

    def sum_squares(self, g: np.ndarray) -> float:
        self.calls.append(f"sum_squares {g.dtype}")
        return super().sum_squares(g)


@pytest.mark.parametrize("case", ["adam", "nadam", "sgd_nesterov"])
def test_float16_falls_back(case: str) -> None:
    spy = _SpyBackend()
    backend = NumbaBackend(fallback=spy)
    _run_both(backend, CONFIGS[case](), np.float16, 1000, None, 0.05, seed=11)
    assert spy.calls == [f"update {CONFIGS[case]().class_name} float16"] * STEPS
    g = np.ones(10, np.float16)
    assert backend.sum_squares(g) == 10.0
    assert spy.calls[-1] == "sum_squares float16"


def test_arrays_and_coefficients_it_was_not_compiled_for_fall_back() -> None:
    spy = _SpyBackend()
    backend = NumbaBackend(fallback=spy)
    rule = RULES["RMSprop"]
    coeffs, _ = rule.coefficients(optimizers.RMSprop().get_config(), 0, {}, np.dtype(np.float32))
    rng = np.random.default_rng(5)
    base = rng.standard_normal(2000).astype(np.float32)
    strided_g = rng.standard_normal(4000).astype(np.float32)[::2]
    f64_coeffs = tuple(np.float64(c) for c in coeffs)
    cases = [
        ("strided gradient", strided_g, coeffs, None),
        ("float64 coefficients", base * 0.5, f64_coeffs, None),
        ("float64 clip", base * 0.5, coeffs, np.float64(0.1)),
    ]
    for what, g, cs, clip in cases:
        spy.calls.clear()
        p, want = base.copy(), base.copy()
        slots, want_slots = (np.zeros(2000, np.float32),), (np.zeros(2000, np.float32),)
        backend.update(rule, p, g, slots, cs, None, clip)
        NumpyBackend().update(rule, want, g, want_slots, cs, None, clip)
        assert spy.calls == ["update RMSprop float32"], what
        assert_bit_identical(p, want, what)
        assert_bit_identical(slots[0], want_slots[0], what)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", [0, 1, 7, 63, 64, 65, 129, 1000, 100003])
def test_sum_squares_matches_float64_reference(
    numba_backend: NumbaBackend, dtype: Any, size: int
) -> None:
    g = _gradient(np.random.default_rng(size), size, dtype)
    want = math.fsum(float(x) * float(x) for x in g.astype(np.float64))
    got = numba_backend.sum_squares(g)
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-13, abs=0.0)


def test_sum_squares_reports_non_finite(numba_backend: NumbaBackend) -> None:
    g = np.ones(1001, np.float32)
    g[999] = np.nan
    assert math.isnan(numba_backend.sum_squares(g))
    g[999] = -np.inf
    assert numba_backend.sum_squares(g) == math.inf
    assert numba_backend.sum_squares(np.full(40, 1e200)) == math.inf
    # float32 squares are taken in float64: no overflow where float32 would overflow.
    assert numba_backend.sum_squares(np.full(3, 1e30, np.float32)) == pytest.approx(3e60)


@pytest.mark.parametrize("case", ["adam", "adam_amsgrad", "nadam", "sgd_momentum_decay"])
def test_keras_optimizer_step_matches_numpy_backend(case: str) -> None:
    """The whole engine path, mixed dtypes included (float16 parameters fall back)."""
    spy = _SpyBackend()
    numba_backend = NumbaBackend(fallback=spy)
    config = CONFIGS[case]()
    rng = np.random.default_rng(21)
    shapes = {"w": ((31, 17), np.float32), "b": ((17,), np.float32), "h": ((9,), np.float16)}
    params = {n: rng.standard_normal(s).astype(d) for n, (s, d) in shapes.items()}
    runs = {
        "numpy": (KerasOptimizer(config, params, backend=NumpyBackend()), _copy(params)),
        "numba": (KerasOptimizer(config, params, backend=numba_backend), _copy(params)),
    }
    for _ in range(STEPS):
        grads = {n: rng.standard_normal(s).astype(d) for n, (s, d) in shapes.items()}
        for opt, ps in runs.values():
            opt.step(ps, grads)
    assert spy.calls and all(call.endswith("float16") for call in spy.calls)
    (ref_opt, ref_params), (opt, got_params) = runs["numpy"], runs["numba"]
    for name in shapes:
        assert_bit_identical(got_params[name], ref_params[name], f"param {name!r}")
        for slot in opt.slot_names:
            assert_bit_identical(
                opt.slots[slot][name], ref_opt.slots[slot][name], f"slot {slot!r} of {name!r}"
            )


def _copy(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: a.copy() for n, a in params.items()}


def test_kernels_run_from_several_threads(numba_backend: NumbaBackend) -> None:
    """The kernels release the GIL (nogil); two threads stepping their own arrays both work."""
    assert len(numba_backend._compiled) == 2 * (len(numba_kernels._KERNELS) + 2)
    for kernel in numba_backend._compiled.values():
        assert kernel.targetoptions["nogil"] and not kernel.targetoptions["fastmath"]
    rule = RULES["Adam"]
    cfg = optimizers.Adam().get_config()
    dt = np.dtype(np.float32)
    size = 200_003
    grads = [_gradient(np.random.default_rng(s), size, np.float32) for s in range(6)]

    def train(seed: int, backend: Any) -> tuple[np.ndarray, ...]:
        p = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
        slots = (np.zeros(size, np.float32), np.zeros(size, np.float32))
        for step, g in enumerate(grads):
            coeffs, _ = rule.coefficients(cfg, step, {}, dt)
            backend.update(rule, p, g, slots, coeffs, None, None)
        return (p, *slots)

    results: dict[int, tuple[np.ndarray, ...]] = {}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            results[seed] = train(seed, numba_backend)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for seed in (1, 2):
        for got, want in zip(results[seed], train(seed, NumpyBackend()), strict=True):
            assert_bit_identical(got, want, f"thread {seed}")


def test_compiles_in_memory_when_no_cache_directory_is_writable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """numba raises (not warns) when ``cache=True`` finds no writable place: we compile in
    memory instead, log it, and the kernels work the same."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    monkeypatch.setattr(numba_kernels, "_cache_available", True)
    backend = NumbaBackend()
    with caplog.at_level(logging.WARNING, logger=numba_kernels.__name__):
        _run_both(backend, optimizers.Adagrad(), np.float64, 7, None, None, seed=4)
    assert numba_kernels._cache_available is False
    assert any("NUMBA_CACHE_DIR" in r.getMessage() for r in caplog.records)


# --- row kernels (lazy row-sparse steps) and the rows' sum of squares ----------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("case", list(CONFIGS))
def test_rows_kernel_steps_only_its_rows_bit_identical_to_numpy(
    numba_backend: NumbaBackend, case: str, transform: str, dtype: Any
) -> None:
    """The fused row kernel steps rows ``index`` in place exactly as the numpy backend's
    gather, step and scatter does, over several steps with loaded slots; every other row of
    the parameter and its slots keeps its bits."""
    config = CONFIGS[case]()
    rule = RULES[config.class_name]
    cfg = config.get_config()
    dt = np.dtype(dtype)
    rng = np.random.default_rng(zlib.crc32(f"{case}{transform}{dt}".encode()))
    n_rows, width = 1009, 13
    p0 = rng.standard_normal(n_rows * width).astype(dtype)
    slot_names = rule.slots(cfg)
    initial = [
        np.abs(rng.standard_normal(p0.size)).astype(dtype) * dt.type(1e-3) for _ in slot_names
    ]
    params = {"numpy": p0.copy(), "numba": p0.copy()}
    slots = {k: tuple(s.copy() for s in initial) for k in params}
    scalars: dict[str, Any] = {k: dt.type(v) for k, v in rule.initial_scalars.items()}
    grad_scale, grad_clip = TRANSFORMS[transform]
    scale = None if grad_scale is None else dt.type(grad_scale)
    clip = None if grad_clip is None else dt.type(grad_clip)
    reference = NumpyBackend()
    kernel = numba_backend.rows_kernel(rule, dt)
    touched = np.zeros(n_rows, bool)
    for step in range(STEPS):
        index = np.sort(rng.choice(n_rows, 1 + step * 40, replace=False)).astype(np.int64)
        if step == 0:
            index = np.array([0, n_rows - 1], np.int64)  # the first and the last row
        touched[index] = True
        rows = _gradient(rng, index.size * width, dtype)
        coeffs, new_scalars = rule.coefficients(cfg, step, scalars, dt)
        reference.update_rows(
            rule, params["numpy"], rows, index, width, slots["numpy"], coeffs, scale, clip
        )
        kernel(params["numba"], rows, index, width, slots["numba"], coeffs, scale, clip)
        scalars.update(new_scalars)
        assert_bit_identical(params["numba"], params["numpy"], f"params, step {step}")
        for name, got, want in zip(slot_names, slots["numba"], slots["numpy"], strict=True):
            assert_bit_identical(got, want, f"slot {name!r}, step {step}")
    untouched = np.repeat(~touched, width)
    assert_bit_identical(params["numba"][untouched], p0[untouched], "untouched rows")
    for got, start in zip(slots["numba"], initial, strict=True):
        assert_bit_identical(got[untouched], start[untouched], "untouched slot rows")
    assert not np.array_equal(params["numba"][~untouched], p0[~untouched])


def test_rows_kernel_takes_a_body_s_unaligned_index_through_the_fallback() -> None:
    """An index the kernels were not compiled for (unaligned, int32) reaches the fallback,
    with the same result."""
    spy = _SpyBackend()
    backend = NumbaBackend(fallback=spy)
    rule = RULES["Adam"]
    cfg = optimizers.Adam().get_config()
    coeffs, _ = rule.coefficients(cfg, 0, {}, np.dtype(np.float32))
    raw = np.zeros(8 * 3 + 1, np.uint8)
    unaligned = np.frombuffer(raw[1:].data, np.int64)
    unaligned[:] = [1, 4, 6]
    p = np.ones(40, np.float32)
    slots = (np.zeros(40, np.float32), np.zeros(40, np.float32))
    backend.rows_kernel(rule, np.dtype(np.float32))(
        p, np.ones(15, np.float32), unaligned, 5, slots, coeffs, None, None
    )
    assert spy.calls
    changed = np.flatnonzero(p != 1).tolist()
    assert changed == [*range(5, 10), *range(20, 25), *range(30, 35)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "shape", [(1000,), (977, 3), (130, 64), (129, 100), (5, 7, 11), (64,), (65, 1), (3, 0)]
)
def test_sparse_sum_squares_matches_numpy_and_the_dense_kernel(
    numba_backend: NumbaBackend, shape: tuple[int, ...], dtype: Any
) -> None:
    """The rows' sum of squares is the dense equivalent's, bit for bit: the numpy rows
    version and the dense kernel over the densified tensor agree, including rows that reach
    into the tail past the last full lane row and rows straddling it."""
    from paramserver import sparse

    rng = np.random.default_rng(zlib.crc32(f"{shape}{np.dtype(dtype)}".encode()))
    width = math.prod(shape[1:])
    for take in (1, 2, shape[0] // 3 or 1, shape[0]):
        index = np.sort(rng.choice(shape[0], take, replace=False)).astype(np.int64)
        if take == 2:
            index = np.array([0, shape[0] - 1], np.int64)[: min(2, shape[0])]
            index = np.unique(index)
        rows = (rng.standard_normal((index.size, width)) * 10.0 ** rng.integers(-3, 3)).astype(
            dtype
        )
        dense = np.zeros((shape[0], width), dtype)
        dense[index] = rows
        want = numba_backend.sum_squares(dense.reshape(-1))
        got = numba_backend.sparse_sum_squares(index, rows, shape)
        assert got == want or (math.isnan(got) and math.isnan(want))
        assert sparse.sum_squares(index, rows, shape) == want
    rows = np.full((1, width), np.inf, dtype)
    if width:
        assert numba_backend.sparse_sum_squares(np.array([0]), rows, shape) == math.inf


@pytest.mark.parametrize(
    "index, n_rows",
    [([0, 8], 2), ([-1], 1), ([2, 3], 3), ([1], 2)],
    ids=["past-the-end", "negative", "too-few-values", "too-many-values"],
)
def test_rows_kernel_refuses_rows_outside_the_parameter(
    numba_backend: NumbaBackend, index: list[int], n_rows: int
) -> None:
    """The kernels do not check bounds: the row kernel checks the rows first and changes
    nothing when one is outside the parameter or the values do not fill the rows."""
    rule = RULES["Adam"]
    coeffs, _ = rule.coefficients(optimizers.Adam().get_config(), 0, {}, np.dtype(np.float32))
    p = np.ones(8 * 5, np.float32)
    slots = (np.zeros(40, np.float32), np.zeros(40, np.float32))
    kernel = numba_backend.rows_kernel(rule, np.dtype(np.float32))
    with pytest.raises(ValueError):
        kernel(p, np.ones(n_rows * 5, np.float32), np.array(index), 5, slots, coeffs, None, None)
    assert (p == 1).all() and not slots[0].any()
