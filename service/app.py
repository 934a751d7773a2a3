"""The aiohttp application: checks the envelope, hands the body to bps.bulk_transfer, returns its answer."""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
import logging
import re
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from time import perf_counter

import asyncpg
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from . import db
from .access import bearer_key
from .config import Config
from .intake import Intake, Item
from .logs import ACCOUNT_ID, API_KEY_ID, REQUEST_ID, STARTED, route_of
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import DATABASE_SQL as METRICS_SQL
from .metrics import Metrics

log = logging.getLogger("bps")

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)
METRICS = web.AppKey("metrics", Metrics)
INTAKE = web.AppKey("intake", Intake)

# The entry points of schema bps_api, the only functions the service's database role may execute: each
# answers the status and body, and the ids of the account and the key the call was about, for the access
# log; it sets response.headers (PostgREST's convention), read in the same statement.
ANSWER = "r.status, r.body::text, current_setting('response.headers', true), r.bank_account_id, r.api_key_id"


def api_sql(function: str, *arguments: str, columns: str = ANSWER) -> str:
    """The statement that calls bps_api.`function` with the request's key ($2) and `arguments` ($3 on). The key
    goes through bps_api.request first, which names the session after the request id ($1), so that what the
    database logs or shows in pg_stat_activity can be matched to the request (LATERAL: it runs first)."""
    return (
        f"SELECT {columns} FROM bps_api.request($1, $2) AS k(key), "
        f"LATERAL bps_api.{function}({', '.join(('k.key', *arguments))}) AS r"
    )


# The body is cast to jsonb here, before the function runs: a body that is not JSON fails this statement
# with a data exception (SQLSTATE class 22: bad syntax, \u0000, a number out of range) or a program limit
# (class 54: nested too deep, too big). The function itself never raises those for a request.
BULK_TRANSFER_SQL = api_sql("bulk_transfer", "$3::jsonb", "$4")
UNREADABLE_JSON_CLASSES = ("22", "54")
# Many requests in one statement (service/intake.py): the same columns, a row per request, in order.
BULK_TRANSFERS_SQL = (
    "SELECT r.status, r.body::text, r.headers::text, r.bank_account_id, r.api_key_id "
    "FROM bps_api.bulk_transfers($1, $2::text[], $3::text[]::jsonb[], $4::text[]) "
    "WITH ORDINALITY AS r(status, body, headers, bank_account_id, api_key_id, n) ORDER BY r.n"
)
# A pain.001 file: the function parses it (and answers 400 invalid_xml for a file that is not well-formed).
BULK_TRANSFER_XML_SQL = api_sql("bulk_transfer_xml", "$3", "$4")
# A pain.002 report: the document on 200, else the problem.
REPORT_SQL = api_sql(
    "get_payment_status_report",
    "$3",
    columns="r.status, coalesce(r.document, r.body::text), current_setting('response.headers', true), "
    "r.bank_account_id, r.api_key_id",
)
XML_TYPES = ("application/xml", "text/xml")
XML_CONTENT_TYPE = "application/xml"
# The encoding an XML declaration names, read from the bytes before they are decoded.
XML_DECLARED_ENCODING = re.compile(rb"<\?xml[^>]{0,200}?encoding\s*=\s*[\"']([A-Za-z][A-Za-z0-9._-]{0,39})[\"']")
AUTHENTICATE_SQL = api_sql("authenticate", "$3")

# Titles of the problems the service answers itself; sql/02_responses.sql titles the function's.
PROBLEM_TITLES = {
    "invalid_json": "Request body is not a JSON object",
    "invalid_xml": "Request body is not a well-formed XML document",
    "unauthorized": "Unauthorized",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "payload_too_large": "Payload too large",
    "unsupported_media_type": "Unsupported media type",
    "service_unavailable": "Service unavailable",
    "internal_error": "Internal error",
}
# What bps.unauthorized() answers, for a key refused before the database is asked (tests/test_access.py
# checks the two agree).
UNAUTHORIZED_DETAIL = (
    "A valid API key is required: send it as Authorization: Bearer <key>. Missing, malformed, unknown, "
    "revoked and expired keys are refused alike."
)
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="bps"'}
ACCEPTED_ENCODINGS = ("identity", "gzip")

# What the database says when it is down, restarting, full, or too slow: the client should retry. Also a node
# that is still read-only as a failover promotes it (25006: HAProxy may route to it a moment early), and a
# connection asyncpg left mid-operation when its node died (fetch closes it).
UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.ReadOnlySQLTransactionError,
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


def unauthorized() -> web.Response:
    return problem(401, "unauthorized", UNAUTHORIZED_DETAIL, headers=CHALLENGE)


