"""The settings (``paramserver.server.settings.Settings``): their defaults and their validation,
and docs/deployment.md's table of them, generated from the class.

``docs/deployment.md`` holds a table of every setting (variable, option, type, default,
meaning) between two markers. :func:`test_deployment_doc_lists_every_setting` fails when it is
out of date; ``python tests/server/test_settings.py --write-settings-table`` (from the
repository's root) writes it again. The command-line options themselves:
``tests/system/test_cli.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from paramserver.server.settings import Settings

# --- validation -------------------------------------------------------------------------------


def test_default_bind_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARAMSERVER_HOST", raising=False)
    assert Settings().host == "127.0.0.1"


def test_journal_without_a_snapshot_dir_is_refused() -> None:
    with pytest.raises(ValidationError, match="durability='journal' needs snapshot_dir"):
        Settings(durability="journal")


# --- docs/deployment.md's table of the settings -----------------------------------------------

DEPLOYMENT_DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
TABLE_START = (
    "<!-- settings table: generated from paramserver.server.settings.Settings by "
    "`python tests/server/test_settings.py --write-settings-table`; do not edit by hand -->"
)
TABLE_END = "<!-- end of settings table -->"


def _kind(annotation: object) -> str:
    text = repr(annotation)
    if annotation is bool:
        return "bool"
    if annotation in (int, float, str):
        return annotation.__name__  # type: ignore[attr-defined]
    if "Literal" in text:
        return " or ".join(re.findall(r"'([^']*)'", text))
    for name in ("int", "float", "str", "Path"):
        if re.search(rf"\b{name}\b", text):
            return ("path" if name == "Path" else name) + ", optional"
    return text


def _default(name: str, value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if name.endswith("_bytes") and isinstance(value, int) and value % (1 << 20) == 0:
        return f"{value} ({value >> 20} MiB)"
    return str(value)


def settings_table() -> str:
    """The Markdown table of every setting: variable, option, type, default and meaning."""
    rows = [
        "| Environment variable | `paramserver serve` option | Type | Default | Meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            flag = f"{flag}, --no-{flag[2:]}"
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(
            f"| `PARAMSERVER_{name.upper()}` | `{flag}` | {_kind(field.annotation)} "
            f"| `{_default(name, field.default)}` | {meaning} |"
        )
    return "\n".join(rows)


def _doc_with_table(doc: str) -> str:
    start = doc.index(TABLE_START) + len(TABLE_START)
    end = doc.index(TABLE_END)
    return doc[:start] + "\n" + settings_table() + "\n" + doc[end:]


def test_deployment_doc_lists_every_setting() -> None:
    doc = DEPLOYMENT_DOC.read_text(encoding="utf-8")
    assert TABLE_START in doc and TABLE_END in doc, "docs/deployment.md lost its table markers"
    assert doc == _doc_with_table(doc), (
        "docs/deployment.md's settings table is out of date with app/settings.py: "
        "run `python tests/server/test_settings.py --write-settings-table`"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-settings-table"]:
        sys.exit("usage: python tests/server/test_settings.py --write-settings-table")
    DEPLOYMENT_DOC.write_text(
        _doc_with_table(DEPLOYMENT_DOC.read_text(encoding="utf-8")), encoding="utf-8"
    )
    print(f"wrote the settings table of {DEPLOYMENT_DOC}")
