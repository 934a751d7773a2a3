"""The database side of the service: the connection pool, migrations and the sql/ functions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from yoyo import get_backend, read_migrations

from .config import Config

PACKAGE = Path(__file__).resolve().parent
# The project folder in a checkout (an editable install included); the working directory when BPS is installed
# as a package: where the embedded database and the simulated rail keep their files.
ROOT = PACKAGE.parent if (PACKAGE.parent / "pyproject.toml").exists() else Path.cwd()


def data_dir(name: str) -> Path:
    """sql/ or migrations/: inside the package when installed from a wheel, else beside it in the checkout."""
    inside = PACKAGE / name
    return inside if inside.is_dir() else PACKAGE.parent / name


MIGRATIONS_DIR = data_dir("migrations")
SQL_DIR = data_dir("sql")

# Serializes schema changes between processes that migrate the same database at once.
SCHEMA_LOCK_ID = 0x425053  # 'BPS'

DEMO_ACCOUNT = ("ACME Corp", "FR10474608000002006107XXXXX", "OIVUSCLQXXX", 7777777)
DEMO_KEY_LABEL = "demo"


async def keep_session(connection: asyncpg.Connection) -> None:
    """What the pool does to a connection it takes back, beyond rolling back an open transaction (asyncpg
    always does that): nothing. The service's statements leave no session state behind (the function's
    response.headers is transaction-local), and asyncpg's default reset (RESET ALL, UNLISTEN *, ...) cost
    one more round trip to PostgreSQL per request."""


async def connection_pool(url: str, max_size: int, statement_timeout_ms: int, application_name: str) -> asyncpg.Pool:
    """A pool that opens lazily, so its process starts (and the service answers 503) while the database is down."""
    return await asyncpg.create_pool(
        url,
        min_size=0,
        max_size=max_size,
        reset=keep_session,
        server_settings={
            "application_name": application_name,
            # JIT compilation costs more than it saves on these short statements.
            "jit": "off",
            "statement_timeout": str(statement_timeout_ms),
            # bps.bulk_transfer and the claims require it, whatever the database's default.
            "default_transaction_isolation": "read committed",
        },
    )


async def create_pool(config: Config) -> asyncpg.Pool:
    """The service's pool, logged in as the service's role."""
    if config.service_database_url is None:
        raise ValueError("the service logs in as its own role: set service_database_url (see db.login_url)")
    return await connection_pool(config.service_database_url, config.pool_max_size, config.statement_timeout_ms, "bps")


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


async def seed_demo(database_url: str) -> tuple[bool, str]:
    """Creates the demo account unless it exists, and a new API key for it (the demo keys made
    before are revoked). Returns whether the account was created, and the key: it is shown only now."""
    connection = await asyncpg.connect(database_url)
    try:
        name, iban, bic, balance = DEMO_ACCOUNT
        async with connection.transaction():
            await connection.execute("LOCK TABLE bps.bank_accounts IN SHARE ROW EXCLUSIVE MODE")
            account_id = await connection.fetchval("SELECT id FROM bps.bank_accounts WHERE iban = $1", iban)
            created = account_id is None
            if created:
                account_id = await connection.fetchval(
                    "SELECT bps.create_bank_account($1, $2, $3, $4)", name, iban, bic, balance
                )
            await connection.execute(
                "SELECT bps.revoke_api_key(id) FROM bps.api_keys WHERE label = $1 AND state = 'live'", DEMO_KEY_LABEL
            )
            key = await connection.fetchval(
                "SELECT bps.create_api_key(ARRAY[$1::bigint], $2)", account_id, DEMO_KEY_LABEL
            )
        return created, key
    finally:
        await connection.close()


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802, 7677), made here so that
    the password itself never reaches the server, nor its log."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def with_login(url: str, user: str, password: str) -> str:
    """`url` logging in as `user` with `password` instead of its own credentials."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


async def login_url(owner_url: str, purpose: str = "service") -> str:
    """The URL the service (or the executor) logs in with, made from the owner's: the role the migrations
    made for this database, with the password kept for it in bps.database_roles (chosen here, the first
    time, and set as a SCRAM verifier, so neither reaches a server log in clear). Every process that starts
    from the owner's URL gets the same one."""
    connection = await asyncpg.connect(owner_url)
    try:
        async with connection.transaction():
            role, password = await connection.fetchrow(
                "SELECT role_name, password FROM bps.database_roles WHERE purpose = $1 FOR UPDATE", purpose
            )
            if password is None:
                # Chosen by the server, so that no statement a server log may keep carries it.
                password = await connection.fetchval(
                    "UPDATE bps.database_roles SET password = encode(sha256(convert_to("
                    "gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')), 'hex') "
                    "WHERE purpose = $1 RETURNING password",
                    purpose,
                )
                statement = await connection.fetchval(
                    "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)", role, scram_verifier(password)
                )
                await connection.execute(statement)
    finally:
        await connection.close()
    return with_login(owner_url, role, password)


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@contextlib.asynccontextmanager
async def connection_of(pool: asyncpg.Pool, within: float | None = None):
    """A connection of `pool`, for one use. A connection asyncpg left mid-operation (InternalClientError
    "another operation is in progress", seen when a database node dies or is switched over under it) is
    closed, never handed out again."""
    async with pool.acquire(timeout=within) as connection:
        try:
            yield connection
        except asyncpg.InternalClientError:
            connection.terminate()
            raise


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
    """Drops the database of `url`, disconnecting whoever is still in it, and the roles it made for itself
    (roles belong to the whole server)."""
    roles: list[str] = []
    try:
        connection = await asyncpg.connect(url)
    except (OSError, asyncpg.InvalidCatalogNameError):
        connection = None
    if connection is not None:
        try:
            if await connection.fetchval("SELECT to_regclass('bps.database_roles') IS NOT NULL"):
                roles = [r["role_name"] for r in await connection.fetch("SELECT role_name FROM bps.database_roles")]
        finally:
            await connection.close()
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database_name(url)}" WITH (FORCE)')
        for role in roles:
            await admin.execute(await admin.fetchval("SELECT format('DROP ROLE IF EXISTS %I', $1::text)", role))
    finally:
        await admin.close()
