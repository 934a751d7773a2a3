"""The aiohttp application: checks the envelope, hands the body to bps.bulk_transfer, returns its answer."""

from __future__ import annotations

import asyncio
import json
import logging

import asyncpg
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from . import db
from .config import Config

log = logging.getLogger("bps")

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)

# The function sets response.headers (PostgREST's convention); it is read in the same statement.
BULK_TRANSFER_SQL = (
    "SELECT r.status, r.body::text, current_setting('response.headers', true) "
    "FROM bps.bulk_transfer($1::jsonb, $2) AS r"
)
GET_BULK_TRANSFER_SQL = "SELECT r.status, r.body::text FROM bps.get_bulk_transfer($1) AS r"

# Titles of the problems the service answers itself; sql/02_responses.sql titles the function's.
PROBLEM_TITLES = {
    "invalid_json": "Request body is not a JSON object",
    "bulk_transfer_not_found": "Bulk transfer not found",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "payload_too_large": "Payload too large",
    "unsupported_media_type": "Unsupported media type",
    "service_unavailable": "Service unavailable",
}
BIGINT_MAX = 2**63 - 1
ACCEPTED_ENCODINGS = ("identity", "gzip")

# What the database says when it is down, restarting, full, or too slow: the client should retry.
UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


def problem(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    """An RFC 9457 response for what the service itself rejects (the function answers the rest)."""
    body = {
        "type": f"/problems/{code}",
        "title": PROBLEM_TITLES.get(code, code),
        "status": status,
        "detail": detail,
        "code": code,
    }
    return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json", headers=headers)


def unavailable(request: web.Request) -> web.Response:
    seconds = request.app[CONFIG].retry_after_seconds
    return problem(
        503,
        "service_unavailable",
        "The database cannot be reached right now; retry later (with the same Idempotency-Key).",
        headers={"Retry-After": str(seconds)},
    )


def is_unreadable_json(error: asyncpg.PostgresError) -> bool:
    """True when PostgreSQL could not read the body as jsonb (bad syntax, \\u0000, a number out of range,
    nesting too deep): the error arose converting parameter $1, before the function ran."""
    return "portal parameter $1" in (getattr(error, "context", None) or "")


def function_response(status: int, body: str, headers: str | None = None) -> web.Response:
    response = web.Response(
        status=status,
        body=body.encode(),
        content_type="application/json" if status < 400 else "application/problem+json",
    )
    if headers:
        response.headers.update(json.loads(headers))
    return response


def is_text(value: str) -> bool:
    """True when PostgreSQL can take the header as text: UTF-8 (no undecodable bytes) without NUL."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def post_bulk_transfer(request: web.Request) -> web.Response:
    if not is_json(request.content_type):
        return problem(415, "unsupported_media_type", "Send the request as Content-Type: application/json.")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ACCEPTED_ENCODINGS:
        # aiohttp's raw-deflate fallback can wait forever on a body that is not deflate: accept gzip only.
        return problem(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding!r} is not accepted; send the body as is or gzip-compressed.",
            headers={"Accept-Encoding": "gzip"},
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return too_large(request)
    except (HttpProcessingError, RequestPayloadError):
        # A body that cannot be read as sent: a broken Content-Encoding or chunked framing.
        return problem(400, "invalid_json", "The request body could not be read as sent (Content-Encoding, framing).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return problem(400, "invalid_json", "The request body is not valid UTF-8 JSON.")
    key = request.headers.get("Idempotency-Key")
    if key is not None and not is_text(key):
        # PostgreSQL cannot even receive it: send the empty key, which the function refuses like any bad key.
        key = ""
    try:
        async with request.app[POOL].acquire(timeout=request.app[CONFIG].pool_timeout_seconds) as connection:
            status, body, headers = await connection.fetchrow(BULK_TRANSFER_SQL, text, key)
    except UNAVAILABLE:
        return unavailable(request)
    except asyncpg.PostgresError as error:
        if is_unreadable_json(error):
            reason = " ".join(f"{error.message}. {error.detail or ''}".split())
            return problem(400, "invalid_json", f"The request body is not valid JSON: {reason}")
        raise
    return function_response(status, body, headers)


async def get_bulk_transfer(request: web.Request) -> web.Response:
    raw_id = request.match_info["id"]
    if not (raw_id.isascii() and raw_id.isdigit()) or int(raw_id) > BIGINT_MAX:
        return problem(404, "bulk_transfer_not_found", f"There is no bulk transfer {raw_id!r}.")
    bulk_transfer_id = int(raw_id)
    try:
        async with request.app[POOL].acquire(timeout=request.app[CONFIG].pool_timeout_seconds) as connection:
            status, body = await connection.fetchrow(GET_BULK_TRANSFER_SQL, bulk_transfer_id)
    except UNAVAILABLE:
        return unavailable(request)
    return function_response(status, body)


async def health(request: web.Request) -> web.Response:
    try:
        async with request.app[POOL].acquire(timeout=2) as connection:
            await connection.fetchval("SELECT 1", timeout=2)
    except UNAVAILABLE:
        return unavailable(request)
    return web.json_response({"status": "ok"})


def too_large(request: web.Request) -> web.Response:
    limit = request.app[CONFIG].max_body_bytes
    return problem(413, "payload_too_large", f"The request body is larger than {limit} bytes.")


@web.middleware
async def problem_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Routing errors (404, 405, 413 from the body limit) answered as problem+json, like everything else."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return too_large(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status, "http_error")
        headers = {k: v for k, v in error.headers.items() if k.lower() == "allow"}
        return problem(error.status, code, error.reason, headers=headers)


async def database_pool(app: web.Application):
    config = app[CONFIG]
    pool = await db.create_pool(config)
    await db.warm_pool(pool, config.pool_min_size)
    app[POOL] = pool
    yield
    await pool.close()


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[problem_middleware])
    app[CONFIG] = config
    app.cleanup_ctx.append(database_pool)
    for path in ("/bulk_transfer", "/transfers/bulk"):
        app.router.add_post(path, post_bulk_transfer)
    app.router.add_get("/bulk_transfers/{id}", get_bulk_transfer)
    app.router.add_get("/health", health)
    return app
