"""``tillsync-agent enroll BUNDLE``: turn central's enrollment bundle into the agent's config
file, and ``tillsync-agent api-token`` to hand the local API's token to the POS app.

The bundle (``tillsync-central registers add --bundle FILE``) is TOML with ``register_id``,
``center_id`` and ``amqp_url`` (which carries the register's broker password, unless the
register logs in with a client certificate). With TLS it may also carry PEM strings:
``tls_ca_pem`` (the CA that signed the broker's certificate), ``tls_cert_pem`` and
``tls_key_pem`` (the register's client certificate and key). Enrolling writes the PEMs to
``<data_dir>/tls/`` (mode 0600), and the rest, a data directory and a generated
``api_token`` into the config file, mode 0600, atomically. Enrolling the same register
again (new credentials) keeps the token and every other setting; a config of *another*
register is only replaced with ``--force``, and never onto that register's database.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr

from tillsync_protocol import ConfigError, TillsyncError

from .settings import AgentSettings
from .terminal import console
from .terminal import fail as _fail
from .terminal import settings_from as _settings

__all__ = ["bundle_files", "enroll_config", "register_enroll_commands", "render_toml"]

DEFAULT_CONFIG = Path("/etc/tillsync/agent.toml")
DEFAULT_DATA_DIR = Path("/var/lib/tillsync-agent")
BUNDLE_KEYS = ("register_id", "center_id", "amqp_url")
TLS_PEMS = {
    "tls_ca_pem": ("tls_ca_file", "broker-ca.pem"),
    "tls_cert_pem": ("tls_cert_file", "client-cert.pem"),
    "tls_key_pem": ("tls_key_file", "client-key.pem"),
}
"""Bundle key of each PEM -> the setting naming its file, and the file in ``<data_dir>/tls``."""


class AlreadyEnrolledError(ConfigError):
    """The config file belongs to another register (``--force`` replaces it)."""

    code = "already_enrolled"


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}", field=what) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the {what} {path} is not TOML: {exc}", field=what) from None


def enroll_config(
    bundle: dict[str, Any],
    existing: dict[str, Any] | None,
    *,
    data_dir: Path | None = None,
    api_port: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The config to write: the bundle over ``existing`` (same register: its token and other
    settings stay), with a data dir and an api_token. Validated as :class:`AgentSettings`."""
    missing = [key for key in BUNDLE_KEYS if not isinstance(bundle.get(key), str)]
    if missing:
        raise ConfigError(f"the bundle lacks {', '.join(missing)}", field=missing[0])
    config: dict[str, Any] = {}
    if existing:
        other = existing.get("register_id")
        if other != bundle["register_id"]:
            if not force:
                raise AlreadyEnrolledError(
                    f"the config is register {other!r}'s; --force replaces it",
                    field="register_id",
                )
            old_dir = Path(str(existing.get("data_dir", DEFAULT_DATA_DIR)))
            if (data_dir or old_dir) == old_dir and (old_dir / "agent.sqlite3").exists():
                raise AlreadyEnrolledError(
                    f"{old_dir} holds register {other!r}'s database (its documents); "
                    "give the new register its own --data-dir",
                    field="data_dir",
                )
        else:
            config.update(existing)
    config.update({key: bundle[key] for key in BUNDLE_KEYS})
    config["data_dir"] = str(data_dir or config.get("data_dir") or DEFAULT_DATA_DIR)
    _apply_tls(bundle, config)
    if api_port is not None:
        config["api_port"] = api_port
    config.setdefault("api_token", secrets.token_urlsafe(32))
    try:
        AgentSettings(**config)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("\n", " "), field="bundle") from None
    return config


