"""Shared fixtures: a fresh, migrated database per test session (dropped afterwards), the app, accounts."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from support import Account, create_database, drop_database, random_iban

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
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=20)
    yield pool
    await pool.close()


@pytest.fixture
def config(database_url: str) -> Config:
    return Config(database_url=database_url, pool_min_size=1, pool_max_size=10)


@pytest.fixture
async def client(aiohttp_client, config: Config):
    return await aiohttp_client(create_app(config))


@pytest.fixture
def make_account(pool: asyncpg.Pool) -> Callable:
    """Creates a fresh account with a unique IBAN: `await make_account(balance_cents=..., ...)`."""

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
        return Account(account_id, organization_name, iban, bic, currency)

    return make
