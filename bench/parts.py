"""`python -m bench.parts [BATCH]`: what each part of bps.bulk_transfer costs per transfer, on one connection.

It creates a fresh database as `make bench` does (BPS_BENCH_ADMIN_URL; migrated, with the floor's table and
an account), and times statements that each do one part of
the function's work on the same request body of BATCH transfers (default 10000): the parse of the body
alone, the floor's insert, the jsonpath type scans, the validation pass, the dedup hash, the 201's list, and
the whole function. It runs 40 rounds of every part, each run in a transaction that is rolled back (so
nothing accumulates and no commit is timed), and prints the median and the fastest run, per transfer, and
what each costs over the bare parse. The database is dropped at the end. Loopback only; bounded.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

import asyncpg

from service import db

from . import database
from .load import FLOOR_SQL
from .payloads import Template

RUNS = 40
WARMUP = 5
TRANSFERS = "$1::jsonb -> 'credit_transfers'"
READ = f"jsonb_populate_recordset(NULL::bps.transfer_input, {TRANSFERS})"
# (label, statement on $1 = the body text): each is one part of the function, as the function writes it.
PARTS = [
    ("parse the body ($1::jsonb)", "SELECT $1::jsonb IS NULL"),
    ("floor: parse and insert", FLOOR_SQL.replace("$3", "7")),  # $2, the account, is set in measure()
    (
        "jsonpath: every transfer an object of strings",
        f"""SELECT jsonb_path_exists({TRANSFERS}, 'strict $[*] ? (@.type() != "object")'),
                   jsonb_path_query_array({TRANSFERS}, 'lax $[*].*.type()') - 'string' = '[]'""",
    ),
    (
        "validation pass: field rules, counts, total",
        f"""SELECT count(*), sum(bps.amount_cents(t.amount)), array_agg(t.client_reference),
                   sum(bps.fields_present(t)), bool_and(bps.transfer_is_valid(t, 'EUR', false))
              FROM {READ} AS t""",
    ),
    (
        "the same pass without the field rules",
        f"""SELECT count(*), sum(bps.amount_cents(t.amount)), array_agg(t.client_reference),
                   sum(bps.fields_present(t))
              FROM {READ} AS t""",
    ),
    ("dedup hash of the canonical payload", "SELECT sha256(convert_to($1::jsonb::text, 'UTF8')) IS NULL"),
    (
        "the 201's list of ids and references",
        f"""SELECT to_jsonb(array_agg((bps.transfer_id(7, r.n - 1), r.reference)::bps.transfer_receipt
                                      ORDER BY r.n)) IS NULL
              FROM unnest((SELECT array_agg(t.client_reference) FROM {READ} AS t))
                   WITH ORDINALITY AS r(reference, n)""",
    ),
    ("bps.bulk_transfer, whole (a 201)", "SELECT status FROM bps.bulk_transfer($1::jsonb)"),
]


async def time_once(connection: asyncpg.Connection, sql: str, body: str) -> float:
    """Wall time of one execution in a transaction that is then rolled back, in seconds."""
    transaction = connection.transaction()
    await transaction.start()
    started = time.perf_counter()
    await connection.fetch(sql, body)
    elapsed = time.perf_counter() - started
    await transaction.rollback()
    return elapsed


async def time_parts(connection: asyncpg.Connection, parts: list[tuple[str, str]], body: str) -> list[list[float]]:
    """RUNS rounds, each running every part once (after WARMUP untimed rounds): a slower spell of the
    machine then touches every part alike instead of the few that ran during it."""
    times: list[list[float]] = [[] for _ in parts]
    for round_number in range(WARMUP + RUNS):
        for index, (_, sql) in enumerate(parts):
            elapsed = await time_once(connection, sql, body)
            if round_number >= WARMUP:
                times[index].append(elapsed)
    return times


async def measure(batch: int) -> None:
    admin_url = os.environ.get("BPS_BENCH_ADMIN_URL") or database.ADMIN_URL
    url = await db.create_database(admin_url, "bps_parts")
    try:
        account_id, iban, _key = (await database.prepare(url, 0, 0))["hot"]
        parts = [(label, sql.replace("$2", str(account_id))) for label, sql in PARTS]
        template = Template.build(batch)
        body = bytearray(template.body)
        body[template.iban_at : template.iban_at + len(iban)] = iban.encode()
        connection = await asyncpg.connect(url, server_settings={"jit": "off"})
        try:
            print(f"bps parts: {batch} transfers per request, {RUNS} rounds of rolled-back runs, one connection")
            print(f"{'part':48} {'median us/transfer':>19} {'fastest':>8} {'over the parse':>15}")
            times = await time_parts(connection, parts, body.decode())
            parse = statistics.median(times[0]) * 1e6 / batch
            for (label, _), runs in zip(parts, times, strict=True):
                per = statistics.median(runs) * 1e6 / batch
                print(f"{label:48} {per:19.2f} {min(runs) * 1e6 / batch:8.2f} {per - parse:15.2f}")
        finally:
            await connection.close()
    finally:
        await db.drop_database(admin_url, url)


def main() -> int:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    asyncio.run(measure(batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
