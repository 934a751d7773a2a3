"""Logging: one access line per request, and nothing a client sent in any line.

No log line, at any level, may hold an API key, an IBAN, a BIC, a name, a description or a request body.
BPS's own lines (logger `bps` and below) are written never to hold them: they name requests by request id,
account id and key id. Other libraries' lines (aiohttp's parser errors, asyncpg's, asyncio's) can quote what
was sent, in their messages or in the messages of the exceptions they carry, so only their logger, level
and exception type are kept.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from time import perf_counter

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)  # perf_counter() when the request reached the application
# Set by a handler from the database's answer: the account and key a request was for.
ACCOUNT_ID = web.RequestKey("account_id", int)
API_KEY_ID = web.RequestKey("api_key_id", int)

FORMATS = ("text", "json")


class Redact(logging.Filter):
    """Keeps other libraries' records to their logger, level and exception type: their messages and
    tracebacks may quote a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "bps" or record.name.startswith("bps."):
            return True
        error = record.exc_info[1] if record.exc_info else None
        record.msg = "message withheld" + (f" ({type(error).__name__})" if error is not None else "")
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure(log_format: str = "text", level: str = "info") -> None:
    """Every record to stderr, one line each, through the redacting filter: BPS's at `level`, other
    libraries' from warnings up (at every level when `level` is debug)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redact())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)
    logging.getLogger("bps").setLevel(level.upper())


def route_of(request: web.BaseRequest) -> str:
    """The route template ('/bulk_transfers/{id}'), never the path itself (an unmatched path is the client's
    text)."""
    match_info = getattr(request, "match_info", None)
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "(unmatched)"


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, route template, status, duration, request id, account id, key id."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        started = request.get(STARTED)
        fields = {
            "method": request.method,
            "route": route_of(request),
            "status": response.status,
            "duration_ms": round((perf_counter() - started) * 1000 if started else time * 1000, 3),
            "request_id": request.get(REQUEST_ID, "-"),
            "account_id": request.get(ACCOUNT_ID) or "-",
            "api_key_id": request.get(API_KEY_ID) or "-",
        }
        self.logger.info(
            "%(method)s %(route)s %(status)s %(duration_ms).1fms request_id=%(request_id)s account_id=%(account_id)s "
            "api_key_id=%(api_key_id)s",
            fields,
            extra={"fields": fields},
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