def _apply_tls(bundle: dict[str, Any], config: dict[str, Any]) -> None:
    """Point the tls_* settings at the files the bundle's PEMs go to; drop what the new
    credentials no longer use (no TLS at all for amqp://, no client certificate when the
    bundle has none). A CA set by hand stays unless the bundle brings one."""
    for pem_key in TLS_PEMS:
        value = bundle.get(pem_key)
        if value is not None and not (isinstance(value, str) and "-----BEGIN " in value):
            raise ConfigError(f"the bundle's {pem_key} is not a PEM text", field=pem_key)
    if not str(bundle["amqp_url"]).startswith("amqps://"):
        for pem_key, (setting, _) in TLS_PEMS.items():
            if pem_key in bundle:
                raise ConfigError(f"{pem_key} needs an amqps:// amqp_url", field=pem_key)
            config.pop(setting, None)
        return
    if ("tls_cert_pem" in bundle) != ("tls_key_pem" in bundle):
        raise ConfigError(
            "the bundle has a client certificate without its key, or the reverse",
            field="tls_key_pem",
        )
    if "tls_cert_pem" not in bundle:
        config.pop("tls_cert_file", None)
        config.pop("tls_key_file", None)
    for path, pem_key in bundle_files(bundle, config).items():
        config[TLS_PEMS[pem_key][0]] = str(path)


def bundle_files(bundle: dict[str, Any], config: dict[str, Any]) -> dict[Path, str]:
    """The PEM files to write (path -> bundle key), under the config's ``data_dir``."""
    folder = Path(str(config["data_dir"])) / "tls"
    return {folder / name: key for key, (_, name) in TLS_PEMS.items() if key in bundle}


def render_toml(config: dict[str, Any]) -> str:
    """Flat TOML: strings, numbers, booleans and lists of those (what the settings hold)."""
    lines = ["# tillsync agent settings (tillsync-agent enroll): secret, keep mode 0600"]
    for key, value in config.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    # A JSON string is a TOML basic string: the same quotes and escapes.
    return json.dumps(str(value), ensure_ascii=False)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (never readable by others,
    not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def enroll(
    bundle: Annotated[
        Path, typer.Argument(help="the bundle `tillsync-central registers add --bundle` wrote")
    ],
    config: Annotated[
        Path,
        typer.Option("--config", "-c", envvar="TILLSYNC_CONFIG", help="the config to write"),
    ] = DEFAULT_CONFIG,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help=f"default: kept, else {DEFAULT_DATA_DIR}")
    ] = None,
    api_port: Annotated[
        int | None,
        typer.Option("--api-port", min=0, max=65535, help="local API port (0: off)"),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace the config of another register")
    ] = False,
) -> None:
    """Enroll this till: write the agent's config (mode 0600) from central's bundle, with a
    generated local API token. Secrets are not printed."""
    try:
        existing = _read_toml(config, "config") if config.exists() else None
        contents = _read_toml(bundle, "bundle")
        values = enroll_config(
            contents,
            existing,
            data_dir=data_dir,
            api_port=api_port,
            force=force,
        )
        Path(values["data_dir"]).mkdir(mode=0o700, parents=True, exist_ok=True)
        # The certificate files before the config that names them.
        for path, pem_key in bundle_files(contents, values).items():
            path.parent.mkdir(mode=0o700, exist_ok=True)
            write_private(path, contents[pem_key])
        write_private(config, render_toml(values))
    except TillsyncError as exc:
        _fail(exc.to_dict())
    port = values.get("api_port", AgentSettings.model_fields["api_port"].default)
    console.print(
        f"enrolled register {values['register_id']} of center {values['center_id']}: "
        f"settings in {config} (mode 0600), data in {values['data_dir']}; local API on "
        f"127.0.0.1:{port} (token: tillsync-agent api-token --config {config})"
    )


def api_token(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", envvar="TILLSYNC_CONFIG", help="the agent's config"),
    ] = DEFAULT_CONFIG,
) -> None:
    """Print the local API's bearer token, for the POS app's configuration."""
    settings = _settings(config)
    if settings.api_token is None:
        _fail({"code": "config_error", "field": "api_token", "reason": "no api_token set"})
    console.print(settings.api_token.get_secret_value(), highlight=False, soft_wrap=True)


def register_enroll_commands(app: typer.Typer) -> None:
    app.command()(enroll)
    app.command("api-token")(api_token)