def function_response(
    request: web.Request, answer: asyncpg.Record, content_type: str = "application/json"
) -> web.Response:
    """The HTTP answer of a bps_api function: its status, body and headers; the account and key it was for
    go to the access log."""
    status, body, headers, account_id, api_key_id = answer
    response = web.Response(
        status=status,
        body=body.encode(),
        content_type=content_type if status < 400 else "application/problem+json",
    )
    if headers:
        response.headers.update(json.loads(headers))
    request[ACCOUNT_ID] = account_id
    request[API_KEY_ID] = api_key_id
    return response


async def fetch(request: web.Request, sql: str, *args) -> asyncpg.Record | None:
    """The row of one statement on a pooled connection; None when the database cannot answer."""
    return await fetch_on(request.app, "fetchrow", sql, *args)


async def fetch_on(app: web.Application, method: str, sql: str, *args, reraise: tuple = ()):
    """What connection.`method` (fetchrow, fetch) gives for one statement on a pooled connection; None when
    the database cannot answer (but for the errors in `reraise`)."""
    metrics = app[METRICS]
    try:
        waited = perf_counter()
        async with app[POOL].acquire(timeout=app[CONFIG].pool_timeout_seconds) as connection:
            metrics.observe_pool_wait(perf_counter() - waited)
            try:
                return await getattr(connection, method)(sql, *args)
            except asyncpg.InternalClientError:
                connection.terminate()  # (as db.connection_of does; inline on the hot path)
                raise
    except UNAVAILABLE as error:
        if isinstance(error, reraise):
            raise
        metrics.database_errors.labels("unavailable").inc()
        return None


async def call(request: web.Request, sql: str, key: str, *args, content_type: str = "application/json") -> web.Response:
    """The answer of the bps_api function of `sql` (see api_sql) for `key`; 503 when the database cannot answer."""
    answer = await fetch(request, sql, request[REQUEST_ID], key, *args)
    return unavailable(request) if answer is None else function_response(request, answer, content_type)


async def refuse(request: web.Request, key: str, scope: str, refusal: web.Response) -> web.Response:
    """`refusal` (a request the service turns away itself) for a key the database accepts; the key's own
    refusal (401, 403) otherwise: a client without a valid key learns nothing else about its request."""
    answer = await fetch(request, AUTHENTICATE_SQL, request[REQUEST_ID], key, scope)
    if answer is None:
        return unavailable(request)
    return refusal if answer[0] is None else function_response(request, answer)


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


def decode_xml(raw: bytes, charset: str | None) -> str | None:
    """An XML body as text: in the charset of its Content-Type, else of its byte order mark, else of its XML
    declaration, else UTF-8; None when it cannot be decoded so, or holds a NUL."""
    if raw.startswith(codecs.BOM_UTF8):
        raw, encoding = raw[len(codecs.BOM_UTF8) :], "utf-8"
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif charset:
        encoding = charset
    else:
        declared = XML_DECLARED_ENCODING.match(raw)
        encoding = declared.group(1).decode() if declared else "utf-8"
    try:
        text = raw.decode(codecs.lookup(encoding).name)
    except (LookupError, UnicodeDecodeError):
        return None
    return None if "\x00" in text else text.lstrip("\ufeff")


async def read_body(request: web.Request) -> tuple[str, bool] | web.Response:
    """The body as text and whether it is XML, or the problem that refuses its envelope (type, coding, size,
    framing, character encoding)."""
    is_xml = request.content_type in XML_TYPES
    if not is_xml and not is_json(request.content_type):
        return problem(
            415,
            "unsupported_media_type",
            "Send the request as Content-Type: application/json, or a pain.001 file as application/xml.",
        )
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ACCEPTED_ENCODINGS:
        # aiohttp's raw-deflate fallback can wait forever on a body that is not deflate: accept gzip only.
        return problem(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding!r} is not accepted; send the body as is or gzip-compressed.",
            headers={"Accept-Encoding": "gzip"},
        )
    if (request.content_length or 0) > request.app[CONFIG].max_body_bytes:
        return too_large(request)
    unreadable = "invalid_xml" if is_xml else "invalid_json"
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return too_large(request)
    except (HttpProcessingError, RequestPayloadError):
        # A body that cannot be read as sent: a broken Content-Encoding or chunked framing.
        return problem(400, unreadable, "The request body could not be read as sent (Content-Encoding, framing).")
    if is_xml:
        text = decode_xml(raw, request.charset)
        if text is None:
            return problem(400, "invalid_xml", "The XML body cannot be decoded in the encoding it declares (or UTF-8).")
        return text, True
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return problem(400, "invalid_json", "The request body is not valid UTF-8 JSON.")
    if "\x00" in text:
        # PostgreSQL text cannot hold it, and JSON does not allow it unescaped.
        return problem(400, "invalid_json", "The request body is not valid JSON: it holds a NUL character.")
    return text, False


