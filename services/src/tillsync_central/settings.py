"""Settings of a central process, built once at the edge (the CLI) and passed down.

Sources, highest priority first: keyword arguments, ``TILLSYNC_*`` environment variables,
then the TOML file named by ``config`` (``load_settings(config_file)`` or
``TILLSYNC_CONFIG``), then the defaults below, which match ``deploy/dev/services``. The
TOML file holds the same keys at its top level::

    database_url = "postgresql://tillsync:secret@db.example:5432/tillsync"
    ingest_batch_size = 1000
    log_format = "json"

URLs carry passwords, so they are ``SecretStr``: masked in ``repr`` and logs; call
``get_secret_value()`` only where a client needs the real URL, and log
``redact_url(...)`` instead.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from tillsync_protocol import ConfigError

__all__ = ["CentralSettings", "LogFormat", "LogLevel", "load_settings", "redact_url"]

LogFormat = Literal["console", "json"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

_URL_SCHEMES: dict[str, tuple[str, ...]] = {
    "amqp_url": ("amqp", "amqps"),
    "database_url": ("postgresql", "postgres"),
    "rabbitmq_api_url": ("http", "https"),
}
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)


def redact_url(url: str | SecretStr) -> str:
    """The URL with its password replaced by ``***``: safe to log and to show."""
    text = url.get_secret_value() if isinstance(url, SecretStr) else url
    return _PASSWORD_IN_URL.sub(r"\g<head>***@", text)


class _TomlFileSource(PydanticBaseSettingsSource):
    """Values from the TOML file named by ``config``, as already resolved by the
    higher-priority sources (keyword arguments, then ``TILLSYNC_CONFIG``)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ reads the whole file at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        if path is None:
            return {}
        path = Path(path)
        try:
            with path.open("rb") as file:
                values = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", field="config") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}", field="config") from exc
        values.pop("config", None)  # a file naming another file would be a loop
        return values


