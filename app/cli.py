"""``paramserver serve``: run the service with uvicorn.

Every field of :class:`paramserver.server.settings.Settings` is an option (``max_body_bytes`` is
``--max-body-bytes``); an option not given falls back to its ``PARAMSERVER_*`` environment
variable and then to the default. uvicorn handles SIGTERM and SIGINT: it stops accepting
connections, lets requests in flight finish, runs the app's shutdown (final snapshots) and
the process exits 0 (see :func:`serve`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from pydantic import ValidationError

from paramserver import __version__

from .settings import Settings


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


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
        description="Run the service. Every option can also be set in the environment as "
        "PARAMSERVER_<OPTION> (e.g. PARAMSERVER_PORT=9000, PARAMSERVER_TOKENS=...).",
    )
    for name, field in Settings.model_fields.items():
        default = field.default
        help_text = (
            f"{field.description or ''} (default: {default}; env PARAMSERVER_{name.upper()})"
        )
        if field.annotation is bool:
            serve.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            serve.add_argument(_flag(name), dest=name, default=None, help=help_text)
    serve.add_argument(
        "--demo",
        action="store_true",
        help="once the server answers, train a small linear regression through it with the "
        "client library and print the loss as it falls; the server keeps running",
    )
    health = commands.add_parser(
        "health",
        help="exit 0 if the local server answers GET /health (for container health checks)",
        description="GET /health (or /ready) of the server these PARAMSERVER_* settings "
        "describe, on loopback (https when PARAMSERVER_SSL_CERTFILE is set; the certificate is "
        "not checked: it names the server's public address). Exit 0 when it answers 200, else 1.",
    )
    health.add_argument(
        "--ready",
        action="store_true",
        help="ask GET /ready instead: 200 only once the sessions are recovered and the kernels "
        "loaded (readiness; /health is liveness)",
    )
    health.add_argument(
        "--cert",
        default=None,
        help="a client certificate (PEM with its key) for a server that requires one",
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name in Settings.model_fields and value is not None
    }
    return Settings(**overrides)


def serve(settings: Settings, *, demo: bool = False, tokens_in_argv: bool = False) -> None:
    from .main import create_app
    from .serving import http_server

    as_json = settings.log_format == "json"
    if as_json:
        from .observability import JsonFormatter

        json_lines = logging.StreamHandler()
        json_lines.setFormatter(JsonFormatter())
        logging.basicConfig(level=settings.log_level.upper(), handlers=[json_lines], force=True)
    else:
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo worker's requests
    if tokens_in_argv:
        logging.getLogger("paramserver").warning(
            "--tokens puts the secrets on the command line, where any local user reads them "
            "(ps, /proc/PID/cmdline); pass them in --tokens-file or PARAMSERVER_TOKENS instead"
        )
    try:
        app = create_app(settings)  # loads the certificate, if any
        # json: uvicorn's loggers go through the root handler (log_config=None), and the
        # access lines are ours (RequestMetrics), with the request's fields
        extra: dict[str, Any] = {"log_config": None, "access_log": False} if as_json else {}
        server = http_server(app, settings, **{"access_log": not demo, **extra})
    except ValueError as exc:  # a certificate that does not load
        print(f"paramserver: invalid settings: {exc}", file=sys.stderr)
        sys.exit(2)
    if demo:
        from .demo import first_write_token, start_demo_thread

        start_demo_thread(
            server,
            settings.host,
            first_write_token(settings.tokens, settings.tokens_file),
            tls=settings.ssl_certfile is not None,
        )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then restores the handlers it found and
    # raises the signal again, so that with Python's defaults the process would die of SIGTERM
    # (exit 143) or a KeyboardInterrupt (130) after a clean shutdown. Handlers of ours that only
    # ask the server to stop make a requested shutdown exit 0; they also cover a signal that
    # arrives before uvicorn installs its own.
    previous = {sig: signal.signal(sig, _stop_handler(server)) for sig in _STOP_SIGNALS}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started or app.state.readiness.failed:
        # The start-up failed (a locked snapshot directory, a damaged journal, a taken port,
        # the kernels' warm-up after the port opened): the reason is logged above; exit
        # non-zero whatever uvicorn's version does.
        sys.exit(EXIT_START_FAILED)
    if app.state.shutdown_failed:
        # A final snapshot could not be written (logged as an ERROR above).
        sys.exit(EXIT_SHUTDOWN_FAILED)


#: Exit codes of ``paramserver serve`` besides 0 (a requested, clean shutdown) and 2 (invalid
#: settings).
EXIT_START_FAILED = 3
EXIT_SHUTDOWN_FAILED = 4


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_handler(server: Any) -> Callable[[int, FrameType | None], None]:
    def handle(sig: int, frame: FrameType | None) -> None:
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True  # a second Ctrl-C skips waiting for open connections
        server.should_exit = True

    return handle


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"paramserver: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "health":
        path = "/ready" if args.ready else "/health"
        return check_health(settings, cert=args.cert, timeout=args.timeout, path=path)
    if args.command == "serve":
        serve(settings, demo=args.demo, tokens_in_argv=getattr(args, "tokens", None) is not None)
    return 0


def check_health(
    settings: Settings, *, cert: str | None, timeout: float, path: str = "/health"
) -> int:
    """0 if the server of ``settings`` answers ``GET path`` (``/health`` or ``/ready``) with 200
    on loopback, else 1."""
    import http.client
    import ssl

    from .demo import local_address

    host = local_address(settings.host)
    connection: http.client.HTTPConnection
    if settings.ssl_certfile is None:
        connection = http.client.HTTPConnection(host, settings.port, timeout=timeout)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # loopback: the certificate names the public host
        if cert is not None:
            context.load_cert_chain(cert)
        connection = http.client.HTTPSConnection(
            host, settings.port, timeout=timeout, context=context
        )
    try:
        connection.request("GET", path)
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        print(f"paramserver health: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"paramserver health: GET {path} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
