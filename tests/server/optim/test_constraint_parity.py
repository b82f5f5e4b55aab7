"""Keras 2.2.4's constraints on the server equal Keras 2.2.4's own, applied inside its update.

The reference is Keras 2.2.4's ``keras/constraints.py`` vendored unmodified (but for its import
lines) in ``tests/reference/keras_2_2_4_constraints.py``, set as ``variable.constraint`` on the
variables of the vendored ``keras/optimizers.py``, whose ``get_updates`` then passes each new
value through it, all on the numpy graph backend (see ``test_keras_parity``). Ours is the
session's trainer (:class:`~paramserver.server.training.KerasTrainer`) with the same
constraints. The constraint math itself is the same IEEE operations in the same order, so on
top of a step that is itself bit-identical (SGD, RMSprop, Adagrad, Adadelta) the results are
equal bit for bit; with the other rules within the parity suite's tolerance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from paramserver import constraints, optimizers
from paramserver.server.optim import constrained
from paramserver.server.training import KerasTrainer
from tests.reference import keras_2_2_4_constraints as keras_constraints
from tests.reference import keras_2_2_4_optimizers as keras_optimizers
from tests.reference import numpy_graph_backend as K
from tests.server.optim.test_keras_parity import TOLERANCE, keras_kwargs

SHAPES = {"kernel": (4, 3), "conv": (2, 2, 3, 4), "bias": (3,)}

#: (ours, Keras 2.2.4's class name and arguments, the parameter it constrains)
CONSTRAINTS: list[tuple[constraints.Constraint, str, dict[str, Any], str]] = [
    (constraints.MaxNorm(), "MaxNorm", {}, "kernel"),
    (constraints.MaxNorm(0.05, axis=1), "MaxNorm", {"max_value": 0.05, "axis": 1}, "kernel"),
    (
        constraints.MaxNorm(0.05, axis=(0, 1, 2)),
        "MaxNorm",
        {"max_value": 0.05, "axis": [0, 1, 2]},
        "conv",
    ),
    (constraints.NonNeg(), "NonNeg", {}, "bias"),
    (constraints.NonNeg(), "NonNeg", {}, "kernel"),
    (constraints.UnitNorm(), "UnitNorm", {}, "kernel"),
    (constraints.UnitNorm(axis=-1), "UnitNorm", {"axis": -1}, "conv"),
    (constraints.MinMaxNorm(), "MinMaxNorm", {}, "kernel"),
    (
        constraints.MinMaxNorm(0.02, 0.04, rate=0.5, axis=0),
        "MinMaxNorm",
        {"min_value": 0.02, "max_value": 0.04, "rate": 0.5, "axis": 0},
        "kernel",
    ),
    (
        constraints.MinMaxNorm(0.5, 0.1, rate=0.3, axis=[1, 2]),  # max below min: raised to min
        "MinMaxNorm",
        {"min_value": 0.5, "max_value": 0.1, "rate": 0.3, "axis": [1, 2]},
        "conv",
    ),
]
BIT_EXACT = ("SGD", "RMSprop", "Adagrad", "Adadelta")
RULES = [
    ("SGD", {"momentum": 0.9}),
    ("RMSprop", {}),
    ("Adagrad", {}),
    ("Adadelta", {}),
    ("Adam", {"amsgrad": True}),
    ("Adamax", {}),
    ("Nadam", {}),
]


def _ids(case: tuple[Any, ...]) -> str:
    ours, _, kwargs, param = case
    return f"{type(ours).__name__}-{param}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("case", CONSTRAINTS, ids=[_ids(c) for c in CONSTRAINTS])
def test_a_constrained_step_equals_keras_2_2_4(case, rule) -> None:
    ours, keras_name, keras_args, param = case
    class_name, config = rule
    rng = np.random.default_rng(13)
    params = {n: (0.05 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}
    names = list(params)
    with K.floatx_scope("float32"):
        variables = [K.variable(params[n].copy()) for n in names]
        variables[names.index(param)].constraint = getattr(keras_constraints, keras_name)(
            **keras_args
        )
        optimizer = getattr(keras_optimizers, class_name)(**keras_kwargs(class_name, dict(config)))
        loss = K.FedGradients()
        train = K.function(loss, [], optimizer.get_updates(loss, variables))
    trainer = KerasTrainer(
        getattr(optimizers, class_name)(**config), params, constraints={param: ours}
    )
    rtol, floor = TOLERANCE[np.dtype(np.float32)]
    for _ in range(15):
        grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        train([grads[n] for n in names])
        trainer.apply(trainer.check_gradients(grads))
        theirs = dict(zip(names, K.batch_get_value(variables), strict=True))
        for name in names:
            if class_name in BIT_EXACT:
                np.testing.assert_array_equal(trainer.weights()[name], theirs[name], err_msg=name)
            else:
                scale = float(np.max(np.abs(theirs[name]))) or 1.0
                np.testing.assert_allclose(
                    trainer.weights()[name], theirs[name], rtol=rtol, atol=floor * scale
                )


@pytest.mark.parametrize("case", CONSTRAINTS, ids=[_ids(c) for c in CONSTRAINTS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_constraint_alone_is_keras_bit_for_bit(case, dtype) -> None:
    """The function of paramserver.server.optim.constraints against the vendored class applied
    to a fed tensor (an identity update through K.function); float64 too, except NonNeg, whose
    Keras 2.2.4 mask is float32 (it cannot multiply a float64 variable)."""
    ours, keras_name, keras_args, param = case
    if dtype == np.float64 and keras_name == "NonNeg":
        pytest.skip("Keras 2.2.4's NonNeg casts its mask to floatx (float32)")
    rng = np.random.default_rng(17)
    w = (rng.standard_normal(SHAPES[param]) * 0.3).astype(dtype)
    w.flat[0] = 0.0
    with K.floatx_scope(np.dtype(dtype).name):
        variable = K.variable(w.copy())
        keras_constraint = getattr(keras_constraints, keras_name)(**keras_args)
        loss = K.FedGradients()
        fn = K.function(loss, [], [K.update(variable, keras_constraint(variable))])
        fn([])
        theirs = K.get_value(variable)
    np.testing.assert_array_equal(constrained(ours, w), theirs)


def test_configs_match_keras_2_2_4_get_config() -> None:
    for ours, keras_name, keras_args, _ in CONSTRAINTS:
        theirs = getattr(keras_constraints, keras_name)(**keras_args).get_config()
        mine = ours.get_config()
        if "axis" in theirs and isinstance(theirs["axis"], (list, tuple)):
            theirs["axis"] = list(theirs["axis"])
        assert mine == theirs, (mine, theirs)
    # Keras 2.2.4's defaults
    assert constraints.MaxNorm().get_config() == keras_constraints.MaxNorm().get_config()
    assert constraints.MinMaxNorm().get_config() == keras_constraints.MinMaxNorm().get_config()
    assert constraints.UnitNorm().get_config() == keras_constraints.UnitNorm().get_config()
    # every name Keras 2.2.4's module resolves (its classes and aliases), case-insensitive
    for alias in (
        "max_norm",
        "maxnorm",
        "non_neg",
        "nonneg",
        "unit_norm",
        "unitnorm",
        "min_max_norm",
        "MinMaxNorm",
        "MAXNORM",
    ):
        keras_class = getattr(keras_constraints, alias, None) or getattr(
            keras_constraints, {"MAXNORM": "MaxNorm"}.get(alias, alias)
        )
        assert constraints.get(alias).class_name == keras_class.__name__, alias
