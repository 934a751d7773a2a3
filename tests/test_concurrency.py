"""Many clients at once: the invariants of the money and of idempotency, checked from the database afterwards.

Requests go through both doors: SQL straight to bps.bulk_transfer over the 20-connection `pool` (a DBA, or
another service process) and HTTP through the app. Where the interleaving matters, the account's row is
held (FOR NO KEY UPDATE, the lock the debit takes) until every request the door can run at once is queued
on a lock in the database; freeing it makes them race for real, without sleeps or timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest
from support import Account, balance_of, request_for, transfer

from service.config import Config

QUEUE_DEADLINE_SECONDS = 20.0

# What the HTTP layer runs, headers included, so both doors are compared on status, body and headers.
BULK_TRANSFER_SQL = (
    "SELECT r.status, r.body::text AS body, current_setting('response.headers', true) AS headers "
    "FROM bps.bulk_transfer($1::jsonb, $2) AS r"
)
QUEUED_SQL = """
    SELECT count(*) FROM pg_stat_activity
     WHERE datname = current_database() AND pid <> pg_backend_pid()
       AND wait_event_type = 'Lock' AND (query LIKE '%.bulk_transfer(%' OR query LIKE '%.bulk_transfers(%')
"""


# ---------------------------------------------------------------------------------------------------------
# The two doors


@dataclass(frozen=True)
class Outcome:
    status: int
    body: dict
    # Only the headers bps.bulk_transfer sets, names lower-cased: location, idempotent-replayed.
    headers: dict[str, str]


@dataclass(frozen=True)
class Door:
    name: str
    capacity: int  # how many requests this door runs in the database at once
    send: Callable[[dict, str | None], Awaitable[Outcome]]

    async def __call__(self, payload: dict, key: str | None = None) -> Outcome:
        return await self.send(payload, key)


def sql_door(pool: asyncpg.Pool) -> Door:
    async def send(payload: dict, key: str | None) -> Outcome:
        row = await pool.fetchrow(BULK_TRANSFER_SQL, json.dumps(payload), key)
        headers = json.loads(row["headers"]) if row["headers"] else {}
        return Outcome(row["status"], json.loads(row["body"]), {k.lower(): v for k, v in headers.items()})

    return Door("sql", pool.get_max_size(), send)


def http_door(client, config: Config) -> Door:
    paths = itertools.cycle(("/bulk_transfer", "/transfers/bulk"))  # the same endpoint under both paths

    async def send(payload: dict, key: str | None) -> Outcome:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        response = await client.post(next(paths), data=json.dumps(payload), headers=headers)
        body = await response.json(content_type=None)
        kept = {
            name.lower(): response.headers[name]
            for name in ("Location", "Idempotent-Replayed")
            if name in response.headers
        }
        return Outcome(response.status, body, kept)

    # Its group commit sends at most group_max_calls calls at once; the other requests wait in the service.
    return Door("http", min(config.group_max_calls, config.pool_max_size), send)


@pytest.fixture(params=["sql", "http"])
def door(request, pool: asyncpg.Pool) -> Door:
    if request.param == "sql":
        return sql_door(pool)
    return http_door(request.getfixturevalue("client"), request.getfixturevalue("config"))


# ---------------------------------------------------------------------------------------------------------
# Requests with their expected totals


@dataclass(frozen=True)
class Request:
    account: Account
    payload: dict
    total_cents: int
    transfer_count: int
    tag: str  # every transfer's description is f"{tag}/{position}": finds the request's rows afterwards


def wire_amount(cents: int, rng: random.Random) -> str:
    """Cents as a contract amount string, in one of the spellings the contract accepts ("14.5", "700", ...)."""
    units, rest = divmod(cents, 100)
    spellings = [f"{units}.{rest:02d}"]
    if rest % 10 == 0:
        spellings.append(f"{units}.{rest // 10}")
    if rest == 0:
        spellings.append(str(units))
    return rng.choice(spellings)


def make_request(account: Account, amounts_cents: list[int], rng: random.Random) -> Request:
    tag = secrets.token_hex(8)
    transfers = [
        transfer(wire_amount(cents, rng), description=f"{tag}/{position}")
        for position, cents in enumerate(amounts_cents)
    ]
    return Request(account, request_for(account, transfers), sum(amounts_cents), len(amounts_cents), tag)


def random_amounts(count: int, rng: random.Random) -> list[list[int]]:
    """The transfer amounts (cents) of `count` requests of 1 to 4 transfers each."""
    return [[rng.randint(1, 2500) for _ in range(rng.randint(1, 4))] for _ in range(count)]


def random_requests(account: Account, count: int, rng: random.Random) -> list[Request]:
    return [make_request(account, amounts, rng) for amounts in random_amounts(count, rng)]


# ---------------------------------------------------------------------------------------------------------
# Holding accounts until the requests are queued


class Gate:
    def __init__(self, watcher: asyncpg.Connection) -> None:
        self.watcher = watcher

    async def wait_until_queued(self, tasks: list[asyncio.Task], count: int) -> None:
        """Returns once `count` bulk_transfer calls wait on a lock; fails if one finished meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + QUEUE_DEADLINE_SECONDS
        while True:
            queued = await self.watcher.fetchval(QUEUED_SQL)
            if queued >= count:
                return
            finished = next((task for task in tasks if task.done()), None)
            if finished is not None:
                pytest.fail(f"a request completed while its account was held: {finished.result()!r}")
            if loop.time() > deadline:
                pytest.fail(f"only {queued} of {count} requests queued behind the held account")
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def holding(database_url: str, accounts: list[Account]) -> AsyncIterator[Gate]:
    """Holds the accounts' rows for the block; they are released (rolled back) when it ends."""
    holder = await asyncpg.connect(database_url)
    watcher = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        try:
            await holder.execute(
                "SELECT 1 FROM bps.bank_accounts WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
                [account.id for account in accounts],
            )
            yield Gate(watcher)
        finally:
            await transaction.rollback()
    finally:
        await watcher.close()
        await holder.close()


