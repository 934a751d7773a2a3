"""Group commit: requests sent as one call of bps.bulk_transfers are answered exactly as the same requests sent
one by one, in the same order, to bps.bulk_transfer: the same statuses, bodies and headers (ids aside), the
same rows and the same balances. Each side runs in a transaction that is rolled back, on the same accounts."""

from __future__ import annotations

import json
import os
import re

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import database_fixtures, random_iban

EXAMPLES = int(os.environ.get("BPS_GROUP_COMMIT_EXAMPLES", "200"))
HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEYS = [None, None, "key-1", "key-2", ""]  # "" is not a valid key: 422
AMOUNTS = ["10.00", "25.50", "40.00", "0.01", "70.00", "0", "12.345"]  # the last two are invalid

# A database of this module's own, its bulk transfer ids made long so that no amount or balance can be taken
# for one when they are masked.
database_url, service_url, pool, session_key = database_fixtures("module", "bps_group_commit")


@pytest.fixture(scope="module")
def db(database_url: str):
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("SELECT setval('bps.bulk_transfers_id_seq', 10000000)")
        yield connection


@pytest.fixture(scope="module")
def accounts(db) -> list[dict]:
    """Two accounts that a few requests empty, one the key may not use, and one that does not exist."""
    made = []
    for balance in (10_000, 6_000, 5_000):
        iban = random_iban()
        account_id = db.execute(
            "SELECT bps.create_bank_account('Group Corp', %s, 'OIVUSCLQXXX', %s)", (iban, balance)
        ).fetchone()[0]
        made.append({"id": account_id, "iban": iban})
    made.append({"id": None, "iban": random_iban()})
    return made


@pytest.fixture(scope="module")
def key_id(db, accounts: list[dict]) -> int:
    key = db.execute(
        "SELECT bps.create_api_key(ARRAY[%s, %s]::bigint[], 'group commit')", (accounts[0]["id"], accounts[1]["id"])
    ).fetchone()[0]
    return db.execute(
        "SELECT id FROM bps.api_credentials WHERE key_hash = sha256(convert_to(%s, 'UTF8'))", (key,)
    ).fetchone()[0]


def payloads(accounts: list[dict]):
    """Requests on the accounts: valid ones of one to three transfers, invalid ones, and non-objects."""
    transfer = st.builds(
        lambda amount, n: {
            "amount": amount,
            "currency": "EUR",
            "counterparty_name": f"Supplier {n}",
            "counterparty_iban": "DE89370400440532013000",
            "counterparty_bic": "COBADEFFXXX",
            "description": f"Invoice {n}",
        },
        st.sampled_from(AMOUNTS),
        st.integers(0, 3),
    )
    request = st.builds(
        lambda account, transfers: {
            "organization_name": "Group Corp",
            "organization_iban": account["iban"],
            "organization_bic": "OIVUSCLQXXX",
            "credit_transfers": transfers,
        },
        st.sampled_from(accounts[:2] * 3 + accounts[2:]),  # mostly the two the key may use
        st.lists(transfer, min_size=1, max_size=3),
    )
    return st.one_of(request, request, request, st.sampled_from([[], "text", {"credit_transfers": "none"}]))


def calls(accounts: list[dict]):
    """A few distinct payloads, and a sequence of requests drawn from them (so duplicates and reused keys are
    common): (payload, Idempotency-Key, whether it comes with the key or as the owner)."""
    return st.lists(payloads(accounts), min_size=1, max_size=5).flatmap(
        lambda pool: st.lists(
            st.tuples(st.sampled_from([json.dumps(p) for p in pool]), st.sampled_from(KEYS), st.booleans()),
            min_size=1,
            max_size=12,
        )
    )


