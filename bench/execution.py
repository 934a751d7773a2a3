"""The executor's cases, in a database of their own: intake alone (many accounts, batch 1000, 16 clients), then
the same backlog settled by executors against a zero-latency simulated rail with no intake, then the intake
again with the executors running beside it. Goals: settled transfers/s >= 0.5 x the intake's, and intake
with executors running >= 0.8 x intake alone."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import asyncpg

from service import db
from service.processes import Process

from . import database
from .server import service

SETTLED_SQL = "SELECT coalesce(sum(executed_count + failed_count), 0)::bigint FROM bps.bulk_transfers"
OPEN_SQL = "SELECT coalesce(sum(pending_count + processing_count), 0)::bigint FROM bps.bulk_transfers"


class Processes:
    """The simulated rail and the executors, as `make run` starts them (a command each)."""

    def __init__(self, url: str, rail_port: int, executors: int, out: Path) -> None:
        self.url = url
        self.rail_port = rail_port
        self.executors = executors
        self.out = out
        self.running: list[Process] = []
        self.record = Path(tempfile.mkdtemp(prefix="bps-bench-rail-")) / "record.sqlite3"

    def start(self, command: str, port: int | None = None, **env: str) -> Process:
        process = Process(command, {"DATABASE_URL": self.url, **env}, port=port, log=self.out / f"{command}.log")
        self.running.append(process.start())
        return process

    async def start_all(self) -> None:
        await asyncio.to_thread(
            self.start,
            "rail-simulator",
            self.rail_port,
            BPS_RAIL_LATENCY_MS="0",
            BPS_RAIL_RECORD=str(self.record),
            BPS_LOG_LEVEL="warning",
        )
        for _ in range(self.executors):
            self.start(
                "execute",
                BPS_RAIL_URL=f"http://127.0.0.1:{self.rail_port}",
                BPS_EXECUTOR_BATCH="1000",
                BPS_EXECUTOR_CONCURRENCY="2",
                BPS_LOG_LEVEL="warning",
            )

    def pids(self) -> set[int]:
        return {pid for process in self.running for pid in process.pids()}

    def stop(self) -> None:
        for process in self.running:
            process.stop(timeout=20)
        self.record.unlink(missing_ok=True)


async def settled_per_second(url: str, seconds: float) -> tuple[float, int]:
    """Transfers settled per second over the next `seconds`, and how many were still to settle at the end."""
    connection = await asyncpg.connect(url)
    try:
        before = await connection.fetchval(SETTLED_SQL)
        started = time.monotonic()
        await asyncio.sleep(seconds)
        after = await connection.fetchval(SETTLED_SQL)
        elapsed = time.monotonic() - started
        left = await connection.fetchval(OPEN_SQL)
    finally:
        await connection.close()
    return (after - before) / elapsed, left


async def execution_cases(settings, run_case, clients, make_sampler, port: int, rail_port: int, index: int) -> dict:
    """Runs the three cases; returns their figures and the two goals."""
    from .run import Case

    url = await db.create_database(settings.admin_url, "bps_bench_exec")
    server = processes = sampler = None
    out = settings.out
    try:
        accounts = await database.prepare(url, settings.accounts, index)
        server = service(url, "127.0.0.1", port, settings.workers, settings.pool_max_size, out / "service-exec.log")
        await asyncio.to_thread(server.start)
        sampler = await make_sampler(url)
        case = Case("many", 1000, 16)
        alone = await run_case(index, case, accounts, url, server, sampler)
        processes = Processes(url, rail_port, settings.executors, out)
        await processes.start_all()
        await asyncio.sleep(settings.warmup + 1)  # the executors' connections open, their first batches go
        settle_rate, left = await settled_per_second(url, settings.seconds)
        beside = asyncio.ensure_future(settled_per_second(url, settings.seconds + settings.warmup))
        with_executors = await run_case(index + 1, case, accounts, url, server, sampler)
        settled_meanwhile, _ = await beside
    finally:
        if sampler is not None:
            await sampler.close()
        if processes is not None:
            processes.stop()
        if server is not None:
            await asyncio.to_thread(server.stop, 45)
        await db.drop_database(settings.admin_url, url)
    intake = alone["transfers_per_second"]
    return {
        "executors": settings.executors,
        "intake_alone": alone,
        "settled_per_second": round(settle_rate, 1),
        "left_to_settle": left,
        "intake_with_executors": with_executors,
        "settled_per_second_during_intake": round(settled_meanwhile, 1),
        "goals": {
            "settle": {
                "goal": "settled/s >= 0.5 x intake transfers/s (batch 1000, zero-latency rail)",
                "ratio": round(settle_rate / intake, 3) if intake else None,
                "met": bool(intake) and settle_rate / intake >= 0.5 and left > 0,
            },
            "beside": {
                "goal": "intake with executors running >= 0.8 x intake alone",
                "ratio": round(with_executors["transfers_per_second"] / intake, 3) if intake else None,
                "met": bool(intake) and with_executors["transfers_per_second"] / intake >= 0.8,
            },
        },
    }


def text(section: dict) -> str:
    alone = section["intake_alone"]["transfers_per_second"]
    beside = section["intake_with_executors"]["transfers_per_second"]
    lines = [
        f"- intake alone (many, batch 1000, 16 clients): {alone:,.0f} transfers/s",
        f"- settled by {section['executors']} executors, zero-latency rail, no intake: "
        f"{section['settled_per_second']:,.0f} transfers/s ({section['left_to_settle']:,} still to settle after)",
        f"- intake with the executors running: {beside:,.0f} transfers/s, while they settled "
        f"{section['settled_per_second_during_intake']:,.0f}/s",
    ]
    for goal in section["goals"].values():
        lines.append(f"- {goal['goal']}: {goal['ratio']}, {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)
