"""Optional frameworks in tests: skipped where they are not installed, required in CI.

CI (``CI=true``) installs every extra the tests use (``tensorflow``, and ``torch`` through the
``dev`` extra), so there a missing framework is a failure, never a silent skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any

import pytest

__all__ = ["IN_CI", "import_or_skip", "installed", "optional_import", "requires"]

IN_CI = os.environ.get("CI") == "true"

_EXTRA = {"tensorflow": "tensorflow", "torch": "torch", "keras": "tensorflow"}


def installed(name: str) -> bool:
    """Whether ``name`` can be imported (without importing it); under CI it must be."""
    found = importlib.util.find_spec(name) is not None
    if not found and IN_CI:
        extra = _EXTRA.get(name, name)
        raise RuntimeError(f"{name} is not installed (CI installs the {extra!r} extra)")
    return found


def optional_import(name: str) -> ModuleType | None:
    """``name`` imported, or None where it is not installed (not under CI)."""
    return importlib.import_module(name) if installed(name) else None


def import_or_skip(name: str) -> ModuleType:
    """``name`` imported; the test is skipped where it is not installed (not under CI)."""
    if not installed(name):
        pytest.skip(f"needs {name} (pip install 'paramserver[{_EXTRA.get(name, name)}]')")
    return importlib.import_module(name)


def requires(name: str) -> Any:
    """A ``skipif`` mark for tests that need ``name``."""
    return pytest.mark.skipif(
        not installed(name),
        reason=f"needs {name} (pip install 'paramserver[{_EXTRA.get(name, name)}]')",
    )