async def post_bulk_transfer(request: web.Request) -> web.Response:
    response = await bulk_transfer(request)
    request.app[METRICS].observe_outcome(outcome_of(response))
    return response


def outcome_of(response: web.Response) -> str:
    """created, replayed, or the code of the problem a bulk transfer request was answered with."""
    if response.status < 300:
        return "replayed" if response.headers.get("Idempotent-Replayed") == "true" else "created"
    try:
        return str(json.loads(response.body)["code"])
    except (TypeError, ValueError, KeyError):
        return str(response.status)


async def bulk_transfer(request: web.Request) -> web.Response:
    key = bearer_key(request.headers.get("Authorization"))
    if key is None:
        return unauthorized()
    read = await read_body(request)
    if isinstance(read, web.Response):
        return await refuse(request, key, "transfers:write", read)
    body, is_xml = read
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None and not is_text(idempotency_key):
        # PostgreSQL cannot even receive it: send the empty key, which the function refuses like any bad key.
        idempotency_key = ""
    if is_xml:
        return await call(request, BULK_TRANSFER_XML_SQL, key, body, idempotency_key)
    try:
        intake = request.app.get(INTAKE)
        if intake is not None and len(body) <= request.app[CONFIG].group_alone_bytes:
            answer = await intake.submit(Item(request[REQUEST_ID], key, body, idempotency_key))
            return unavailable(request) if answer is None else function_response(request, answer)
        return await call(request, BULK_TRANSFER_SQL, key, body, idempotency_key)
    except asyncpg.PostgresError as error:
        if (error.sqlstate or "")[:2] not in UNREADABLE_JSON_CLASSES:
            raise
        reason = " ".join(f"{error.message}. {error.detail or ''}".split())[:300]
        return await refuse(
            request,
            key,
            "transfers:write",
            problem(400, "invalid_json", f"The request body is not valid JSON: {reason}"),
        )


def quality(value: str) -> Decimal:
    try:
        return Decimal(value)
    except InvalidOperation:
        return Decimal(0)


def wants_xml(accept: str | None) -> bool:
    """Whether an Accept header prefers XML (application/xml, text/xml) to JSON, which is the default."""
    xml = json_ = Decimal(-1)
    for item in (accept or "").split(","):
        media, *parameters = (part.strip().lower() for part in item.split(";"))
        q = next((quality(p[2:]) for p in parameters if p.startswith("q=")), Decimal(1))
        if media in XML_TYPES:
            xml = max(xml, q)
        elif media in ("application/json", "application/*", "*/*"):
            json_ = max(json_, q)
    return xml > 0 and xml > json_


def path_id(request: web.Request) -> str:
    return request.match_info["id"]


def query_of(request: web.Request) -> str:
    """The query string as a JSON object: each parameter's value, or its values when it is given twice."""
    query = request.query
    return json.dumps(
        {name: values[0] if len(values) == 1 else values for name in query for values in [query.getall(name)]}
    )


def keyed(function: str, *arguments: Callable[[web.Request], str]):
    """A handler that hands the request's key and `arguments` (the path's id, the query) to bps_api.`function`,
    whose answer is the response."""
    sql = api_sql(function, *(f"${i}" for i in range(3, len(arguments) + 3)))

    async def handler(request: web.Request) -> web.Response:
        key = bearer_key(request.headers.get("Authorization"))
        if key is None:
            return unauthorized()
        return await call(request, sql, key, *(argument(request) for argument in arguments))

    return handler


get_bulk_transfer_json = keyed("get_bulk_transfer", path_id)


async def get_bulk_transfer(request: web.Request) -> web.Response:
    """GET /bulk_transfers/{id}: JSON, or its pain.002 status report for Accept: application/xml."""
    if wants_xml(request.headers.get("Accept")):
        key = bearer_key(request.headers.get("Authorization"))
        response = (
            unauthorized()
            if key is None
            else await call(request, REPORT_SQL, key, path_id(request), content_type=XML_CONTENT_TYPE)
        )
    else:
        response = await get_bulk_transfer_json(request)
    response.headers["Vary"] = "Accept"
    return response


OPENAPI = web.AppKey("openapi", bytes)


