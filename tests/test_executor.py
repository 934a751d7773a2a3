"""The executor against the simulated rail, in a database of this module's own: every due transfer reaches a
final status, executed at the rail at most once whatever fails (a crashed executor, a rail that executes
and does not answer, a rail that refuses to work), failures refunded exactly once, several executors
sharing the work. The rail's own record is the witness for every execution."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, migrated_database, random_iban

from service import db, rail_simulator
from service.executor import Executor
from service.metrics import ExecutorMetrics
from service.rail import HttpRail

VALID = ("DE89370400440532013000", "COBADEFFXXX")  # executed
BAD_IBAN = ("f", "COBADEFFXXX")  # AC01, as the demo request's placeholder IBAN
BAD_BIC = ("DE89370400440532013000", "e")  # RC01
FINAL = ("executed", "failed", "cancelled")
REQUESTS = itertools.count()  # makes every payload unique: identical ones would be duplicates


@pytest.fixture(scope="module")
async def url() -> AsyncIterator[str]:
    async with migrated_database("bps_executor_test") as url:
        yield url


@pytest.fixture(scope="module")
async def owner(url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=8)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def executor_pool(url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.connection_pool(await db.login_url(url, "executor"), 8, 60_000, "bps-executor-test")
    yield pool
    await pool.close()


@pytest.fixture
async def rail(aiohttp_server, tmp_path):
    """The simulated rail on a port of its own; `rail.app[rail_simulator.FAULTS]` changes its faults."""
    settings = rail_simulator.Settings(record=tmp_path / "rail.sqlite3", latency_ms=0)
    server = await aiohttp_server(rail_simulator.create_app(settings))
    server.record = settings.record
    return server


async def account(owner: asyncpg.Pool, balance: int = 10_000_000) -> tuple[int, str]:
    """A new account: its id and IBAN."""
    iban = random_iban()
    account_id = await owner.fetchval(
        "SELECT bps.create_bank_account('Exec Corp', $1, 'EXECFRPPXXX', $2)", iban, balance
    )
    return account_id, iban


@contextlib.asynccontextmanager
async def execution_settings(owner: asyncpg.Pool, max_attempts: int, retry_cap: str) -> AsyncIterator[None]:
    """bps.settings' execution rules for the block, then the defaults again."""
    await owner.execute(
        "UPDATE bps.settings SET execution_max_attempts = $1, execution_retry_cap = $2::text::interval",
        max_attempts,
        retry_cap,
    )
    try:
        yield
    finally:
        await owner.execute("UPDATE bps.settings SET execution_max_attempts = 10, execution_retry_cap = '5 minutes'")


async def accept(
    owner: asyncpg.Pool, account_iban: str, counterparties: list[tuple[str, str]], cents: int = 100
) -> int:
    """A bulk transfer of one transfer per counterparty, accepted as the owner; its id."""
    payload = {
        "organization_iban": account_iban,
        "organization_bic": "EXECFRPPXXX",
        "credit_transfers": [
            {
                "amount": f"{cents // 100}.{cents % 100:02d}",
                "counterparty_name": "Bip Bip",
                "counterparty_iban": iban,
                "counterparty_bic": bic,
                "description": f"executor test {next(REQUESTS)}.{i}",
            }
            for i, (iban, bic) in enumerate(counterparties)
        ],
    }
    status, body = await owner.fetchrow("SELECT * FROM bps.bulk_transfer($1::jsonb)", json.dumps(payload))
    assert status == 201, body
    return json.loads(body)["bulk_transfer_id"]


@contextlib.asynccontextmanager
async def executors(pool, rail_server, count: int = 1, **options) -> AsyncIterator[list[Executor]]:
    """`count` executors working in this process until the block ends."""
    options = {"batch": 50, "concurrency": 2, "lease_seconds": 5.0, "idle_poll_max_seconds": 0.05, **options}
    timeout = options.pop("rail_timeout", 2.0)
    rails = [HttpRail(str(rail_server.make_url("/")), timeout) for _ in range(count)]
    running = [Executor(pool, r, name=f"test-{i}", **options) for i, r in enumerate(rails)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(e.run(stop)) for e in running]
    try:
        yield running
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for r in rails:
            await r.close()