async def race(database_url: str, accounts: list[Account], calls: list[tuple[Door, dict, str | None]]) -> list[Outcome]:
    """Sends every call at once while the accounts are held; frees them once each door is saturated."""
    tasks: list[asyncio.Task] = []
    try:
        async with holding(database_url, accounts) as gate:
            tasks = [asyncio.create_task(door(payload, key)) for door, payload, key in calls]
            per_door: dict[str, int] = defaultdict(int)
            capacity: dict[str, int] = {}
            for door, _, _ in calls:
                per_door[door.name] += 1
                capacity[door.name] = door.capacity
            await gate.wait_until_queued(tasks, sum(min(n, capacity[name]) for name, n in per_door.items()))
    except BaseException:
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return list(await asyncio.gather(*tasks))


async def warm(pool: asyncpg.Pool) -> None:
    """Opens all of the pool's connections, so the SQL door's calls start together."""
    connections = [await pool.acquire() for _ in range(pool.get_max_size())]
    for connection in connections:
        await pool.release(connection)


# ---------------------------------------------------------------------------------------------------------
# The invariants, read from the database


async def assert_journal_consistent(pool: asyncpg.Pool, account: Account) -> list[asyncpg.Record]:
    """The audit view agrees with the balance, and the journal is one unbroken, never-negative chain."""
    audit = await pool.fetchrow("SELECT * FROM bps.account_audit WHERE bank_account_id = $1", account.id)
    assert audit["consistent"] is True, dict(audit)
    entries = await pool.fetch(
        "SELECT * FROM bps.account_entries WHERE bank_account_id = $1 ORDER BY account_version", account.id
    )
    assert [e["account_version"] for e in entries] == list(range(1, len(entries) + 1))
    for before, after in itertools.pairwise(entries):
        assert after["previous_balance_cents"] == before["balance_cents"], (dict(before), dict(after))
    assert all(e["balance_cents"] >= 0 for e in entries)
    return entries


