"""``tillsync-agent enroll`` with TLS bundles: the PEMs become files of their own (mode
0600) named by the tls_* settings, the config holds no key material, and re-enrolling
keeps or drops TLS settings as the new credentials need. The real command, real files."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme

from tillsync_agent import load_settings
from tillsync_agent.enroll import enroll_config, render_toml
from tillsync_protocol import ConfigError

CA = trustme.CA()
CLIENT = CA.issue_cert("reg-r1.registers.tillsync.invalid", common_name="reg-r1")
CA_PEM = CA.cert_pem.bytes().decode()
CERT_PEM = CLIENT.cert_chain_pems[0].bytes().decode()
KEY_PEM = CLIENT.private_key_pem.bytes().decode()


@pytest.fixture(autouse=True)
def _no_tillsync_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The services' URLs are exported for the tests (``deploy/dev/test``), and the
    environment overrides a config file: these tests read only the enrolled file."""
    for name in [name for name in os.environ if name.startswith("TILLSYNC_")]:
        monkeypatch.delenv(name)


def bundle(**extra: str) -> dict[str, Any]:
    return {"register_id": "r1", "center_id": "c1", **extra}


def run_enroll(
    bundle_values: dict[str, Any], config: Path, data_dir: Path
) -> subprocess.CompletedProcess[str]:
    path = config.parent / "bundle.toml"
    path.write_text(render_toml(bundle_values))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLSYNC_")}
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "tillsync-agent"),
            "enroll",
            str(path),
            "--config",
            str(config),
            "--data-dir",
            str(data_dir),
            "--api-port",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_client_certificate_bundle_becomes_private_files(tmp_path: Path) -> None:
    config, data_dir = tmp_path / "agent.toml", tmp_path / "data"
    values = bundle(
        amqp_url="amqps://broker.example:5671/tillsync?auth=external",
        tls_ca_pem=CA_PEM,
        tls_cert_pem=CERT_PEM,
        tls_key_pem=KEY_PEM,
    )
    result = run_enroll(values, config, data_dir)
    assert result.returncode == 0, result.stderr
    assert "PRIVATE KEY" not in result.stdout + result.stderr

    written = config.read_text()
    assert "-----BEGIN" not in written
    assert config.stat().st_mode & 0o777 == 0o600
    assert (data_dir / "tls").stat().st_mode & 0o777 == 0o700
    settings = load_settings(config)
    files = {
        settings.tls_ca_file: CA_PEM,
        settings.tls_cert_file: CERT_PEM,
        settings.tls_key_file: KEY_PEM,
    }
    for path, pem in files.items():
        assert path is not None
        assert path.parent == data_dir / "tls"
        assert path.read_text() == pem
        assert path.stat().st_mode & 0o777 == 0o600
    assert settings.uses_external_auth
    assert settings.broker_user == "reg-r1"  # the certificate's CN, the documents' user_id


def test_re_enrolling_with_a_password_drops_the_client_certificate(tmp_path: Path) -> None:
    config, data_dir = tmp_path / "agent.toml", tmp_path / "data"
    first = bundle(
        amqp_url="amqps://broker.example:5671/?auth=external",
        tls_ca_pem=CA_PEM,
        tls_cert_pem=CERT_PEM,
        tls_key_pem=KEY_PEM,
    )
    assert run_enroll(first, config, data_dir).returncode == 0
    token = tomllib.loads(config.read_text())["api_token"]

    # New credentials: a password over TLS, the CA kept from before.
    second = bundle(amqp_url="amqps://reg-r1:secret@broker.example:5671/")
    result = run_enroll(second, config, data_dir)
    assert result.returncode == 0, result.stderr
    values = tomllib.loads(config.read_text())
    assert values["api_token"] == token
    assert "tls_cert_file" not in values
    assert "tls_key_file" not in values
    assert values["tls_ca_file"] == str(data_dir / "tls" / "broker-ca.pem")
    assert load_settings(config).broker_user == "reg-r1"

    # Plain amqp: no TLS setting survives (they would make the settings invalid).
    third = bundle(amqp_url="amqp://reg-r1:secret@broker.example:5672/")
    assert run_enroll(third, config, data_dir).returncode == 0
    assert not any(key.startswith("tls_") for key in tomllib.loads(config.read_text()))


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"amqp_url": "amqp://h/", "tls_ca_pem": CA_PEM}, "tls_ca_pem"),
        ({"amqp_url": "amqps://h/", "tls_cert_pem": "not a pem"}, "tls_cert_pem"),
        ({"amqp_url": "amqps://h/", "tls_cert_pem": CERT_PEM}, "tls_key_pem"),
    ],
)
def test_a_bad_tls_bundle_is_refused_naming_the_field(
    tmp_path: Path, extra: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError) as error:
        enroll_config(bundle(**extra), None, data_dir=tmp_path)
    assert error.value.field == field


def test_external_auth_without_a_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        enroll_config(
            bundle(amqp_url="amqps://h:5671/?auth=external", tls_ca_pem=CA_PEM),
            None,
            data_dir=tmp_path,
        )
    assert "auth=external" in error.value.reason
