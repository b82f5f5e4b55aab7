"""Optimizer configurations (``paramserver.optimizers``): names, defaults, round trips, refusals.

Every refusal is an :class:`InvalidOptimizerConfig` whose message names the argument at fault,
so that a worker sees what to fix; an unknown optimizer name lists the valid names.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest

from paramserver import optimizers
from paramserver.optimizers import InvalidOptimizerConfig, UnknownOptimizer

KERAS_NAMES = ["SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "Adamax", "Nadam"]

#: The defaults of the issue: Keras 2.2.4's, except Nadam's schedule_decay (Keras: 0.004).
DEFAULTS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 0.01, "momentum": 0.0, "decay": 0.0, "nesterov": False},
    "RMSprop": {"lr": 0.001, "rho": 0.9, "epsilon": 1e-07, "decay": 0.0},
    "Adagrad": {"lr": 0.01, "epsilon": 1e-07, "decay": 0.0},
    "Adadelta": {"lr": 1.0, "rho": 0.95, "epsilon": 1e-07, "decay": 0.0},
    "Adam": {
        "lr": 0.001,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-07,
        "decay": 0.0,
        "amsgrad": False,
    },
    "Adamax": {"lr": 0.002, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "decay": 0.0},
    "Nadam": {
        "lr": 0.002,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-07,
        "schedule_decay": 0.001,
    },
}

#: A valid non-default configuration of each optimizer, clips included.
CUSTOM: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 0.1, "momentum": 0.9, "decay": 1e-4, "nesterov": True, "clipnorm": 1.0},
    "RMSprop": {"lr": 0.01, "rho": 0.5, "epsilon": 1e-4, "decay": 0.1, "clipvalue": 0.5},
    "Adagrad": {"lr": 0.2, "epsilon": 1e-3, "decay": 0.01, "clipnorm": 2.0, "clipvalue": 3.0},
    "Adadelta": {"lr": 0.5, "rho": 0.0, "epsilon": 1e-6, "decay": 0.5},
    "Adam": {
        "lr": 0.01,
        "beta_1": 0.0,
        "beta_2": 0.5,
        "epsilon": 0.0,
        "decay": 0.3,
        "amsgrad": True,
    },
    "Adamax": {"lr": 0.3, "beta_1": 0.5, "beta_2": 0.25, "epsilon": 1e-3, "clipnorm": 5.0},
    "Nadam": {"lr": 0.1, "beta_1": 0.5, "beta_2": 0.9, "schedule_decay": 0.004, "clipvalue": 1.0},
}

#: Float arguments: (optimizer, argument) for every one of them.
FLOAT_ARGUMENTS = [
    (name, arg)
    for name in KERAS_NAMES
    for arg, default in DEFAULTS[name].items()
    if not isinstance(default, bool)
] + [(name, clip) for name in KERAS_NAMES for clip in ("clipnorm", "clipvalue")]

BOOL_ARGUMENTS = [("SGD", "nesterov"), ("Adam", "amsgrad")]


def names_argument(arg: str) -> str:
    """A ``pytest.raises(match=...)`` pattern: the message quotes the argument's name."""
    return re.escape(f"'{arg}'")


# --- lookup --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KERAS_NAMES)
def test_lookup_by_name_is_case_insensitive(name: str) -> None:
    cls = getattr(optimizers, name)
    for spelling in (name, name.lower(), name.upper(), name.swapcase()):
        opt = optimizers.get(spelling)
        assert type(opt) is cls
        assert opt.get_config() == cls().get_config()
        assert type(optimizers.deserialize({"class_name": spelling})) is cls


def test_lookup_of_the_dict_form() -> None:
    opt = optimizers.get({"class_name": "sgd", "config": {"lr": 0.1, "momentum": 0.5}})
    assert type(opt) is optimizers.SGD
    assert opt.get_config() == {**DEFAULTS["SGD"], "lr": 0.1, "momentum": 0.5}
    # config omitted or null: the defaults
    assert optimizers.get({"class_name": "Adam"}) == optimizers.Adam()
    assert optimizers.get({"class_name": "Adam", "config": None}) == optimizers.Adam()
    assert optimizers.get({"class_name": "Adam", "config": {}}) == optimizers.Adam()


def test_get_returns_an_instance_unchanged() -> None:
    opt = optimizers.Adam(lr=0.1)
    assert optimizers.get(opt) is opt


def test_unknown_optimizer_name_lists_the_valid_names() -> None:
    for identifier in ("adamw", {"class_name": "AdamW", "config": {}}):
        with pytest.raises(UnknownOptimizer) as info:
            optimizers.get(identifier)  # type: ignore[arg-type]
        message = str(info.value)
        assert "AdamW" in message or "adamw" in message
        for name in [*KERAS_NAMES, "TFOptimizer"]:
            assert name in message
    assert optimizers.optimizer_names() == [*KERAS_NAMES, "TFOptimizer"]


