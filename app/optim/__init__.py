"""The optimizer engine: Keras 2.2.4 update rules as pure in-place numpy (and numba) kernels.

No HTTP, no storage, no globals beyond the compiled-kernel cache: numpy arrays in, numpy arrays
out. It imports numpy, numba and the shared configs (:mod:`paramserver.optimizers`,
:mod:`paramserver.codes`) only. See :class:`KerasOptimizer`.
"""

from .constraints import constrained
from .engine import (
    GradientError,
    KerasOptimizer,
    OptimizerState,
    PreparedGradients,
    SparseGradient,
    StateError,
    check_weights,
    default_backend,
    prepare_gradients,
)
from .kernels import FLOAT_DTYPES, KernelBackend, NumpyBackend, RowsKernel, UpdateKernel
from .rules import RULES, UpdateRule

__all__ = [
    "FLOAT_DTYPES",
    "RULES",
    "GradientError",
    "KerasOptimizer",
    "KernelBackend",
    "NumpyBackend",
    "OptimizerState",
    "PreparedGradients",
    "RowsKernel",
    "SparseGradient",
    "StateError",
    "UpdateKernel",
    "UpdateRule",
    "check_weights",
    "constrained",
    "default_backend",
    "prepare_gradients",
]
