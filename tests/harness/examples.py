"""Loading the examples of ``examples/`` as modules, and what tests of them check."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from paramserver.client import Client

__all__ = ["EXAMPLES", "load_example", "session_ids"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` imported as the module ``examples_<name>``, with ``examples/``
    on ``sys.path`` as running the script puts it (the examples import ``_common`` from it)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def session_ids(base_url: str) -> set[str]:
    """The ids of the server's sessions (an example must delete the ones it made)."""
    with Client(base_url) as client:
        return {s.session_id for s in client.sessions()}
