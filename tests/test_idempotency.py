"""CONTRACT section 3: duplicate payloads without a key (409), and Idempotency-Key replays."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections import Counter

import pytest
from support import balance_of, request_for, transfer

KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


async def rows_of(pool, account) -> dict:
    """What a request can change for an account: balance and row counts (idempotency records included)."""
    return dict(
        await pool.fetchrow(
            """
            SELECT a.balance_cents,
                   (SELECT count(*) FROM bps.bulk_transfers b WHERE b.bank_account_id = a.id) AS bulk_transfers,
                   (SELECT count(*) FROM bps.transfers t WHERE t.bank_account_id = a.id) AS transfers,
                   (SELECT count(*) FROM bps.account_entries e WHERE e.bank_account_id = a.id) AS entries,
                   (SELECT count(*) FROM bps.idempotency_keys k WHERE k.bank_account_id = a.id) AS keys
              FROM bps.bank_accounts a WHERE a.id = $1
            """,
            account.id,
        )
    )


async def assert_problem(response, status: int, code: str) -> dict:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body = await response.json(content_type=None)
    assert body["code"] == code
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


async def created(response) -> dict:
    assert response.status == 201, await response.text()
    assert REPLAYED not in response.headers
    return await response.json()


async def wait_for_lock_waiters(pool, count: int, unless=None) -> None:
    """Waits until `count` service sessions wait for a lock (or the `unless` task has finished)."""
    for _ in range(1000):
        waiting = await pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND application_name = 'bps' AND wait_event_type = 'Lock'"""
        )
        if waiting >= count or (unless is not None and unless.done()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} requests never waited for a lock")


async def while_account_locked(pool, account, *requests):
    """Starts the requests one after the other while the account row is locked, each once the previous one
    waits (so the first is still running when the next arrives), then releases the lock; returns the answers."""
    tasks = []
    async with pool.acquire() as blocker:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM bps.bank_accounts WHERE id = $1 FOR UPDATE", account.id)
            for request in requests:
                tasks.append(asyncio.ensure_future(request()))
                await wait_for_lock_waiters(pool, len(tasks), unless=tasks[-1] if len(tasks) > 1 else None)
    return await asyncio.gather(*tasks)


def post_bytes(client, data: str, **headers):
    return client.post("/bulk_transfer", data=data.encode(), headers={"Content-Type": "application/json", **headers})


@pytest.fixture
async def dedup_window(pool):
    """Sets bps.settings.dedup_window for one test; the previous value is restored afterwards."""
    original = await pool.fetchval("SELECT dedup_window FROM bps.settings")

    async def change(interval: str) -> None:
        await pool.execute("UPDATE bps.settings SET dedup_window = $1::text::interval", interval)

    try:
        yield change
    finally:
        await pool.execute("UPDATE bps.settings SET dedup_window = $1", original)


# Without a key: payload dedup


def reordered_and_reformatted(payload: dict) -> str:
    """The same JSON value, with every object's keys reversed and different whitespace."""

    def reverse(value):
        if isinstance(value, dict):
            return {k: reverse(value[k]) for k in reversed(list(value))}
        if isinstance(value, list):
            return [reverse(v) for v in value]
        return value

    return json.dumps(reverse(payload), indent="\t", separators=(" ,  ", " :\n "))


