"""The benchmark's database: a fresh one (or BPS_BENCH_URL), migrated, with accounts and the floor's table;
a sampler of what its backends wait on; and a per-statement breakdown of bps.bulk_transfer (auto_explain)."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

import asyncpg

from service import db
from service.app import BULK_TRANSFER_SQL

from . import system
from .load import FLOOR_SERVER_SETTINGS, FLOOR_SQL, FLOOR_TABLE
from .payloads import ORGANIZATION_BIC, ORGANIZATION_NAME, Template, account_iban

# Where fresh databases are made unless BPS_BENCH_ADMIN_URL says otherwise.
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BALANCE_CENTS = 10**14  # no request of the run can exhaust it: every accepted request is a 201


async def prepare(url: str, accounts: int, run_tag: int) -> dict:
    """Migrates, (re)creates the floor's table and opens `accounts` + 2 accounts for this run.
    Returns {"hot": (id, iban, key), "explain": (id, iban, key), "many": [(id, iban, key), ...]}."""
    await db.migrate(url)
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"""
            CREATE SCHEMA IF NOT EXISTS bench;
            DROP TABLE IF EXISTS {FLOOR_TABLE};
            -- bps.transfers' columns and defaults, an identity primary key (the floor's inserts name no id)
            -- and nothing else.
            CREATE TABLE {FLOOR_TABLE} (LIKE bps.transfers INCLUDING DEFAULTS);
            ALTER TABLE {FLOOR_TABLE} ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (CACHE 1000),
                                      ADD PRIMARY KEY (id);
        """)
        # Each account with a key of its own, as each customer has.
        rows = await connection.fetch(
            "SELECT i, a.id, bps.create_api_key(ARRAY[a.id], 'bench') AS key "
            "FROM generate_series(0, $5 - 1) AS i, "
            "LATERAL (SELECT bps.create_bank_account($1, $2 || lpad(i::text, 17, '0'), $3, $4) AS id) AS a "
            "ORDER BY i",
            ORGANIZATION_NAME,
            f"FR76{run_tag:06d}",
            ORGANIZATION_BIC,
            BALANCE_CENTS,
            accounts + 2,
        )
        await connection.execute("ANALYZE")
    finally:
        await connection.close()
    opened = [(row["id"], account_iban(run_tag, row["i"]), row["key"]) for row in rows]
    return {"hot": opened[0], "explain": opened[1], "many": opened[2:]}


async def autovacuum_stand_in(url: str) -> None:
    """What autovacuum would have done by now, run between cases (outside every measured window): fresh
    statistics for the growing tables, which also invalidates every backend's cached plans, and a vacuum of
    the accounts table whose hot row is updated by every request. Without it, on a server with autovacuum
    off, plans cached while the tables were empty (a foreign-key check's sequential scan) stay forever."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            f"ANALYZE bps.bank_accounts, bps.bulk_transfers, bps.transfers, bps.account_entries, {FLOOR_TABLE}"
        )
        await connection.execute("VACUUM bps.bank_accounts")
    finally:
        await connection.close()


async def server_facts(url: str) -> dict:
    connection = await asyncpg.connect(url)
    try:
        facts = {"version": await connection.fetchval("SELECT version()")}
        for setting in (
            "shared_buffers",
            "synchronous_commit",
            "wal_sync_method",
            "max_wal_size",
            "checkpoint_timeout",
            "autovacuum",
            "max_connections",
            "shared_preload_libraries",
        ):
            facts[setting] = await connection.fetchval(f"SHOW {setting}")
        return facts
    finally:
        await connection.close()


async def table_sizes(url: str) -> dict:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT relname, n_live_tup AS rows, pg_total_relation_size(relid) AS bytes "
            "FROM pg_stat_user_tables WHERE schemaname IN ('bps', 'bench') ORDER BY bytes DESC"
        )
        return {row["relname"]: {"rows": row["rows"], "bytes": row["bytes"]} for row in rows}
    finally:
        await connection.close()