@pytest.mark.parametrize(
    "identifier",
    [
        42,
        None,
        ["adam"],
        {"config": {}},
        {"class_name": "adam", "config": {}, "extra": 1},
        {"class_name": "adam", "config": [("lr", 0.1)]},
        {"class_name": "adam", "config": {1: 0.1}},
        {"class_name": 3},
    ],
)
def test_malformed_identifiers_are_refused(identifier: Any) -> None:
    with pytest.raises((InvalidOptimizerConfig, UnknownOptimizer)):
        optimizers.get(identifier)


def test_deserialize_refuses_what_is_not_a_mapping() -> None:
    with pytest.raises(InvalidOptimizerConfig):
        optimizers.deserialize("adam")  # type: ignore[arg-type]


# --- defaults and round trips --------------------------------------------------------------------


@pytest.mark.parametrize("name", KERAS_NAMES)
def test_defaults(name: str) -> None:
    config = getattr(optimizers, name)().get_config()
    assert config == DEFAULTS[name]
    assert list(config) == list(DEFAULTS[name])  # Keras's argument order
    for key, value in config.items():
        assert type(value) is type(DEFAULTS[name][key]), key


def test_epsilon_none_means_keras_epsilon() -> None:
    for name in KERAS_NAMES:
        if name == "SGD":
            continue
        assert getattr(optimizers, name)(epsilon=None).get_config()["epsilon"] == 1e-07


@pytest.mark.parametrize("name", KERAS_NAMES)
@pytest.mark.parametrize("which", ["defaults", "custom"])
def test_get_config_from_config_round_trip(name: str, which: str) -> None:
    cls = getattr(optimizers, name)
    kwargs = {} if which == "defaults" else CUSTOM[name]
    opt = cls(**kwargs)
    config = opt.get_config()
    assert config == {**DEFAULTS[name], **kwargs}
    again = cls.from_config(config)
    assert type(again) is cls and again == opt and again.get_config() == config
    assert hash(again) == hash(opt)
    # the serialized form, as Keras's serialize/deserialize write it
    serialized = optimizers.serialize(opt)
    assert serialized == {"class_name": name, "config": config}
    assert optimizers.deserialize(serialized) == opt
    # get_config hands out a copy
    config["lr"] = 123.0
    assert opt.get_config()["lr"] != 123.0


def test_clip_arguments_appear_only_when_set() -> None:
    assert "clipnorm" not in optimizers.SGD().get_config()
    assert "clipvalue" not in optimizers.SGD(clipnorm=None).get_config()
    config = optimizers.SGD(clipnorm=1.0, clipvalue=2).get_config()
    assert (config["clipnorm"], config["clipvalue"]) == (1.0, 2.0)
    assert type(config["clipvalue"]) is float
    opt = optimizers.Adam()
    assert opt.clipnorm is None and opt.clipvalue is None
    assert optimizers.Adam(clipnorm=0.5).clipnorm == 0.5


def test_attributes_read_the_config() -> None:
    opt = optimizers.Adam(lr=0.1, amsgrad=True)
    assert (opt.lr, opt.beta_1, opt.amsgrad) == (0.1, 0.9, True)
    with pytest.raises(AttributeError):
        _ = opt.momentum


def test_positional_arguments_follow_keras_order() -> None:
    assert optimizers.SGD(0.1, 0.9, 0.01, True) == optimizers.SGD(
        lr=0.1, momentum=0.9, decay=0.01, nesterov=True
    )
    with pytest.raises(InvalidOptimizerConfig, match="positional"):
        optimizers.Adagrad(0.1, 1e-7, 0.0, 1.0)
    with pytest.raises(InvalidOptimizerConfig, match=names_argument("lr")):
        optimizers.SGD(0.1, lr=0.2)


def test_ints_are_accepted_as_floats() -> None:
    config = optimizers.SGD(lr=1, momentum=0, decay=2).get_config()
    assert config == {"lr": 1.0, "momentum": 0.0, "decay": 2.0, "nesterov": False}
    assert all(type(config[k]) is float for k in ("lr", "momentum", "decay"))


def test_optimizers_of_different_classes_or_configs_differ() -> None:
    assert optimizers.Adam() != optimizers.Adamax()
    assert optimizers.Adam() != optimizers.Adam(lr=0.1)
    assert optimizers.Adam() != {"class_name": "Adam", "config": DEFAULTS["Adam"]}