@pytest.mark.parametrize(
    "resend",
    [
        lambda payload: json.dumps(payload),
        lambda payload: json.dumps(payload, separators=(",", ":")),
        reordered_and_reformatted,
        lambda payload: "\n  " + json.dumps(payload, indent=4, sort_keys=True) + "\r\n",
        lambda payload: json.dumps(payload, ensure_ascii=False),
    ],
    ids=["identical", "compact", "reordered_keys_and_whitespace", "sorted_and_indented", "unescaped_unicode"],
)
async def test_same_payload_again_without_key_is_409_naming_the_original(client, make_account, pool, resend):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00"), transfer("2.50", client_reference="x", description="Café/é")])
    original = await created(await post_bytes(client, json.dumps(payload)))
    before = await rows_of(pool, account)

    duplicate = await post_bytes(client, resend(payload))

    problem = await assert_problem(duplicate, 409, "duplicate_request")
    assert problem["bulk_transfer_id"] == original["bulk_transfer_id"]
    assert await rows_of(pool, account) == before
    assert before["balance_cents"] == 10_000 - 350


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p["credit_transfers"].reverse(),
        lambda p: p["credit_transfers"][0].update(amount="1.01"),
        lambda p: p["credit_transfers"][1].update(client_reference="y"),
        lambda p: p.pop("organization_name"),
    ],
    ids=["transfers_reordered", "amount_changed", "reference_changed", "name_left_out"],
)
async def test_different_payload_without_key_is_a_new_request(client, make_account, pool, change):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00"), transfer("2.50", client_reference="x")])
    await created(await client.post("/bulk_transfer", json=payload))
    change(payload)

    await created(await client.post("/bulk_transfer", json=payload))

    assert (await rows_of(pool, account))["bulk_transfers"] == 2


async def test_request_denied_for_funds_is_not_remembered(client, make_account, pool):
    account = await make_account(100)
    payload = request_for(account, [transfer("5.00")])
    await assert_problem(await client.post("/bulk_transfer", json=payload), 422, "insufficient_funds")

    await pool.execute("SELECT bps.credit_bank_account($1, $2)", account.id, 1_000)
    await created(await client.post("/bulk_transfer", json=payload))

    assert await balance_of(pool, account) == 1_100 - 500


async def test_invalid_request_is_not_remembered(client, make_account, pool):
    account = await make_account(1_000)
    payload = request_for(account, [transfer("5.00")], organization_name="Wrong Corp")
    await assert_problem(await client.post("/bulk_transfer", json=payload), 422, "validation_failed")
    await assert_problem(await client.post("/bulk_transfer", json=payload), 422, "validation_failed")


async def test_payload_dedup_is_per_account(client, make_account, pool):
    first = await make_account(10_000)
    second = await make_account(10_000)
    transfers = [transfer("1.00")]

    await created(await client.post("/bulk_transfer", json=request_for(first, transfers)))
    await created(await client.post("/bulk_transfer", json=request_for(second, transfers)))

    assert await balance_of(pool, first) == await balance_of(pool, second) == 9_900


async def test_dedup_window_is_configurable(client, make_account, pool, dedup_window):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    await dedup_window("0 seconds")

    await created(await client.post("/bulk_transfer", json=payload))
    await created(await client.post("/bulk_transfer", json=payload))

    assert await balance_of(pool, account) == 9_800


@pytest.mark.parametrize(
    ("age", "status"),
    [("23 hours 59 minutes", 409), ("24 hours 1 minute", 201)],
    ids=["inside_default_window", "after_default_window"],
)
async def test_default_dedup_window_is_24_hours(client, make_account, pool, age, status):
    assert await pool.fetchval("SELECT dedup_window FROM bps.settings") == datetime.timedelta(hours=24)
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    await created(await client.post("/bulk_transfer", json=payload))
    await pool.execute(
        "UPDATE bps.bulk_transfers SET created_at = now() - $2::text::interval WHERE bank_account_id = $1",
        account.id,
        age,
    )

    response = await client.post("/bulk_transfer", json=payload)

    assert response.status == status, await response.text()


async def test_concurrent_identical_payloads_without_key_are_accepted_once(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])

    responses = await asyncio.gather(*(client.post("/bulk_transfer", json=payload) for _ in range(12)))

    assert Counter(r.status for r in responses) == {201: 1, 409: 11}
    accepted = next(r for r in responses if r.status == 201)
    original_id = (await accepted.json())["bulk_transfer_id"]
    for response in responses:
        if response.status == 409:
            assert (await assert_problem(response, 409, "duplicate_request"))["bulk_transfer_id"] == original_id
    assert await balance_of(pool, account) == 9_900