class WaitSampler:
    """Samples pg_stat_activity for this database every `interval` seconds during a case: how many backends
    were active, and on what they waited ('CPU' when on none). Cheap: one small query per sample."""

    QUERY = (
        "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS wait, count(*)::int AS n "
        "FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
        "AND pid <> pg_backend_pid() GROUP BY 1"
    )

    def __init__(self, url: str, interval: float = 0.1) -> None:
        self.url = url
        self.interval = interval
        self.connection: asyncpg.Connection | None = None

    async def open(self) -> None:
        self.connection = await asyncpg.connect(self.url, server_settings={"application_name": "bps-bench-sampler"})

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def sample(self, start_at: float, until: float) -> dict:
        """Average number of active backends per wait, between the two monotonic instants."""
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        totals: Counter = Counter()
        samples = 0
        while time.monotonic() < until:
            for row in await self.connection.fetch(self.QUERY):
                totals[row["wait"]] += row["n"]
            samples += 1
            await asyncio.sleep(self.interval)
        return {wait: round(n / max(samples, 1), 2) for wait, n in totals.most_common()}


DURATION = re.compile(r"duration: ([0-9.]+) ms")
TRIGGER = re.compile(r"^Trigger (.+): time=([0-9.]+) calls=([0-9]+)", re.MULTILINE)
HELPERS_SQL = (
    "SELECT schemaname || '.' || funcname AS function, calls, self_time, total_time FROM pg_stat_xact_user_functions"
)