async def assert_all_or_nothing(
    pool: asyncpg.Pool,
    account: Account,
    opening_cents: int,
    requests: list[Request],
    outcomes: list[Outcome],
    credited_cents: int = 0,
) -> int:
    """Every money invariant for one account; returns its final balance."""
    accepted: dict[str, tuple[Request, Outcome]] = {}
    rejected: list[Request] = []
    for request, outcome in zip(requests, outcomes, strict=True):
        assert request.account == account
        if outcome.status == 201:
            assert outcome.body["total_cents"] == request.total_cents, outcome
            assert outcome.body["transfer_count"] == request.transfer_count, outcome
            accepted[request.tag] = (request, outcome)
        else:
            assert outcome.status == 422, outcome
            assert outcome.body["code"] == "insufficient_funds", outcome
            assert outcome.body["required_cents"] == request.total_cents, outcome
            assert outcome.body["balance_cents"] < request.total_cents, outcome
            assert outcome.body["shortfall_cents"] == request.total_cents - outcome.body["balance_cents"]
            rejected.append(request)

    final = await balance_of(pool, account)
    assert final >= 0
    assert opening_cents + credited_cents - final == sum(r.total_cents for r, _ in accepted.values())
    if not credited_cents:
        # The balance only fell, so a request turned away for funds cannot have fitted in the final balance.
        assert all(r.total_cents > final for r in rejected), (final, [r.total_cents for r in rejected])

    bulk_rows = {
        row["id"]: row
        for row in await pool.fetch("SELECT * FROM bps.bulk_transfers WHERE bank_account_id = $1", account.id)
    }
    assert sorted(bulk_rows) == sorted(o.body["bulk_transfer_id"] for _, o in accepted.values())

    transfers_by_tag: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for row in await pool.fetch(
        "SELECT * FROM bps.transfers WHERE bank_account_id = $1 ORDER BY bulk_transfer_id, position", account.id
    ):
        transfers_by_tag[row["description"].split("/")[0]].append(row)
    # Fully out: a rejected request left no transfer behind (nor did anything unknown).
    assert set(transfers_by_tag) == set(accepted)

    for tag, (request, outcome) in accepted.items():
        bulk_id = outcome.body["bulk_transfer_id"]
        bulk = bulk_rows[bulk_id]
        assert (bulk["transfer_count"], bulk["total_cents"]) == (request.transfer_count, request.total_cents)
        rows = transfers_by_tag[tag]
        # Fully in: every transfer of the request, in one bulk transfer, at its position, for its amount.
        assert [r["bulk_transfer_id"] for r in rows] == [bulk_id] * request.transfer_count
        assert [r["description"] for r in rows] == [t["description"] for t in request.payload["credit_transfers"]]
        assert sum(r["amount_cents"] for r in rows) == request.total_cents
        assert all(r["status"] == "pending" and r["amount_cents"] > 0 for r in rows)
        assert [t["id"] for t in outcome.body["transfers"]] == [r["id"] for r in rows]

    entries = await assert_journal_consistent(pool, account)
    debits = {e["bulk_transfer_id"]: -e["amount_cents"] for e in entries if e["kind"] == "bulk_debit"}
    assert debits == {bulk_id: row["total_cents"] for bulk_id, row in bulk_rows.items()}
    assert sum(e["amount_cents"] for e in entries if e["kind"] == "credit") == credited_cents
    return final


# ---------------------------------------------------------------------------------------------------------
# (a) one hot account


async def test_hot_account_accepts_whole_requests_until_the_balance_runs_out(door, database_url, pool, make_account):
    rng = random.Random(1)
    amounts = random_amounts(40, rng)
    opening = sum(map(sum, amounts)) * 2 // 3  # the requests ask for 50% more than there is
    account = await make_account(opening)
    requests = [make_request(account, a, rng) for a in amounts]
    await warm(pool)

    outcomes = await race(database_url, [account], [(door, r.payload, None) for r in requests])

    final = await assert_all_or_nothing(pool, account, opening, requests, outcomes)
    statuses = [o.status for o in outcomes]
    assert 201 in statuses and 422 in statuses, statuses
    assert final < min(r.total_cents for r, o in zip(requests, outcomes, strict=True) if o.status == 422)


async def test_hot_account_hit_through_sql_and_http_at_once_never_overdraws(client, config, pool, make_account):
    rng = random.Random(2)
    account = await make_account(60_000)
    requests = random_requests(account, 60, rng)
    assert sum(r.total_cents for r in requests) > 60_000
    doors = itertools.cycle((sql_door(pool), http_door(client, config)))
    await warm(pool)

    outcomes = await asyncio.gather(*(door(r.payload) for door, r in zip(doors, requests, strict=False)))

    await assert_all_or_nothing(pool, account, 60_000, requests, outcomes)


async def test_top_ups_during_a_run_of_debits_are_neither_lost_nor_overdrawn(client, config, pool, make_account):
    rng = random.Random(8)
    account = await make_account(20_000)
    requests = random_requests(account, 40, rng)
    credits = [rng.randint(1, 5_000) for _ in range(10)]
    doors = itertools.cycle((sql_door(pool), http_door(client, config)))
    await warm(pool)

    debit_calls = [door(r.payload) for door, r in zip(doors, requests, strict=False)]
    credit_calls = [pool.fetchval("SELECT bps.credit_bank_account($1, $2)", account.id, c) for c in credits]
    results = await asyncio.gather(*debit_calls, *credit_calls)

    outcomes = results[: len(requests)]
    await assert_all_or_nothing(pool, account, 20_000, requests, outcomes, credited_cents=sum(credits))


# ---------------------------------------------------------------------------------------------------------
# (b) and (c) the same request many times at once


