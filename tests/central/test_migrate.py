"""tillsync_central.db.migrate: order, once only, checksums, the lock, and the CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import sysconfig
import time
from collections.abc import AsyncIterator
from importlib.resources import as_file, files
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pydantic import SecretStr

from services import DatabaseFactory
from tillsync_central.db import (
    MIGRATION_LOCK_KEY,
    MigrationError,
    create_pool,
    load_migrations,
    migrate,
    migration_status,
)
from tillsync_central.settings import CentralSettings
from tillsync_protocol import ConfigError

TABLES = {
    "centers",
    "registers",
    "documents",
    "receipts",
    "shifts",
    "conflicts",
    "dead_letters",
    "register_state",
    "schema_migrations",
    "catalog_scopes",
    "catalog_entities",
    "catalog_changelog",
    "relay_positions",
    "catalog_conflicts",
    "register_presence",
    # 0004_admin
    "operators",
    "operator_sessions",
    "audit_log",
    "register_syncs",
    # 0005_reconcile
    "seq_holes",
    "shift_reconciliations",
    # 0006_shift_checks adds a column and an index only
    # 0007_loyalty
    "loyalty_postings",
    # 0008_stock
    "stock_pending",
    "stock_voided",
    "stock_voids_waiting",
    # 0009_gap_search adds a column only
}
ALL = [migration.name for migration in load_migrations()]
"""Every migration of the package, in order: a new file needs no edit here (TABLES does)."""


@pytest.fixture
async def empty_database(make_database: DatabaseFactory) -> AsyncIterator[str]:
    dsn = await make_database()
    yield dsn
    await make_database.drop(dsn)


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A writable copy of the packaged migrations folder."""
    with as_file(files("tillsync_central.db").joinpath("migrations")) as source:
        shutil.copytree(source, tmp_path / "migrations")
    return tmp_path / "migrations"


async def _tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


async def test_migrate_creates_every_table(empty_database: str) -> None:
    assert await _tables(empty_database) == set()
    assert [s.state for s in await migration_status(empty_database)] == ["pending"] * len(ALL)

    assert await migrate(empty_database) == ALL

    assert await _tables(empty_database) == TABLES
    statuses = await migration_status(empty_database)
    assert [(s.name, s.state) for s in statuses] == [(name, "applied") for name in ALL]
    assert statuses[0].applied_at is not None


async def test_migrating_twice_is_a_no_op(empty_database: str) -> None:
    await migrate(empty_database)
    conn = await asyncpg.connect(empty_database, timeout=10)
    try:
        before = await conn.fetch("SELECT * FROM schema_migrations")
        assert await migrate(conn) == []
        assert await conn.fetch("SELECT * FROM schema_migrations") == before
    finally:
        await conn.close()


async def test_an_edited_applied_migration_is_refused(
    empty_database: str, migrations_copy: Path
) -> None:
    assert await migrate(empty_database, migrations_copy) == ALL
    edited = migrations_copy / "0001_documents.sql"
    edited.write_text(edited.read_text() + "\nCREATE TABLE sneaky (id int);\n")

    with pytest.raises(MigrationError) as caught:
        await migrate(empty_database, migrations_copy)

    error = caught.value
    assert isinstance(error, ConfigError)
    assert error.code == "migration_checksum_mismatch"
    assert error.field == "0001_documents"
    assert "changed after it was applied" in error.reason
    assert "sneaky" not in await _tables(empty_database)
    assert [s.state for s in await migration_status(empty_database, migrations_copy)] == [
        "changed",
        *["applied"] * (len(ALL) - 1),
    ]


async def test_a_new_file_is_applied_after_the_others(
    empty_database: str, migrations_copy: Path
) -> None:
    await migrate(empty_database, migrations_copy)
    (migrations_copy / "0099_extra.sql").write_text("CREATE TABLE extra (id int);\n")

    assert await migrate(empty_database, migrations_copy) == ["0099_extra"]
    assert "extra" in await _tables(empty_database)


async def test_a_failing_migration_is_rolled_back_whole(
    empty_database: str, migrations_copy: Path
) -> None:
    (migrations_copy / "0099_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT 1 / 0;\n"
    )

    with pytest.raises(MigrationError) as caught:
        await migrate(empty_database, migrations_copy)

    assert caught.value.code == "migration_failed"
    assert caught.value.field == "0099_broken"
    # The package's files committed in their own transactions; 0099 left nothing behind.
    assert "half_done" not in await _tables(empty_database)
    statuses = await migration_status(empty_database, migrations_copy)
    assert [(s.name, s.state) for s in statuses] == [
        *((name, "applied") for name in ALL),
        ("0099_broken", "pending"),
    ]