async def function_breakdown(url: str, account: tuple[int, str, str], batches: list[int], counter_base: int) -> dict:
    """For each batch size: plain warm calls of bps.bulk_transfer and of the floor's insert of the same body
    (median wall time, and the backend's CPU time per call when its /proc entry is readable), then one call
    with auto_explain logging every statement inside the function (EXPLAIN ANALYZE of each, triggers
    included: instrumented, so slower than plain) and the calls of helper functions PostgreSQL did not
    inline. Needs a superuser (LOAD); else it is skipped."""
    connection = await asyncpg.connect(url, server_settings=FLOOR_SERVER_SETTINGS)
    logs: list[str] = []
    connection.add_log_listener(lambda _connection, message: logs.append(message.message))
    account_id, iban, key = account
    counter = counter_base
    result: dict = {}

    def body(template: Template) -> str:
        nonlocal counter
        counter += 1
        data = bytearray(template.body)
        data[template.iban_at : template.iban_at + len(iban)] = iban.encode()
        data[template.counter_at : template.counter_at + 20] = b"%020d" % counter
        return data.decode()

    async def timed(sql: str, *args) -> tuple[float, object]:
        started = time.perf_counter()
        value = await connection.fetchval(sql, *args)
        return (time.perf_counter() - started) * 1000, value

    call = BULK_TRANSFER_SQL  # exactly what the service sends, response body text included
    try:
        try:
            await connection.execute("LOAD 'auto_explain'")
        except asyncpg.PostgresError as error:
            return {"skipped": str(error)}
        await connection.execute(
            "SET auto_explain.log_min_duration = -1; SET auto_explain.log_analyze = on; "
            "SET auto_explain.log_nested_statements = on; SET auto_explain.log_triggers = on; "
            "SET client_min_messages = log; SET track_functions = 'all'"
        )
        backend = str(await connection.fetchval("SELECT pg_backend_pid()"))

        def arguments(sql: str, template: Template) -> tuple:
            text = body(template)  # takes the next counter, which the floor also uses as its bulk id
            return (key, text, None) if sql == call else (text, account_id, counter)

        async def measured(sql: str, template: Template) -> tuple[float, float | None, set]:
            """Median wall ms and the backend's CPU ms per call over enough warm calls to read /proc's ticks."""
            reps = max(5, min(300, 20_000 // template.batch))
            await timed(sql, *arguments(sql, template))
            cpu_before = system.process_cpu_seconds(backend)
            runs = [await timed(sql, *arguments(sql, template)) for _ in range(reps)]
            cpu_after = system.process_cpu_seconds(backend)
            cpu = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) * 1000 / reps
            return sorted(ms for ms, _ in runs)[reps // 2], cpu, {value for _, value in runs}

        for batch in batches:
            template = Template.build(batch)
            call_ms, call_cpu_ms, statuses = await measured(call, template)
            floor_ms, floor_cpu_ms, _ = await measured(FLOOR_SQL, template)
            async with connection.transaction():
                before = {row["function"]: row for row in await connection.fetch(HELPERS_SQL)}
                await connection.execute("SET LOCAL auto_explain.log_min_duration = 0")
                logs.clear()
                instrumented, status = await timed(call, *arguments(call, template))
                await asyncio.sleep(0.05)  # the log messages are delivered by the event loop
                plans = list(logs)
                await connection.execute("SET LOCAL auto_explain.log_min_duration = -1")
                after = await connection.fetch(HELPERS_SQL)
            await connection.execute("SET auto_explain.log_min_duration = 0")
            logs.clear()
            await connection.execute(FLOOR_SQL, *arguments(FLOOR_SQL, template))
            await asyncio.sleep(0.05)
            floor_plans = list(logs)
            await connection.execute("SET auto_explain.log_min_duration = -1")
            helpers = []
            for row in after:
                was = before.get(row["function"])
                calls = row["calls"] - (was["calls"] if was else 0)
                if calls > 0:
                    helpers.append(
                        {
                            "function": row["function"],
                            "calls": calls,
                            "total_ms": round(row["total_time"] - (was["total_time"] if was else 0), 3),
                            "self_ms": round(row["self_time"] - (was["self_time"] if was else 0), 3),
                        }
                    )
            result[str(batch)] = {
                "statuses": sorted(statuses | {status}),
                "call_ms": round(call_ms, 3),
                "call_cpu_ms": None if call_cpu_ms is None else round(call_cpu_ms, 3),
                "floor_ms": round(floor_ms, 3),
                "floor_cpu_ms": None if floor_cpu_ms is None else round(floor_cpu_ms, 3),
                "instrumented_call_ms": round(instrumented, 3),
                "statements": _statements(plans),
                "triggers": _triggers(plans),
                "helper_calls": sorted(helpers, key=lambda h: -h["total_ms"]),
                "plans": plans,
                "floor_plan": floor_plans,
            }
    finally:
        await connection.close()
    return result


def _statements(logs: list[str]) -> list[dict]:
    """Statements logged inside one call, grouped by text: how often each ran and its total duration
    (a trigger's own queries, such as foreign-key checks, are separate statements)."""
    grouped: dict[str, dict] = {}
    for message in logs:
        match = DURATION.search(message)
        if match is None:
            continue
        lines: list[str] = []
        for line in message.splitlines():
            if line.startswith("Query Text:"):
                lines = [line[len("Query Text:") :]]
            elif lines and "(cost=" in line:
                break
            elif lines:
                lines.append(line)
        query = " ".join(" ".join(lines).split())[:200]
        entry = grouped.setdefault(query, {"query": query, "calls": 0, "ms": 0.0})
        entry["calls"] += 1
        entry["ms"] = round(entry["ms"] + float(match.group(1)), 3)
    return sorted(grouped.values(), key=lambda s: -s["ms"])


def _triggers(logs: list[str]) -> list[dict]:
    """Trigger time per trigger (foreign-key checks are triggers), over the statements of one call."""
    grouped: dict[str, dict] = {}
    for message in logs:
        for name, ms, calls in TRIGGER.findall(message):
            entry = grouped.setdefault(name, {"trigger": name, "calls": 0, "ms": 0.0})
            entry["calls"] += int(calls)
            entry["ms"] = round(entry["ms"] + float(ms), 3)
    return sorted(grouped.values(), key=lambda t: -t["ms"])
