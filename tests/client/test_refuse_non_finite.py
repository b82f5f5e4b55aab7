"""The client creates sessions that refuse non-finite results and reads the setting back."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver import Client, InvalidRequest, optimizers


def test_create_session_with_refuse_non_finite(base_url: str) -> None:
    with Client(base_url) as client:
        session = client.create_session(
            {"w": np.ones(3, np.float32)},
            optimizers.SGD(lr=1e30),
            refuse_non_finite=True,
        )
        info = session.info()
        assert info.refuse_non_finite is True
        with pytest.raises(InvalidRequest) as err:
            session.push({"w": np.full(3, 1e10, np.float32)})
        assert err.value.code == "non_finite_result"
        assert session.info().iterations == 0
        state = session.state()
        assert state.refuse_non_finite is True
        copy = client.restore_session(state)
        assert copy.info().refuse_non_finite is True
        plain = client.create_session({"w": np.ones(3, np.float32)}, "sgd")
        assert plain.info().refuse_non_finite is False
        for s in (session, copy, plain):
            s.delete()
