"""Business rules: one account debited by exactly the total, or the whole request denied and nothing written;
under concurrency and when a database session dies mid-request too. The shared samples with their outcomes."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from support import (
    account_locked,
    assert_duplicate_of,
    assert_insufficient_funds,
    assert_unavailable,
    balance_of,
    for_account,
    request_for,
    rows_of,
    sample,
    transfer,
)

EXAMPLE_BALANCE = 10_000_000


async def assert_consistent_journal(pool, account) -> None:
    audit = await pool.fetchrow("SELECT * FROM bps.account_audit WHERE bank_account_id = $1", account.id)
    assert audit["consistent"] is True, dict(audit)
    assert audit["journal_sum_cents"] == await balance_of(pool, account)


# The rule


@pytest.mark.parametrize(
    ("balance", "amounts", "required"),
    [
        (1_000, ["6", "5"], 1_100),  # each transfer fits, the sum does not
        (1_000, ["10.01"], 1_001),  # one cent short
        (0, ["0.01"], 1),
        (5_000, ["1"] * 49 + ["1.01"], 5_001),
    ],
    ids=["sum_over_balance", "one_cent_short", "empty_account", "many_small_transfers"],
)
async def test_total_over_the_balance_denies_the_whole_request(client, make_account, pool, balance, amounts, required):
    account = await make_account(balance)
    before = await rows_of(pool, account)

    response = await client.post("/bulk_transfer", json=request_for(account, [transfer(a) for a in amounts]))

    await assert_insufficient_funds(response, balance, required)
    assert await rows_of(pool, account) == before
    assert before["bulk_transfers"] == before["transfers"] == 0
    await assert_consistent_journal(pool, account)


async def test_spending_exactly_the_balance_is_allowed(client, make_account, pool):
    account = await make_account(1_592)

    response = await client.post(
        "/bulk_transfer", json=request_for(account, [transfer("14.5"), transfer("0.29"), transfer("1.13")])
    )

    assert response.status == 201, await response.text()
    assert (await response.json())["total_cents"] == 1_592
    assert await balance_of(pool, account) == 0
    await assert_insufficient_funds(
        await client.post("/bulk_transfer", json=request_for(account, [transfer("0.01")])), 0, 1
    )
    assert await balance_of(pool, account) == 0
    await assert_consistent_journal(pool, account)


async def test_every_transfer_is_recorded_against_the_debited_account(client, make_account, pool):
    account = await make_account(100_000)
    bystander = await make_account(100_000)
    transfers = [
        transfer("10", counterparty_name="Bip Bip", counterparty_iban="EE383680981021245685", client_reference="r1"),
        transfer("20.5", counterparty_name="Wile E Coyote", counterparty_bic="ZDRPLBQI"),
        transfer("0.01", description="//TeslaMotors/Invoice/12"),
    ]

    response = await client.post("/bulk_transfer", json=request_for(account, transfers))

    assert response.status == 201, await response.text()
    body = await response.json()
    rows = await pool.fetch(
        """SELECT bank_account_id, counterparty_name, counterparty_iban, counterparty_bic, amount_cents,
                  amount_currency, description, client_reference
             FROM bps.transfers WHERE bulk_transfer_id = $1 ORDER BY position""",
        body["bulk_transfer_id"],
    )
    assert [dict(row) for row in rows] == [
        {
            "bank_account_id": account.id,
            "counterparty_name": t["counterparty_name"],
            "counterparty_iban": t["counterparty_iban"],
            "counterparty_bic": t["counterparty_bic"],
            "amount_cents": cents,
            "amount_currency": "EUR",
            "description": t["description"],
            "client_reference": t.get("client_reference"),
        }
        for t, cents in zip(transfers, [1_000, 2_050, 1], strict=True)
    ]
    assert await balance_of(pool, account) == 100_000 - 3_051
    assert await balance_of(pool, bystander) == 100_000
    # A transfer's id is its bulk transfer's id * 100000 + its position: the 201 lists them, and
    # bps.transfers_of reads them back in order.
    bulk_id = body["bulk_transfer_id"]
    listed = await pool.fetch("SELECT id, position, client_reference FROM bps.transfers_of($1)", bulk_id)
    assert [(r["id"], r["position"]) for r in listed] == [(bulk_id * 100_000 + p, p) for p in range(3)]
    assert body["transfers"] == [{"id": r["id"], "client_reference": r["client_reference"]} for r in listed]


# The sample requests against an account of 10000000 cents, as in the examples


@pytest.mark.parametrize(
    ("name", "transfer_count", "total", "balance_after"),
    [
        ("sample1.json", 3, 6_225_150, 3_774_850),
        ("demo-request.json", 1, 70_000, 9_930_000),
        ("example-request.json", 1, 1_322, 9_998_678),
    ],
)
async def test_accepted_sample_debits_its_total(client, make_account, pool, name, transfer_count, total, balance_after):
    account = await make_account(EXAMPLE_BALANCE, organization_name="ACME Corp")

    response = await client.post("/bulk_transfer", json=for_account(sample(name), account))

    assert response.status == 201, await response.text()
    body = await response.json()
    assert body["transfer_count"] == transfer_count
    assert body["total_cents"] == total
    assert await balance_of(pool, account) == balance_after
    await assert_consistent_journal(pool, account)


async def test_sample2_is_denied_for_funds_and_writes_nothing(client, make_account, pool):
    account = await make_account(EXAMPLE_BALANCE, organization_name="ACME Corp")
    before = await rows_of(pool, account)

    response = await client.post("/bulk_transfer", json=for_account(sample("sample2.json"), account))

    await assert_insufficient_funds(response, EXAMPLE_BALANCE, 10_648_216)
    assert await rows_of(pool, account) == before


async def test_seed_readme_request_sent_again_is_409(client, make_account, pool):
    account = await make_account(EXAMPLE_BALANCE, organization_name="ACME Corp")
    payload = for_account(sample("demo-request.json"), account)

    first = await client.post("/bulk_transfer", json=payload)
    again = await client.post("/bulk_transfer", json=payload)

    assert first.status == 201, await first.text()
    await assert_duplicate_of(again, (await first.json())["bulk_transfer_id"])
    assert await balance_of(pool, account) == EXAMPLE_BALANCE - 70_000


# The journal


async def test_journal_records_every_balance_change_and_agrees_with_the_balance(client, make_account, pool):
    account = await make_account(10_000)

    assert (
        await client.post("/bulk_transfer", json=request_for(account, [transfer("30"), transfer("10")]))
    ).status == 201
    await pool.execute("SELECT bps.credit_bank_account($1, $2)", account.id, 500)
    denied = await client.post("/bulk_transfer", json=request_for(account, [transfer("100")]))
    assert denied.status == 422
    assert (await client.post("/bulk_transfer", json=request_for(account, [transfer("65")]))).status == 201

    entries = await pool.fetch(
        """SELECT kind, amount_cents, previous_balance_cents, balance_cents
             FROM bps.account_entries WHERE bank_account_id = $1 ORDER BY account_version""",
        account.id,
    )
    assert [tuple(entry) for entry in entries] == [
        ("opening", 10_000, 0, 10_000),
        ("bulk_debit", -4_000, 10_000, 6_000),
        ("credit", 500, 6_000, 6_500),
        ("bulk_debit", -6_500, 6_500, 0),
    ]
    assert await balance_of(pool, account) == 0
    await assert_consistent_journal(pool, account)


# Concurrency: no lost update, never a negative balance, never a partial request


async def test_concurrent_requests_never_overdraw_nor_lose_an_update(client, make_account, pool):
    account = await make_account(1_000)
    payloads = [request_for(account, [transfer("1.50"), transfer("1.50")]) for _ in range(20)]

    responses = await asyncio.gather(*(client.post("/bulk_transfer", json=p) for p in payloads))

    statuses = Counter(r.status for r in responses)
    assert statuses == {201: 3, 422: 17}
    for response in responses:
        if response.status == 422:
            assert (await response.json(content_type=None))["code"] == "insufficient_funds"
    assert await rows_of(pool, account) == {"balance_cents": 100, "bulk_transfers": 3, "transfers": 6, "entries": 4}
    await assert_consistent_journal(pool, account)


async def test_concurrent_requests_through_two_service_instances_debit_exactly_once_each(
    client, make_client, make_account, pool
):
    other = await make_client()
    account = await make_account(10_000)
    payloads = [request_for(account, [transfer("3.00")]) for _ in range(30)]

    responses = await asyncio.gather(
        *((client if n % 2 else other).post("/bulk_transfer", json=p) for n, p in enumerate(payloads))
    )

    assert Counter(r.status for r in responses) == {201: 30}
    assert await rows_of(pool, account) == {
        "balance_cents": 1_000,
        "bulk_transfers": 30,
        "transfers": 30,
        "entries": 31,
    }
    await assert_consistent_journal(pool, account)


@pytest.mark.parametrize("headers", [{}, {"Idempotency-Key": "k-crash"}], ids=["no_key", "with_key"])
async def test_request_whose_database_session_dies_midway_leaves_no_trace(client, make_account, pool, headers):
    """The session running the request is killed while the request waits for the account: nothing is written,
    the client is told to retry (503 with Retry-After), and the retry (same key, if any) is executed afresh."""
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00"), transfer("2.00")])
    before = await rows_of(pool, account)

    async with account_locked(pool, account):
        request = asyncio.ensure_future(client.post("/bulk_transfer", json=payload, headers=headers))
        victim = None
        for _ in range(500):
            victim = await pool.fetchval(
                """SELECT pid FROM pg_stat_activity
                    WHERE datname = current_database() AND application_name LIKE 'bps %'
                      AND wait_event_type = 'Lock' AND query LIKE '%bulk_transfer%'"""
            )
            if victim is not None:
                break
            await asyncio.sleep(0.01)
        assert victim is not None, "the request never waited for the account lock"
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", victim)
        response = await request

    await assert_unavailable(response)
    assert await rows_of(pool, account) == before

    retried = await client.post("/bulk_transfer", json=payload, headers=headers)
    assert retried.status == 201, await retried.text()
    assert "Idempotent-Replayed" not in retried.headers
    assert await balance_of(pool, account) == 10_000 - 300
    await assert_consistent_journal(pool, account)
