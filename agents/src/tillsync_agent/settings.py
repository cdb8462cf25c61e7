"""The agent's settings: one object, built at the edge (CLI) and handed down."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tillsync_protocol import MAX_BATCH_DOCUMENTS, ConfigError

__all__ = ["AgentSettings", "load_settings"]


class AgentSettings(BaseSettings):
    """Everything one register agent needs. Environment variables are ``TILLSYNC_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="TILLSYNC_", extra="forbid")

    register_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    center_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    amqp_url: SecretStr = SecretStr("amqp://127.0.0.1:5672/")
    """``amqp://`` or, for TLS, ``amqps://`` (the broker's certificate is always verified,
    host name included). ``?auth=external`` logs in with the client certificate instead of
    a password."""
    tls_ca_file: Path | None = None
    """PEM file of the CA(s) that signed the broker's certificate (amqps only); unset: the
    system's trusted CAs."""
    tls_cert_file: Path | None = None
    """PEM file of this register's client certificate (amqps only; with ``tls_key_file``)."""
    tls_key_file: Path | None = None
    """PEM file of the client certificate's private key: keep it mode 0600."""
    data_dir: Path = Path("/var/lib/tillsync-agent")

    publish_timeout_s: float = Field(10.0, gt=0)
    """Longest wait for one batch of publisher confirms."""
    ack_timeout_s: float = Field(30.0, gt=0)
    """A published document with no ack from central after this long is published again."""
    retry_base_s: float = Field(1.0, gt=0)
    retry_cap_s: float = Field(300.0, gt=0)
    reconnect_base_s: float = Field(0.5, gt=0)
    reconnect_cap_s: float = Field(60.0, gt=0)
    sweep_interval_s: float = Field(6 * 3600.0, gt=0)
    """Every this often, everything not yet acknowledged is published again (seeds: 6–12 h)."""
    max_in_flight: int = Field(1000, ge=1, le=100_000)
    publish_batch_max: int = Field(50, ge=1, le=MAX_BATCH_DOCUMENTS)
    """Most documents published in one message (a ``document_batch``, docs/protocol.md)
    when several are due at once; 1 publishes every document in a message of its own."""

    labels: list[str] = []
    """Labels of this register: it keeps only items with no labels or sharing one of these."""
    delta_page_size: int = Field(1000, ge=1, le=5000)
    """Changes per ``delta_page`` asked of central."""
    delta_timeout_s: float = Field(30.0, gt=0)
    """Longest wait for the next reply (page or end) of a delta or reinit request."""
    catalog_check_interval_s: float = Field(300.0, gt=0)
    """Every this often, a delta request checks that nothing was missed."""
    heartbeat_interval_s: float = Field(15.0, gt=0, le=3600)
    """Every this often while connected, a heartbeat tells central how the register stands."""
    catalog_queue_size: int = Field(1000, ge=1, le=1_000_000)
    """Changes queued per ``catalog_changes()`` subscriber; a slow one loses the oldest."""
    log_format: str = Field("console", pattern="^(console|json)$")
    log_level: str = "info"
    api_port: int = Field(8765, ge=0, le=65535)
    """Port of the local HTTP API for POS apps, on 127.0.0.1 only; 0 turns it off."""
    api_token: SecretStr | None = None
    """Bearer token the local API requires (``enroll`` generates one); without one the
    API is off."""

    @property
    def database_path(self) -> Path:
        return self.data_dir / "agent.sqlite3"

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "agent.sock"

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.amqp_url.get_secret_value()).scheme == "amqps"

    @property
    def uses_external_auth(self) -> bool:
        """Whether the agent logs in with its client certificate (``?auth=external``)."""
        query = parse_qs(urlsplit(self.amqp_url.get_secret_value()).query)
        return [value.lower() for value in query.get("auth", [])] == ["external"]

    @property
    def broker_user(self) -> str:
        """The AMQP user this agent logs in as: set as ``user_id`` on every document.

        With a client certificate (EXTERNAL) the broker takes the user from the
        certificate's common name, which central issues as the register's user."""
        if self.uses_external_auth:
            return f"reg-{self.register_id}"
        return unquote(urlsplit(self.amqp_url.get_secret_value()).username or "guest")

    @model_validator(mode="after")
    def _check_tls(self) -> AgentSettings:
        url = urlsplit(self.amqp_url.get_secret_value())
        if url.scheme not in ("amqp", "amqps"):
            raise ValueError(f"amqp_url: must be an amqp:// or amqps:// URL, not {url.scheme}://")
        query = parse_qs(url.query)
        # aiormq reads these from the URL; we build the TLS context ourselves, always
        # verifying, so a URL asking otherwise is a mistake to report, not to ignore.
        for key in ("no_verify_ssl", "cafile", "capath", "cadata", "certfile", "keyfile"):
            if key in query:
                raise ValueError(
                    f"amqp_url: the {key!r} parameter is not supported: use the tls_* "
                    "settings (the broker's certificate is always verified)"
                )
        tls_files = {
            "tls_ca_file": self.tls_ca_file,
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
        }
        if url.scheme == "amqp":
            given = [name for name, value in tls_files.items() if value is not None]
            if given or self.uses_external_auth:
                raise ValueError(
                    f"{(given or ['auth=external'])[0]}: TLS settings need an amqps:// amqp_url"
                )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: give both or neither")
        if self.uses_external_auth and self.tls_cert_file is None:
            raise ValueError("amqp_url: auth=external needs tls_cert_file and tls_key_file")
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
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Build the settings from ``overrides``, then the environment, then the TOML file."""
    path = config_file
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist", field="config")
    cls: type[AgentSettings] = AgentSettings
    if path is not None:
        config = SettingsConfigDict(**{**AgentSettings.model_config, "toml_file": path})
        cls = type("AgentSettings", (AgentSettings,), {"model_config": config})
    try:
        return cls(**overrides)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("\n", " "), field="settings") from None
