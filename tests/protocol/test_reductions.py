"""The clipnorm sum of squares: the numpy version any party can run (paramserver.reductions)
gives the numba kernel's bits, and a push's total equals the server's."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver import optimizers, reductions
from paramserver.server.optim import KerasOptimizer, NumpyBackend, default_backend

SIZES = [0, 1, 2, 63, 64, 65, 127, 128, 1000, 64 * 512, 64 * 512 + 1, 64 * 1025 + 63, 1_000_003]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", SIZES)
def test_numpy_equals_the_numba_kernel_bit_for_bit(n, dtype) -> None:
    backend = default_backend()
    if backend.name == "numpy":  # pragma: no cover - numba is a dependency
        pytest.skip("numba is not importable")
    rng = np.random.default_rng(n)
    for _ in range(3):
        # magnitudes over 12 decades: the sum's order decides its last bits
        g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n)).astype(dtype)
        assert reductions.sum_squares(g) == backend.sum_squares(g)


def test_special_values() -> None:
    backend = default_backend()
    for g in (
        np.array([np.inf, 1.0], np.float32),
        np.array([np.nan] + [1.0] * 70, np.float32),
        np.full(200, 3e38, np.float32),  # overflows float32 squares, not float64
        np.full(200, 1e200, np.float64),  # overflows float64
        np.zeros(77, np.float32),
        np.array(2.5, np.float32),  # a scalar
    ):
        ours, theirs = reductions.sum_squares(g), backend.sum_squares(g)
        assert ours == theirs or (np.isnan(ours) and np.isnan(theirs))


def test_the_numpy_backend_and_float16_use_the_same_order() -> None:
    rng = np.random.default_rng(1)
    g = rng.standard_normal(10_007).astype(np.float16)
    assert NumpyBackend().sum_squares(g) == reductions.sum_squares(g)
    assert default_backend().sum_squares(g) == reductions.sum_squares(g)


@pytest.mark.parametrize("make_backend", [default_backend, NumpyBackend], ids=["default", "numpy"])
def test_a_push_total_equals_the_servers(make_backend) -> None:
    rng = np.random.default_rng(2)
    params = {
        "a": np.zeros((300, 7), np.float32),
        "b": np.zeros(5, np.float64),
        "c": np.zeros(()),
        "d": np.zeros(129, np.float16),
    }
    engine = KerasOptimizer(optimizers.SGD(clipnorm=1.0), params, backend=make_backend())
    grads = {k: (rng.standard_normal(v.shape) * 100).astype(np.float64) for k, v in params.items()}
    prepared = engine.check_gradients(grads)
    cast = [np.asarray(grads[k], v.dtype) for k, v in params.items()]
    assert reductions.push_sum_squares(cast) == prepared.sum_squares
