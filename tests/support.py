"""Helpers the tests share: databases of their own, accounts, requests, and what the answers must look like."""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from service import db
from service.processes import Process

# The sample requests of tests/data (the demo request, the API's examples); the tests hold their outcomes.
DATA_DIR = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("BPS_TEST_ADMIN_URL") or os.environ.get(
    "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


async def create_database(prefix: str = "bps_test") -> str:
    """Creates an empty database with a unique name; returns its URL."""
    return await db.create_database(ADMIN_URL, prefix)


async def drop_database(url: str) -> None:
    await db.drop_database(ADMIN_URL, url)


@asynccontextmanager
async def migrated_database(prefix: str) -> AsyncIterator[str]:
    """A fresh database with a unique name, migrated, dropped when the block ends."""
    url = await create_database(prefix)
    try:
        await db.migrate(url)
        yield url
    finally:
        await drop_database(url)


def database_fixtures(scope: str, prefix: str) -> tuple:
    """The fixtures database_url, service_url, pool and session_key, on a database of their own for `scope`
    (conftest's for the session; a module that claims transfers or changes settings takes its own):
    `database_url, service_url, pool, session_key = database_fixtures("module", "bps_mine")`."""
    import pytest

    @pytest.fixture(scope=scope, name="database_url")
    async def database_url() -> AsyncIterator[str]:
        """A migrated database, dropped afterwards; tests isolate themselves with their own accounts."""
        async with migrated_database(prefix) as url:
            yield url

    @pytest.fixture(scope=scope, name="service_url")
    async def service_url(database_url: str) -> str:
        """The login of the service's own role (it may only execute schema bps_api), as `serve` makes it."""
        return await db.login_url(database_url)

    @pytest.fixture(scope=scope, name="pool")
    async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
        """Connections as the owner: what a DBA may do (create accounts and keys, read every table)."""
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=20)
        yield pool
        await pool.close()

    @pytest.fixture(scope=scope, name="session_key")
    async def session_key(pool: asyncpg.Pool) -> ApiKey:
        """An API key with both scopes that `make_account` adds every account it opens to: the tests' client
        sends it unless a test says otherwise."""
        first = await pool.fetchval(
            "SELECT bps.create_bank_account('Key Holder SA', $1, 'OIVUSCLQXXX', 0)", random_iban()
        )
        key = await pool.fetchval("SELECT bps.create_api_key(ARRAY[$1::bigint], 'tests')", first)
        key_id = await pool.fetchval(
            "SELECT id FROM bps.api_credentials WHERE key_hash = sha256(convert_to($1, 'UTF8'))", key
        )
        return ApiKey(key_id, key)

    return database_url, service_url, pool, session_key


@dataclass(frozen=True)
class Account:
    id: int
    organization_name: str
    iban: str
    bic: str
    currency: str


@dataclass(frozen=True)
class ApiKey:
    id: int
    key: str


def random_iban() -> str:
    return "FR76" + "".join(secrets.choice("0123456789") for _ in range(23))


def transfer(amount: str = "14.50", **fields) -> dict:
    """One credit transfer with valid placeholder counterparty fields; keyword arguments override them."""
    return {
        "amount": amount,
        "counterparty_name": "Bip Bip",
        "counterparty_bic": "CRLYFRPPTOU",
        "counterparty_iban": "EE383680981021245685",
        "description": f"Wonderland/{secrets.token_hex(4)}",
        **fields,
    }


def request_for(account: Account, transfers: list[dict], **fields) -> dict:
    """A bulk transfer request debiting `account`."""
    return {
        "organization_name": account.organization_name,
        "organization_iban": account.iban,
        "organization_bic": account.bic,
        "credit_transfers": transfers,
        **fields,
    }


def sample(name: str) -> dict:
    """A sample request from tests/data/."""
    return json.loads((DATA_DIR / name).read_text())