async def until(condition, failure: str, within: float = 30) -> None:
    """Waits (bounded) until the coroutine function `condition` answers something true."""
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(failure)
        await asyncio.sleep(0.05)


async def until_final(owner: asyncpg.Pool, bulk_ids: list[int], within: float = 30) -> None:
    """Waits (bounded) until every transfer of these bulk transfers has a final status."""

    async def final() -> bool:
        return 0 == await owner.fetchval(
            "SELECT sum(pending_count + processing_count) FROM bps.bulk_transfers WHERE id = ANY ($1)", bulk_ids
        )

    await until(final, f"transfers still not final after {within} s", within)


async def statuses(owner: asyncpg.Pool, bulk_id: int) -> list[tuple[str, str | None]]:
    rows = await owner.fetch("SELECT status, failure_reason FROM bps.transfers_of($1)", bulk_id)
    return [(r["status"], r["failure_reason"]) for r in rows]


def executions(rail_server) -> dict[str, int]:
    record = sqlite3.connect(rail_server.record)
    try:
        return dict(record.execute("SELECT payment_id, count(*) FROM executions GROUP BY payment_id"))
    finally:
        record.close()


async def assert_consistent(owner: asyncpg.Pool, rail_server, bulk_ids: list[int]) -> None:
    """The invariants: each executed transfer executed at the rail exactly once and nothing else executed there;
    each failed transfer refunded exactly once, with the rail's reason; every balance equals its journal."""
    rows = await owner.fetch(
        """SELECT t.id, t.status, t.failure_reason, t.amount_cents,
                  (SELECT count(*) FROM bps.account_entries AS e
                    WHERE e.transfer_id = t.id AND e.kind = 'refund') AS refunds
             FROM bps.transfers AS t WHERE t.bulk_transfer_id = ANY ($1)""",
        bulk_ids,
    )
    executed_at_rail = executions(rail_server)
    assert all(n == 1 for n in executed_at_rail.values()), executed_at_rail
    ours = {str(r["id"]) for r in rows}
    assert {str(r["id"]) for r in rows if r["status"] == "executed"} == set(executed_at_rail) & ours
    for r in rows:
        assert r["refunds"] == (1 if r["status"] in ("failed", "cancelled") else 0), dict(r)
    assert await owner.fetchval("SELECT bool_and(consistent) FROM bps.account_audit")


async def test_every_due_transfer_reaches_the_outcome_the_rail_decides(owner, executor_pool, rail):
    account_id, iban = await account(owner)
    bulk = await accept(owner, iban, [VALID, BAD_IBAN, BAD_BIC, VALID])
    before = await owner.fetchval("SELECT balance_cents FROM bps.bank_accounts WHERE id = $1", account_id)

    async with executors(executor_pool, rail):
        await until_final(owner, [bulk])

    assert await statuses(owner, bulk) == [
        ("executed", None),
        ("failed", "AC01"),
        ("failed", "RC01"),
        ("executed", None),
    ]
    assert await owner.fetchval("SELECT status FROM bps.bulk_transfers WHERE id = $1", bulk) == "partially_completed"
    after = await owner.fetchval("SELECT balance_cents FROM bps.bank_accounts WHERE id = $1", account_id)
    assert after == before + 200  # the two refused transfers came back
    await assert_consistent(owner, rail, [bulk])