async def test_same_payload_sent_twenty_times_at_once_is_accepted_once(door, database_url, pool, make_account):
    account = await make_account(1_000_000)
    request = make_request(account, [1450, 29, 70000], random.Random(3))
    await warm(pool)

    outcomes = await race(database_url, [account], [(door, request.payload, None)] * 20)

    created = [o for o in outcomes if o.status == 201]
    assert len(created) == 1, [o.status for o in outcomes]
    bulk_id = created[0].body["bulk_transfer_id"]
    duplicates = [o for o in outcomes if o.status != 201]
    assert len(duplicates) == 19
    for outcome in duplicates:
        assert outcome.status == 409, outcome
        assert outcome.body["code"] == "duplicate_request", outcome
        assert outcome.body["bulk_transfer_id"] == bulk_id, outcome
    await assert_all_or_nothing(pool, account, 1_000_000, [request], [created[0]])
    assert await balance_of(pool, account) == 1_000_000 - 71479


async def test_same_idempotency_key_sent_twenty_times_at_once_executes_once(door, database_url, pool, make_account):
    account = await make_account(1_000_000)
    request = make_request(account, [802499, 1999], random.Random(4))
    key = f"retry-{secrets.token_hex(8)}"
    await warm(pool)

    outcomes = await race(database_url, [account], [(door, request.payload, key)] * 20)

    assert {o.status for o in outcomes} == {201}, [(o.status, o.body) for o in outcomes]
    first_body = outcomes[0].body
    assert all(o.body == first_body for o in outcomes), [o.body for o in outcomes]
    replayed = [o for o in outcomes if o.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 19, [o.headers for o in outcomes]
    assert {o.headers.get("location") for o in outcomes} == {f"/bulk_transfers/{first_body['bulk_transfer_id']}"}
    rows = await pool.fetch("SELECT * FROM bps.bulk_transfers WHERE bank_account_id = $1", account.id)
    assert [(r["id"], r["idempotency_key"]) for r in rows] == [(first_body["bulk_transfer_id"], key)]
    original = next(o for o in outcomes if o not in replayed)
    await assert_all_or_nothing(pool, account, 1_000_000, [request], [original])
    assert await balance_of(pool, account) == 1_000_000 - 804498


async def test_one_idempotency_key_with_two_payloads_at_once_executes_one_of_them(
    door, database_url, pool, make_account
):
    account = await make_account(1_000_000)
    rng = random.Random(5)
    first, second = make_request(account, [1000], rng), make_request(account, [2000, 3000], rng)
    key = f"shared-{secrets.token_hex(8)}"
    await warm(pool)

    calls = [(door, (first if i % 2 else second).payload, key) for i in range(20)]
    outcomes = await race(database_url, [account], calls)

    created = {o.body["bulk_transfer_id"] for o in outcomes if o.status == 201}
    assert len(created) == 1, [(o.status, o.body) for o in outcomes]
    (bulk_id,) = created
    description = await pool.fetchval("SELECT description FROM bps.transfers WHERE bulk_transfer_id = $1", bulk_id)
    winner_tag = description.split("/")[0]
    winner = first if first.tag == winner_tag else second
    for (_, payload, _), outcome in zip(calls, outcomes, strict=True):
        if payload is winner.payload:
            assert outcome.status == 201 and outcome.body["bulk_transfer_id"] == bulk_id, outcome
        else:
            assert outcome.status == 422 and outcome.body["code"] == "idempotency_key_reused", outcome
    original = next(o for o in outcomes if o.status == 201 and "idempotent-replayed" not in o.headers)
    await assert_all_or_nothing(pool, account, 1_000_000, [winner], [original])


async def test_same_idempotency_key_sent_twenty_times_to_a_short_account_stores_one_denial(door, pool, make_account):
    account = await make_account(1_000)
    request = make_request(account, [1_001], random.Random(9))
    key = f"short-{secrets.token_hex(8)}"
    await warm(pool)

    outcomes = await asyncio.gather(*(door(request.payload, key) for _ in range(20)))

    assert {(o.status, o.body["code"]) for o in outcomes} == {(422, "insufficient_funds")}
    assert all(o.body == outcomes[0].body for o in outcomes), [o.body for o in outcomes]
    replayed = [o for o in outcomes if o.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 19, [o.headers for o in outcomes]
    await assert_all_or_nothing(pool, account, 1_000, [request], [outcomes[0]])
    assert await balance_of(pool, account) == 1_000


# ---------------------------------------------------------------------------------------------------------
# (d) many accounts at once


async def test_many_accounts_at_once_each_loses_exactly_what_it_accepted(
    client, config, database_url, pool, make_account
):
    rng = random.Random(6)
    amounts_per_account = [random_amounts(10, rng) for _ in range(8)]
    # Each request fits the opening balance on its own (so it reaches the held lock); together they do not.
    openings = [max(max(map(sum, amounts)), sum(map(sum, amounts)) * 2 // 3) for amounts in amounts_per_account]
    accounts = [await make_account(opening) for opening in openings]
    requests = [
        make_request(account, a, rng)
        for account, amounts in zip(accounts, amounts_per_account, strict=True)
        for a in amounts
    ]
    rng.shuffle(requests)
    doors = [sql_door(pool), http_door(client, config)]
    calls = [(doors[i % 2], r.payload, None) for i, r in enumerate(requests)]
    await warm(pool)

    outcomes = await race(database_url, accounts, calls)

    by_account: dict[int, list[tuple[Request, Outcome]]] = defaultdict(list)
    for request, outcome in zip(requests, outcomes, strict=True):
        by_account[request.account.id].append((request, outcome))
    spent = 0
    for account, opening in zip(accounts, openings, strict=True):
        pairs = by_account[account.id]
        final = await assert_all_or_nothing(pool, account, opening, [r for r, _ in pairs], [o for _, o in pairs])
        spent += opening - final
    transferred = await pool.fetchval(
        "SELECT sum(amount_cents) FROM bps.transfers WHERE bank_account_id = ANY($1::bigint[])",
        [a.id for a in accounts],
    )
    assert transferred == spent
    assert 422 in {o.status for o in outcomes}


# ---------------------------------------------------------------------------------------------------------
# (e) draining an account to exactly zero


async def test_concurrent_requests_that_together_spend_the_whole_balance_all_succeed(
    door, database_url, pool, make_account
):
    rng = random.Random(7)
    amounts = random_amounts(20, rng)
    opening = sum(map(sum, amounts))
    account = await make_account(opening)
    requests = [make_request(account, a, rng) for a in amounts]
    await warm(pool)

    outcomes = await race(database_url, [account], [(door, r.payload, None) for r in requests])

    assert [o.status for o in outcomes] == [201] * 20, [(o.status, o.body) for o in outcomes]
    assert await assert_all_or_nothing(pool, account, opening, requests, outcomes) == 0
    one_cent_more = await door(make_request(account, [1], rng).payload)
    assert one_cent_more.status == 422, one_cent_more
    assert one_cent_more.body["code"] == "insufficient_funds"
    assert (one_cent_more.body["balance_cents"], one_cent_more.body["shortfall_cents"]) == (0, 1)
    assert await balance_of(pool, account) == 0


async def test_money_spent_while_a_request_was_writing_denies_it_whole_on_the_balance_under_the_lock(
    database_url, pool, make_account
):
    """The lost race of sql/04_bulk_transfer.sql, made to happen: a request passes the lock-free pre-check
    and writes its rows, then a concurrent request's debit commits first. Its own debit then finds too little:
    422 with the figures decided on under the account's lock, and none of its rows left."""
    account = await make_account(10_000)
    spend = request_for(account, [transfer("70.00")])
    late = request_for(account, [transfer("40.00"), transfer("10.00")])  # fits 100.00, not the 30.00 left
    spender = await asyncpg.connect(database_url)
    watcher = await asyncpg.connect(database_url)
    try:
        transaction = spender.transaction()
        await transaction.start()
        spent = await spender.fetchrow("SELECT * FROM bps.bulk_transfer($1::jsonb)", json.dumps(spend))
        assert spent["status"] == 201  # its debit holds the account's row until the commit
        call = asyncio.create_task(pool.fetchrow("SELECT * FROM bps.bulk_transfer($1::jsonb)", json.dumps(late)))
        await Gate(watcher).wait_until_queued([call], 1)
        await transaction.commit()
        outcome = await call
    finally:
        await watcher.close()
        await spender.close()
    body = json.loads(outcome["body"])
    assert (outcome["status"], body["code"]) == (422, "insufficient_funds")
    assert (body["balance_cents"], body["required_cents"], body["shortfall_cents"]) == (3_000, 5_000, 2_000)
    counts = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM bps.bulk_transfers WHERE bank_account_id = $1) AS bulk_transfers,
                  (SELECT count(*) FROM bps.transfers WHERE bank_account_id = $1) AS transfers,
                  (SELECT consistent FROM bps.account_audit WHERE bank_account_id = $1) AS consistent""",
        account.id,
    )
    assert dict(counts) == {"bulk_transfers": 1, "transfers": 1, "consistent": True}
    assert await balance_of(pool, account) == 3_000
