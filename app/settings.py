"""Service configuration: one pydantic-settings class, read from ``PARAMSERVER_*`` variables.

Every option of ``paramserver serve`` is a field here; the command line only overrides the
environment. Values are validated at start-up, so a bad setting stops the server with a clear
message instead of failing on the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """All service settings. Environment: ``PARAMSERVER_<FIELD>`` (e.g. ``PARAMSERVER_PORT``)."""

    model_config = SettingsConfigDict(env_prefix="PARAMSERVER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind; loopback by default.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="critical, error, warning, info or debug."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="'text' lines, or 'json': one object a line (time, level, message, and "
        "for requests request_id, session_id, method, path, status, duration_ms, bytes).",
    )
    metrics_public: bool = Field(
        False,
        description="Serve GET /metrics without a token even when tokens are configured "
        "(for a Prometheus that cannot send one).",
    )

    max_body_bytes: int = Field(
        512 * MiB, ge=1024, description="Largest request body, enforced while it streams in."
    )
    max_json_body_bytes: int = Field(
        16 * MiB,
        ge=1024,
        description="Largest JSON body (POST /sessions); JSON numbers cost far more memory "
        "than msgpack bytes, so large models should be sent as msgpack.",
    )
    max_tensors: int = Field(4096, ge=1, description="Most tensors in one request.")
    max_dims: int = Field(32, ge=0, le=64, description="Most dimensions of one tensor.")
    max_elements: int = Field(1 << 31, ge=1, description="Most elements of one tensor.")
    max_sessions: int = Field(1024, ge=1, description="Most sessions held at once.")

    max_session_bytes: int | None = Field(
        None, ge=1, description="Most bytes of weights and optimizer state in one session."
    )
    max_total_bytes: int | None = Field(
        None, ge=1, description="Most bytes of weights and optimizer state in all sessions."
    )
    limit_concurrency: int | None = Field(
        None,
        ge=1,
        description="Most HTTP requests in progress at once; more get 503 with Retry-After "
        "(the data plane is bounded by data_plane_max_connections).",
    )
    request_timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="Longest wait for a request body to arrive and for the session's turn; "
        "past it the request gets 408 (body) or 503 (busy session).",
    )

    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest wait for a request line and its headers, from the connection's "
        "accept (TLS handshake included) or the first byte of the next request; past it the "
        "connection is closed.",
    )
    idle_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="Longest silence of a kept-alive connection between two requests; past it "
        "the connection is closed.",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="Most open connections. At the cap a new connection first closes the "
        "oldest one still sending its headers, then the oldest idle one; when all are busy it "
        "is refused (503). Lowered to fit the file-descriptor limit.",
    )

    data_plane: bool = Field(
        True,
        description="Serve push and pull on a TCP port of their own too (the data plane, "
        "docs/protocol.md): the client uses it when it can, at about the speed of the wire.",
    )
    data_plane_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="The data plane's port; unset: the HTTP port + 1 (any free port when "
        "the HTTP port is 0). GET /data-plane announces it.",
    )
    data_plane_max_connections: int = Field(
        256,
        ge=1,
        description="Most open data-plane connections (a thread each); at the cap as for "
        "max_connections.",
    )

    ssl_certfile: Path | None = Field(
        None, description="Serve https with this PEM certificate (chain); off if unset."
    )
    ssl_keyfile: Path | None = Field(
        None, description="The certificate's PEM private key (if not in ssl_certfile)."
    )
    ssl_ca_certs: Path | None = Field(
        None,
        description="PEM CA certificates that sign client certificates: asks each client "
        "for a certificate (see ssl_client_cert).",
    )
    ssl_client_cert: Literal["required", "optional"] = Field(
        "required",
        description="With ssl_ca_certs: 'required' refuses a TLS client without a valid "
        "certificate; 'optional' verifies one if sent.",
    )

    tokens: str | None = Field(
        None,
        description="Comma-separated bearer tokens; 'SECRET' or 'SECRET:rw' may write, "
        "'SECRET:ro' may only read. When set (here or in tokens_file) every endpoint but "
        "/health, /ready and the dashboard's page needs 'Authorization: Bearer SECRET' "
        "(/metrics too, unless metrics_public).",
    )
    tokens_file: Path | None = Field(
        None, description="A file of tokens, one per line (same forms as tokens; # comments)."
    )

    idempotency_window_seconds: float = Field(
        600.0,
        ge=0,
        description="How long a push's Idempotency-Key is remembered (its response replayed): "
        "twice the client's default deadline (300 s), so a retry always finds its key.",
    )
    idempotency_max_keys: int = Field(
        2_000_000,
        ge=0,
        description="Most live Idempotency-Keys across all sessions (about 340 bytes each); "
        "at the bound new keyed pushes get 503 with Retry-After, no live key is evicted.",
    )
    idempotency_max_keys_per_session: int = Field(
        1_000_000,
        ge=0,
        description="Most live Idempotency-Keys of one session (one window of pushes: 1,000,000 "
        "covers 1,600 pushes/s for 600 s); at the bound its new keyed pushes get 503.",
    )
    idempotency_max_bytes: int = Field(
        256 * MiB,
        ge=0,
        description="Most bytes of remembered push answers; older answers shrink to "
        "{iterations} alone.",
    )

    snapshot_dir: Path | None = Field(
        None, description="Directory for crash-safe snapshots of every session (off if unset)."
    )
    snapshot_interval_seconds: float = Field(
        60.0, gt=0, description="Seconds between periodic snapshots."
    )
    snapshot_keep: int = Field(3, ge=1, description="Snapshots kept per session.")
    snapshot_fallback: bool = Field(
        False,
        description="At start-up, when a session's newest snapshot cannot be read, load its "
        "previous one (losing what only the newest held) instead of refusing to start.",
    )
    durability: Literal["snapshot", "journal"] = Field(
        "snapshot",
        description="'journal': a push is acknowledged only after it is in the write-ahead "
        "journal (needs snapshot_dir).",
    )
    journal_fsync: Literal["always", "interval"] = Field(
        "always",
        description="'always': fsync the journal before each acknowledgement; 'interval': "
        "every journal_fsync_interval_seconds (a crash of the machine may lose that much).",
    )
    journal_fsync_interval_seconds: float = Field(1.0, gt=0)

    warm_up_kernels: bool = Field(
        True, description="Compile the numba kernels at start-up instead of on first use."
    )

    def data_plane_address(self) -> tuple[str, int] | None:
        """Where the data plane listens, or None when it is off."""
        if not self.data_plane:
            return None
        if self.data_plane_port is not None:
            return self.host, self.data_plane_port
        return self.host, 0 if self.port == 0 else self.port + 1

    @model_validator(mode="after")
    def _data_plane_port_exists(self) -> Settings:
        if self.data_plane and self.data_plane_port is None and self.port == 65535:
            raise ValueError(
                "the data plane's default port is the HTTP port + 1, and 65535 has none: set "
                "data_plane_port (--data-plane-port) or turn the data plane off (--no-data-plane)"
            )
        return self

    @model_validator(mode="after")
    def _tls_needs_a_certificate(self) -> Settings:
        if self.ssl_certfile is None and (
            self.ssl_keyfile is not None or self.ssl_ca_certs is not None
        ):
            raise ValueError(
                "ssl_keyfile and ssl_ca_certs need ssl_certfile (--ssl-certfile or "
                "PARAMSERVER_SSL_CERTFILE): the server's own certificate"
            )
        return self

    @model_validator(mode="after")
    def _journal_needs_a_directory(self) -> Settings:
        if self.durability == "journal" and self.snapshot_dir is None:
            raise ValueError(
                "durability='journal' needs snapshot_dir (--snapshot-dir or "
                "PARAMSERVER_SNAPSHOT_DIR): the journal is kept there and replayed after the "
                "snapshots at start-up"
            )
        return self
