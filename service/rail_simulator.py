"""The simulated payment rail: a bank's payment API of its own, in a process of its own, with a durable record
of every payment it executed (SQLite, fsynced per request), so that a test can count executions per id.

It decides deterministically, so clients can test against it:
- a creditor IBAN that fails ISO 13616 (the country's length, the mod-97 check digits): failed, AC01;
- a creditor BIC that is not shaped as ISO 9362 says: failed, RC01;
- of the rest, the share BPS_RAIL_FAILURE_RATE (decided by the payment id, so asking again gives the same
  answer): failed, MS03; every other payment: executed.
A payment submitted again is answered with its first outcome and not executed again.

For fault tests it can also be slow (BPS_RAIL_LATENCY_MS per request), refuse a share of requests with 503
before doing anything (BPS_RAIL_ERROR_RATE), or execute a share of them and then not answer for
BPS_RAIL_HANG_SECONDS (BPS_RAIL_TIMEOUT_RATE): the client's timeout fires with the payments executed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiohttp import web

from .db import ROOT

log = logging.getLogger("bps.rail")

BIC_SHAPE = re.compile(r"[A-Z]{4}[A-Z]{2}[A-Z0-9]{2}([A-Z0-9]{3})?")
IBAN_SHAPE = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]+")
# ISO 13616: the length of an IBAN in each country that has them (the SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


LETTERS_AS_DIGITS = str.maketrans({chr(c): str(c - 55) for c in range(ord("A"), ord("Z") + 1)})


@functools.lru_cache(maxsize=65536)
def iban_is_valid(iban: str) -> bool:
    """ISO 13616: two letters of country, two check digits, and the country's length; mod 97 of the
    rearranged number (letters as 10 to 35) is 1. Cached: a payroll pays the same people every month."""
    iban = iban.replace(" ", "").upper()
    if not IBAN_SHAPE.fullmatch(iban) or IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    return int((iban[4:] + iban[:4]).translate(LETTERS_AS_DIGITS)) % 97 == 1


def share(payment_id: str) -> float:
    """Where a payment id falls in [0, 1), the same every time it is asked."""
    return int.from_bytes(hashlib.sha256(payment_id.encode()).digest()[:8], "big") / 2**64


@dataclass
class Faults:
    """What the rail does wrong, changeable while it runs (POST /admin/faults): for fault tests."""

    latency_ms: float = 5.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_seconds: float = 60.0


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8100
    record: Path = ROOT / ".rail" / "record.sqlite3"
    latency_ms: float = 5.0
    failure_rate: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_seconds: float = 60.0

    @classmethod
    def from_env(cls, env=os.environ) -> Settings:
        d = cls()

        def get(name, cast, default):
            value = env.get(name)
            return default if value in (None, "") else cast(value)

        return cls(
            host=get("BPS_RAIL_HOST", str, d.host),
            port=get("BPS_RAIL_PORT", int, d.port),
            record=get("BPS_RAIL_RECORD", Path, d.record),
            latency_ms=get("BPS_RAIL_LATENCY_MS", float, d.latency_ms),
            failure_rate=get("BPS_RAIL_FAILURE_RATE", float, d.failure_rate),
            error_rate=get("BPS_RAIL_ERROR_RATE", float, d.error_rate),
            timeout_rate=get("BPS_RAIL_TIMEOUT_RATE", float, d.timeout_rate),
            hang_seconds=get("BPS_RAIL_HANG_SECONDS", float, d.hang_seconds),
        )


class Record:
    """The rail's durable record: every payment it executed or refused, once, and how often it was submitted.
    One SQLite transaction per request, fsynced before the answer goes out."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS payments (
            id TEXT PRIMARY KEY, status TEXT NOT NULL, reason TEXT, amount_cents INTEGER NOT NULL,
            currency TEXT NOT NULL, creditor_iban TEXT NOT NULL, creditor_bic TEXT NOT NULL,
            decided_at REAL NOT NULL, submissions INTEGER NOT NULL DEFAULT 1);
        -- One row each time the rail executed a payment: a payment executed twice would have two.
        CREATE TABLE IF NOT EXISTS executions (seq INTEGER PRIMARY KEY, payment_id TEXT NOT NULL, at REAL NOT NULL);
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used from the threads asyncio.to_thread runs requests on: one at a time.
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.executescript(self.SCHEMA)

    def decide(self, payments: list[dict], failure_rate: float) -> list[tuple[str, str, str | None]]:
        """Executes the payments not seen before, records them, and returns every payment's outcome."""
        now = time.time()
        ids = [p["id"] for p in payments]
        with self.lock:
            return self._decide(payments, ids, now, failure_rate)

    def _decide(self, payments: list[dict], ids: list[str], now: float, failure_rate: float) -> list[tuple]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            seen = self._outcomes(ids)
            known = dict(seen)
            new = []
            for p in payments:
                if p["id"] in known:
                    continue
                if not iban_is_valid(p["creditor_iban"]):
                    status, reason = "failed", "AC01"
                elif not BIC_SHAPE.fullmatch(p["creditor_bic"]):
                    status, reason = "failed", "RC01"
                elif share(p["id"]) < failure_rate:
                    status, reason = "failed", "MS03"
                else:
                    status, reason = "executed", None
                known[p["id"]] = (status, reason)
                new.append((p["id"], status, reason, p["amount_cents"], p["currency"], p["creditor_iban"],
                            p["creditor_bic"], now))  # fmt: skip
            self.db.executemany(
                "INSERT INTO payments (id, status, reason, amount_cents, currency, creditor_iban, creditor_bic, "
                "decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                new,
            )
            self.db.executemany(
                "INSERT INTO executions (payment_id, at) VALUES (?, ?)",
                [(n[0], now) for n in new if n[1] == "executed"],
            )
            self.db.executemany("UPDATE payments SET submissions = submissions + 1 WHERE id = ?", [(i,) for i in seen])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return [(i, *known[i]) for i in ids]

    def outcomes(self, ids: list[str]) -> dict[str, tuple[str, str | None]]:
        with self.lock:
            return self._outcomes(ids)

    def _outcomes(self, ids: list[str]) -> dict[str, tuple[str, str | None]]:
        found = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = self.db.execute(
                f"SELECT id, status, reason FROM payments WHERE id IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update({row[0]: (row[1], row[2]) for row in rows})
        return found


RECORD = web.AppKey("record", Record)
SETTINGS = web.AppKey("settings", Settings)
FAULTS = web.AppKey("faults", Faults)
PAYMENT_FIELDS = {"id", "amount_cents", "currency", "creditor_name", "creditor_iban", "creditor_bic"}


def answer(outcomes) -> web.Response:
    results = [{"id": i, "status": s, "reason": r} for i, s, r in outcomes]
    return web.Response(body=orjson.dumps({"results": results}), content_type="application/json")


async def misbehave(request: web.Request) -> web.Response | None:
    """The configured latency, and a 503 for the configured share of requests."""
    faults = request.app[FAULTS]
    if faults.latency_ms > 0:
        await asyncio.sleep(faults.latency_ms / 1000)
    if random.random() < faults.error_rate:
        return web.json_response({"error": "rail unavailable (simulated)"}, status=503)
    return None


async def submit(request: web.Request) -> web.Response:
    refused = await misbehave(request)
    if refused is not None:
        return refused
    try:
        document = orjson.loads(await request.read())
        payments = document["payments"]
        if not isinstance(payments, list) or not all(
            isinstance(p, dict) and PAYMENT_FIELDS <= set(p) and isinstance(p["id"], str) for p in payments
        ):
            raise ValueError("payments")
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": 'expected {"payments": [{id, amount_cents, ...}]}'}, status=400)
    outcomes = await asyncio.to_thread(request.app[RECORD].decide, payments, request.app[SETTINGS].failure_rate)
    faults = request.app[FAULTS]
    if random.random() < faults.timeout_rate:
        await asyncio.sleep(faults.hang_seconds)  # executed and recorded, but the answer does not come
    return answer(outcomes)


async def set_faults(request: web.Request) -> web.Response:
    """Changes the faults while the rail runs: {"error_rate": 0.5, ...}."""
    faults = request.app[FAULTS]
    try:
        changes = await request.json()
        for name, value in changes.items():
            if name not in vars(faults) or not isinstance(value, int | float):
                raise ValueError(name)
            setattr(faults, name, float(value))
    except (ValueError, AttributeError, TypeError):
        return web.json_response({"error": f"faults are numbers named {sorted(vars(faults))}"}, status=400)
    return web.json_response(vars(faults))


async def lookup(request: web.Request) -> web.Response:
    refused = await misbehave(request)
    if refused is not None:
        return refused
    try:
        ids = orjson.loads(await request.read())["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("ids")
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": 'expected {"ids": ["..."]}'}, status=400)
    known = await asyncio.to_thread(request.app[RECORD].outcomes, ids)
    return answer((i, *known[i]) for i in ids if i in known)


async def payment(request: web.Request) -> web.Response:
    known = request.app[RECORD].outcomes([request.match_info["id"]])
    if not known:
        return web.json_response({"error": "no such payment"}, status=404)
    ((status, reason),) = known.values()
    return web.json_response({"id": request.match_info["id"], "status": status, "reason": reason})


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SETTINGS] = settings
    app[FAULTS] = Faults(settings.latency_ms, settings.error_rate, settings.timeout_rate, settings.hang_seconds)
    app[RECORD] = Record(settings.record)
    app.router.add_post("/admin/faults", set_faults)
    app.router.add_post("/payments", submit)
    app.router.add_post("/payments/lookup", lookup)
    app.router.add_get("/payments/{id}", payment)
    app.router.add_get("/health", health)
    return app


def serve(settings: Settings) -> None:
    import gc

    import uvloop

    uvloop.install()
    # Batches of a thousand payments make many short-lived objects and few cycles: collect less often.
    gc.set_threshold(50_000, 20, 20)
    log.info("simulated rail on http://%s:%d, record %s", settings.host, settings.port, settings.record)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=lambda message: log.info(message.strip()),
    )