class CentralSettings(BaseSettings):
    """Everything a central process needs to know; one instance per process."""

    model_config = SettingsConfigDict(
        env_prefix="TILLSYNC_",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    config: Path | None = None
    """The TOML file the other values were read from, if any."""

    amqp_url: SecretStr = SecretStr("amqp://tillsync:tillsync@127.0.0.1:5672/")
    database_url: SecretStr = SecretStr("postgresql://tillsync:tillsync@127.0.0.1:5432/tillsync")
    rabbitmq_api_url: SecretStr = SecretStr("http://tillsync:tillsync@127.0.0.1:15672/")

    register_broker_url: str | None = None
    """The broker URL written into registers' bundles, without credentials (e.g.
    ``amqps://broker.example:5671/``); unset: ``amqp_url``'s scheme, host, port and vhost.
    Its vhost must be ``amqp_url``'s."""
    register_broker_ca_file: Path | None = None
    """PEM of the CA that signed the broker's certificate, copied into registers' bundles
    (unset: registers trust their system's CAs)."""
    register_client_ca_cert_file: Path | None = None
    """With ``register_client_ca_key_file``: the CA (the one the broker's
    ``ssl_options.cacertfile`` trusts) that issues each register a client certificate
    (CN ``reg-<register>``) in ``registers add``; the register then logs in with it
    (EXTERNAL) and has no password."""
    register_client_ca_key_file: Path | None = None
    register_client_cert_days: int = Field(default=825, ge=1, le=36_500)

    db_pool_min_size: int = Field(default=1, ge=0, le=1000)
    db_pool_max_size: int = Field(default=10, ge=1, le=1000)
    db_connect_timeout: float = Field(default=10.0, gt=0, le=600)
    """Seconds to open one PostgreSQL connection."""
    db_command_timeout: float = Field(default=60.0, gt=0, le=86_400)
    """Default seconds a single statement may take."""
    migration_lock_timeout: float = Field(default=300.0, gt=0, le=86_400)
    """Seconds a starting process waits for another one's migrations to finish."""

    ingest_batch_size: int = Field(default=500, ge=1, le=100_000)
    # What has arrived is taken at once; an idle worker's batch waits at most this long
    # for more, a busy worker's none. Under load batches fill while the previous one
    # commits, so a long wait only adds latency.
    ingest_batch_max_wait_ms: int = Field(default=2, ge=0, le=60_000)
    ingest_prefetch: int = Field(default=2000, ge=1, le=65_535)

    heartbeat_interval_s: float = Field(default=15.0, gt=0, le=3600)
    """The registers' ``heartbeat_interval_s``: a register whose last heartbeat is older
    than three of them is shown offline."""

    declare_topology: bool = True
    """Declare the shared topology at start-up (idempotent). Off: only check that it exists
    (passively), for the least-privilege service user, which may not declare; then
    ``tillsync-central broker setup-users`` declares it with the administrator's rights."""

    reconcile_interval_s: float = Field(default=10.0, gt=0, le=86_400)
    """Seconds between reconciliation passes (seq holes, Z-reports; reconcile.py)."""
    reconcile_hole_grace_s: float = Field(default=30.0, ge=0, le=86_400)
    """A seq hole younger than this is not yet asked for: batches commit out of order."""
    reconcile_request_cap_s: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    """The longest wait between two resend requests for one hole (backoff doubles)."""

    admin_host: str = "127.0.0.1"
    """Where the admin API and dashboard listen (``tillsync-central api`` and ``run``)."""
    admin_port: int = Field(default=8470, ge=0, le=65_535)
    """Their port (0: any free port, logged at start-up)."""
    admin_in_run: bool = True
    """``tillsync-central run`` serves the admin API too (a port in use is logged there,
    not fatal: the workers matter more); ``tillsync-central api`` serves it alone."""
    admin_session_hours: float = Field(default=12.0, gt=0, le=24 * 90)
    """How long an operator's login (cookie or bearer token) lasts."""
    admin_secure_cookie: bool = False
    """Mark the session cookie ``Secure`` (set it when a TLS proxy fronts the dashboard)."""
    admin_queue_sample_s: float = Field(default=5.0, gt=0, le=3600)
    """How often the dashboard samples queue depths for its chart."""

    metrics_host: str = "127.0.0.1"
    """Where ``tillsync-central run`` serves Prometheus' ``/metrics``."""
    metrics_port: int | None = Field(default=None, ge=0, le=65_535)
    """None or 0: no metrics listener (each process of a host needs its own port)."""
    metrics_db_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """Seconds a scrape waits for the fleet gauges' queries before answering without."""

    log_format: LogFormat = "console"
    log_level: LogLevel = "info"

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("amqp_url", "database_url", "rabbitmq_api_url")
    @classmethod
    def _check_scheme(cls, value: SecretStr, info: Any) -> SecretStr:
        allowed = _URL_SCHEMES[info.field_name]
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in allowed or not parts.hostname:
            raise ValueError(
                f"must be a {' or '.join(allowed)} URL with a host, not {redact_url(value)!r}"
            )
        return value

    @field_validator("register_broker_url")
    @classmethod
    def _check_register_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(f"must be an amqp or amqps URL with a host, not {value!r}")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials: each register gets its own")
        return value

    @model_validator(mode="after")
    def _check_client_ca(self) -> CentralSettings:
        if self.register_broker_url is not None:
            # Provisioning grants rights on amqp_url's vhost: registers must log in there.
            theirs = urlsplit(self.register_broker_url).path.lstrip("/") or "/"
            ours = urlsplit(self.amqp_url.get_secret_value()).path.lstrip("/") or "/"
            if unquote(theirs) != unquote(ours):
                raise ValueError(
                    f"register_broker_url: its vhost {unquote(theirs)!r} must be amqp_url's "
                    f"({unquote(ours)!r})"
                )
        if (self.register_client_ca_cert_file is None) != (
            self.register_client_ca_key_file is None
        ):
            raise ValueError(
                "register_client_ca_cert_file and register_client_ca_key_file: give both or neither"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env file and no secrets dir: what is not in the environment is in the file.
        return init_settings, env_settings, _TomlFileSource(settings_cls)


def load_settings(config_file: Path | None = None) -> CentralSettings:
    """Build the settings, or raise ``ConfigError`` naming the first bad field.

    ``config_file`` takes precedence over ``TILLSYNC_CONFIG``; environment variables
    take precedence over the file.
    """
    overrides: dict[str, Any] = {} if config_file is None else {"config": config_file}
    try:
        return CentralSettings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        reason = error["msg"].removeprefix("Value error, ")
        raise ConfigError(reason, field=field) from None
