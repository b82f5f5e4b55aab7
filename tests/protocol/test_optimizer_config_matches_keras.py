"""Optimizer configurations are Keras 2.2.4's: the same keys, defaults and names.

``paramserver.optimizers`` against the vendored ``keras/optimizers.py`` of Keras 2.2.4
(``tests/reference/keras_2_2_4_optimizers.py``, on the numpy graph backend of
``tests/reference/numpy_graph_backend.py``): ``get_config`` has Keras's keys and values, our
configuration is a valid Keras configuration and back again, the defaults are Keras's except
Nadam's ``schedule_decay`` (ours 0.001, Keras 0.004), and ``get`` knows the same names in any
case. The steps themselves: ``tests/server/optim/test_keras_parity.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from paramserver import optimizers
from tests.reference import keras_2_2_4_optimizers as keras_optimizers
from tests.reference import numpy_graph_backend as K

CONFIG_CASES = [
    ("SGD", {}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "decay": 0.001, "nesterov": True, "clipnorm": 1.0}),
    ("RMSprop", {}),
    ("RMSprop", {"lr": 0.01, "rho": 0.8, "epsilon": 1e-3, "decay": 0.1, "clipvalue": 0.3}),
    ("Adagrad", {}),
    ("Adagrad", {"lr": 0.1, "epsilon": 1e-4, "decay": 0.2}),
    ("Adadelta", {}),
    ("Adadelta", {"lr": 0.3, "rho": 0.7, "epsilon": 1e-6, "decay": 0.1, "clipnorm": 2.0}),
    ("Adam", {}),
    ("Adam", {"lr": 0.1, "beta_1": 0.7, "beta_2": 0.8, "epsilon": 1e-3, "amsgrad": True}),
    ("Adamax", {}),
    ("Adamax", {"lr": 0.1, "beta_1": 0.7, "beta_2": 0.8, "epsilon": 1e-3, "decay": 0.01}),
    ("Nadam", {"schedule_decay": 0.004}),
    (
        "Nadam",
        {
            "lr": 0.1,
            "beta_1": 0.7,
            "beta_2": 0.8,
            "epsilon": 1e-3,
            "schedule_decay": 0.01,
            "clipnorm": 1.0,
            "clipvalue": 0.5,
        },
    ),
]


@pytest.mark.parametrize(
    ("class_name", "kwargs"),
    CONFIG_CASES,
    ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIG_CASES)],
)
def test_get_config_matches_keras(class_name: str, kwargs: dict[str, Any]) -> None:
    """Same keys; the values Keras keeps in a ``K.variable`` come back float32-rounded."""
    ours = getattr(optimizers, class_name)(**kwargs).get_config()
    theirs_opt = getattr(keras_optimizers, class_name)(**kwargs)
    theirs = theirs_opt.get_config()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if isinstance(getattr(theirs_opt, key, None), K.Variable):
            assert theirs[key] == float(np.float32(value)), key
        else:
            assert theirs[key] == value, key
            assert type(theirs[key]) is type(value), key
    # Our configuration is a valid Keras 2.2.4 configuration, and back again.
    reloaded = getattr(keras_optimizers, class_name).from_config(ours)
    assert reloaded.get_config() == theirs
    assert optimizers.deserialize(keras_optimizers.serialize(theirs_opt)).get_config() == {
        k: (float(np.float32(v)) if isinstance(getattr(theirs_opt, k, None), K.Variable) else v)
        for k, v in ours.items()
    }


def test_defaults_match_keras_except_nadam_schedule_decay() -> None:
    for name in set(optimizers.optimizer_names()) - {"TFOptimizer"}:
        ours = getattr(optimizers, name)().get_config()
        keras_opt = getattr(keras_optimizers, name)()
        theirs = keras_opt.get_config()
        assert ours.keys() == theirs.keys(), name
        for key, value in ours.items():
            if name == "Nadam" and key == "schedule_decay":
                assert (value, theirs[key]) == (0.001, 0.004)
            elif isinstance(getattr(keras_opt, key, None), K.Variable):
                assert theirs[key] == float(np.float32(value)), (name, key)
            else:
                assert theirs[key] == value, (name, key)
    assert optimizers.Adam().get_config()["epsilon"] == K.epsilon() == 1e-07


def test_names_match_keras() -> None:
    """Keras's ``optimizers.get`` knows the same names (TFOptimizer cannot be built by name)."""
    for name in set(optimizers.optimizer_names()) - {"TFOptimizer"}:
        for spelling in (name, name.lower(), name.upper()):
            assert type(keras_optimizers.get(spelling)) is getattr(keras_optimizers, name)
            assert type(optimizers.get(spelling)) is getattr(optimizers, name)