def openapi_document() -> bytes:
    """service/openapi.yaml, the API's description (written first, then the code), as JSON."""
    import yaml

    return json.dumps(yaml.safe_load((Path(__file__).parent / "openapi.yaml").read_text())).encode()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def health(request: web.Request) -> web.Response:
    try:
        async with request.app[POOL].acquire(timeout=2) as connection:
            try:
                await connection.fetchval("SELECT 1", timeout=2)
            except asyncpg.InternalClientError:
                connection.terminate()  # (as db.connection_of does; inline: the health check is the floor's path)
                raise
    except UNAVAILABLE:
        return unavailable(request)
    return web.json_response({"status": "ok"})


def too_large(request: web.Request) -> web.Response:
    limit = request.app[CONFIG].max_body_bytes
    return problem(413, "payload_too_large", f"The request body is larger than {limit} bytes.")


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-Id when it is 1 to 200 visible ASCII characters, else a new one."""
    given = request.headers.get("X-Request-Id", "")
    if 1 <= len(given) <= 200 and given.isascii() and all("!" <= c <= "~" for c in given):
        return given
    return uuid.uuid4().hex


@web.middleware
async def problem_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every answer carries the request's id; routing errors (404, 405, 413 from the body limit) are
    problem+json like everything else; an unexpected error is a 500 logged by its type alone (its message
    may quote the request)."""
    request[STARTED] = perf_counter()
    request[REQUEST_ID] = request_id_of(request)
    try:
        response = await handler(request)
    except web.HTTPRequestEntityTooLarge:
        response = too_large(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status, "http_error")
        headers = {k: v for k, v in error.headers.items() if k.lower() == "allow"}
        response = problem(error.status, code, error.reason, headers=headers)
    except Exception as error:
        sqlstate = getattr(error, "sqlstate", None)
        log.error(
            "request %s failed: %s%s",
            request[REQUEST_ID],
            type(error).__name__,
            f" (SQLSTATE {sqlstate})" if sqlstate else "",
        )
        request.app[METRICS].database_errors.labels(sqlstate[:2] if sqlstate else "none").inc()
        response = problem(500, "internal_error", "The request failed on our side; it is logged by its request id.")
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    request.app[METRICS].observe_request(request.method, route_of(request), response.status, request[STARTED])
    return response


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: every worker's counts and the database's figures (without them while it is down)."""
    try:
        async with db.connection_of(request.app[POOL], within=2) as connection:
            rows = await connection.fetch(METRICS_SQL, timeout=5)
        up = 1
    except UNAVAILABLE:
        rows, up = [], 0
    rows = [("bps_database_up", "1 when the database answered this scrape.", "gauge", None, up), *rows]
    request.app[METRICS].observe_queue(request.app.get(INTAKE))
    return web.Response(body=request.app[METRICS].exposition(rows), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def database_pool(app: web.Application):
    config = app[CONFIG]
    pool = await db.create_pool(config)
    await db.warm_pool(pool, config.pool_min_size)
    app[POOL] = pool
    if config.group_max_requests > 0:
        app[INTAKE] = Intake(
            functools.partial(fetch_on, app),
            BULK_TRANSFER_SQL,
            BULK_TRANSFERS_SQL,
            max_calls=min(config.group_max_calls, config.pool_max_size),
            max_requests=config.group_max_requests,
            max_bytes=config.group_max_bytes,
            observe=app[METRICS].observe_call,
            retried=app[METRICS].group_retries.inc,
        )
    watch = asyncio.create_task(keep_metrics(app))
    yield
    watch.cancel()
    app[METRICS].flush()
    await pool.close()


async def keep_metrics(app: web.Application, every_seconds: float = 1) -> None:
    """Adds this worker's counts to the shared figures and sets its pool's and queue's gauges, in the
    background (each worker's are summed at scrape time)."""
    metrics = app[METRICS]
    while True:
        metrics.flush()
        metrics.observe_pool(app[POOL])
        metrics.observe_queue(app.get(INTAKE))
        await asyncio.sleep(every_seconds)


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[problem_middleware])
    app[CONFIG] = config
    app[OPENAPI] = openapi_document()
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(database_pool)
    for path in ("/bulk_transfer", "/transfers/bulk"):
        app.router.add_post(path, post_bulk_transfer)
    app.router.add_get("/bulk_transfers", keyed("list_bulk_transfers", query_of))
    app.router.add_get("/bulk_transfers/{id}", get_bulk_transfer)
    app.router.add_post("/bulk_transfers/{id}/cancel", keyed("cancel_bulk_transfer", path_id))
    # Not /transfers/bulk, the POST endpoint: a GET of it is 405, not a transfer named "bulk".
    app.router.add_get("/transfers/{id:(?!bulk$)[^/]+}", keyed("get_transfer", path_id))
    app.router.add_get("/accounts", keyed("list_accounts"))
    app.router.add_get("/accounts/{id}/entries", keyed("list_account_entries", path_id, query_of))
    app.router.add_get("/health", health)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)
    return app
