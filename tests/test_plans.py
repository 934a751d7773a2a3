"""The rows a call reads do not grow with the tables. The functions plan each statement once per connection
(plan_cache_mode = force_generic_plan), so a plan chosen while a table was small stays while it grows: a
statement that a small table made a scan would then read every row on every call. Here one connection
caches its plans on nearly empty tables, another fills them, and the first one's next calls must still read
only their own rows (the transaction's own counts, pg_stat_xact_user_tables)."""

from __future__ import annotations

import json

import psycopg
import pytest
from support import Account, database_fixtures, random_iban, request_for, transfer

GROWN_REQUESTS = 3000  # bulk transfers the tables hold when the first connection calls again
GROUP = [f"group-{n}" for n in range(32)]  # a group as large as the service sends
READ_LIMIT = 60  # rows a small call may read from any one table (its own and a few index neighbours)

database_url, service_url, pool, session_key = database_fixtures("module", "bps_plans")


def call(connection, account: Account, tags: list[str], keys: list[str | None]) -> list[tuple[int, int | None]]:
    """One group call of a one-transfer request per tag (the same tag, the same payload): each request's
    status and bulk transfer id."""
    payloads = [json.dumps(request_for(account, [transfer("1.00", description=f"Invoice {tag}")])) for tag in tags]
    return connection.execute(
        "SELECT status, (body ->> 'bulk_transfer_id')::bigint FROM bps.bulk_transfers(%s::jsonb[], %s::text[])",
        (payloads, keys),
    ).fetchall()


def remove(connection, bulk_id: int) -> None:
    """Deletes a bulk transfer: its journal entry and its transfers first, each found by an index."""
    connection.execute("DELETE FROM bps.account_entries WHERE bulk_transfer_id = %s", (bulk_id,))
    connection.execute(
        "DELETE FROM bps.transfers WHERE id BETWEEN bps.transfer_id(%s, 0) AND bps.transfer_id(%s, 99999)",
        (bulk_id, bulk_id),
    )
    connection.execute("DELETE FROM bps.bulk_transfers WHERE id = %s", (bulk_id,))


def reads(connection) -> dict[str, int]:
    """Rows read from each table of schema bps and not yet reported to the statistics (this transaction's,
    and those of the session's transactions of the last second: only a difference within one transaction
    says what a statement read)."""
    return dict(
        connection.execute(
            "SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
            " FROM pg_stat_xact_user_tables WHERE schemaname = 'bps'"
        ).fetchall()
    )


@pytest.fixture(scope="module")
def account(database_url: str) -> Account:
    iban = random_iban()
    with psycopg.connect(database_url, autocommit=True) as connection:
        # No autovacuum: the test decides when the tables are analyzed (each ANALYZE makes connections plan
        # again).
        for table in ("bulk_transfers", "transfers", "account_entries", "idempotency_keys", "bank_accounts"):
            connection.execute(f"ALTER TABLE bps.{table} SET (autovacuum_enabled = false)")
        # Other accounts first, with lower ids: a scan of the accounts in id order reads them all.
        connection.execute(
            "SELECT bps.create_bank_account('Other Corp', 'FR76' || lpad(n::text, 23, '0'), 'OIVUSCLQXXX', 0)"
            " FROM generate_series(1, 200) AS n"
        )
        account_id = connection.execute(
            "SELECT bps.create_bank_account('Plans Corp', %s, 'OIVUSCLQXXX', 1000000000000)", (iban,)
        ).fetchone()[0]
    return Account(account_id, "Plans Corp", iban, "OIVUSCLQXXX", "EUR")


def execute(connection) -> None:
    """An executor's round: claims a few transfers, then settles them, every other one failed (refunded)."""
    claimed = connection.execute("SELECT run_id, attempt, transfer_id FROM bps.claim_transfers('plans', 6, '1 minute')")
    runs, attempts, transfers = zip(*claimed.fetchall(), strict=True)
    outcomes = ["executed" if n % 2 else "failed" for n in range(len(transfers))]
    reasons = [None if outcome == "executed" else "AC04" for outcome in outcomes]
    settled = connection.execute(
        "SELECT bps.settle_transfers(%s, %s, %s, %s, %s)",
        (list(runs), list(attempts), list(transfers), outcomes, reasons),
    ).fetchone()[0]
    assert settled == len(transfers) > 0


@pytest.fixture(scope="module")
def cached(database_url: str, account: Account):
    """A connection whose plans were made on small, analyzed tables, once the tables have grown."""
    with psycopg.connect(database_url, autocommit=True) as cached, psycopg.connect(database_url) as filler:
        # The plans: a group with a key and a duplicate, the removal of a request's rows (bps.bulk_transfers
        # removes a request it had written when a concurrent debit left it short) and an executor's round.
        call(filler, account, [f"small-{tag}" for tag in GROUP], [f"small-{tag}" for tag in GROUP])
        filler.commit()
        cached.execute("ANALYZE")
        answers = call(cached, account, ["a", "b", "b", *GROUP], [None, "k-b", *[None] * (1 + len(GROUP))])
        assert [status for status, _ in answers] == [201, 201, 409, *[201] * len(GROUP)]
        with cached.transaction(force_rollback=True):
            remove(cached, answers[-1][1])
            execute(cached)

        for start in range(0, GROWN_REQUESTS, 500):
            tags = [f"fill-{n}" for n in range(start, start + 500)]
            assert {status for status, _ in call(filler, account, tags, [f"key-{tag}" for tag in tags])} == {201}
            filler.commit()
        yield cached


def read_by(connection, work) -> dict[str, int]:
    """The rows `work(connection)` reads from each table that exceed READ_LIMIT, in a rolled-back transaction."""
    with connection.transaction(force_rollback=True):
        before = reads(connection)
        work(connection)
        read = {table: n - before.get(table, 0) for table, n in reads(connection).items()}
    return {table: n for table, n in read.items() if n > READ_LIMIT}


def test_an_intake_call_reads_its_own_rows_after_the_tables_grew(cached, account: Account) -> None:
    def intake(connection) -> None:
        answers = call(connection, account, ["d", "e", "e", "f"], [None, "k-e", None, None])
        assert [status for status, _ in answers] == [201, 201, 409, 201]
        remove(connection, answers[-1][1])

    assert read_by(cached, intake) == {}


def test_an_executor_round_reads_its_own_rows_after_the_tables_grew(cached) -> None:
    assert read_by(cached, execute) == {}