def state(db, accounts: list[dict]) -> dict:
    """What the requests left: rows and balances, with the bulk transfers numbered in the order they were made."""
    ids = [a["id"] for a in accounts if a["id"] is not None]
    bulk = db.execute(
        "SELECT id, bank_account_id, encode(payload_hash, 'hex'), idempotency_key, transfer_count, total_cents,"
        " api_key_id, requested_execution_date::text, pending_count FROM bps.bulk_transfers"
        " WHERE bank_account_id = ANY (%s) AND created_at = now() ORDER BY id",
        (ids,),
    ).fetchall()
    return {
        "bulk_ids": [row[0] for row in bulk],
        "bulk": [row[1:] for row in bulk],
        "transfers": db.execute(
            "SELECT bulk_transfer_id, position, counterparty_name, amount_cents, description, status"
            " FROM bps.transfers WHERE bank_account_id = ANY (%s) AND created_at = now() ORDER BY id",
            (ids,),
        ).fetchall(),
        "balances": db.execute(
            "SELECT id, balance_cents, version FROM bps.bank_accounts WHERE id = ANY (%s) ORDER BY id", (ids,)
        ).fetchall(),
        "journal": db.execute(
            "SELECT bank_account_id, account_version, kind, amount_cents, previous_balance_cents, balance_cents,"
            " bulk_transfer_id FROM bps.account_entries WHERE bank_account_id = ANY (%s) AND created_at = now()"
            " ORDER BY bank_account_id, account_version",
            (ids,),
        ).fetchall(),
        "keys": db.execute(
            "SELECT bank_account_id, idempotency_key, encode(payload_hash, 'hex'), status, body::text, bulk_transfer_id"
            " FROM bps.idempotency_keys WHERE bank_account_id = ANY (%s) AND created_at = now()"
            " ORDER BY bank_account_id, idempotency_key",
            (ids,),
        ).fetchall(),
    }


