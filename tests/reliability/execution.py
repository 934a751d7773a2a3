"""The invariants of execution, checked from the database and from the simulated rail's own record after a
phase: every transfer final; no transfer executed twice at the rail; BPS and the rail agree on every outcome;
every failed or cancelled transfer refunded exactly once and nothing else refunded."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import asyncpg

from .checks import Checks


async def wait_final(url: str, within: float) -> tuple[int, float]:
    """Waits (bounded) until no transfer is pending or processing; returns how many still are, and the wait."""
    started = time.monotonic()
    connection = await asyncpg.connect(url)
    try:
        while True:
            open_ = await connection.fetchval(
                "SELECT coalesce(sum(pending_count + processing_count), 0) FROM bps.bulk_transfers"
            )
            if open_ == 0 or time.monotonic() - started > within:
                return open_, time.monotonic() - started
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


def rail_record(path: Path) -> tuple[dict[str, tuple], dict[str, int]]:
    """The rail's record: each payment's (status, reason, amount_cents), and executions per payment id."""
    record = sqlite3.connect(path)
    try:
        payments = {row[0]: row[1:] for row in record.execute("SELECT id, status, reason, amount_cents FROM payments")}
        executions = dict(record.execute("SELECT payment_id, count(*) FROM executions GROUP BY payment_id"))
    finally:
        record.close()
    return payments, executions


async def check_execution(checks: Checks, url: str, record: Path) -> dict:
    """Every execution invariant; returns figures for the report."""
    connection = await asyncpg.connect(url)
    try:
        transfers = await connection.fetch(
            """SELECT t.id, t.status, t.failure_reason, t.amount_cents,
                      (SELECT count(*) FROM bps.account_entries AS e
                        WHERE e.transfer_id = t.id AND e.kind = 'refund') AS refunds
                 FROM bps.transfers AS t"""
        )
        parked = await connection.fetchval("SELECT count(*) FROM bps.parked_transfers")
        runs = await connection.fetchrow(
            "SELECT count(*) AS runs, coalesce(max(attempt), 0) AS max_attempt, coalesce(sum(failures), 0) AS failures "
            "FROM bps.execution_runs"
        )
    finally:
        await connection.close()
    payments, executions = rail_record(record)
    by_status: dict[str, int] = {}
    for t in transfers:
        by_status[t["status"]] = by_status.get(t["status"], 0) + 1

    checks.add(
        "every transfer reached a final status",
        len(transfers),
        [f"transfer {t['id']} is {t['status']}" for t in transfers if t["status"] in ("pending", "processing")],
    )
    checks.add(
        "zero transfers executed twice at the rail (its own record)",
        len(executions),
        [f"payment {i} executed {n} times" for i, n in executions.items() if n > 1],
    )
    bad = []
    ours = set()
    for t in transfers:
        key = str(t["id"])
        ours.add(key)
        at_rail = payments.get(key)
        if t["status"] == "executed" and (at_rail is None or at_rail[0] != "executed" or key not in executions):
            bad.append(f"transfer {key} executed here, at the rail {at_rail}")
        elif t["status"] == "executed" and at_rail[2] != t["amount_cents"]:
            bad.append(f"transfer {key}: {t['amount_cents']} cents here, {at_rail[2]} at the rail")
        elif t["status"] == "failed" and (at_rail is None or at_rail[:2] != ("failed", t["failure_reason"])):
            bad.append(f"transfer {key} failed here ({t['failure_reason']}), at the rail {at_rail}")
        elif t["status"] == "cancelled" and at_rail is not None:
            bad.append(f"transfer {key} cancelled here but it reached the rail: {at_rail}")
    bad += [f"payment {i} executed at the rail, unknown here" for i in executions if i not in ours]
    checks.add("BPS and the rail agree on every transfer's outcome and amount", len(transfers), bad)
    checks.add(
        "every failed or cancelled transfer refunded exactly once, nothing else refunded",
        len(transfers),
        [
            f"transfer {t['id']} ({t['status']}) refunded {t['refunds']} times"
            for t in transfers
            if t["refunds"] != (1 if t["status"] in ("failed", "cancelled") else 0)
        ],
    )
    checks.expect("no run parked (the rail always came back)", parked == 0, f"{parked} transfers parked")
    return {"transfers by status": by_status, "runs": dict(runs), "rail payments": len(payments)}
