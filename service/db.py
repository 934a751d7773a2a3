"""The database side of the service: the connection pool, migrations and the sql/ functions."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from yoyo import get_backend, read_migrations

from .config import Config

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = ROOT / "migrations"
SQL_DIR = ROOT / "sql"

# Serializes schema changes between processes that migrate the same database at once.
SCHEMA_LOCK_ID = 0x425053  # 'BPS'

DEMO_ACCOUNT = ("ACME Corp", "FR10474608000002006107XXXXX", "OIVUSCLQXXX", 7777777)


async def keep_session(connection: asyncpg.Connection) -> None:
    """What the pool does to a connection it takes back, beyond rolling back an open transaction (asyncpg
    always does that): nothing. The service's statements leave no session state behind (the function's
    response.headers is transaction-local), and asyncpg's default reset (RESET ALL, UNLISTEN *, ...) cost
    one more round trip to PostgreSQL per request."""


async def create_pool(config: Config) -> asyncpg.Pool:
    """A pool that opens lazily, so the service starts (and answers 503) while the database is down."""
    return await asyncpg.create_pool(
        config.database_url,
        min_size=0,
        max_size=config.pool_max_size,
        reset=keep_session,
        server_settings={
            "application_name": "bps",
            # JIT compilation costs more than it saves on these short statements.
            "jit": "off",
            "statement_timeout": str(config.statement_timeout_ms),
            # bps.bulk_transfer requires it, whatever the database's default.
            "default_transaction_isolation": "read committed",
        },
    )


async def warm_pool(pool: asyncpg.Pool, size: int) -> None:
    """Opens up to `size` connections ahead of traffic; a database that is down is not an error here."""
    try:
        connections = [await pool.acquire(timeout=5) for _ in range(min(size, pool.get_max_size()))]
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return
    for connection in connections:
        await pool.release(connection)


def yoyo_url(database_url: str) -> str:
    """The database URL as yoyo (through psycopg) takes it."""
    scheme, rest = database_url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgres", "postgresql") else database_url


def apply_migrations(database_url: str, up_to: str | None = None) -> list[str]:
    """Applies pending yoyo migrations (those up to and including `up_to`, when given); returns the ids applied."""
    backend = get_backend(yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    if up_to is not None:
        migrations = migrations.filter(lambda m: m.id <= up_to)
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]


async def apply_functions(database_url: str) -> None:
    """Re-applies every sql/ file in order, in one transaction, so a changed function always lands."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_ID)
            for path in sorted(SQL_DIR.glob("*.sql")):
                await connection.execute(path.read_text())
    finally:
        await connection.close()


async def migrate(database_url: str) -> list[str]:
    """The whole schema: migrations first (tables), then the functions and views of sql/."""
    applied = await asyncio.to_thread(apply_migrations, database_url)
    await apply_functions(database_url)
    return applied


async def seed_demo(database_url: str) -> bool:
    """Creates the seed's demo account unless it exists; True when it was created."""
    connection = await asyncpg.connect(database_url)
    try:
        name, iban, bic, balance = DEMO_ACCOUNT
        async with connection.transaction():
            await connection.execute("LOCK TABLE bps.bank_accounts IN SHARE ROW EXCLUSIVE MODE")
            if await connection.fetchval("SELECT 1 FROM bps.bank_accounts WHERE iban = $1", iban):
                return False
            await connection.execute("SELECT bps.create_bank_account($1, $2, $3, $4)", name, iban, bic, balance)
        return True
    finally:
        await connection.close()


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def create_database(admin_url: str, prefix: str) -> str:
    """Creates an empty database named `prefix_<random>` on admin_url's server; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))


async def drop_database(admin_url: str, url: str) -> None:
    """Drops the database of `url`, disconnecting whoever is still in it."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database_name(url)}" WITH (FORCE)')
    finally:
        await admin.close()
