"""A :class:`CoefficientSchedule` gives every step the coefficients its rule computes for
that step alone, bit for bit and of the same numpy scalar types, and an optimizer that uses
it steps exactly as one that computes each step's coefficients on its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from paramserver import optimizers
from paramserver.server.optim import engine as engine_module
from paramserver.server.optim.engine import SCHEDULE_STEPS, KerasOptimizer, NumpyBackend
from paramserver.server.optim.rules import RULES, CoefficientSchedule

CONFIGS: dict[str, Callable[[], optimizers.Optimizer]] = {
    "sgd": lambda: optimizers.SGD(lr=0.05),
    "sgd_momentum_decay": lambda: optimizers.SGD(lr=0.05, momentum=0.9, decay=0.01),
    "sgd_nesterov": lambda: optimizers.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda: optimizers.RMSprop(decay=0.001),
    "adagrad": lambda: optimizers.Adagrad(lr=0.02, decay=0.3),
    "adadelta": lambda: optimizers.Adadelta(decay=0.01),
    "adam": lambda: optimizers.Adam(),
    "adam_odd": lambda: optimizers.Adam(lr=0.0137, beta_1=0.8, beta_2=0.9321, epsilon=1e-5),
    "adam_amsgrad_decay": lambda: optimizers.Adam(lr=0.01, amsgrad=True, decay=0.001),
    "adamax": lambda: optimizers.Adamax(decay=1e-4),
}

#: Counts around the places where float rounding of the count changes: small counts, float16's
#: largest finite value, float32's last exact integer, 2**31 and the last counts a session has.
STARTS = [0, 1, 65_470, 2**24 - 20, 2**31 - 7, 2**53 - SCHEDULE_STEPS - 2]

DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]


def _bits(value: Any) -> tuple[type, bytes]:
    return type(value), np.asarray(value).tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_step_is_what_the_rule_computes_for_it_alone(name: str, dtype: np.dtype) -> None:
    config = CONFIGS[name]()
    rule = RULES[config.class_name]
    cfg = config.get_config()
    for first in STARTS:
        schedule = CoefficientSchedule(rule, cfg, first, SCHEDULE_STEPS, dtype)
        for iterations in range(first, first + SCHEDULE_STEPS):
            assert schedule.covers(iterations)
            with np.errstate(all="ignore"):
                alone, new_scalars = rule.coefficients(cfg, iterations, {}, dtype)
            assert new_scalars == {}
            got = schedule.at(iterations)
            assert [_bits(c) for c in got] == [_bits(c) for c in alone], (first, iterations)
        assert not schedule.covers(first - 1) and not schedule.covers(first + SCHEDULE_STEPS)


def test_nadam_has_none() -> None:
    """Nadam's coefficients follow its m_schedule, a product over every step: no schedule."""
    rule = RULES["Nadam"]
    assert not rule.iterations_only
    with pytest.raises(ValueError, match="scalar state"):
        CoefficientSchedule(rule, optimizers.Nadam().get_config(), 0, 8, np.dtype(np.float32))


@pytest.mark.parametrize("name", ["adam_amsgrad_decay", "sgd_momentum_decay", "adadelta"])
def test_steps_across_schedules_match_steps_computed_alone(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two optimizers from one state, one with schedules (crossing several, and a state load
    that moves the count back), one computing every step's coefficients alone: the same
    weights and slots bit for bit."""
    rng = np.random.default_rng(7)
    params = {"w": rng.standard_normal(37).astype(np.float32)}
    grads = [{"w": rng.standard_normal(37).astype(np.float32)} for _ in range(3 * SCHEDULE_STEPS)]

    def run(scheduled: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        opt = KerasOptimizer(CONFIGS[name](), params, backend=NumpyBackend())
        if not scheduled:
            rule = opt.rule
            monkeypatch.setattr(
                opt,
                "_coefficients",
                lambda: rule.coefficients(opt._cfg, opt.iterations, opt.scalars, opt.compute_dtype),
            )
        w = {"w": params["w"].copy()}
        for g in grads[: SCHEDULE_STEPS + 5]:
            opt.step(w, g)
        state = opt.get_state()
        for g in grads[SCHEDULE_STEPS + 5 : 2 * SCHEDULE_STEPS + 9]:
            opt.step(w, g)
        opt.set_state(state)  # back to an earlier count: a schedule must not be reused
        for g in grads[SCHEDULE_STEPS + 5 :]:
            opt.step(w, g)
        return w["w"], {s: per["w"] for s, per in opt.get_state().slots.items()}

    scheduled_w, scheduled_slots = run(True)
    alone_w, alone_slots = run(False)
    assert scheduled_w.tobytes() == alone_w.tobytes()
    assert {k: v.tobytes() for k, v in scheduled_slots.items()} == {
        k: v.tobytes() for k, v in alone_slots.items()
    }


def test_an_optimizer_computes_one_schedule_per_block_of_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[int] = []
    real = engine_module.CoefficientSchedule

    def counting(rule: Any, config: Any, first: int, count: int, dtype: Any) -> Any:
        made.append(first)
        return real(rule, config, first, count, dtype)

    monkeypatch.setattr(engine_module, "CoefficientSchedule", counting)
    params = {"w": np.zeros(5, np.float32)}
    opt = KerasOptimizer(optimizers.Adam(), params, backend=NumpyBackend())
    for _ in range(2 * SCHEDULE_STEPS + 1):
        opt.step(params, {"w": np.ones(5, np.float32)})
    assert made == [0, SCHEDULE_STEPS, 2 * SCHEDULE_STEPS]
