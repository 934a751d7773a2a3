"""The database roles: the service and the executor log in as roles that own nothing and may execute only
their own entry points; SECURITY DEFINER functions pin search_path; roles are named per database; and the
login `serve` makes works on a server that checks passwords."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from urllib.parse import urlsplit

import asyncpg
import pytest
from reliability.cluster import Cluster
from support import ADMIN_URL, create_database, drop_database, request_for, transfer

from service import db

REFUSED = (asyncpg.InsufficientPrivilegeError, asyncpg.InvalidSchemaNameError, asyncpg.UndefinedFunctionError)


@pytest.fixture
async def as_service(service_url: str):
    connection = await asyncpg.connect(service_url)
    yield connection
    await connection.close()


@pytest.fixture(scope="session")
async def executor_url(database_url: str) -> str:
    return await db.login_url(database_url, "executor")


async def role_names(pool) -> dict[str, str]:
    return {r["purpose"]: r["role_name"] for r in await pool.fetch("SELECT purpose, role_name FROM bps.database_roles")}


STATEMENTS_REFUSED = {
    "update a balance": "UPDATE bps.bank_accounts SET balance_cents = balance_cents + 100",
    "read accounts": "SELECT * FROM bps.bank_accounts",
    "read key hashes": "SELECT key_hash FROM bps.api_credentials",
    "read the keys view": "SELECT * FROM bps.api_keys",
    "read the roles' passwords": "SELECT password FROM bps.database_roles",
    "write a transfer": "DELETE FROM bps.transfers",
    "call bulk_transfer without a key": "SELECT * FROM bps.bulk_transfer('{}'::jsonb)",
    "check a key itself": "SELECT * FROM bps.key_access('bps_x', 'transfers:write')",
    "make a key": "SELECT bps.create_api_key(ARRAY[1::bigint], 'mine')",
    "credit an account": "SELECT bps.credit_bank_account(1, 100)",
    "create a table in bps_api": "CREATE TABLE bps_api.mine (x int)",
    "create a table in public": "CREATE TABLE public.mine (x int)",
    "create a function in bps_api": "CREATE FUNCTION bps_api.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
}


@pytest.mark.parametrize("statement", STATEMENTS_REFUSED.values(), ids=STATEMENTS_REFUSED.keys())
async def test_the_service_role_is_refused_everything_but_its_entry_points(as_service, statement):
    with pytest.raises(REFUSED):
        await as_service.execute(statement)


@pytest.mark.parametrize("statement", STATEMENTS_REFUSED.values(), ids=STATEMENTS_REFUSED.keys())
async def test_the_executor_role_is_refused_them_too(executor_url, statement):
    connection = await asyncpg.connect(executor_url)
    try:
        with pytest.raises(REFUSED):
            await connection.execute(statement)
    finally:
        await connection.close()


async def test_set_role_and_reset_role_give_the_service_role_nothing_more(as_service, pool):
    owner = await pool.fetchval("SELECT current_user")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_service.execute(f'SET ROLE "{owner}"')
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_service.execute(f'SET SESSION AUTHORIZATION "{owner}"')
    await as_service.execute("RESET ROLE")
    with pytest.raises(REFUSED):
        await as_service.execute("UPDATE bps.bank_accounts SET balance_cents = 0")
    assert await as_service.fetchval("SELECT session_user = current_user") is True
    assert (
        await as_service.fetchval(
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = current_user"
        )
        is False
    )
    assert await as_service.fetchval("SELECT count(*) FROM pg_auth_members WHERE member = current_user::regrole") == 0


async def test_the_service_role_executes_its_entry_point_with_a_key(as_service, pool, make_account):
    account = await make_account(10_000)
    key = await pool.fetchval("SELECT bps.create_api_key(ARRAY[$1::bigint], 'roles test')", account.id)
    payload = json.dumps(request_for(account, [transfer("1.00")]))

    answer = await as_service.fetchrow("SELECT * FROM bps_api.bulk_transfer($1, $2::jsonb)", key, payload)
    assert answer["status"] == 201, answer["body"]
    assert answer["bank_account_id"] == account.id
    answer = await as_service.fetchrow("SELECT * FROM bps_api.bulk_transfer(NULL, $1::jsonb)", payload)
    assert answer["status"] == 401


async def test_the_roles_own_nothing(pool):
    roles = list((await role_names(pool)).values())
    owned = await pool.fetchval(
        """SELECT (SELECT count(*) FROM pg_class WHERE relowner::regrole::text = ANY ($1))
                + (SELECT count(*) FROM pg_proc WHERE proowner::regrole::text = ANY ($1))
                + (SELECT count(*) FROM pg_namespace WHERE nspowner::regrole::text = ANY ($1))
                + (SELECT count(*) FROM pg_type WHERE typowner::regrole::text = ANY ($1))""",
        roles,
    )
    assert owned == 0


async def test_each_role_may_execute_exactly_its_own_schemas_functions(pool):
    roles = await role_names(pool)
    rows = await pool.fetch(
        """SELECT n.nspname, p.oid::regprocedure::text AS function,
                  has_function_privilege($1, p.oid, 'EXECUTE') AS service,
                  has_function_privilege($2, p.oid, 'EXECUTE') AS executor,
                  has_function_privilege('public', p.oid, 'EXECUTE') AS public
             FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
            WHERE n.nspname IN ('bps', 'bps_api', 'bps_executor')""",
        roles["service"],
        roles["executor"],
    )
    assert any(r["nspname"] == "bps_api" for r in rows)
    wrong = [
        dict(r)
        for r in rows
        if r["public"]
        or r["service"] != (r["nspname"] == "bps_api")
        or r["executor"] != (r["nspname"] == "bps_executor")
    ]
    assert wrong == []


async def test_every_security_definer_function_pins_its_search_path_and_every_entry_point_is_one(pool):
    rows = await pool.fetch(
        """SELECT p.oid::regprocedure::text AS function, n.nspname, p.prosecdef,
                  coalesce(array_to_string(p.proconfig, ','), '') AS config
             FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
            WHERE n.nspname IN ('bps', 'bps_api', 'bps_executor')"""
    )
    entry_points = [r for r in rows if r["nspname"] != "bps"]
    assert entry_points
    assert [r["function"] for r in entry_points if not r["prosecdef"]] == []
    unpinned = [r["function"] for r in rows if r["prosecdef"] and "search_path=pg_catalog, pg_temp" not in r["config"]]
    assert unpinned == []


async def test_two_databases_on_one_server_get_roles_of_their_own_and_a_second_migrate_changes_none():
    first, second = await create_database(), await create_database()
    try:
        for url in (first, second):
            await db.migrate(url)
        names = []
        for url in (first, second):
            connection = await asyncpg.connect(url)
            try:
                names.append(await connection.fetch("SELECT purpose, role_name FROM bps.database_roles ORDER BY 1"))
            finally:
                await connection.close()
        assert {r["role_name"] for r in names[0]}.isdisjoint({r["role_name"] for r in names[1]})
        assert [r["role_name"] for r in names[0]] == [
            f"{db.database_name(first)}_executor",
            f"{db.database_name(first)}_service",
        ]

        login = await db.login_url(first)
        assert await db.migrate(first) == []
        assert await db.login_url(first) == login  # the kept password survives a migrate
        connection = await asyncpg.connect(login)
        await connection.close()
    finally:
        await drop_database(first)
        await drop_database(second)
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        left = await admin.fetchval(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE ANY ($1)",
            [f"{db.database_name(u)}%" for u in (first, second)],
        )
    finally:
        await admin.close()
    assert left == 0, "dropping a test database drops its roles"


async def test_many_processes_asking_for_the_login_at_once_get_the_same_one(database_url):
    logins = await asyncio.gather(*(db.login_url(database_url) for _ in range(8)))
    assert len(set(logins)) == 1


def test_the_login_serve_makes_works_where_the_server_checks_passwords():
    """On a server that asks for SCRAM passwords (the owner trusted on loopback, everyone else not), the
    service's role logs in with the password `serve` kept, and not with another; the password never reaches
    the server's log, even one that logs every statement."""
    with Cluster(host_auth="scram-sha-256", settings={"log_statement": "'all'"}) as cluster:
        owner = cluster.url("postgres")

        async def check() -> None:
            await db.migrate(owner)
            login = await db.login_url(owner)
            connection = await asyncpg.connect(login)
            assert await connection.fetchval("SELECT current_user") == "postgres_service"
            await connection.close()
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(db.with_login(owner, "postgres_service", "not-the-password"))
            password = urlsplit(login).password
            assert "ALTER ROLE" in cluster.log.read_text()
            assert password not in cluster.log.read_text()

        asyncio.run(check())


async def test_the_pool_refuses_to_start_without_the_service_login(config):
    with pytest.raises(ValueError, match="service_database_url"):
        await db.create_pool(dataclasses.replace(config, service_database_url=None))