async def test_an_executor_counts_what_the_rail_decided_on_its_metrics_port(owner, executor_pool, rail):
    _, iban = await account(owner)
    bulk = await accept(owner, iban, [VALID, BAD_IBAN, BAD_BIC, VALID])
    metrics, port = ExecutorMetrics(), free_port()
    metrics.serve("127.0.0.1", port)
    async with executors(executor_pool, rail, metrics=metrics) as running:
        await until_final(owner, [bulk])
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def total(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))

    # What this executor settled, outcome by outcome (other tests' transfers may be among them).
    assert total("bps_executor_outcomes_total") == running[0].settled >= 4
    assert total("bps_executor_outcomes_total", status="executed") >= 2
    assert total("bps_executor_outcomes_total", status="failed", reason="AC01") >= 1
    assert total("bps_executor_outcomes_total", status="failed", reason="RC01") >= 1
    assert total("bps_executor_claimed_transfers_total") >= running[0].settled
    assert total("bps_executor_rail_calls_total", operation="submit", result="ok") >= 1
    assert total("bps_executor_rail_call_seconds_count", operation="submit") >= 1
    assert total("bps_executor_released_runs_total") == 0


async def test_a_future_requested_execution_date_waits_for_its_day(owner, executor_pool, rail):
    account_id, iban = await account(owner)
    bulk = await accept(owner, iban, [VALID])
    await owner.execute("UPDATE bps.bulk_transfers SET requested_execution_date = bps.today() + 1 WHERE id = $1", bulk)
    async with executors(executor_pool, rail) as running:
        await asyncio.sleep(0.3)
        assert await statuses(owner, bulk) == [("pending", None)]
        assert sum(e.settled for e in running) == 0
        await owner.execute("UPDATE bps.bulk_transfers SET requested_execution_date = bps.today() WHERE id = $1", bulk)
        await until_final(owner, [bulk])
    assert await statuses(owner, bulk) == [("executed", None)]


