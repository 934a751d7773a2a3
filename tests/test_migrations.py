"""The schema from zero: what the migrations build, that migrating again changes nothing, that 0001 rolls back,
and that functions come only from sql/ (migrations hold tables, never functions: docs/design.md).

Each test works in empty databases of its own (create_database), dropped afterwards.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import asyncpg
import pytest
from support import create_database, drop_database, random_iban
from yoyo import get_backend, read_migrations

from service import db

# The columns a DBA may read (docs/sql.md), with the types the code relies on.
DBA_COLUMNS = {
    "bank_accounts": {
        "id": "bigint",
        "organization_name": "text",
        "iban": "text",
        "bic": "text",
        "balance_cents": "bigint",
        "currency": None,
    },
    "transfers": {
        "id": "bigint",
        "bank_account_id": "bigint",
        "bulk_transfer_id": "bigint",
        "counterparty_name": "text",
        "counterparty_iban": "text",
        "counterparty_bic": "text",
        "amount_cents": "bigint",
        "amount_currency": None,
        "description": "text",
        "status": "text",
    },
}
# Tables that do not belong to one account: the accounts themselves and the single row of tunables.
# Tables of no single account: the accounts themselves, settings, the database's roles, and API keys (which
# name their accounts in bank_account_ids).
NOT_PER_ACCOUNT = {"bank_accounts", "settings", "database_roles", "api_credentials"}

MIGRATION_FILES = sorted(p for p in db.MIGRATIONS_DIR.iterdir() if p.suffix in (".sql", ".py"))
MIGRATION_IDS = sorted(p.name.removesuffix(".sql") for p in MIGRATION_FILES if not p.name.endswith(".rollback.sql"))

SNAPSHOT_QUERIES = {
    "relations": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text, c.relacl::text
          FROM pg_class AS c WHERE c.relnamespace = 'bps'::regnamespace ORDER BY 1""",
    "columns": """
        SELECT table_name, ordinal_position, column_name, data_type, character_maximum_length, column_default,
               is_nullable, is_identity, identity_generation
          FROM information_schema.columns WHERE table_schema = 'bps' ORDER BY 1, 2""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'bps'::regnamespace ORDER BY 1, 2""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'bps' ORDER BY 1, 2",
    "sequences": """
        SELECT sequencename, data_type::text, start_value, increment_by, cache_size
          FROM pg_sequences WHERE schemaname = 'bps' ORDER BY 1""",
    "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'bps' ORDER BY 1",
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), p.proacl::text
          FROM pg_proc AS p WHERE p.pronamespace = 'bps'::regnamespace ORDER BY 1""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
          FROM pg_trigger WHERE NOT tgisinternal AND tgrelid::regclass::text LIKE 'bps.%' ORDER BY 1, 2""",
    "types": """
        SELECT typname, typtype::text FROM pg_type
         WHERE typnamespace = 'bps'::regnamespace AND typrelid = 0 AND typelem = 0 ORDER BY 1""",
    "comments": """
        SELECT c.relname, d.objsubid, d.description FROM pg_description AS d
          JOIN pg_class AS c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass
         WHERE c.relnamespace = 'bps'::regnamespace ORDER BY 1, 2""",
    "schema": "SELECT nspname, nspacl::text FROM pg_namespace WHERE nspname = 'bps'",
    "settings": "SELECT * FROM bps.settings",
}

# What an empty database holds besides yoyo's own bookkeeping tables: schemas, relations, functions, extensions.
FOOTPRINT_SQL = """
    SELECT 'schema' AS kind, nspname::text AS name FROM pg_namespace
     WHERE nspname NOT LIKE 'pg\\_%' AND nspname NOT IN ('information_schema', 'public')
    UNION ALL
    SELECT 'relation', n.nspname || '.' || c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
     WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
       AND c.relname NOT LIKE '\\_yoyo%' AND c.relname NOT LIKE 'yoyo%'
    UNION ALL
    SELECT 'function', p.oid::regprocedure::text FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
     WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
    UNION ALL
    SELECT 'extension', extname::text FROM pg_extension WHERE extname <> 'plpgsql'
    ORDER BY 1, 2
"""