async def balance_of(pool: asyncpg.Pool, account: Account) -> int:
    return await pool.fetchval("SELECT balance_cents FROM bps.bank_accounts WHERE id = $1", account.id)


def for_account(payload: dict, account: Account) -> dict:
    """A sample payload debiting `account` (the samples name the demo IBAN, unique per database)."""
    return payload | {"organization_iban": account.iban, "organization_bic": account.bic}


def post_raw(client, path: str, data: bytes, content_type: str | None = "application/json", **headers):
    """POSTs `data` as it is (no JSON encoding by the client), with this Content-Type unless it is None."""
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.post(path, data=data, headers=headers)


# What a request may change


COUNTED_ROWS = {"bulk_transfers": "bulk_transfers", "transfers": "transfers", "entries": "account_entries"}


async def rows_of(pool: asyncpg.Pool, account: Account, *, keys: bool = False) -> dict:
    """What a request can change for an account: balance and row counts (with `keys`, idempotency records too)."""
    counted = COUNTED_ROWS | ({"keys": "idempotency_keys"} if keys else {})
    counts = "".join(
        f", (SELECT count(*) FROM bps.{table} r WHERE r.bank_account_id = a.id) AS {name}"
        for name, table in counted.items()
    )
    return dict(
        await pool.fetchrow(f"SELECT a.balance_cents{counts} FROM bps.bank_accounts a WHERE a.id = $1", account.id)
    )


@asynccontextmanager
async def account_locked(pool: asyncpg.Pool, account: Account) -> AsyncIterator[None]:
    """Holds the account's row lock, as a request debiting it would, until the block ends."""
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM bps.bank_accounts WHERE id = $1 FOR UPDATE", account.id)
        yield


# Problem documents (RFC 9457)


async def assert_problem(response, status: int, code: str | None) -> dict:
    """An RFC 9457 problem document with the contract's members (and `code`, unless None); returns its body."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body = await response.json(content_type=None)
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["status"] == status
    assert isinstance(body["code"], str) and body["code"]
    if code is not None:
        assert body["code"] == code
    return body


async def validation_errors(response) -> list[dict]:
    """The errors of a 422 validation_failed problem, each with its code and detail."""
    body = await assert_problem(response, 422, "validation_failed")
    for error in body["errors"]:
        assert error["code"] and error["detail"]
    return body["errors"]


async def assert_rejected_unchanged(client, pool, account: Account, payload, expected_pointers) -> list[dict]:
    """Posts `payload`: a 422 validation_failed with one error at each expected pointer, and nothing written."""
    before = await rows_of(pool, account)
    errors = await validation_errors(await client.post("/bulk_transfer", json=payload))
    assert sorted(error["pointer"] for error in errors) == sorted(expected_pointers)
    assert await rows_of(pool, account) == before
    return errors


async def assert_insufficient_funds(response, balance: int, required: int) -> dict:
    body = await assert_problem(response, 422, "insufficient_funds")
    assert body["balance_cents"] == balance
    assert body["required_cents"] == required
    assert body["shortfall_cents"] == required - balance
    return body


async def assert_duplicate_of(response, bulk_transfer_id: int) -> dict:
    """A 409 duplicate_request naming the bulk transfer accepted before."""
    body = await assert_problem(response, 409, "duplicate_request")
    assert body["bulk_transfer_id"] == bulk_transfer_id
    return body


async def assert_unavailable(response) -> dict:
    """A 503 service_unavailable telling the client when to retry."""
    body = await assert_problem(response, 503, "service_unavailable")
    assert int(response.headers["Retry-After"]) >= 0
    return body


# A service process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_process(database_url: str, **env: str) -> Process:
    """`python -m service serve` on a free port against `database_url` (one worker unless BPS_WORKERS says),
    its output kept in `.output`: start() it, stop() it."""
    return Process("serve", {"DATABASE_URL": database_url, **env}, port=free_port(), capture=True)