def test_optimizer_base_class_is_abstract() -> None:
    with pytest.raises(TypeError):
        optimizers.Optimizer()


# --- the learning_rate alias ---------------------------------------------------------------------


@pytest.mark.parametrize("name", KERAS_NAMES)
def test_learning_rate_is_an_alias_of_lr(name: str) -> None:
    cls = getattr(optimizers, name)
    opt = cls(learning_rate=0.25)
    config = opt.get_config()
    assert config["lr"] == 0.25 and "learning_rate" not in config
    assert opt == cls(lr=0.25)
    assert cls.from_config({"learning_rate": 0.25}) == opt
    assert optimizers.get({"class_name": name, "config": {"learning_rate": 0.25}}) == opt


@pytest.mark.parametrize("name", KERAS_NAMES)
def test_lr_and_learning_rate_together_are_refused(name: str) -> None:
    cls = getattr(optimizers, name)
    with pytest.raises(InvalidOptimizerConfig) as info:
        cls(lr=0.1, learning_rate=0.1)
    assert "'lr'" in str(info.value) and "'learning_rate'" in str(info.value)
    with pytest.raises(InvalidOptimizerConfig, match="learning_rate"):
        optimizers.get({"class_name": name, "config": {"lr": 0.1, "learning_rate": 0.2}})


def test_learning_rate_alias_is_validated_as_lr() -> None:
    with pytest.raises(InvalidOptimizerConfig, match=names_argument("lr")):
        optimizers.Adam(learning_rate=-1.0)
    with pytest.raises(InvalidOptimizerConfig, match=names_argument("lr")):
        optimizers.Adam(learning_rate="0.1")


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KERAS_NAMES)
def test_unknown_argument_is_refused_by_name(name: str) -> None:
    cls = getattr(optimizers, name)
    with pytest.raises(InvalidOptimizerConfig, match=names_argument("bogus")) as info:
        cls(bogus=1.0)
    assert "allowed" in str(info.value)
    with pytest.raises(InvalidOptimizerConfig, match=names_argument("bogus")):
        cls.from_config({"lr": 0.1, "bogus": 1.0})


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        ("Nadam", "decay"),
        ("SGD", "epsilon"),
        ("Adagrad", "rho"),
        ("RMSprop", "momentum"),
        ("Adam", "nesterov"),
        ("SGD", "amsgrad"),
        ("Adamax", "schedule_decay"),
        ("Adam", "name"),
    ],
)
def test_arguments_of_other_optimizers_are_refused(name: str, arg: str) -> None:
    with pytest.raises(InvalidOptimizerConfig, match=names_argument(arg)):
        getattr(optimizers, name)(**{arg: 0.5})


@pytest.mark.parametrize(("name", "arg"), FLOAT_ARGUMENTS)
@pytest.mark.parametrize(
    "value",
    [True, False, "0.1", b"0.1", [0.1], {"value": 0.1}, 1j],
    ids=["True", "False", "str", "bytes", "list", "dict", "complex"],
)
def test_float_arguments_refuse_other_types(name: str, arg: str, value: Any) -> None:
    with pytest.raises(InvalidOptimizerConfig, match=names_argument(arg)):
        getattr(optimizers, name)(**{arg: value})


