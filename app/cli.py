"""``paramserver serve``: run the service with uvicorn.

Every option falls back to its ``PARAMSERVER_*`` environment variable and then to the
default of :class:`app.settings.Settings`. uvicorn handles SIGTERM and SIGINT: it stops
accepting connections, lets requests in flight finish, runs the app's shutdown and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from . import __version__
from .settings import Settings

_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "address to bind (default 127.0.0.1)"),
    ("--port", "port", int, "TCP port (default 8000; 0 picks a free one)"),
    ("--log-level", "log_level", str, "critical, error, warning, info or debug"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body in bytes (default 512 MiB)"),
    ("--max-tensors", "max_tensors", int, "most tensors in one request"),
    ("--max-dims", "max_dims", int, "most dimensions of one tensor"),
    ("--max-elements", "max_elements", int, "most elements of one tensor"),
    ("--max-sessions", "max_sessions", int, "most sessions held at once"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paramserver",
        description="A parameter server with exact Keras 2.2 optimizer semantics.",
    )
    parser.add_argument("--version", action="version", version=f"paramserver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the service",
        description="Run the service. Every option can also be set as PARAMSERVER_<NAME> "
        "in the environment (e.g. PARAMSERVER_PORT=9000).",
    )
    for flag, field, kind, text in _OPTIONS:
        serve.add_argument(flag, dest=field, type=kind, default=None, help=text)
    serve.add_argument(
        "--no-warm-up",
        dest="warm_up_kernels",
        action="store_const",
        const=False,
        default=None,
        help="compile the numba kernels on first use instead of at start-up",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name != "command" and value is not None
    }
    return Settings(**overrides)


def serve(settings: Settings) -> None:
    import uvicorn

    from .main import create_app

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
    )
    uvicorn.Server(config).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"paramserver: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        serve(settings)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