async def test_identical_payload_arriving_while_the_first_runs_is_409_once_it_commits(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])

    first, second = await while_account_locked(
        pool,
        account,
        lambda: client.post("/bulk_transfer", json=payload),
        lambda: client.post("/bulk_transfer", json=payload),
    )

    original = await created(first)
    problem = await assert_problem(second, 409, "duplicate_request")
    assert problem["bulk_transfer_id"] == original["bulk_transfer_id"]
    assert await balance_of(pool, account) == 9_900


# With an Idempotency-Key


async def test_retry_with_same_key_replays_the_201_and_changes_nothing(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00"), transfer("2.00")])
    first = await client.post("/bulk_transfer", json=payload, headers={KEY: "order-42"})
    first_body = await created(first)
    before = await rows_of(pool, account)

    for _ in range(2):
        retry = await post_bytes(client, reordered_and_reformatted(payload), **{KEY: "order-42"})
        assert retry.status == 201
        assert retry.headers[REPLAYED] == "true"
        assert retry.content_type == "application/json"
        assert await retry.json() == first_body
        assert retry.headers["Location"] == first.headers["Location"]
    assert await rows_of(pool, account) == before
    assert before["balance_cents"] == 9_700


async def test_stored_insufficient_funds_replays_even_after_a_top_up(client, make_account, pool):
    account = await make_account(100)
    payload = request_for(account, [transfer("5.00")])
    first = await client.post("/bulk_transfer", json=payload, headers={KEY: "k-funds"})
    first_body = await assert_problem(first, 422, "insufficient_funds")
    assert REPLAYED not in first.headers
    await pool.execute("SELECT bps.credit_bank_account($1, $2)", account.id, 1_000)
    before = await rows_of(pool, account)

    retry = await client.post("/bulk_transfer", json=payload, headers={KEY: "k-funds"})

    assert await assert_problem(retry, 422, "insufficient_funds") == first_body
    assert retry.headers[REPLAYED] == "true"
    assert await rows_of(pool, account) == before
    # A new key is a new request, and now the money is there.
    await created(await client.post("/bulk_transfer", json=payload, headers={KEY: "k-funds-2"}))
    assert await balance_of(pool, account) == 1_100 - 500


async def test_same_key_with_a_different_payload_is_422_idempotency_key_reused(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    first_body = await created(await client.post("/bulk_transfer", json=payload, headers={KEY: "k-reuse"}))
    before = await rows_of(pool, account)

    changed = request_for(account, [transfer("1.01")])
    await assert_problem(
        await client.post("/bulk_transfer", json=changed, headers={KEY: "k-reuse"}), 422, "idempotency_key_reused"
    )
    assert await rows_of(pool, account) == before

    retry = await client.post("/bulk_transfer", json=payload, headers={KEY: "k-reuse"})
    assert retry.status == 201
    assert await retry.json() == first_body


async def test_key_is_scoped_to_the_account(client, make_account, pool):
    first = await make_account(10_000)
    second = await make_account(10_000)

    await created(await client.post("/bulk_transfer", json=request_for(first, [transfer("1.00")]), headers={KEY: "k"}))
    await created(await client.post("/bulk_transfer", json=request_for(second, [transfer("2.00")]), headers={KEY: "k"}))

    assert await balance_of(pool, first) == 9_900
    assert await balance_of(pool, second) == 9_800


async def test_with_keys_the_payload_dedup_does_not_apply(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])

    one = await created(await client.post("/bulk_transfer", json=payload, headers={KEY: "k-one"}))
    two = await created(await client.post("/bulk_transfer", json=payload, headers={KEY: "k-two"}))

    assert one["bulk_transfer_id"] != two["bulk_transfer_id"]
    assert await balance_of(pool, account) == 9_800


@pytest.mark.parametrize("key", ["k", "K" * 255, "550e8400-e29b-41d4-a716-446655440000", "order/42 retry:1"])
async def test_key_of_1_to_255_characters_is_accepted_and_replayed(client, make_account, pool, key):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    headers = {KEY: key}

    first_body = await created(await client.post("/bulk_transfer", json=payload, headers=headers))
    retry = await client.post("/bulk_transfer", json=payload, headers=headers)

    assert retry.status == 201
    assert retry.headers[REPLAYED] == "true"
    assert await retry.json() == first_body
    assert await balance_of(pool, account) == 9_900


@pytest.mark.parametrize("key", ["", "K" * 256, "K" * 1000], ids=["empty", "256_chars", "1000_chars"])
async def test_key_outside_1_to_255_characters_is_422_and_changes_nothing(client, make_account, pool, key):
    account = await make_account(10_000)
    before = await rows_of(pool, account)

    response = await client.post("/bulk_transfer", json=request_for(account, [transfer("1.00")]), headers={KEY: key})

    problem = await assert_problem(response, 422, "validation_failed")
    assert any("Idempotency-Key" in json.dumps(error) for error in problem["errors"])
    assert await rows_of(pool, account) == before


async def test_key_is_not_stored_for_a_validation_failure(client, make_account, pool):
    account = await make_account(10_000)
    broken = request_for(account, [transfer("1,00")])
    await assert_problem(
        await client.post("/bulk_transfer", json=broken, headers={KEY: "k-fix"}), 422, "validation_failed"
    )
    assert (await rows_of(pool, account))["keys"] == 0

    fixed = request_for(account, [transfer("1.00")])
    await created(await client.post("/bulk_transfer", json=fixed, headers={KEY: "k-fix"}))

    assert await balance_of(pool, account) == 9_900


async def test_key_is_kept_at_least_24_hours(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    first_body = await created(await client.post("/bulk_transfer", json=payload, headers={KEY: "k-day"}))
    await pool.execute(
        "UPDATE bps.idempotency_keys SET created_at = now() - interval '23 hours 59 minutes' "
        "WHERE bank_account_id = $1",
        account.id,
    )

    retry = await client.post("/bulk_transfer", json=payload, headers={KEY: "k-day"})

    assert retry.status == 201
    assert retry.headers[REPLAYED] == "true"
    assert await retry.json() == first_body
    assert await balance_of(pool, account) == 9_900


async def test_concurrent_retries_with_one_key_execute_once(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00"), transfer("2.00")])

    responses = await asyncio.gather(
        *(client.post("/bulk_transfer", json=payload, headers={KEY: "k-race"}) for _ in range(12))
    )

    fresh = [r for r in responses if r.status == 201 and REPLAYED not in r.headers]
    assert len(fresh) == 1
    original = await fresh[0].json()
    for response in responses:
        if response is fresh[0]:
            continue
        if response.status == 409:
            await assert_problem(response, 409, "request_in_progress")
        else:
            assert response.status == 201, await response.text()
            assert response.headers[REPLAYED] == "true"
            assert await response.json() == original
    assert await rows_of(pool, account) == {
        "balance_cents": 9_700,
        "bulk_transfers": 1,
        "transfers": 2,
        "entries": 2,
        "keys": 1,
    }


async def test_retry_while_the_first_is_still_running_waits_and_replays_or_is_409(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00"), transfer("2.00")])

    def send():
        return client.post("/bulk_transfer", json=payload, headers={KEY: "k-running"})

    first, retry = await while_account_locked(pool, account, send, send)

    original = await created(first)
    if retry.status == 409:
        await assert_problem(retry, 409, "request_in_progress")
    else:
        assert retry.status == 201, await retry.text()
        assert retry.headers[REPLAYED] == "true"
        assert await retry.json() == original
    assert await rows_of(pool, account) == {
        "balance_cents": 9_700,
        "bulk_transfers": 1,
        "transfers": 2,
        "entries": 2,
        "keys": 1,
    }
