"""The optimizer engine: Keras 2.2.4 update rules as pure in-place numpy (and numba) kernels.

No HTTP, no storage, no globals beyond the compiled-kernel cache: numpy arrays in, numpy arrays
out. See :class:`KerasOptimizer`.
"""

from .engine import (
    FLOAT_DTYPES,
    GradientError,
    KerasOptimizer,
    KernelBackend,
    NumpyBackend,
    OptimizerState,
    StateError,
    default_backend,
)
from .rules import RULES, UpdateRule

__all__ = [
    "FLOAT_DTYPES",
    "RULES",
    "GradientError",
    "KerasOptimizer",
    "KernelBackend",
    "NumpyBackend",
    "OptimizerState",
    "StateError",
    "UpdateRule",
    "default_backend",
]