@pytest.mark.parametrize(("name", "arg"), FLOAT_ARGUMENTS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_float_arguments_refuse_nan_and_inf(name: str, arg: str, value: float) -> None:
    with pytest.raises(InvalidOptimizerConfig, match=names_argument(arg)):
        getattr(optimizers, name)(**{arg: value})


@pytest.mark.parametrize(
    ("name", "arg"),
    [(n, a) for n, a in FLOAT_ARGUMENTS if a not in ("epsilon", "clipnorm", "clipvalue")],
)
def test_null_is_refused_where_it_means_nothing(name: str, arg: str) -> None:
    with pytest.raises(InvalidOptimizerConfig, match=names_argument(arg)):
        getattr(optimizers, name)(**{arg: None})


@pytest.mark.parametrize(("name", "arg"), BOOL_ARGUMENTS)
@pytest.mark.parametrize("value", [1, 0, 1.0, "true", None], ids=["1", "0", "1.0", "str", "None"])
def test_bool_arguments_refuse_other_types(name: str, arg: str, value: Any) -> None:
    with pytest.raises(InvalidOptimizerConfig, match=names_argument(arg)):
        getattr(optimizers, name)(**{arg: value})


NEGATIVE = [
    (name, arg)
    for name, arg in FLOAT_ARGUMENTS
    if arg in ("lr", "decay", "epsilon", "rho", "momentum", "schedule_decay")
]


@pytest.mark.parametrize(("name", "arg"), NEGATIVE)
def test_negative_values_are_refused(name: str, arg: str) -> None:
    with pytest.raises(InvalidOptimizerConfig, match=names_argument(arg)) as info:
        getattr(optimizers, name)(**{arg: -0.001})
    assert "-0.001" in str(info.value)  # the message shows the value it refused
    getattr(optimizers, name)(**{arg: 0.0})  # zero is allowed


@pytest.mark.parametrize("name", ["Adam", "Adamax", "Nadam"])
@pytest.mark.parametrize("arg", ["beta_1", "beta_2"])
def test_betas_must_be_in_the_half_open_unit_interval(name: str, arg: str) -> None:
    cls = getattr(optimizers, name)
    for bad in (1.0, 1.5, -0.1, -1e-12):
        with pytest.raises(InvalidOptimizerConfig, match=names_argument(arg)) as info:
            cls(**{arg: bad})
        assert "[0, 1)" in str(info.value)  # the allowed range, in the message
    for good in (0.0, 0.5, 0.999999):
        assert cls(**{arg: good}).get_config()[arg] == good


@pytest.mark.parametrize("name", ["RMSprop", "Adadelta"])
def test_rho_must_be_in_the_unit_interval(name: str) -> None:
    cls = getattr(optimizers, name)
    for bad in (1.0 + 1e-9, 2.0, -0.5):
        with pytest.raises(InvalidOptimizerConfig, match=names_argument("rho")):
            cls(rho=bad)
    for good in (0.0, 1.0):
        assert cls(rho=good).get_config()["rho"] == good


@pytest.mark.parametrize("name", KERAS_NAMES)
@pytest.mark.parametrize("arg", ["clipnorm", "clipvalue"])
@pytest.mark.parametrize("value", [0, 0.0, -0.0, -1.0])
def test_clips_must_be_positive(name: str, arg: str, value: float) -> None:
    with pytest.raises(InvalidOptimizerConfig, match=names_argument(arg)) as info:
        getattr(optimizers, name)(**{arg: value})
    assert "> 0" in str(info.value)


def test_refusals_name_the_optimizer() -> None:
    with pytest.raises(InvalidOptimizerConfig, match=r"^Adamax: argument 'beta_2'"):
        optimizers.get({"class_name": "adamax", "config": {"beta_2": 1.0}})


# --- TFOptimizer ---------------------------------------------------------------------------------


def test_tfoptimizer_config_shape_and_round_trip() -> None:
    opt = optimizers.TFOptimizer("AdamOptimizer", learning_rate=0.01, beta1=0.8)
    config = opt.get_config()
    assert config == {
        "optimizer": {
            "class_name": "AdamOptimizer",
            "config": {"learning_rate": 0.01, "beta1": 0.8},
        }
    }
    assert optimizers.TFOptimizer.from_config(config) == opt
    serialized = optimizers.serialize(opt)
    assert serialized == {"class_name": "TFOptimizer", "config": config}
    assert optimizers.deserialize(serialized) == opt
    assert optimizers.get({"class_name": "tfoptimizer", "config": config}) == opt
    assert hash(optimizers.TFOptimizer(config["optimizer"])) == hash(opt)


def test_tfoptimizer_from_an_instance_with_get_config() -> None:
    class FakeKerasOptimizer:
        def get_config(self) -> dict[str, Any]:
            return {"learning_rate": np.float32(0.5), "betas": (np.float64(0.9), 0.99)}

    config = optimizers.TFOptimizer(FakeKerasOptimizer()).get_config()
    assert config == {
        "optimizer": {
            "class_name": "FakeKerasOptimizer",
            "config": {"learning_rate": 0.5, "betas": [0.9, 0.99]},
        }
    }
    assert type(config["optimizer"]["config"]["learning_rate"]) is float


@pytest.mark.parametrize(
    "build",
    [
        lambda: optimizers.TFOptimizer(),
        lambda: optimizers.TFOptimizer(42),
        lambda: optimizers.TFOptimizer({"class_name": ""}),
        lambda: optimizers.TFOptimizer({"class_name": "AdamOptimizer", "config": [1]}),
        lambda: optimizers.TFOptimizer({"class_name": "AdamOptimizer", "bogus": 1}),
        lambda: optimizers.TFOptimizer.from_config({"optimizer": {}, "bogus": 1}),
        lambda: optimizers.TFOptimizer.from_config({}),
        lambda: optimizers.TFOptimizer.from_config([]),  # type: ignore[arg-type]
    ],
)
def test_tfoptimizer_refuses_malformed_configs(build: Any) -> None:
    with pytest.raises(InvalidOptimizerConfig, match="TFOptimizer"):
        build()
