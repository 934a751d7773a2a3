"""Amounts: strings of the full amount, converted to exact cents, every bad form rejected."""

from __future__ import annotations

import pytest
from support import assert_rejected_unchanged, balance_of, request_for, transfer

MAXIMUM_CENTS = 99_999_999_999  # "999999999.99", the SEPA maximum

EXACT_CONVERSIONS = [
    ("14.5", 1450),
    ("13.2", 1320),
    ("61238", 6_123_800),
    ("8024.99", 802_499),
    ("19.99", 1999),
    ("0.29", 29),
    ("1.13", 113),
    ("700", 70_000),
    ("0.01", 1),
    ("007.5", 750),  # leading zeros match the contract's pattern
    ("999999999.99", MAXIMUM_CENTS),
    ("0999999999.99", MAXIMUM_CENTS),
]

REJECTED_AMOUNTS = [
    "0",
    "0.00",
    "0.0",
    "00",
    "000.00",
    "-5",
    "-0.5",
    "",
    " 1",
    "1 ",
    "+1",
    "1,5",
    "5.",
    ".5",
    "1e2",
    "1.234",
    "NaN",
    "Infinity",
    "abc",
    "１",  # a fullwidth digit is not [0-9]
    None,
    "1000000000",  # over the maximum
    "1000000000.00",
    "999999999.991",
    "99999999999999999999",
]

JSON_NUMBERS = [14.5, 1450, 0, 1e2]


@pytest.mark.parametrize(("amount", "cents"), EXACT_CONVERSIONS, ids=[a for a, _ in EXACT_CONVERSIONS])
async def test_valid_amount_debits_and_stores_exact_cents(client, make_account, pool, amount, cents):
    start = 100_000_000_000
    account = await make_account(start)

    response = await client.post("/bulk_transfer", json=request_for(account, [transfer(amount)]))

    assert response.status == 201, await response.text()
    body = await response.json()
    assert body["total_cents"] == cents
    assert body["transfer_count"] == 1
    assert await balance_of(pool, account) == start - cents
    stored = await pool.fetchval(
        "SELECT amount_cents FROM bps.transfers WHERE bulk_transfer_id = $1", body["bulk_transfer_id"]
    )
    assert stored == cents


async def test_every_contract_example_in_one_request_totals_exactly(client, make_account, pool):
    account = await make_account(10_000_000)
    amounts = [a for a, cents in EXACT_CONVERSIONS if cents < 10_000_000]
    expected = [cents for _, cents in EXACT_CONVERSIONS if cents < 10_000_000]

    response = await client.post("/bulk_transfer", json=request_for(account, [transfer(a) for a in amounts]))

    assert response.status == 201, await response.text()
    body = await response.json()
    assert body["total_cents"] == sum(expected)
    assert await balance_of(pool, account) == 10_000_000 - sum(expected)
    stored = await pool.fetch(
        "SELECT amount_cents FROM bps.transfers WHERE bulk_transfer_id = $1 ORDER BY position",
        body["bulk_transfer_id"],
    )
    assert [row["amount_cents"] for row in stored] == expected


@pytest.mark.parametrize("amount", REJECTED_AMOUNTS, ids=[repr(a) for a in REJECTED_AMOUNTS])
async def test_invalid_amount_is_rejected_with_its_pointer_and_changes_nothing(client, make_account, pool, amount):
    account = await make_account(100_000_000_000)
    payload = request_for(account, [transfer("1.00"), transfer(amount)])
    await assert_rejected_unchanged(client, pool, account, payload, ["/credit_transfers/1/amount"])


@pytest.mark.parametrize("amount", JSON_NUMBERS, ids=[repr(a) for a in JSON_NUMBERS])
async def test_amount_sent_as_json_number_is_rejected_asking_for_a_string(client, make_account, pool, amount):
    account = await make_account(100_000)
    payload = request_for(account, [transfer(amount)])
    [error] = await assert_rejected_unchanged(client, pool, account, payload, ["/credit_transfers/0/amount"])
    assert "string" in error["detail"].lower()


async def test_every_bad_amount_of_a_request_is_listed(client, make_account, pool):
    account = await make_account(100_000)
    transfers = [transfer("0"), transfer("1.00"), transfer("1.234"), transfer(5), transfer("1000000000")]
    await assert_rejected_unchanged(
        client,
        pool,
        account,
        request_for(account, transfers),
        [f"/credit_transfers/{n}/amount" for n in (0, 2, 3, 4)],
    )


async def test_money_is_stored_as_bigint_cents_and_never_as_floating_point(pool):
    money_columns = await pool.fetch(
        """SELECT table_name, column_name, data_type FROM information_schema.columns
            WHERE table_schema = 'bps' AND table_name IN ('bank_accounts', 'transfers')
              AND column_name IN ('balance_cents', 'amount_cents')"""
    )
    assert {(c["table_name"], c["column_name"]): c["data_type"] for c in money_columns} == {
        ("bank_accounts", "balance_cents"): "bigint",
        ("transfers", "amount_cents"): "bigint",
    }
    floating = await pool.fetch(
        """SELECT table_name, column_name FROM information_schema.columns
            WHERE table_schema = 'bps' AND data_type IN ('real', 'double precision')"""
    )
    assert floating == []
