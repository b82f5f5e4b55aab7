"""The kernels' disk cache: built once (as ``docker build`` does), loaded at every start.

:func:`build_cache` compiles the kernels into numba's in-tree cache, the package's
``__pycache__`` (:data:`SHIPPED_CACHE`); a server with ``NUMBA_CACHE_DIR`` elsewhere copies them
there and loads them instead of compiling (:func:`prepare_cache`), also when that directory is
not writable (a private directory instead). Each case runs in a child Python, since numba reads
its settings once per process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import pytest
from numba.core import caching

from paramserver.server.optim import numba_kernels
from paramserver.server.optim.numba_kernels import SHIPPED_CACHE, cache_subdirectory

#: Warm the kernels up in a child Python and print what happened, as JSON.
WARM_UP = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from paramserver.server.optim import numba_kernels
summary = numba_kernels.NumbaBackend().warm_up()
print(json.dumps({"loaded": summary.loaded, "compiled": summary.compiled,
                  "cache_dir": None if summary.cache_dir is None else str(summary.cache_dir)}))
"""


def child(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def shipped() -> Path:
    """The kernels compiled into the package's ``__pycache__``, as the Dockerfile does."""
    if not os.access(SHIPPED_CACHE.parent, os.W_OK):
        pytest.skip(f"{SHIPPED_CACHE.parent} is read-only here: cannot build the cache")
    done = child(
        "from paramserver.server.optim import numba_kernels; numba_kernels.build_cache()", {}
    )
    assert f"numba kernels cached in {SHIPPED_CACHE}" in done.stdout, done.stdout
    return SHIPPED_CACHE


def test_cache_subdirectory_is_numbas() -> None:
    """Where numba's UserProvidedCacheLocator keeps this module's kernels."""
    locator = (
        getattr(caching, "UserProvidedCacheLocator", None) or caching._UserProvidedCacheLocator
    )
    expected = locator.get_suitable_cache_subpath(numba_kernels.__file__)
    assert cache_subdirectory("/x") == Path("/x", expected)


def test_the_shipped_kernels_load_instead_of_compiling(shipped: Path, tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    done = child(WARM_UP, {"NUMBA_CACHE_DIR": str(cache)})
    summary = json.loads(done.stdout)
    assert summary == {"loaded": 22, "compiled": 0, "cache_dir": str(cache_subdirectory(cache))}
    # (11 functions; more where a source checkout's __pycache__ holds older versions too)
    copied = r"copied the shipped kernels of \d+ function\(s\) from " + re.escape(str(shipped))
    assert re.search(copied, done.stderr), done.stderr
    # a second start finds them in place: nothing copied, nothing compiled
    again = child(WARM_UP, {"NUMBA_CACHE_DIR": str(cache)})
    assert json.loads(again.stdout)["loaded"] == 22
    assert "copied the shipped kernels" not in again.stderr


def test_an_unwritable_cache_directory_falls_back_to_a_private_one(
    shipped: Path, tmp_path: Path
) -> None:
    """A read-only root file system without a scratch mount: NUMBA_CACHE_DIR cannot be written,
    so the kernels are copied into a private temporary directory (removed at exit) and load
    from there."""
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores the mode
        target = Path("/proc/self/no-cache")  # nothing can be made under /proc
    else:
        target = locked / "cache"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = child(WARM_UP, {"NUMBA_CACHE_DIR": str(target), "TMPDIR": str(scratch)})
    summary = json.loads(done.stdout)
    assert summary["loaded"] == 22 and summary["compiled"] == 0
    assert summary["cache_dir"].startswith(str(scratch / "paramserver-numba-"))
    assert f"NUMBA_CACHE_DIR {target} is not writable" in done.stderr
    assert list(scratch.iterdir()) == [], "the private directory outlived its process"


def test_another_cpu_compiles_into_the_cache_directory(shipped: Path, tmp_path: Path) -> None:
    """The shipped cache is keyed by its builder's CPU: another CPU compiles (and caches) its
    own kernels, next to the shipped ones, instead of loading code it cannot run."""
    cache = tmp_path / "numba-cache"
    env = {"NUMBA_CACHE_DIR": str(cache), "NUMBA_CPU_NAME": "generic"}
    summary = json.loads(child(WARM_UP, env).stdout)
    assert summary["compiled"] == 22 and summary["loaded"] == 0
    assert json.loads(child(WARM_UP, env).stdout)["loaded"] == 22  # cached for this "CPU" now
    assert json.loads(child(WARM_UP, {"NUMBA_CACHE_DIR": str(cache)}).stdout)["loaded"] == 22


def test_no_cache_directory_configured_leaves_numba_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(numba_kernels, "_cache_prepared", False)
    assert numba_kernels.prepare_cache() is None
    assert numba.config.CACHE_DIR == ""