def rollback_all_migrations(database_url: str) -> list[str]:
    """What `yoyo rollback` does for every applied migration, newest first; returns the ids rolled back."""
    backend = get_backend(db.yoyo_url(database_url))
    migrations = read_migrations(str(db.MIGRATIONS_DIR))
    with backend.lock():
        to_rollback = backend.to_rollback(migrations)
        backend.rollback_migrations(to_rollback)
    return [m.id for m in to_rollback]


async def snapshot(database_url: str, *, with_data: bool = False) -> dict[str, list[tuple]]:
    """The bps schema as the catalogs describe it (no oids), optionally with each table's row count."""
    connection = await asyncpg.connect(database_url)
    try:
        result = {name: [tuple(row) for row in await connection.fetch(sql)] for name, sql in SNAPSHOT_QUERIES.items()}
        if with_data:
            tables = await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'bps' ORDER BY tablename"
            )
            result["row_counts"] = [
                (t["tablename"], await connection.fetchval(f'SELECT count(*) FROM bps."{t["tablename"]}"'))
                for t in tables
            ]
            result["applied_migrations"] = [
                tuple(row) for row in await connection.fetch("SELECT migration_id FROM _yoyo_migration ORDER BY 1")
            ]
        return result
    finally:
        await connection.close()


async def footprint(database_url: str) -> list[tuple]:
    connection = await asyncpg.connect(database_url)
    try:
        return [tuple(row) for row in await connection.fetch(FOOTPRINT_SQL)]
    finally:
        await connection.close()


@pytest.fixture(scope="module")
async def migrated_from_zero() -> AsyncIterator[str]:
    """An empty database, migrated once; the schema tests below only read it or roll their writes back."""
    url = await create_database("bps_migration_test")
    try:
        assert await db.migrate(url) == MIGRATION_IDS
        yield url
    finally:
        await drop_database(url)


@pytest.fixture
async def connection(migrated_from_zero: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the migrated database inside a transaction that is rolled back afterwards."""
    connection = await asyncpg.connect(migrated_from_zero)
    transaction = connection.transaction()
    await transaction.start()
    try:
        yield connection
    finally:
        await transaction.rollback()
        await connection.close()


async def new_account(connection: asyncpg.Connection, balance_cents: int = 10_000) -> int:
    return await connection.fetchval(
        "SELECT bps.create_bank_account('ACME Corp', $1, 'OIVUSCLQXXX', $2)", random_iban(), balance_cents
    )


async def new_bulk_transfer(connection: asyncpg.Connection, account_id: int) -> int:
    return await connection.fetchval(
        """INSERT INTO bps.bulk_transfers (bank_account_id, payload_hash, transfer_count, total_cents, currency,
                                           pending_count)
           VALUES ($1, sha256('x'), 1, 100, 'EUR', 1) RETURNING id""",
        account_id,
    )


async def insert_transfer(connection: asyncpg.Connection, account_id: int, bulk_id: int, **overrides) -> int:
    row = {
        "bank_account_id": account_id,
        "bulk_transfer_id": bulk_id,
        "position": 0,
        "counterparty_name": "Bip Bip",
        "counterparty_iban": "EE383680981021245685",
        "counterparty_bic": "CRLYFRPPTOU",
        "amount_cents": 100,
        "amount_currency": "EUR",
        "description": "Wonderland",
        **overrides,
    }
    columns = ", ".join(row)
    placeholders = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    # The id follows from the bulk transfer and the position ($2 and $3), as bps.transfer_id says.
    return await connection.fetchval(
        f"INSERT INTO bps.transfers (id, {columns}) VALUES (bps.transfer_id($2, $3), {placeholders}) RETURNING id",
        *row.values(),
    )


async def rejects(connection: asyncpg.Connection, error: type[Exception], statement) -> None:
    """The statement fails with `error`; a savepoint keeps the test's transaction usable afterwards."""
    with pytest.raises(error):
        async with connection.transaction():
            await statement()


# ---------------------------------------------------------------------------------------------------------
# From zero


async def test_migrating_from_zero_creates_the_contract_tables_and_columns(connection):
    rows = await connection.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'bps'"
    )
    found: dict[str, dict[str, str]] = {}
    for row in rows:
        found.setdefault(row["table_name"], {})[row["column_name"]] = row["data_type"]
    for table, columns in DBA_COLUMNS.items():
        assert table in found, f"bps.{table} is missing"
        for column, data_type in columns.items():
            assert column in found[table], f"bps.{table}.{column} is missing"
            if data_type is not None:
                assert found[table][column] == data_type, (table, column, found[table][column])


