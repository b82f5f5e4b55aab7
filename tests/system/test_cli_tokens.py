"""``--tokens`` on the command line is visible to every local user: the server warns."""

from __future__ import annotations

from pathlib import Path

from tests.harness.servers import ServerProcess, start_paramserver


def test_tokens_on_the_command_line_are_warned_about(tmp_path: Path) -> None:
    server = start_paramserver(tmp_path, "--tokens", "s3cret")
    try:
        assert server.terminate() == 0
    finally:
        server.kill()
    assert "WARNING" in server.log
    assert "--tokens puts the secrets on the command line" in server.log
    assert "--tokens-file or PARAMSERVER_TOKENS" in server.log
    assert "s3cret" not in server.log


def test_tokens_from_a_file_are_not_warned_about(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    server: ServerProcess = start_paramserver(tmp_path, "--tokens-file", str(tokens))
    try:
        assert server.terminate() == 0
    finally:
        server.kill()
    assert "--tokens puts the secrets" not in server.log
    assert "authentication on" in server.log
