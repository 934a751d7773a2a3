"""Shared fixtures: a fresh, migrated database per test session (dropped afterwards), the app, accounts."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from support import Account, ApiKey, create_database, drop_database, random_iban

from service import db
from service.app import create_app
from service.config import Config


def pytest_sessionstart(session) -> None:
    """The tests need a PostgreSQL to create their databases on: start the machine's own if it is down."""
    subprocess.run([Path(__file__).parent / "ensure-postgres.sh"], check=True)


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """One migrated database for the whole session; tests isolate themselves with their own accounts."""
    url = await create_database()
    try:
        await db.migrate(url)
        yield url
    finally:
        await drop_database(url)


@pytest.fixture(scope="session")
async def service_url(database_url: str) -> str:
    """The login of the service's own role (it may only execute schema bps_api), as `serve` makes it."""
    return await db.login_url(database_url)


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """Connections as the owner: what a DBA may do (create accounts and keys, read every table)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=20)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def session_key(pool: asyncpg.Pool) -> ApiKey:
    """An API key with both scopes that `make_account` adds every account it opens to: the tests' client
    sends it unless a test says otherwise."""
    first = await pool.fetchval("SELECT bps.create_bank_account('Key Holder SA', $1, 'OIVUSCLQXXX', 0)", random_iban())
    key = await pool.fetchval("SELECT bps.create_api_key(ARRAY[$1::bigint], 'tests')", first)
    key_id = await pool.fetchval(
        "SELECT id FROM bps.api_credentials WHERE key_hash = sha256(convert_to($1, 'UTF8'))", key
    )
    return ApiKey(key_id, key)


@pytest.fixture
def config(database_url: str, service_url: str) -> Config:
    return Config(database_url=database_url, service_database_url=service_url, pool_min_size=1, pool_max_size=10)


@pytest.fixture
def make_client(aiohttp_client, config: Config, session_key: ApiKey) -> Callable:
    """`await make_client(config=..., key=...)`: a test client of an app with that configuration, sending that
    key (the session's by default; None: no Authorization header)."""

    async def make(config: Config = config, key: str | None = session_key.key, **kwargs):
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return await aiohttp_client(create_app(config), headers=headers, **kwargs)

    return make


@pytest.fixture
async def client(make_client):
    return await make_client()


@pytest.fixture
def cover(pool: asyncpg.Pool, session_key: ApiKey) -> Callable:
    """`await cover(account_id)`: the session's key may use that account from now on."""

    async def add(account_id: int) -> None:
        await pool.execute(
            "UPDATE bps.api_credentials SET bank_account_ids = bank_account_ids || $1::bigint WHERE id = $2",
            account_id,
            session_key.id,
        )

    return add


@pytest.fixture
def make_account(pool: asyncpg.Pool, cover: Callable) -> Callable:
    """Creates a fresh account with a unique IBAN, covered by the session's key:
    `await make_account(balance_cents=..., ...)`."""

    async def make(
        balance_cents: int = 10_000_000,
        *,
        organization_name: str = "ACME Corp",
        bic: str = "OIVUSCLQXXX",
        currency: str = "EUR",
        counterparty_check: str = "basic",
    ) -> Account:
        iban = random_iban()
        account_id = await pool.fetchval(
            "SELECT bps.create_bank_account($1, $2, $3, $4, $5, $6)",
            organization_name,
            iban,
            bic,
            balance_cents,
            currency,
            counterparty_check,
        )
        await cover(account_id)
        return Account(account_id, organization_name, iban, bic, currency)

    return make