async def test_migrating_from_zero_stores_money_as_bigint_cents_and_never_as_floats(connection):
    money = await connection.fetch(
        """SELECT c.table_name, c.column_name, c.data_type
             FROM information_schema.columns AS c
             JOIN information_schema.tables AS t USING (table_schema, table_name)
            WHERE c.table_schema = 'bps' AND t.table_type = 'BASE TABLE' AND c.column_name LIKE '%cents'"""
    )
    assert {(r["table_name"], r["column_name"]) for r in money} >= {
        ("bank_accounts", "balance_cents"),
        ("transfers", "amount_cents"),
    }
    assert {r["data_type"] for r in money} == {"bigint"}, [tuple(r) for r in money]
    floats = await connection.fetch(
        """SELECT table_name, column_name FROM information_schema.columns
            WHERE table_schema = 'bps' AND data_type IN ('real', 'double precision', 'money')"""
    )
    assert floats == []


async def test_transfer_status_defaults_to_pending(connection):
    default = await connection.fetchval(
        """SELECT column_default FROM information_schema.columns
            WHERE table_schema = 'bps' AND table_name = 'transfers' AND column_name = 'status'"""
    )
    assert default is not None and default.startswith("'pending'"), default
    account_id = await new_account(connection)
    transfer_id = await insert_transfer(connection, account_id, await new_bulk_transfer(connection, account_id))
    assert await connection.fetchval("SELECT status FROM bps.transfers WHERE id = $1", transfer_id) == "pending"


async def test_every_table_that_belongs_to_an_account_carries_bank_account_id(connection):
    tables = await connection.fetch(
        """SELECT t.table_name,
                  EXISTS (SELECT 1 FROM information_schema.columns AS c
                           WHERE c.table_schema = t.table_schema AND c.table_name = t.table_name
                             AND c.column_name = 'bank_account_id') AS has_account
             FROM information_schema.tables AS t
            WHERE t.table_schema = 'bps' AND t.table_type = 'BASE TABLE'"""
    )
    per_account = {r["table_name"]: r["has_account"] for r in tables if r["table_name"] not in NOT_PER_ACCOUNT}
    assert {"transfers", "bulk_transfers"} <= set(per_account)
    assert [name for name, has in per_account.items() if not has] == []


async def test_a_negative_balance_is_rejected_by_the_schema(connection):
    account_id = await new_account(connection, 100)
    await rejects(
        connection,
        asyncpg.CheckViolationError,
        lambda: connection.execute("UPDATE bps.bank_accounts SET balance_cents = -1 WHERE id = $1", account_id),
    )
    await rejects(
        connection,
        asyncpg.CheckViolationError,
        lambda: connection.execute("SELECT bps.create_bank_account('ACME Corp', $1, 'OIVUSCLQXXX', -1)", random_iban()),
    )
    assert await connection.fetchval("SELECT balance_cents FROM bps.bank_accounts WHERE id = $1", account_id) == 100


@pytest.mark.parametrize("amount_cents", [0, -1, -100])
async def test_a_transfer_amount_of_zero_or_less_is_rejected_by_the_schema(connection, amount_cents):
    account_id = await new_account(connection)
    bulk_id = await new_bulk_transfer(connection, account_id)
    await rejects(
        connection,
        asyncpg.CheckViolationError,
        lambda: insert_transfer(connection, account_id, bulk_id, amount_cents=amount_cents),
    )


async def test_a_duplicate_iban_is_rejected_by_the_schema(connection):
    iban = random_iban()
    await connection.execute("SELECT bps.create_bank_account('ACME Corp', $1, 'OIVUSCLQXXX', 100)", iban)
    await rejects(
        connection,
        asyncpg.UniqueViolationError,
        lambda: connection.execute("SELECT bps.create_bank_account('Other Corp', $1, 'AGRIFRPPXXX', 100)", iban),
    )


