"""The models and gradients the tests train, and what the engine makes of them.

:func:`engine_trajectory` runs the engine (``paramserver.server.optim.KerasOptimizer``) in this
process, without HTTP: the service's answers are compared with it bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from paramserver.optimizers import get as get_optimizer
from paramserver.server.optim import KerasOptimizer

__all__ = [
    "DEFAULT_CONFIGS",
    "assert_bitwise_equal",
    "engine_trajectory",
    "gradient_sequence",
    "model",
    "ones",
    "sgd_step",
    "small_gradients",
    "small_weights",
    "zeros",
]


#: Each name's class and full configuration: Keras 2.2.4's arguments and defaults (Nadam's
#: schedule_decay is the project's documented 0.001, Keras's is 0.004).
DEFAULT_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {"lr": 0.01, "momentum": 0.0, "decay": 0.0, "nesterov": False}),
    "rmsprop": ("RMSprop", {"lr": 0.001, "rho": 0.9, "epsilon": 1e-07, "decay": 0.0}),
    "adagrad": ("Adagrad", {"lr": 0.01, "epsilon": 1e-07, "decay": 0.0}),
    "adadelta": ("Adadelta", {"lr": 1.0, "rho": 0.95, "epsilon": 1e-07, "decay": 0.0}),
    "adam": (
        "Adam",
        {
            "lr": 0.001,
            "beta_1": 0.9,
            "beta_2": 0.999,
            "epsilon": 1e-07,
            "decay": 0.0,
            "amsgrad": False,
        },
    ),
    "adamax": (
        "Adamax",
        {"lr": 0.002, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "decay": 0.0},
    ),
    "nadam": (
        "Nadam",
        {"lr": 0.002, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "schedule_decay": 0.001},
    ),
}


def model(seed: int = 0, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """A kernel (3, 4), a bias (4,) and a 0-d parameter, seeded."""
    rng = np.random.default_rng(seed)
    return {
        "dense/kernel": rng.standard_normal((3, 4)).astype(dtype),
        "dense/bias": rng.standard_normal(4).astype(dtype),
        "scale": np.asarray(rng.standard_normal(), dtype=dtype),  # a 0-d parameter
    }


def zeros(size: int = 4, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """One parameter ``w`` of ``size`` zeros: a model whose bytes are easy to count."""
    return {"w": np.zeros(size, dtype)}


def ones(size: int = 4, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """One parameter ``w`` of ``size`` ones: gradients for :func:`zeros`."""
    return {"w": np.ones(size, dtype)}


def gradient_sequence(
    weights: Mapping[str, np.ndarray], steps: int, seed: int = 1, dtype: Any = None
) -> list[dict[str, np.ndarray]]:
    """``steps`` seeded gradients for ``weights`` (of their dtypes unless ``dtype`` is given)."""
    rng = np.random.default_rng(seed)
    return [
        {
            n: np.asarray(rng.standard_normal(w.shape), dtype=dtype or w.dtype)
            for n, w in weights.items()
        }
        for _ in range(steps)
    ]


def engine_trajectory(
    optimizer: Any, weights: Mapping[str, np.ndarray], grads: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """The weights after each step when the engine runs in this process, without HTTP."""
    params = {n: np.array(w, copy=True) for n, w in weights.items()}
    engine = KerasOptimizer(get_optimizer(optimizer), params)
    out = []
    for g in grads:
        engine.step(params, g)
        out.append({n: p.copy() for n, p in params.items()})
    assert engine.iterations == len(grads)
    return out


def assert_bitwise_equal(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    """Same names in the same order, and each array of the same dtype, shape and bytes."""
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), (name, got[name], want[name])


# --- the client tests' model ------------------------------------------------------------------


def small_weights() -> dict[str, np.ndarray]:
    """A float32 kernel (2, 3) and a float64 bias (3,)."""
    return {
        "kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bias": np.array([0.5, -0.5, 1.0], dtype=np.float64),
    }


def small_gradients() -> dict[str, np.ndarray]:
    """Gradients for :func:`small_weights`."""
    return {"kernel": np.ones((2, 3), dtype=np.float32), "bias": np.full(3, 2.0)}


def sgd_step(
    weights: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float = 0.1
) -> dict[str, np.ndarray]:
    """One plain SGD step, in each parameter's dtype."""
    return {k: (v - np.asarray(lr, v.dtype) * grads[k].astype(v.dtype)) for k, v in weights.items()}