def masked(value, bulk_ids: list[int]):
    """`value` with each bulk transfer id written as its rank (#1, #2, ...) and each transfer id as rank.position."""
    ranks = {bulk_id: n for n, bulk_id in enumerate(bulk_ids, 1)}

    def name(number: int) -> str | None:
        if number in ranks:
            return f"#{ranks[number]}"
        if number // 100000 in ranks:
            return f"#{ranks[number // 100000]}.{number % 100000}"
        return None

    def walk(v):
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, int):
            return name(v) or v
        if isinstance(v, str):
            return re.sub(r"\d{3,}", lambda m: name(int(m.group())) or m.group(), v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(value)


def one_call(db, requests, key_id: int) -> tuple[list, dict]:
    rows = db.execute(
        "SELECT status, body, headers FROM bps.bulk_transfers(%s::text[]::jsonb[], %s::text[], %s::bigint[])",
        (
            [p for p, _, _ in requests],
            [k for _, k, _ in requests],
            [key_id if keyed else None for _, _, keyed in requests],
        ),
    ).fetchall()
    return [list(row) for row in rows]


def one_by_one(db, requests, key_id: int) -> list:
    answers = []
    for payload, key, keyed in requests:
        status, body, headers = db.execute(
            "SELECT r.status, r.body, current_setting('response.headers', true)::jsonb"
            " FROM bps.bulk_transfer(%s::jsonb, %s, %s::bigint) AS r",
            (payload, key, key_id if keyed else None),
        ).fetchone()
        answers.append([status, body, headers])
    return answers


def outcome(db, accounts, requests, key_id: int, send) -> tuple[list, dict]:
    with db.transaction(force_rollback=True):
        answers = send(db, requests, key_id)
        left = state(db, accounts)
    bulk_ids = left.pop("bulk_ids")
    return masked(answers, bulk_ids), masked(left, bulk_ids)


def test_one_call_answers_as_the_same_requests_one_by_one(db, accounts, key_id) -> None:
    seen: set[tuple] = set()

    def request(account: dict, amount: str) -> str:
        return json.dumps(
            {
                "organization_name": "Group Corp",
                "organization_iban": account["iban"],
                "organization_bic": "OIVUSCLQXXX",
                "credit_transfers": [
                    {
                        "amount": amount,
                        "counterparty_name": "Supplier 1",
                        "counterparty_iban": "DE89370400440532013000",
                        "counterparty_bic": "COBADEFFXXX",
                        "description": "Invoice 1",
                    }
                ],
            }
        )

    first, second = request(accounts[0], "40.00"), request(accounts[0], "70.00")

    @HYPOTHESIS
    @given(calls(accounts))
    # Each kind of answer at least once, whatever the draw: a key replayed and reused, a duplicate, short of funds.
    @example([(first, "key-1", True), (first, "key-1", True), (second, "key-1", True)])
    @example([(first, None, False), (first, None, False), (second, None, False), (second, None, False)])
    def prop(requests) -> None:
        together = outcome(db, accounts, requests, key_id, one_call)
        alone = outcome(db, accounts, requests, key_id, one_by_one)
        assert together == alone
        for status, body, headers in together[0]:
            seen.add((status, body.get("code"), "Idempotent-Replayed" in headers))

    prop()
    # The examples reached every kind of answer: accepted, replayed, short of funds, duplicate, a key reused,
    # invalid, no such account, not an object.
    assert {
        (201, None, False),
        (201, None, True),
        (422, "insufficient_funds", False),
        (409, "duplicate_request", False),
        (422, "idempotency_key_reused", False),
        (422, "validation_failed", False),
        (404, "account_not_found", False),
        (400, "invalid_json", False),
    } <= seen


def test_concurrent_calls_on_the_same_accounts_never_deadlock_and_keep_the_books(db, database_url) -> None:
    """Calls of many requests each, on the same few accounts in every order, with shared keys and payloads,
    from 8 connections at once: none fails (no deadlock), each key holds one answer, and every account's
    balance is its journal's last balance, never negative, the journal an unbroken chain."""
    import asyncio
    import random

    import asyncpg

    ibans = [random_iban() for _ in range(4)]
    ids = [
        db.execute("SELECT bps.create_bank_account('Race Corp', %s, 'OIVUSCLQXXX', 500000)", (iban,)).fetchone()[0]
        for iban in ibans
    ]

    def request(rng: random.Random) -> tuple[str, str | None]:
        payload = {
            "organization_iban": rng.choice(ibans),
            "organization_bic": "OIVUSCLQXXX",
            "credit_transfers": [
                {
                    "amount": rng.choice(["10.00", "150.00", "900.00"]),
                    "counterparty_name": "Bob",
                    "counterparty_iban": "DE89370400440532013000",
                    "counterparty_bic": "COBADEFFXXX",
                    "description": f"race {rng.randrange(6)}",
                }
            ],
        }
        return json.dumps(payload), rng.choice([None, None, f"race-key-{rng.randrange(10)}"])

    async def client(seed: int) -> list[int]:
        rng = random.Random(seed)
        connection = await asyncpg.connect(database_url)
        statuses = []
        try:
            for _ in range(15):
                calls = [request(rng) for _ in range(rng.randint(2, 12))]
                rows = await connection.fetch(
                    "SELECT status FROM bps.bulk_transfers($1::text[]::jsonb[], $2::text[])",
                    [p for p, _ in calls],
                    [k for _, k in calls],
                )
                statuses += [row["status"] for row in rows]
        finally:
            await connection.close()
        return statuses

    async def run() -> list[int]:
        results = await asyncio.gather(*(client(seed) for seed in range(8)))
        return [s for statuses in results for s in statuses]

    statuses = asyncio.run(run())
    assert set(statuses) <= {201, 409, 422}
    assert 201 in statuses and 422 in statuses
    for account_id in ids:
        balance, version = db.execute(
            "SELECT balance_cents, version FROM bps.bank_accounts WHERE id = %s", (account_id,)
        ).fetchone()
        journal = db.execute(
            "SELECT account_version, previous_balance_cents, balance_cents FROM bps.account_entries"
            " WHERE bank_account_id = %s ORDER BY account_version",
            (account_id,),
        ).fetchall()
        assert [v for v, _, _ in journal] == list(range(1, version + 1))
        assert all(previous == before[2] for before, (_, previous, _) in zip(journal, journal[1:], strict=False))
        assert journal[-1][2] == balance >= 0
        debited = db.execute(
            "SELECT coalesce(sum(total_cents), 0) FROM bps.bulk_transfers WHERE bank_account_id = %s", (account_id,)
        ).fetchone()[0]
        assert balance == 500000 - debited
    assert (
        db.execute(
            "SELECT count(*) FROM bps.idempotency_keys WHERE bank_account_id = ANY (%s) AND status IS NULL", (ids,)
        ).fetchone()[0]
        == 0
    )
