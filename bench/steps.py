"""`python -m bench.steps [G] [BATCH] [CALLS]`: where one call of bps.bulk_transfers spends its time, step by
step: G requests of BATCH transfers per call (default 1 and 1), each on an account of its own.

It makes a fresh database (BPS_BENCH_ADMIN_URL's server), and beside bps.bulk_transfers a copy of it,
bps.bulk_transfers_timed, that takes clock_timestamp() at the start, before each step the function's own
comments number (`-- 1-3.`, `-- 4.`, ...) and at the end. It calls the copy CALLS times (default 2,000; each
call its own transaction, synchronous_commit off) and prints each step's median wall time. A step's time
includes its executor start-up, which pg_stat_statements does not count: the figure to read when a call's
fixed cost is the question. The database is dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import sys
import uuid

import psycopg

from service import db

from . import database
from .function_ab import GROUP_ACCOUNTS, group_iban, make_database, payload

STEP = re.compile(r"^(\s+)-- (\d+(?:-\d+)?)\. (.*)$")
MARK = "ts := ts || clock_timestamp();"


def timed_copy(source: str) -> tuple[str, list[str]]:
    """bps.bulk_transfers's definition from sql/04_bulk_transfer.sql, renamed, with its clock readings, and
    the name of each interval between two readings."""
    lines = source.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("CREATE OR REPLACE FUNCTION bps.bulk_transfers("))
    end = next(i for i in range(start, len(lines)) if lines[i] == "END")
    names, out = ["start"], []
    for line in lines[start : end + 1]:
        line = line.replace("FUNCTION bps.bulk_transfers(", "FUNCTION bps.bulk_transfers_timed(")
        if (step := STEP.match(line)) is not None:
            out.append(step.group(1) + MARK)
            names.append(f"{step.group(2)}. {re.split(r'[.,:(]', step.group(3))[0].strip()}")
        if line == "DECLARE":
            out += [line, "    ts timestamptz[] := ARRAY[clock_timestamp()];"]
            continue
        if line == "END":
            out.append(f"    {MARK} PERFORM set_config('bench.steps', ts::text, false);")
        out.append(line)
    return "\n".join(out) + "\n$$;\n", names


def main(argv: list[str]) -> None:
    group, batch, calls = (int(a) for a in (argv + ["1", "1", "2000"][len(argv) :])[:3])
    admin_url = os.environ.get("BPS_BENCH_ADMIN_URL") or database.ADMIN_URL
    definition, names = timed_copy((db.SQL_DIR / "04_bulk_transfer.sql").read_text())
    url = make_database(admin_url, None)
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(definition)
            connection.execute("SET jit = off; SET synchronous_commit = off")
            intervals = []
            for i in range(calls + 50):  # (the first 50: plans cached, caches warm)
                tag = uuid.uuid4().hex[:16]
                bodies = [payload(batch, tag, group_iban((i * group + k) % GROUP_ACCOUNTS)) for k in range(group)]
                rows = connection.execute(
                    "SELECT r.status, current_setting('bench.steps') "
                    "FROM bps.bulk_transfers_timed(%s::text[]::jsonb[]) AS r",
                    (bodies,),
                ).fetchall()
                if any(status != 201 for status, _ in rows):
                    raise SystemExit(f"bps.bulk_transfers answered {[status for status, _ in rows]}")
                if i >= 50:
                    stamps = connection.execute(
                        "SELECT array_agg(extract(epoch FROM t)::numeric ORDER BY n) "
                        "FROM unnest(%s::timestamptz[]) WITH ORDINALITY AS u(t, n)",
                        (rows[0][1],),
                    ).fetchone()[0]
                    intervals.append([int((b - a) * 1_000_000) for a, b in zip(stamps, stamps[1:], strict=False)])
        # (A step inside the function's loop is read once per pass; the usual call makes one pass.)
        labels = names[: len(intervals[0])]
        print(f"bps.bulk_transfers, {group} request(s) of {batch} transfer(s) per call, median of {calls} calls:")
        for label, column in zip(labels, zip(*intervals, strict=False), strict=False):
            print(f"  {statistics.median(column):8.0f} us  from {label}")
        print(f"  {statistics.median(sum(row) for row in intervals):8.0f} us  in all")
    finally:
        asyncio.run(db.drop_database(admin_url, url))


if __name__ == "__main__":
    main(sys.argv[1:])