async def test_a_database_newer_than_the_files_is_refused(
    empty_database: str, migrations_copy: Path
) -> None:
    (migrations_copy / "0099_extra.sql").write_text("CREATE TABLE extra (id int);\n")
    await migrate(empty_database, migrations_copy)

    with pytest.raises(MigrationError) as caught:
        await migrate(empty_database)
    assert caught.value.code == "migration_unknown"
    assert caught.value.field == "0099_extra"


async def test_badly_named_files_are_refused(empty_database: str, migrations_copy: Path) -> None:
    (migrations_copy / "2_Oops.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError) as caught:
        await migrate(empty_database, migrations_copy)
    assert caught.value.code == "migration_invalid"
    assert await _tables(empty_database) == set()


async def test_concurrent_migrations_apply_once(empty_database: str) -> None:
    results = await asyncio.gather(*(migrate(empty_database) for _ in range(4)))

    assert sorted(results) == [[], [], [], ALL]
    conn = await asyncpg.connect(empty_database, timeout=10)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(ALL)
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
        held += "(SELECT oid FROM pg_database WHERE datname = current_database())"
        assert await conn.fetchval(held) == 0
    finally:
        await conn.close()


async def _wait_until_waiting_on_lock(conn: asyncpg.Connection, deadline: float) -> None:
    query = """
        SELECT count(*) FROM pg_locks
        WHERE locktype = 'advisory' AND NOT granted
          AND (classid::bigint << 32) | objid::bigint = $1
    """
    while await conn.fetchval(query, MIGRATION_LOCK_KEY) == 0:
        assert time.monotonic() < deadline, "migrate() never waited on the advisory lock"
        await asyncio.sleep(0.05)


async def test_migrate_waits_for_the_lock_holder(empty_database: str) -> None:
    holder = await asyncpg.connect(empty_database, timeout=10)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        task = asyncio.create_task(migrate(empty_database))
        await _wait_until_waiting_on_lock(holder, deadline=time.monotonic() + 10)
        assert not task.done()
        assert await _tables(empty_database) == set()

        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        assert await asyncio.wait_for(task, 30) == ALL
    finally:
        await holder.close()


async def test_migrate_gives_up_after_the_lock_timeout(empty_database: str) -> None:
    holder = await asyncpg.connect(empty_database, timeout=10)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with pytest.raises(MigrationError) as caught:
            await migrate(empty_database, lock_timeout=0.3)
        assert caught.value.code == "migration_lock_timeout"
    finally:
        await holder.close()
    assert await migrate(empty_database) == ALL


async def test_schema_keeps_documents_once_through_the_pool(fresh_database: str) -> None:
    settings = CentralSettings(database_url=SecretStr(fresh_database))
    pool = await create_pool(settings)
    async with pool:
        await pool.execute("INSERT INTO centers (center_id, name) VALUES ('c1', 'Main street')")
        await pool.execute(
            "INSERT INTO registers (register_id, center_id, broker_user) VALUES ($1, $2, $3)",
            "r1",
            "c1",
            "reg-r1",
        )
        insert = """
            INSERT INTO documents (register_id, seq, doc_id, center_id, doc_type, created_at,
                                   payload, payload_json, content_hash)
            VALUES ('r1', 1, gen_random_uuid(), 'c1', 'receipt', now(), $1, $2, sha256($1))
            ON CONFLICT DO NOTHING
        """
        body = {"type": "receipt", "body": {"total": 12_345, "lines": [{"name": "Čaj"}]}}
        assert await pool.execute(insert, b"\x81\xa1x\x01", body) == "INSERT 0 1"
        assert await pool.execute(insert, b"\x81\xa1x\x01", body) == "INSERT 0 0"
        assert await pool.fetchval("SELECT payload_json FROM documents") == body
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(
                "INSERT INTO registers (register_id, center_id, broker_user) "
                "VALUES ('r2', 'c1', 'Reg.*')"
            )


def _cli() -> str:
    return str(Path(sysconfig.get_path("scripts")) / "tillsync-central")


async def _run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        _cli(),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TILLSYNC_")}


async def test_cli_migrates_then_reports_up_to_date(empty_database: str) -> None:
    env = {**_clean_env(), "TILLSYNC_DATABASE_URL": empty_database}

    code, out, err = await _run_cli("migrate", env=env)
    assert (code, out) == (0, "".join(f"applied {name}\n" for name in ALL)), err
    assert "migrated" in err
    assert f":{urlsplit(empty_database).password}@" not in err  # passwords are masked

    code, out, err = await _run_cli("migrate", env=env)
    assert (code, out) == (0, "database is up to date\n"), err

    code, out, err = await _run_cli("migrate", "--status", env=env)
    assert code == 0, err
    assert "0001_documents" in out
    assert "applied" in out


async def test_cli_reads_a_config_file(empty_database: str, tmp_path: Path) -> None:
    config = tmp_path / "central.toml"
    config.write_text(f'database_url = "{empty_database}"\nlog_format = "json"\n')

    code, out, err = await _run_cli("migrate", "--config", str(config), env=_clean_env())
    assert (code, out) == (0, "".join(f"applied {name}\n" for name in ALL)), err
    assert '"event": "migrated"' in err


async def test_cli_reports_errors_with_code_field_and_reason(empty_database: str) -> None:
    env = {**_clean_env(), "TILLSYNC_DATABASE_URL": "mysql://nope@localhost/x"}
    code, _, err = await _run_cli("migrate", env=env)
    assert code == 1
    assert "code=config_error field=database_url reason=" in err

    parts = urlsplit(empty_database)
    netloc = f"{parts.username}:not-the-password@{parts.hostname}:{parts.port or 5432}"
    bad_password = urlunsplit(parts._replace(netloc=netloc))
    code, _, err = await _run_cli("migrate", env={**env, "TILLSYNC_DATABASE_URL": bad_password})
    assert code == 1
    assert "code=database_unavailable field=database_url" in err
    assert "not-the-password" not in err


async def test_0006_marks_the_shifts_with_a_final_verdict_as_checked(
    empty_database: str, migrations_copy: Path
) -> None:
    """A database reconciled before 0006: its final verdicts leave the unchecked index,
    its waiting shifts stay in it."""
    later = _move(migrations_copy, migrations_copy.parent / "later", "0006_*.sql")
    await migrate(empty_database, migrations_copy)
    conn = await asyncpg.connect(empty_database, timeout=10)
    try:
        await conn.execute("INSERT INTO centers (center_id, name) VALUES ('c1', 'c1')")
        await conn.execute(
            "INSERT INTO registers (register_id, center_id, broker_user)"
            " VALUES ('r1', 'c1', 'reg-r1')"
        )
        for shift_no, status in ((1, "ok"), (2, "mismatch"), (3, "waiting"), (4, None)):
            # closed_seq names a stored document (the shift_close).
            await conn.execute(
                "INSERT INTO documents (register_id, seq, doc_id, center_id, doc_type,"
                " created_at, payload, payload_json, content_hash)"
                " VALUES ('r1', $1, gen_random_uuid(), 'c1', 'shift_close', now(), '',"
                " '{}', sha256(''::bytea))",
                shift_no,
            )
            await conn.execute(
                "INSERT INTO shifts (register_id, shift_no, center_id, currency, closed_seq,"
                " closed_at) VALUES ('r1', $1, 'c1', 'EUR', $1, now())",
                shift_no,
            )
            if status is not None:
                await conn.execute(
                    "INSERT INTO shift_reconciliations (register_id, shift_no, status)"
                    " VALUES ('r1', $1, $2)",
                    shift_no,
                    status,
                )
        _move(later, migrations_copy, "*.sql")
        assert await migrate(conn, migrations_copy) == ["0006_shift_checks"]
        rows = await conn.fetch("SELECT shift_no, z_checked FROM shifts ORDER BY shift_no")
        assert [(r["shift_no"], r["z_checked"]) for r in rows] == [
            (1, True),
            (2, True),
            (3, False),
            (4, False),
        ]
    finally:
        await conn.close()


def _move(source: Path, target: Path, pattern: str) -> Path:
    target.mkdir(exist_ok=True)
    for path in sorted(source.glob(pattern)):
        path.rename(target / path.name)
    return target
