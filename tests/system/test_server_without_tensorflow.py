"""A server that cannot import TensorFlow answers TFOptimizer sessions with how to install it.

The server runs as a child process whose imports of ``tensorflow`` and ``keras`` fail, as on
an install without the ``tensorflow`` extra: creating a TFOptimizer session, or importing a
state that names one, gets 422 ``tensorflow_not_installed`` with the install command, and
every other session works. The TFOptimizer sessions themselves: ``tests/server/test_tf_trainer.py``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx
import pytest

from paramserver import optimizers, wire
from tests.harness.http_api import assert_error, create_session, post_session, pushed, put_state
from tests.harness.models import gradient_sequence, model
from tests.harness.servers import ServerProcess

pytestmark = pytest.mark.tensorflow  # with the TFOptimizer tests, though it needs no TensorFlow

INSTALL_HINT = "pip install 'paramserver[tensorflow]'"

SERVE_WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "keras"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, NoTensorFlow())

    import uvicorn

    from paramserver.server.main import create_app
    from paramserver.server.settings import Settings

    app = create_app(Settings(warm_up_kernels=False))
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)


def test_server_without_tensorflow_answers_the_install_hint(tmp_path: Path) -> None:
    script = tmp_path / "serve_without_tensorflow.py"
    script.write_text(SERVE_WITHOUT_TENSORFLOW)
    weights = model()
    tf_adam = optimizers.TFOptimizer("AdamOptimizer", learning_rate=0.01)
    with (
        ServerProcess([str(script), "{port}"], log_dir=tmp_path) as server,
        httpx.Client(base_url=server.url, timeout=60) as api,
    ):
        r = post_session(api, tf_adam.to_dict(), weights, session_id="tf")
        assert INSTALL_HINT in assert_error(r, 422, "tensorflow_not_installed")
        assert api.get("/sessions/tf").status_code == 404

        # A state naming a TFOptimizer gets the same answer; every other session works.
        state = {
            "iterations": 0,
            "optimizer": optimizers.TFOptimizer("Adam").to_dict(),
            "weights": weights,
            "slots": {},
            "scalars": {},
        }
        r = put_state(api, "tf", wire.pack(state))
        assert INSTALL_HINT in assert_error(r, 422, "tensorflow_not_installed")
        create_session(api, optimizers.Adam(lr=0.01).to_dict(), weights, session_id="keras")
        assert pushed(api, "keras", gradient_sequence(weights, 1)[0])["iterations"] == 1