async def test_a_crashed_executors_run_is_taken_over_asking_the_rail_first(owner, executor_pool, rail):
    """An executor claims, sends to the rail, and dies before settling: once its lease runs out another one
    takes the run over, finds the outcomes at the rail, and nothing is executed twice."""
    _, iban = await account(owner)
    bulk = await accept(owner, iban, [VALID] * 5 + [BAD_IBAN])
    claimed = await executor_pool.fetch("SELECT * FROM bps_executor.claim_transfers('dying', 100, '1 second')")
    assert {r["transfer_id"] for r in claimed} >= {bulk * 100_000 + i for i in range(6)}
    dying = HttpRail(str(rail.make_url("/")), 2)
    try:
        from service.executor import payment_of

        await dying.submit([payment_of(r) for r in claimed if r["transfer_id"] // 100_000 == bulk][:3])
    finally:
        await dying.close()
    # ... and never settles. Three of its six payments reached the rail.
    async with executors(executor_pool, rail) as running:
        await until_final(owner, [bulk])
    runs = await owner.fetch("SELECT attempt, executor FROM bps.execution_runs WHERE bulk_transfer_id = $1", bulk)
    assert [r["attempt"] for r in runs] == [2] and runs[0]["executor"].startswith("test-")
    assert await statuses(owner, bulk) == [("executed", None)] * 5 + [("failed", "AC01")]
    assert sum(e.settled for e in running) == 6
    await assert_consistent(owner, rail, [bulk])


async def test_a_rail_that_executes_and_does_not_answer_executes_each_payment_once(owner, executor_pool, rail):
    _, iban = await account(owner)
    bulks = [await accept(owner, iban, [VALID, VALID, BAD_BIC]) for _ in range(4)]
    faults = rail.app[rail_simulator.FAULTS]
    faults.timeout_rate, faults.hang_seconds = 1.0, 3.0
    async with (
        execution_settings(owner, 100, "200 ms"),
        executors(executor_pool, rail, rail_timeout=0.2, lease_seconds=0.5) as running,
    ):

        async def timed_out() -> bool:
            return all(e.rail_failures for e in running)

        await until(timed_out, "the rail never timed out", 10)
        faults.timeout_rate = 0.0
        await until_final(owner, bulks, within=30)
    await assert_consistent(owner, rail, bulks)


async def test_a_rail_answering_errors_is_retried_until_it_works(owner, executor_pool, rail):
    _, iban = await account(owner)
    bulks = [await accept(owner, iban, [VALID] * 3) for _ in range(3)]
    rail.app[rail_simulator.FAULTS].error_rate = 0.5
    async with execution_settings(owner, 100, "50 ms"), executors(executor_pool, rail):
        await until_final(owner, bulks, within=60)
    await assert_consistent(owner, rail, bulks)


async def test_runs_the_rail_keeps_failing_for_are_parked_for_a_dba_and_retried_by_one(owner, executor_pool, rail):
    _, iban = await account(owner)
    bulk = await accept(owner, iban, [VALID, VALID])
    rail.app[rail_simulator.FAULTS].error_rate = 1.0
    async with execution_settings(owner, 2, "100 ms"):
        async with executors(executor_pool, rail):

            async def parked() -> bool:
                return await owner.fetchval(
                    "SELECT count(*) FROM bps.parked_transfers WHERE bulk_transfer_id = $1", bulk
                )

            await until(parked, "the run was never parked", 20)
            parked = await owner.fetch("SELECT * FROM bps.parked_transfers WHERE bulk_transfer_id = $1", bulk)
            assert len(parked) == 2 and {p["failures"] for p in parked} == {2}
            assert "503" in parked[0]["last_error"]
            await asyncio.sleep(0.3)  # parked: no executor takes it, however long
            assert await statuses(owner, bulk) == [("processing", None)] * 2
            rail.app[rail_simulator.FAULTS].error_rate = 0.0
            assert await owner.fetchval("SELECT bps.retry_run($1)", parked[0]["run_id"])
            await until_final(owner, [bulk])
    assert await statuses(owner, bulk) == [("executed", None)] * 2
    await assert_consistent(owner, rail, [bulk])


async def test_several_executors_share_the_work_and_execute_each_transfer_once(owner, executor_pool, rail):
    _, iban = await account(owner, 10**12)
    bulks = [await accept(owner, iban, [VALID] * 19 + [BAD_IBAN]) for _ in range(30)]
    async with executors(executor_pool, rail, count=3, batch=25) as running:
        await until_final(owner, bulks, within=60)
    assert sum(e.settled for e in running) == 600
    assert all(e.settled > 0 for e in running), [e.settled for e in running]
    await assert_consistent(owner, rail, bulks)


async def test_cancel_racing_executors_leaves_each_transfer_cancelled_or_executed(owner, executor_pool, rail):
    account_id, iban = await account(owner, 10**12)
    bulks = [await accept(owner, iban, [VALID] * 10) for _ in range(20)]
    async with executors(executor_pool, rail, count=2, batch=7):
        answers = await asyncio.gather(
            *(owner.fetchrow("SELECT * FROM bps.cancel_bulk_transfer($1)", b) for b in bulks)
        )
        await until_final(owner, bulks)
    assert {a["status"] for a in answers} <= {200, 409}
    rows = await owner.fetch(
        "SELECT status, count(*) FROM bps.transfers WHERE bulk_transfer_id = ANY ($1) GROUP BY 1", bulks
    )
    assert {r["status"] for r in rows} <= {"executed", "cancelled"}
    assert sum(r["count"] for r in rows) == 200
    await assert_consistent(owner, rail, bulks)


async def test_the_executor_role_cannot_read_what_it_executes_except_through_its_entry_points(url, executor_pool):
    async with executor_pool.acquire() as connection:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.fetch("SELECT * FROM bps.transfers LIMIT 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.fetch("SELECT * FROM bps.claim_transfers('x', 1, '1 s')")
        nothing = "SELECT bps_executor.release_runs(ARRAY[]::bigint[], ARRAY[]::int[], 'x')"
        assert await connection.fetchval(nothing) == 0


def test_the_lease_must_outlast_the_rails_timeout():
    from service.__main__ import execute
    from service.config import Config

    config = dataclasses.replace(Config(), executor_lease_seconds=5, rail_timeout_seconds=10, database_url="x")
    with pytest.raises(SystemExit, match="LEASE"):
        asyncio.run(execute(config))
