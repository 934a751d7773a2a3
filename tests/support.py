"""Helpers the tests share: databases of their own, accounts, requests."""

from __future__ import annotations

import json
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
ADMIN_URL = os.environ.get("BPS_TEST_ADMIN_URL") or os.environ.get(
    "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def database_url_for(name: str) -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(prefix: str = "bps_test") -> str:
    """Creates an empty database with a unique name; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return database_url_for(name)


async def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@dataclass(frozen=True)
class Account:
    id: int
    organization_name: str
    iban: str
    bic: str
    currency: str


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
    """A request from ../shared/data/."""
    return json.loads((DATA_DIR / name).read_text())


async def balance_of(pool: asyncpg.Pool, account: Account) -> int:
    return await pool.fetchval("SELECT balance_cents FROM bps.bank_accounts WHERE id = $1", account.id)