async def test_foreign_keys_reject_rows_that_point_nowhere_or_to_another_account(connection):
    account_id = await new_account(connection)
    other_account_id = await new_account(connection)
    bulk_id = await new_bulk_transfer(connection, account_id)
    missing = 2**40  # times 100000 still a bigint: a transfer of it has an id

    # A bulk transfer of an account that does not exist (checked at commit: the foreign key is deferred, see
    # migrations/0002; SET CONSTRAINTS ALL IMMEDIATE checks it now).
    async def bulk_transfer_of_a_missing_account() -> None:
        await new_bulk_transfer(connection, missing)
        await connection.execute("SET CONSTRAINTS ALL IMMEDIATE")

    await rejects(connection, asyncpg.ForeignKeyViolationError, bulk_transfer_of_a_missing_account)
    assert await connection.fetchval(
        "SELECT condeferred FROM pg_constraint WHERE conname = 'bulk_transfers_bank_account_id_fkey'"
    )
    # A transfer of a bulk transfer that does not exist.
    await rejects(
        connection, asyncpg.ForeignKeyViolationError, lambda: insert_transfer(connection, account_id, missing)
    )
    # A transfer debiting another account than its bulk transfer's.
    await rejects(
        connection,
        asyncpg.ForeignKeyViolationError,
        lambda: insert_transfer(connection, other_account_id, bulk_id),
    )
    # An account with transfers cannot vanish from under them.
    transfer_id = await insert_transfer(connection, account_id, bulk_id)
    await rejects(
        connection,
        asyncpg.ForeignKeyViolationError,
        lambda: connection.execute("DELETE FROM bps.bank_accounts WHERE id = $1", account_id),
    )
    # Nor can their bulk transfer, and neither can be re-keyed (sql/06_integrity.sql stands in for a
    # per-row foreign key).
    await rejects(
        connection,
        asyncpg.ForeignKeyViolationError,
        lambda: connection.execute("DELETE FROM bps.bulk_transfers WHERE id = $1", bulk_id),
    )
    for statement in (
        "UPDATE bps.bulk_transfers SET bank_account_id = $2 WHERE id = $1",
        "UPDATE bps.transfers SET bank_account_id = $2 WHERE bulk_transfer_id = $1",
    ):
        await rejects(
            connection,
            asyncpg.ForeignKeyViolationError,
            lambda statement=statement: connection.execute(statement, bulk_id, other_account_id),
        )
    # Nor in a statement that also inserts a rightful transfer of that bulk transfer.
    await rejects(
        connection,
        asyncpg.ForeignKeyViolationError,
        lambda: connection.execute(
            """INSERT INTO bps.transfers (id, bank_account_id, bulk_transfer_id, position, counterparty_name,
                                           counterparty_iban, counterparty_bic, amount_cents, amount_currency,
                                           description)
               VALUES (bps.transfer_id($1, 1), $2, $1, 1, 'n', 'i', 'b', 100, 'EUR', 'd'),
                      (bps.transfer_id($1, 2), $3, $1, 2, 'n', 'i', 'b', 100, 'EUR', 'd')""",
            bulk_id,
            account_id,
            other_account_id,
        ),
    )
    # TRUNCATE fires no delete trigger: it must take the transfers along. (TRUNCATE refuses to run while
    # deferred foreign-key checks are pending: run them first.)
    await connection.execute("SET CONSTRAINTS ALL IMMEDIATE")
    await rejects(
        connection,
        asyncpg.ForeignKeyViolationError,
        lambda: connection.execute("TRUNCATE bps.bulk_transfers CASCADE"),
    )
    # A transfer's id is its bulk transfer's id * 100000 + its position, and nothing else.
    await rejects(
        connection,
        asyncpg.CheckViolationError,
        lambda: connection.execute("UPDATE bps.transfers SET id = id + 1 WHERE id = $1", transfer_id),
    )
    # Without transfers, a bulk transfer can go.
    await connection.execute("DELETE FROM bps.transfers WHERE id = $1", transfer_id)
    await connection.execute("DELETE FROM bps.bulk_transfers WHERE id = $1", bulk_id)


async def test_bulk_transfers_are_deleted_only_at_read_committed(migrated_from_zero):
    """A REPEATABLE READ snapshot would not see transfers committed while the delete waited for them, so the
    delete trigger (sql/06_integrity.sql) refuses to run there."""
    connection = await asyncpg.connect(migrated_from_zero)
    try:
        with pytest.raises(asyncpg.InvalidTransactionStateError):
            async with connection.transaction(isolation="repeatable_read"):
                await connection.execute("DELETE FROM bps.bulk_transfers WHERE id = -1")
    finally:
        await connection.close()


