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
from time import gmtime, localtime, perf_counter, strftime
from time import time as clock

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
            "time": timestamp(record.created, "T") + "Z",
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
    """One line per request: method, route template, status, duration, request id, account id, key id; in
    the shape of the other lines (text or JSON, aiohttp's access_log_format naming which). Written straight
    to stderr: through the logging module's machinery the line cost a request about 70 us of the service's
    CPU, written directly under 20 (a worker's stderr line is one write, so workers' lines never interleave)."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.json = log_format == "json"
        self.second = -1
        self.stamp = ""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        started = request.get(STARTED)
        now = perf_counter()
        duration_ms = round((now - started) * 1000 if started else time * 1000, 3)
        route = route_of(request)
        request_id = request.get(REQUEST_ID, "-")
        account_id = request.get(ACCOUNT_ID)
        api_key_id = request.get(API_KEY_ID)
        wall = clock()
        if self.json:
            line = json.dumps(
                {
                    "time": timestamp(wall, "T") + "Z",
                    "level": "info",
                    "logger": "bps.access",
                    "method": request.method,
                    "route": route,
                    "status": response.status,
                    "duration_ms": duration_ms,
                    "request_id": request_id,
                    "account_id": account_id,
                    "api_key_id": api_key_id,
                },
                separators=(",", ":"),
            )
        else:
            second = int(wall)
            if second != self.second:
                self.second, self.stamp = second, strftime("%Y-%m-%d %H:%M:%S", localtime(second))
            line = (
                f"{self.stamp},{int(wall % 1 * 1000):03d} INFO bps.access {request.method} {route} {response.status} "
                f"{duration_ms:.1f}ms request_id={request_id} account_id={account_id or '-'} "
                f"api_key_id={api_key_id or '-'}"
            )
        sys.stderr.write(line + "\n")

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def timestamp(wall: float, separator: str = " ") -> str:
    """UTC, to the millisecond: '2026-12-01T21:00:00.123'."""
    return strftime(f"%Y-%m-%d{separator}%H:%M:%S", gmtime(wall)) + f".{int(wall % 1 * 1000):03d}"
