"""The group commit of a running service (one worker, one connection): requests that arrive while its call is in
flight go together in its next call, each answered as if alone; a body PostgreSQL cannot parse sends that
group again one request at a time, and only that request is refused."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from support import database_fixtures, request_for, service_process, transfer
from test_metrics import scrape, value

database_url, service_url, pool, session_key = database_fixtures("module", "bps_intake_test")
POLL_SECONDS = 0.05
POLLS = 200  # 10 s


@pytest.fixture(scope="module")
def service(database_url: str):
    process = service_process(
        database_url, BPS_WORKERS="1", BPS_POOL_MIN_SIZE="1", BPS_POOL_MAX_SIZE="1", BPS_ACCESS_LOG="0"
    )
    process.start()
    yield process
    process.stop()


async def post(session: aiohttp.ClientSession, port: int, key: str, body: str) -> int:
    async with session.post(
        f"http://127.0.0.1:{port}/bulk_transfer",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    ) as response:
        await response.read()
        return response.status


async def until(condition, what: str) -> None:
    for _ in range(POLLS):
        if await condition():
            return
        await asyncio.sleep(POLL_SECONDS)
    pytest.fail(f"never: {what}")


async def test_requests_queued_behind_a_call_go_together_and_a_bad_body_fails_only_itself(
    service, make_account, session_key, pool
) -> None:
    account = await make_account(1_000_000)
    before = await scrape(service.port)
    good = [json.dumps(request_for(account, [transfer(f"1.{i:02d}")])) for i in range(26)]
    bad = ['{"organization_iban": "x", "credit_transfers": [1e999999]}', '{"a": "\\u0000"}', "[1, 2"]
    async with aiohttp.ClientSession() as session:
        statuses = await race(session, service.port, session_key.key, pool, account, good[0], [*good[1:], *bad])
    after = await scrape(service.port)

    def delta(name: str) -> float:
        return value(after, name) - value(before, name)

    assert statuses == [201] * len(good) + [400] * len(bad)
    assert delta("bps_bulk_transfer_call_requests_count") == 2  # the first alone, then all the others at once
    assert delta("bps_bulk_transfer_call_requests_sum") == len(good) + len(bad)
    assert delta("bps_bulk_transfer_group_retries_total") == 1
    rows = await pool.fetchval("SELECT count(*) FROM bps.bulk_transfers WHERE bank_account_id = $1", account.id)
    balance = await pool.fetchval("SELECT balance_cents FROM bps.bank_accounts WHERE id = $1", account.id)
    assert rows == len(good)
    assert balance == 1_000_000 - sum(100 + i for i in range(26))


async def race(session, port: int, key: str, pool, account, first_body: str, bodies: list[str]) -> list[int]:
    """Sends first_body while the account is held, so that its call waits at the debit; then the others, which
    queue behind it; then lets the account go. The statuses, in the order sent."""
    async with pool.acquire() as holder, holder.transaction():
        # The account's row held: the first request's call waits at its debit, the worker's one connection busy.
        await holder.execute("SELECT 1 FROM bps.bank_accounts WHERE id = $1 FOR UPDATE", account.id)
        first = asyncio.create_task(post(session, port, key, first_body))

        async def first_waits() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%bps_api.bulk_transfers(%' AND datname = current_database()"
                )
            )

        await until(first_waits, "the first call waits for the account")
        rest = [asyncio.create_task(post(session, port, key, body)) for body in bodies]

        async def all_queued() -> bool:
            return value(await scrape(port), "bps_bulk_transfer_queued_requests") == len(rest)

        await until(all_queued, "every other request queued")
    return [await first, *await asyncio.gather(*rest)]


async def test_an_idle_service_sends_a_request_at_once_alone(service, make_account, session_key) -> None:
    account = await make_account(1_000_000)
    before = await scrape(service.port)
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            body = json.dumps(request_for(account, [transfer(f"2.{i:02d}")]))
            assert await post(session, service.port, session_key.key, body) == 201
    after = await scrape(service.port)
    assert (
        value(after, "bps_bulk_transfer_call_requests_count") - value(before, "bps_bulk_transfer_call_requests_count")
        == 3
    )
    assert (
        value(after, "bps_bulk_transfer_call_requests_bucket", le="1.0")
        - value(before, "bps_bulk_transfer_call_requests_bucket", le="1.0")
        == 3
    )