async def test_migrating_from_zero_gives_a_working_bulk_transfer(connection):
    account = await connection.fetchrow(
        "SELECT id, iban, bic FROM bps.bank_accounts WHERE id = $1", await new_account(connection, 10_000)
    )
    payload = {
        "organization_iban": account["iban"],
        "organization_bic": account["bic"],
        "credit_transfers": [
            {
                "amount": "14.5",
                "counterparty_name": "Bip Bip",
                "counterparty_iban": "EE383680981021245685",
                "counterparty_bic": "CRLYFRPPTOU",
                "description": "Wonderland",
            }
        ],
    }
    status, body = await connection.fetchrow("SELECT * FROM bps.bulk_transfer($1::jsonb)", json.dumps(payload))
    assert (status, json.loads(body)["total_cents"]) == (201, 1450)
    assert await connection.fetchval("SELECT balance_cents FROM bps.bank_accounts WHERE id = $1", account["id"]) == (
        10_000 - 1450
    )


# ---------------------------------------------------------------------------------------------------------
# Migrating twice


async def test_migrating_twice_changes_nothing():
    url = await create_database("bps_migration_test")
    try:
        await db.migrate(url)
        connection = await asyncpg.connect(url)
        try:
            account_id = await new_account(connection, 5_000)
            await new_bulk_transfer(connection, account_id)
        finally:
            await connection.close()
        before = await snapshot(url, with_data=True)

        assert await db.migrate(url) == []

        after = await snapshot(url, with_data=True)
        for part in before:
            assert after[part] == before[part], part
        assert ("bank_accounts", 1) in after["row_counts"]
    finally:
        await drop_database(url)


async def test_migrating_again_reapplies_the_functions_of_sql():
    url = await create_database("bps_migration_test")
    try:
        await db.migrate(url)
        connection = await asyncpg.connect(url)
        try:
            definition = "SELECT pg_get_functiondef('bps.format_cents(bigint)'::regprocedure)"
            original = await connection.fetchval(definition)
            await connection.execute(
                "CREATE OR REPLACE FUNCTION bps.format_cents(cents bigint) RETURNS text "
                "LANGUAGE sql AS $$ SELECT 'x' $$"
            )
            assert await connection.fetchval("SELECT bps.format_cents(1450)") == "x"

            assert await db.migrate(url) == []

            assert await connection.fetchval(definition) == original
            assert await connection.fetchval("SELECT bps.format_cents(1450)") == "14.50"
        finally:
            await connection.close()
    finally:
        await drop_database(url)


async def test_two_processes_migrating_one_empty_database_at_once_build_one_schema(migrated_from_zero):
    url = await create_database("bps_migration_test")
    try:
        await asyncio.gather(db.migrate(url), db.migrate(url))

        assert await snapshot(url) == await snapshot(migrated_from_zero)
    finally:
        await drop_database(url)


# ---------------------------------------------------------------------------------------------------------
# Rolling back


async def test_rolling_back_0001_leaves_no_bps_schema_and_migrating_again_rebuilds_it(migrated_from_zero):
    url = await create_database("bps_migration_test")
    try:
        empty = await footprint(url)
        await db.migrate(url)

        rolled_back = await asyncio.to_thread(rollback_all_migrations, url)

        assert rolled_back == MIGRATION_IDS[::-1]
        assert "0001.initial-schema" in rolled_back
        connection = await asyncpg.connect(url)
        try:
            assert await connection.fetchval("SELECT to_regnamespace('bps')") is None
            assert await connection.fetch("SELECT migration_id FROM _yoyo_migration") == []
        finally:
            await connection.close()
        assert await footprint(url) == empty

        assert await db.migrate(url) == MIGRATION_IDS
        assert await snapshot(url) == await snapshot(migrated_from_zero)
    finally:
        await drop_database(url)


# ---------------------------------------------------------------------------------------------------------
# Functions come from sql/, never from a migration


def strip_sql_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", re.sub(r"--[^\n]*", "", text), flags=re.S)


def test_no_migration_file_defines_a_function():
    assert MIGRATION_FILES, "migrations/ is empty"
    pattern = re.compile(r"\bCREATE\s+(OR\s+REPLACE\s+)?(FUNCTION|PROCEDURE)\b", re.I)
    offenders = [p.name for p in MIGRATION_FILES if pattern.search(strip_sql_comments(p.read_text()))]
    assert offenders == []


