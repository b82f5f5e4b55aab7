"""Nothing on the server or the client can unpickle: no pickle-family import, no np.load.

Unpickling a body is remote code execution (msgpack-numpy and dask fall back to pickle for
some dtypes), so every module of ``app`` and ``client`` is parsed with :mod:`ast` and checked
for the imports and calls that can unpickle. The checker is itself tested on snippets that
hold each forbidden pattern, so that a bug in it cannot make this test pass vacuously. Last,
msgpack ext types (the other way a msgpack body can ask for an object to be built) are refused
by our decoder, whatever their type code and size (and by a live server:
``tests/server/test_malformed_bodies.py``).
"""

from __future__ import annotations

import ast
import datetime
import struct
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from paramserver import wire

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("paramserver", "app", "client")

FORBIDDEN_MODULES = frozenset(
    {
        "pickle",
        "_pickle",
        "cPickle",
        "dill",
        "cloudpickle",
        "joblib",
        "shelve",
        "marshal",
        "msgpack_numpy",
    }
)
# Calls that unpickle (or may) whatever object they are called on.
FORBIDDEN_ATTRIBUTES = frozenset({"read_pickle", "from_pickle"})
NUMPY_NAMES = frozenset({"np", "numpy"})


def module_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _top(name: str | None) -> str:
    return (name or "").split(".")[0]


def violations(source: str, filename: str = "<snippet>") -> Iterator[str]:
    """Each forbidden import or call in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename=filename)
    numpy_load_names: set[str] = set()
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _top(alias.name) in FORBIDDEN_MODULES:
                    yield f"{where}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if _top(node.module) in FORBIDDEN_MODULES:
                yield f"{where}: from {node.module} import ..."
            if node.module in ("numpy", "numpy.lib.npyio"):
                for alias in node.names:
                    if alias.name == "load":
                        numpy_load_names.add(alias.asname or alias.name)
                        yield f"{where}: from {node.module} import load"
            for alias in node.names:
                if alias.name in FORBIDDEN_MODULES:  # from six.moves import cPickle
                    yield f"{where}: from {node.module} import {alias.name}"
        elif isinstance(node, ast.Call):
            func = node.func
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    yield f"{where}: allow_pickle={ast.unparse(keyword.value)}"
                if keyword.arg == "ext_hook":
                    yield f"{where}: a msgpack ext_hook"
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and isinstance(func.value, ast.Name)
                and func.value.id in NUMPY_NAMES
            ):
                yield f"{where}: {func.value.id}.load("
            if isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_ATTRIBUTES:
                yield f"{where}: .{func.attr}("
            if isinstance(func, ast.Name) and func.id in numpy_load_names:
                yield f"{where}: {func.id}( (numpy.load)"
            dynamic = (isinstance(func, ast.Name) and func.id == "__import__") or (
                isinstance(func, ast.Attribute) and func.attr == "import_module"
            )
            if dynamic and node.args:
                target = node.args[0]
                if not isinstance(target, ast.Constant):
                    yield f"{where}: a dynamic import of a computed name"
                elif _top(str(target.value)) in FORBIDDEN_MODULES:
                    yield f"{where}: dynamic import of {target.value}"


# --- the checker catches what it must -------------------------------------------------------

FORBIDDEN_SNIPPETS = [
    "import pickle",
    "import pickle as p",
    "import cPickle",
    "import _pickle",
    "import dill",
    "import cloudpickle",
    "import joblib",
    "import shelve",
    "import marshal",
    "import msgpack_numpy",
    "from pickle import loads",
    "from joblib.numpy_pickle import load",
    "from six.moves import cPickle",
    "import numpy as np\nnp.load('x.npy')",
    "import numpy\nnumpy.load(f)",
    "from numpy import load",
    "from numpy import load as l\nl(f)",
    "import numpy as np\nnp.load(f, allow_pickle=True)",
    "x = f(allow_pickle=True)",
    "x = f(allow_pickle=flag)",
    "msgpack.unpackb(b, ext_hook=hook)",
    "__import__('pickle')",
    "importlib.import_module('cloudpickle')",
    "importlib.import_module(name)",
    "pd.read_pickle(path)",
]

ALLOWED_SNIPPETS = [
    "import json\njson.load(f)",
    "import numpy as np\nnp.frombuffer(b, dtype=np.float32)",
    "x = f(allow_pickle=False)",
    "import msgpack\nmsgpack.packb(x, use_bin_type=True)",
    "import importlib\nimportlib.import_module('paramserver.server.tf_trainer')",
    "s = 'pickle'  # a string is not an import",
]


@pytest.mark.parametrize("snippet", FORBIDDEN_SNIPPETS)
def test_checker_catches(snippet: str) -> None:
    assert list(violations(snippet)), snippet


@pytest.mark.parametrize("snippet", ALLOWED_SNIPPETS)
def test_checker_allows(snippet: str) -> None:
    assert not list(violations(snippet)), snippet


# --- the code base --------------------------------------------------------------------------


def test_every_module_is_found() -> None:
    found = {p.relative_to(ROOT).as_posix() for p in module_files()}
    for expected in ("app/main.py", "app/protocol.py", "app/auth.py", "paramserver/wire.py"):
        assert expected in found
    assert any(p.startswith("app/optim/") for p in found)
    assert any(p.startswith("app/api/") for p in found)


@pytest.mark.parametrize("path", module_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_can_unpickle(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    found = list(violations(source, path.relative_to(ROOT).as_posix()))
    assert not found, "\n".join(found)


# --- msgpack ext types are refused ----------------------------------------------------------


def _ext_encodings(type_code: int) -> Iterator[tuple[str, bytes]]:
    code = struct.pack(">b", type_code)
    for size, head in ((1, 0xD4), (2, 0xD5), (4, 0xD6), (8, 0xD7), (16, 0xD8)):
        yield f"fixext{size}", bytes((head,)) + code + b"\x00" * size
    yield "ext8", b"\xc7\x03" + code + b"abc"
    yield "ext16", b"\xc8\x00\x03" + code + b"abc"
    yield "ext32", b"\xc9\x00\x00\x00\x03" + code + b"abc"


EXT_BODIES = [
    pytest.param(body, id=f"{name}-type{type_code}")
    for type_code in (-128, -1, 0, 1, 42, 127)
    for name, body in _ext_encodings(type_code)
]


@pytest.mark.parametrize("ext", EXT_BODIES)
def test_ext_types_are_refused_alone_and_nested(ext: bytes) -> None:
    for body in (
        ext,
        msgpack.packb([1, 2]).replace(b"\x02", ext),  # [1, ext]
        b"\x81\xa9gradients\x81\xa1w" + ext,  # {"gradients": {"w": ext}}
    ):
        with pytest.raises(wire.MalformedBody, match="ext types are not accepted"):
            wire.unpack(body)


def test_ext_types_packed_by_msgpack_itself_are_refused() -> None:
    for value in (
        msgpack.ExtType(42, b"payload"),
        msgpack.ExtType(127, b"\x00" * 8),
        {"gradients": {"w": msgpack.ExtType(1, b"\x80\x04K\x01.")}},  # a pickle in an ext
    ):
        with pytest.raises(wire.MalformedBody, match="ext types"):
            wire.unpack(msgpack.packb(value, use_bin_type=True))
    stamp = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    with pytest.raises(wire.MalformedBody, match="ext types"):
        wire.unpack(msgpack.packb({"t": stamp}, datetime=True))
