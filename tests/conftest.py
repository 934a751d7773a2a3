"""Shared fixtures: a fresh, migrated database per test session (dropped afterwards), the app, accounts."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from support import Account, ApiKey, database_fixtures, random_iban

from service.app import create_app
from service.config import Config


def pytest_sessionstart(session) -> None:
    """The tests need a PostgreSQL to create their databases on: start the machine's own if it is down."""
    subprocess.run([Path(__file__).parent / "ensure-postgres.sh"], check=True)


# The session's database, and the owner's pool and API key on it.
database_url, service_url, pool, session_key = database_fixtures("session", "bps_test")


@pytest.fixture
def config(database_url: str, service_url: str) -> Config:
    # As many group calls in flight as connections: the tests race requests against each other in the database.
    return Config(
        database_url=database_url,
        service_database_url=service_url,
        pool_min_size=1,
        pool_max_size=10,
        group_max_calls=10,
    )


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
