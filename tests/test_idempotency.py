"""Duplicate payloads without a key (409), and Idempotency-Key replays."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections import Counter

import pytest
from support import (
    account_locked,
    assert_duplicate_of,
    assert_problem,
    balance_of,
    post_raw,
    request_for,
    rows_of,
    transfer,
    validation_errors,
)

KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


ONE_REQUEST_OF_TWO_TRANSFERS = {"balance_cents": 9_700, "bulk_transfers": 1, "transfers": 2, "entries": 2, "keys": 1}


async def created(response) -> dict:
    assert response.status == 201, await response.text()
    assert REPLAYED not in response.headers
    return await response.json()


async def assert_replayed(response, original: dict) -> None:
    """The stored 201 answer given again, marked as a replay."""
    assert response.status == 201, await response.text()
    assert response.headers[REPLAYED] == "true"
    assert await response.json() == original


async def assert_replayed_or_in_progress(response, original: dict) -> None:
    """A retry arriving while the first request with its key runs: 409 request_in_progress, or the replay."""
    if response.status == 409:
        await assert_problem(response, 409, "request_in_progress")
    else:
        await assert_replayed(response, original)


async def wait_for_lock_waiters(pool, count: int, unless=None) -> None:
    """Waits until `count` service sessions wait for a lock (or the `unless` task has finished)."""
    for _ in range(1000):
        waiting = await pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND application_name LIKE 'bps %' AND wait_event_type = 'Lock'"""
        )
        if waiting >= count or (unless is not None and unless.done()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} requests never waited for a lock")


async def while_account_locked(pool, account, *requests):
    """Starts the requests one after the other while the account row is locked, each once the previous one
    waits (so the first is still running when the next arrives), then releases the lock; returns the answers."""
    tasks = []
    async with account_locked(pool, account):
        for request in requests:
            tasks.append(asyncio.ensure_future(request()))
            await wait_for_lock_waiters(pool, len(tasks), unless=tasks[-1] if len(tasks) > 1 else None)
    return await asyncio.gather(*tasks)


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
    original = await created(await post_raw(client, "/bulk_transfer", json.dumps(payload).encode()))
    before = await rows_of(pool, account, keys=True)

    duplicate = await post_raw(client, "/bulk_transfer", resend(payload).encode())

    await assert_duplicate_of(duplicate, original["bulk_transfer_id"])
    assert await rows_of(pool, account, keys=True) == before
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

    assert (await rows_of(pool, account, keys=True))["bulk_transfers"] == 2


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
    for _ in range(2):
        await validation_errors(await client.post("/bulk_transfer", json=payload))


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
            await assert_duplicate_of(response, original_id)
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
    await assert_duplicate_of(second, original["bulk_transfer_id"])
    assert await balance_of(pool, account) == 9_900


# With an Idempotency-Key


async def test_retry_with_same_key_replays_the_201_and_changes_nothing(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00"), transfer("2.00")])
    first = await client.post("/bulk_transfer", json=payload, headers={KEY: "order-42"})
    first_body = await created(first)
    before = await rows_of(pool, account, keys=True)

    for _ in range(2):
        retry = await post_raw(
            client, "/bulk_transfer", reordered_and_reformatted(payload).encode(), **{KEY: "order-42"}
        )
        await assert_replayed(retry, first_body)
        assert retry.content_type == "application/json"
        assert retry.headers["Location"] == first.headers["Location"]
    assert await rows_of(pool, account, keys=True) == before
    assert before["balance_cents"] == 9_700


async def test_stored_insufficient_funds_replays_even_after_a_top_up(client, make_account, pool):
    account = await make_account(100)
    payload = request_for(account, [transfer("5.00")])
    first = await client.post("/bulk_transfer", json=payload, headers={KEY: "k-funds"})
    first_body = await assert_problem(first, 422, "insufficient_funds")
    assert REPLAYED not in first.headers
    await pool.execute("SELECT bps.credit_bank_account($1, $2)", account.id, 1_000)
    before = await rows_of(pool, account, keys=True)

    retry = await client.post("/bulk_transfer", json=payload, headers={KEY: "k-funds"})

    assert await assert_problem(retry, 422, "insufficient_funds") == first_body
    assert retry.headers[REPLAYED] == "true"
    assert await rows_of(pool, account, keys=True) == before
    # A new key is a new request, and now the money is there.
    await created(await client.post("/bulk_transfer", json=payload, headers={KEY: "k-funds-2"}))
    assert await balance_of(pool, account) == 1_100 - 500


async def test_same_key_with_a_different_payload_is_422_idempotency_key_reused(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    first_body = await created(await client.post("/bulk_transfer", json=payload, headers={KEY: "k-reuse"}))
    before = await rows_of(pool, account, keys=True)

    changed = request_for(account, [transfer("1.01")])
    await assert_problem(
        await client.post("/bulk_transfer", json=changed, headers={KEY: "k-reuse"}), 422, "idempotency_key_reused"
    )
    assert await rows_of(pool, account, keys=True) == before

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

    await assert_replayed(retry, first_body)
    assert await balance_of(pool, account) == 9_900


@pytest.mark.parametrize("key", ["", "K" * 256, "K" * 1000], ids=["empty", "256_chars", "1000_chars"])
async def test_key_outside_1_to_255_characters_is_422_and_changes_nothing(client, make_account, pool, key):
    account = await make_account(10_000)
    before = await rows_of(pool, account, keys=True)

    response = await client.post("/bulk_transfer", json=request_for(account, [transfer("1.00")]), headers={KEY: key})

    errors = await validation_errors(response)
    assert any("Idempotency-Key" in json.dumps(error) for error in errors)
    assert await rows_of(pool, account, keys=True) == before


async def test_key_is_not_stored_for_a_validation_failure(client, make_account, pool):
    account = await make_account(10_000)
    broken = request_for(account, [transfer("1,00")])
    await validation_errors(await client.post("/bulk_transfer", json=broken, headers={KEY: "k-fix"}))
    assert (await rows_of(pool, account, keys=True))["keys"] == 0

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

    await assert_replayed(retry, first_body)
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
        if response is not fresh[0]:
            await assert_replayed_or_in_progress(response, original)
    assert await rows_of(pool, account, keys=True) == ONE_REQUEST_OF_TWO_TRANSFERS


async def test_retry_while_the_first_is_still_running_waits_and_replays_or_is_409(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00"), transfer("2.00")])

    def send():
        return client.post("/bulk_transfer", json=payload, headers={KEY: "k-running"})

    first, retry = await while_account_locked(pool, account, send, send)

    await assert_replayed_or_in_progress(retry, await created(first))
    assert await rows_of(pool, account, keys=True) == ONE_REQUEST_OF_TWO_TRANSFERS