async def test_migrations_alone_create_no_function_and_sql_files_create_them_all():
    url = await create_database("bps_migration_test")
    try:
        await asyncio.to_thread(db.apply_migrations, url)
        connection = await asyncpg.connect(url)
        count_functions = "SELECT count(*) FROM pg_proc WHERE pronamespace = 'bps'::regnamespace"
        try:
            assert await connection.fetchval(count_functions) == 0
            await db.apply_functions(url)
            functions = await connection.fetch(
                "SELECT oid::regprocedure::text AS signature FROM pg_proc WHERE pronamespace = 'bps'::regnamespace"
            )
        finally:
            await connection.close()
        signatures = {r["signature"] for r in functions}
        assert {
            "bps.bulk_transfer(jsonb,text)",
            "bps.create_bank_account(text,text,text,bigint,text,text)",
        } <= signatures
    finally:
        await drop_database(url)


async def test_0002_renumbers_the_transfers_of_0001_and_everything_that_names_them():
    """A database that ran 0001 for a while (identity ids past 200000, a stored replay, a journal entry naming a
    transfer, a setting above the new ceiling) comes out of 0002 consistent."""
    url = await create_database("bps_migration_test")
    try:
        await asyncio.to_thread(db.apply_migrations, url, "0001.initial-schema")
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(
                """
                UPDATE bps.settings SET max_transfers_per_request = 200000;
                INSERT INTO bps.bank_accounts (organization_name, iban, bic, balance_cents)
                VALUES ('A', 'FR7630006000011234567890189', 'AGRIFRPPXXX', 1000),
                       ('B', 'DE89370400440532013000', 'DEUTDEFFXXX', 1000);
                INSERT INTO bps.bulk_transfers (bank_account_id, payload_hash, idempotency_key, transfer_count,
                                                total_cents, currency)
                VALUES (1, sha256('a'), 'K', 2, 300, 'EUR'), (2, sha256('b'), NULL, 1, 100, 'EUR');
                ALTER TABLE bps.transfers ALTER COLUMN id RESTART WITH 200000;
                INSERT INTO bps.transfers (bank_account_id, bulk_transfer_id, position, counterparty_name,
                                           counterparty_iban, counterparty_bic, amount_cents, amount_currency,
                                           description, client_reference)
                VALUES (1, 1, 0, 'n', 'i', 'b', 100, 'EUR', 'd', 'r0'),
                       (2, 2, 0, 'n', 'i', 'b', 100, 'EUR', 'd', NULL),
                       (1, 1, 1, 'n', 'i', 'b', 200, 'EUR', 'd', NULL);
                INSERT INTO bps.idempotency_keys (bank_account_id, idempotency_key, payload_hash, status, body,
                                                  bulk_transfer_id)
                VALUES (1, 'K', sha256('a'), 201,
                        '{"bulk_transfer_id": 1, "transfers": [{"id": 200000, "client_reference": "r0"},
                                                               {"id": 200002, "client_reference": null}]}', 1);
                INSERT INTO bps.account_entries (bank_account_id, account_version, kind, amount_cents,
                                                 previous_balance_cents, balance_cents, transfer_id)
                VALUES (1, 1, 'refund', 100, 900, 1000, 200002);
                """
            )
        finally:
            await connection.close()

        assert await db.migrate(url) == [i for i in MIGRATION_IDS if i > "0001.initial-schema"]

        connection = await asyncpg.connect(url)
        try:
            transfers = await connection.fetch("SELECT id, bulk_transfer_id, position FROM bps.transfers ORDER BY id")
            assert [tuple(t) for t in transfers] == [(100000, 1, 0), (100001, 1, 1), (200000, 2, 0)]
            body = json.loads(await connection.fetchval("SELECT body FROM bps.idempotency_keys"))
            assert body["transfers"] == [
                {"id": 100000, "client_reference": "r0"},
                {"id": 100001, "client_reference": None},
            ]
            assert await connection.fetchval("SELECT transfer_id FROM bps.account_entries") == 100001
            assert await connection.fetchval("SELECT max_transfers_per_request FROM bps.settings") == 100_000
        finally:
            await connection.close()
    finally:
        await drop_database(url)
