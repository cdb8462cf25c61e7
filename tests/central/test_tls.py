"""TLS to the broker (issue #6): peer verification always on, and registers logging in
with client certificates (SASL EXTERNAL) while the broker still confines them.

Against the real broker's TLS listener (``deploy/dev/services`` makes it: 127.0.0.1:5671
with a throwaway dev CA). The CA is found through ``TILLSYNC_TLS_CA`` and
``TILLSYNC_TLS_CA_KEY`` (``deploy/dev/services env`` prints them), else in the dev state
directory (``TILLSYNC_DEV_STATE``, default ``/var/tmp/tillsync-dev``);
``TILLSYNC_AMQPS_URL`` names the listener. Without TLS these tests fail, saying so: they
are the proof that TLS works, not optional extras.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import asyncpg
import pytest
import trustme
from tills import until

from agent.documents import receipt
from conftest import new_id
from tillsync_agent import Agent, load_settings
from tillsync_agent.tls import ssl_context
from tillsync_central.management import Management
from tillsync_central.provisioning import Enrollment, RegisterTls, add_register
from tillsync_central.runner import IngestService
from tillsync_central.settings import CentralSettings
from tillsync_protocol import ConfigError, topology

DEFAULT_TLS_DIR = Path(os.environ.get("TILLSYNC_DEV_STATE", "/var/tmp/tillsync-dev")) / "tls"
DEFAULT_AMQPS = "amqps://127.0.0.1:5671/"
DOCUMENTS = 25


@dataclass(frozen=True)
class DevTls:
    """The dev CA (which also signs the broker's certificate) and the TLS listener."""

    ca_file: Path
    ca_key_file: Path
    host: str
    port: int

    @property
    def ca(self) -> trustme.CA:
        return trustme.CA.from_pem(self.ca_file.read_bytes(), self.ca_key_file.read_bytes())

    def url(self, vhost: str, user: str | None = None, password: str | None = None) -> str:
        """``amqps://`` to the listener and ``vhost``, with these credentials if any."""
        netloc = f"{self.host}:{self.port}"
        if user is not None:
            netloc = f"{quote(user, safe='')}:{quote(password or '', safe='')}@{netloc}"
        return urlunsplit(("amqps", netloc, "/" + quote(vhost, safe=""), "", ""))


@pytest.fixture(scope="session")
def dev_tls() -> DevTls:
    ca = Path(os.environ.get("TILLSYNC_TLS_CA", DEFAULT_TLS_DIR / "ca.pem"))
    ca_key = Path(os.environ.get("TILLSYNC_TLS_CA_KEY", DEFAULT_TLS_DIR / "ca.key"))
    listener = urlsplit(os.environ.get("TILLSYNC_AMQPS_URL", DEFAULT_AMQPS))
    host, port = listener.hostname or "127.0.0.1", listener.port or 5671
    if not (ca.is_file() and ca_key.is_file()):
        pytest.fail(
            f"TLS is not set up: no dev CA at {ca} / {ca_key}. Run deploy/dev/services start "
            "(it makes the CA and the broker's TLS listener) and export what "
            "`deploy/dev/services env` prints (TILLSYNC_TLS_CA, TILLSYNC_TLS_CA_KEY)."
        )
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        pytest.fail(
            f"TLS is not set up: the broker's TLS listener {host}:{port} does not answer "
            f"({exc}). deploy/dev/services start configures it (listeners.ssl.default)."
        )
    return DevTls(ca, ca_key, host, port)


def vhost_of(settings: CentralSettings) -> str:
    return urlsplit(settings.amqp_url.get_secret_value()).path.lstrip("/") or "/"


def tls_context(ca_file: Path | None, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    if cert is not None:
        cert.configure_cert(context)
    return context


@pytest.fixture
async def tls_enroll(
    settings: CentralSettings,
    pool: asyncpg.Pool,
    declared: None,
    management: Management,
    dev_tls: DevTls,
) -> AsyncIterator[Any]:
    """Enroll a register for amqps (password, or a client certificate from the dev CA)."""
    users: list[str] = []

    async def _enroll(*, client_cert: bool, center_id: str | None = None) -> Enrollment:
        tls = RegisterTls(
            broker_ca_pem=dev_tls.ca_file.read_text(),
            client_ca_cert_file=dev_tls.ca_file if client_cert else None,
            client_ca_key_file=dev_tls.ca_key_file if client_cert else None,
        )
        enrollment = await add_register(
            pool,
            management,
            dev_tls.url(vhost_of(settings)),
            center_id or new_id("c"),
            new_id("r"),
            tls=tls,
        )
        users.append(enrollment.broker_user)
        return enrollment

    yield _enroll
    for user in users:
        await management.delete_user(user)


def write_pems(enrollment: Enrollment, folder: Path) -> dict[str, Path]:
    """The bundle's PEMs as files, as ``tillsync-agent enroll`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"tls_ca_file": folder / "ca.pem"}
    assert enrollment.broker_ca_pem is not None
    files["tls_ca_file"].write_text(enrollment.broker_ca_pem)
    if enrollment.client_certificate is not None:
        files["tls_cert_file"] = folder / "cert.pem"
        files["tls_key_file"] = folder / "key.pem"
        files["tls_cert_file"].write_text(enrollment.client_certificate.cert_pem)
        files["tls_key_file"].write_text(enrollment.client_certificate.key_pem)
    return files


async def run_agent_and_count(
    enrollment: Enrollment,
    data_dir: Path,
    pool: asyncpg.Pool,
    management: Management,
    tls_files: dict[str, Path],
) -> dict[str, Any]:
    """Run a real agent over TLS, submit DOCUMENTS, and return its broker connection."""
    settings = load_settings(
        None,
        register_id=enrollment.register_id,
        center_id=enrollment.center_id,
        amqp_url=enrollment.amqp_url,
        data_dir=data_dir,
        api_port=0,
        **tls_files,
    )
    async with Agent(settings) as agent:
        for n in range(DOCUMENTS):
            await agent.submit("receipt", receipt(100 + n, receipt_no=f"T-{n}"))
        run = asyncio.create_task(agent.run())
        try:

            async def all_acked() -> bool:
                return agent.outbox.counts.acknowledged == DOCUMENTS

            await until(all_acked, timeout=60)
            assert agent.outbox.counts.pending == 0
            assert agent.outbox.counts.rejected == 0
            connections = await connections_of(management, enrollment.broker_user)
            assert len(connections) == 1, connections
        finally:
            agent.stop()
            await asyncio.wait_for(run, timeout=30)
    async with pool.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT count(*) FROM documents WHERE register_id = $1", enrollment.register_id
        )
    assert stored == DOCUMENTS
    return connections[0]


async def connections_of(management: Management, user: str) -> list[dict[str, Any]]:
    async def listed() -> list[dict[str, Any]]:
        response = await management._client.get(
            f"/api/vhosts/{quote(management.vhost, safe='')}/connections"
        )
        return [c for c in response.json() if c.get("user") == user]

    await until(listed, timeout=15)  # the API lists a new connection after a moment
    return await listed()


async def test_an_agent_over_tls_verifies_the_broker_and_its_documents_flow(
    tls_enroll: Any,
    ingest: IngestService,
    pool: asyncpg.Pool,
    management: Management,
    tmp_path: Path,
) -> None:
    enrollment = await tls_enroll(client_cert=False)
    assert enrollment.amqp_url.startswith("amqps://")
    assert enrollment.password is not None
    files = write_pems(enrollment, tmp_path / "tls")
    connection = await run_agent_and_count(enrollment, tmp_path / "data", pool, management, files)
    assert connection["ssl"] is True
    assert connection["auth_mechanism"] == "PLAIN"
    assert connection["peer_cert_subject"] in (None, "")  # no client certificate sent


async def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_enroll: Any, dev_tls: DevTls, tmp_path: Path
) -> None:
    enrollment = await tls_enroll(client_cert=False)
    # The system's CAs do not include the dev CA: the handshake fails on our side.
    with pytest.raises(aiormq.exceptions.AMQPConnectionError) as refused:
        await aio_pika.connect(enrollment.amqp_url, ssl_context=tls_context(None), timeout=10)
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    # Nor with another CA, the way the agent builds its context from its settings.
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    settings = load_settings(
        None,
        register_id=enrollment.register_id,
        center_id=enrollment.center_id,
        amqp_url=enrollment.amqp_url,
        data_dir=tmp_path,
        tls_ca_file=other_ca,
    )
    with pytest.raises(aiormq.exceptions.AMQPConnectionError) as refused:
        await aio_pika.connect(enrollment.amqp_url, ssl_context=ssl_context(settings), timeout=10)
    assert "certificate verify failed" in str(refused.value)
    # The agent's link shows why it is down (and keeps the password out of it).
    async with Agent(settings) as agent:
        run = asyncio.create_task(agent.run())
        try:

            async def refused_shown() -> bool:
                error = agent.status()["last_error"] or ""
                return "CERTIFICATE_VERIFY_FAILED" in error

            await until(refused_shown, timeout=20)
            assert not agent.status()["connected"]
            assert enrollment.password not in str(agent.status())
        finally:
            agent.stop()
            await asyncio.wait_for(run, timeout=30)
    # A broker name the certificate does not carry is refused too (host name checked).
    context = tls_context(dev_tls.ca_file)
    wrong_name = enrollment.amqp_url.replace(f"@{dev_tls.host}:", "@127.0.0.2:")
    with pytest.raises((aiormq.exceptions.AMQPConnectionError, OSError)):
        await aio_pika.connect(wrong_name, ssl_context=context, timeout=10)


def test_an_unusable_tls_file_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "register_id": "r1",
        "center_id": "c1",
        "amqp_url": "amqps://127.0.0.1:5671/",
        "data_dir": tmp_path,
    }
    with pytest.raises(ConfigError) as error:
        ssl_context(load_settings(None, **base, tls_ca_file=tmp_path / "missing.pem"))
    assert error.value.field == "tls_ca_file"
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError) as error:
        ssl_context(
            load_settings(
                None,
                **base,
                tls_cert_file=tmp_path / "junk.pem",
                tls_key_file=tmp_path / "junk.pem",
            )
        )
    assert error.value.field == "tls_cert_file"
    for bad in (
        {"amqp_url": "amqp://127.0.0.1:5672/", "tls_ca_file": tmp_path / "ca.pem"},
        {"amqp_url": "amqps://127.0.0.1:5671/?no_verify_ssl=1"},
        {"amqp_url": "amqps://127.0.0.1:5671/?auth=external"},
        {"tls_cert_file": tmp_path / "cert.pem"},
    ):
        with pytest.raises(ConfigError):
            load_settings(None, **{**base, **bad})


async def test_a_register_with_a_client_certificate_logs_in_as_itself_and_stays_confined(
    tls_enroll: Any,
    ingest: IngestService,
    pool: asyncpg.Pool,
    management: Management,
    dev_tls: DevTls,
    tmp_path: Path,
) -> None:
    mine = await tls_enroll(client_cert=True)
    other = await tls_enroll(client_cert=True)
    assert mine.client_certificate is not None
    assert mine.password is None
    assert "@" not in mine.amqp_url
    assert "auth=external" in mine.amqp_url
    assert mine.client_certificate.key_pem not in repr(mine)

    files = write_pems(mine, tmp_path / "tls")
    connection = await run_agent_and_count(mine, tmp_path / "data", pool, management, files)
    assert connection["ssl"] is True
    assert connection["auth_mechanism"] == "EXTERNAL"
    assert connection["user"] == f"reg-{mine.register_id}"
    assert f"CN=reg-{mine.register_id}" in connection["peer_cert_subject"]

    # The broker user has no password: a password login as it is refused.
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(
            dev_tls.url(urlsplit(mine.amqp_url).path.lstrip("/"), mine.broker_user, ""),
            ssl_context=tls_context(dev_tls.ca_file),
            timeout=10,
        )

    # Logged in by its certificate, it is still confined by the broker.
    context = tls_context(dev_tls.ca_file)
    context.load_cert_chain(files["tls_cert_file"], files["tls_key_file"])
    connection_ = await aio_pika.connect(mine.amqp_url, ssl_context=context, timeout=10)
    async with connection_:
        await assert_confined(connection_, mine, other)


async def assert_confined(
    connection: aio_pika.abc.AbstractConnection, me: Enrollment, victim: Enrollment
) -> None:
    """``connection`` (logged in as ``me``) cannot publish or read as ``victim``."""
    message = aio_pika.Message(b"x", user_id=me.broker_user)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
    victim_key = topology.document_key(victim.center_id, victim.register_id, "receipt")
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await exchange.publish(message, victim_key, timeout=10)
    # With the victim's user_id on its own key: RabbitMQ refuses (PRECONDITION_FAILED).
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        await exchange.publish(
            aio_pika.Message(b"x", user_id=victim.broker_user),
            topology.document_key(me.center_id, me.register_id, "receipt"),
            timeout=10,
        )
    channel = await connection.channel()
    queue = await channel.get_queue(topology.register_queue(victim.register_id), ensure=False)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await queue.consume(_ignore)


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    raise AssertionError("another register's message was delivered")


async def test_a_certificate_with_another_cn_cannot_act_as_this_register(
    tls_enroll: Any, management: Management, dev_tls: DevTls
) -> None:
    mine = await tls_enroll(client_cert=True)
    other = await tls_enroll(client_cert=True)
    ca = dev_tls.ca

    # A valid certificate from the same CA for the other register logs in as that one,
    # and the broker keeps it to that register's rights.
    other_cert = ca.issue_cert(
        f"{other.broker_user}.registers.tillsync.invalid", common_name=other.broker_user
    )
    context = tls_context(dev_tls.ca_file, other_cert)
    connection = await aio_pika.connect(mine.amqp_url, ssl_context=context, timeout=10)
    async with connection:
        listed = await connections_of(management, other.broker_user)
        assert [c["user"] for c in listed] == [other.broker_user]
        assert not await management.connections_of(mine.broker_user)
        await assert_confined(connection, other, mine)

    # A CN that is no broker user: the login is refused.
    stranger = ca.issue_cert("stranger.tillsync.invalid", common_name=new_id("reg-nobody"))
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(
            mine.amqp_url, ssl_context=tls_context(dev_tls.ca_file, stranger), timeout=10
        )

    # This register's own CN, signed by a CA the broker does not trust: the broker ends
    # the handshake (with TLS 1.3 the client may see its alert or only the reset).
    forged = trustme.CA().issue_cert(
        f"{mine.broker_user}.registers.tillsync.invalid", common_name=mine.broker_user
    )
    with pytest.raises(aiormq.exceptions.AMQPConnectionError) as refused:
        await aio_pika.connect(
            mine.amqp_url, ssl_context=tls_context(dev_tls.ca_file, forged), timeout=10
        )
    reason = str(refused.value).lower()
    assert "unknown_ca" in reason or "unknown ca" in reason or "reset" in reason, reason
    assert not await management.connections_of(mine.broker_user)


TLS_SETTINGS = ("tls_ca_file", "tls_cert_file", "tls_key_file")


def _mode(path: str, folder: Path) -> int:
    assert Path(path).parent == folder
    return Path(path).stat().st_mode & 0o777


def _read(path: str) -> str:
    return Path(path).read_text()


def _cli(program: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / program), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_bundle_with_a_client_certificate_enrolls_an_agent_that_connects(
    settings: CentralSettings, management: Management, dev_tls: DevTls, tmp_path: Path
) -> None:
    center, register = new_id("c"), new_id("r")
    env = {
        **os.environ,
        "TILLSYNC_AMQP_URL": settings.amqp_url.get_secret_value(),
        "TILLSYNC_DATABASE_URL": settings.database_url.get_secret_value(),
        "TILLSYNC_RABBITMQ_API_URL": settings.rabbitmq_api_url.get_secret_value(),
        "TILLSYNC_REGISTER_BROKER_URL": dev_tls.url(vhost_of(settings)),
        "TILLSYNC_REGISTER_BROKER_CA_FILE": str(dev_tls.ca_file),
        "TILLSYNC_REGISTER_CLIENT_CA_CERT_FILE": str(dev_tls.ca_file),
        "TILLSYNC_REGISTER_CLIENT_CA_KEY_FILE": str(dev_tls.ca_key_file),
    }
    env.pop("TILLSYNC_CONFIG", None)
    bundle = tmp_path / "bundle.toml"
    try:
        no_bundle = await asyncio.to_thread(
            _cli, "tillsync-central", env, "registers", "add", "--center", center,
            "--register", register,
        )  # fmt: skip
        assert no_bundle.returncode == 1
        assert "field=bundle" in no_bundle.stderr

        added = await asyncio.to_thread(
            _cli, "tillsync-central", env, "registers", "add", "--center", center,
            "--register", register, "--bundle", str(bundle),
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert bundle.stat().st_mode & 0o777 == 0o600
        contents = tomllib.loads(bundle.read_text())
        assert "PRIVATE KEY" in contents["tls_key_pem"]
        assert contents["tls_key_pem"] not in added.stdout + added.stderr

        agent_env = {k: v for k, v in os.environ.items() if not k.startswith("TILLSYNC_")}
        config, data_dir = tmp_path / "agent.toml", tmp_path / "data"
        enrolled = await asyncio.to_thread(
            _cli, "tillsync-agent", agent_env, "enroll", str(bundle), "--config", str(config),
            "--data-dir", str(data_dir), "--api-port", "0",
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        assert "PRIVATE KEY" not in enrolled.stdout + enrolled.stderr
        values = tomllib.loads(config.read_text())
        assert not any("-----BEGIN" in str(value) for value in values.values())
        modes = {setting: _mode(values[setting], data_dir / "tls") for setting in TLS_SETTINGS}
        assert modes == dict.fromkeys(TLS_SETTINGS, 0o600)
        assert _read(values["tls_key_file"]) == contents["tls_key_pem"]

        with pytest.MonkeyPatch.context() as env_free:
            # deploy/dev/test exports TILLSYNC_AMQP_URL, which would override the file.
            for name in [name for name in os.environ if name.startswith("TILLSYNC_")]:
                env_free.delenv(name)
            agent_settings = load_settings(config)
        assert agent_settings.broker_user == f"reg-{register}"
        connection = await aio_pika.connect(
            agent_settings.amqp_url.get_secret_value(),
            ssl_context=ssl_context(agent_settings),
            timeout=10,
        )
        async with connection:
            [listed] = await connections_of(management, f"reg-{register}")
            assert listed["auth_mechanism"] == "EXTERNAL"
    finally:
        await management.delete_user(f"reg-{register}")


def test_dev_services_env_prints_only_exports_naming_the_tls_files(dev_tls: DevTls) -> None:
    script = Path(__file__).resolve().parents[2] / "deploy" / "dev" / "services"
    result = subprocess.run(
        [str(script), "env"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(line.startswith("export TILLSYNC_") for line in lines), lines
    exported = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    assert exported["TILLSYNC_AMQPS_URL"].startswith("amqps://")
    assert urlsplit(exported["TILLSYNC_AMQPS_URL"]).port == dev_tls.port
    assert Path(exported["TILLSYNC_TLS_CA"]).is_file()
    key = Path(exported["TILLSYNC_TLS_CA_KEY"])
    assert key.stat().st_mode & 0o777 == 0o600
