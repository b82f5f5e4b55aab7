"""Service configuration: one pydantic-settings class, read from ``PARAMSERVER_*`` variables.

Every option of ``paramserver serve`` is a field here; the command line only overrides the
environment. Values are validated at start-up, so a bad setting stops the server with a clear
message instead of failing on the first request.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """All service settings. Environment: ``PARAMSERVER_<FIELD>`` (e.g. ``PARAMSERVER_PORT``)."""

    model_config = SettingsConfigDict(env_prefix="PARAMSERVER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind; loopback by default.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    log_level: str = Field("info", description="critical, error, warning, info or debug.")

    max_body_bytes: int = Field(
        512 * MiB, ge=1024, description="Largest request body, enforced while it streams in."
    )
    max_tensors: int = Field(10_000, ge=1, description="Most tensors in one request.")
    max_dims: int = Field(32, ge=0, le=64, description="Most dimensions of one tensor.")
    max_elements: int = Field(
        1 << 31, ge=1, description="Most elements of one tensor."
    )
    max_sessions: int = Field(1024, ge=1, description="Most sessions held at once.")

    warm_up_kernels: bool = Field(
        True, description="Compile the numba kernels at start-up instead of on first use."
    )
