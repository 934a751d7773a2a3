"""The executor: claims due transfers in batches, sends them to the payment rail, and settles what it answered.

Any number run at once, on any machines, sharing the work through the database alone (bps.claim_transfers
skips what another holds). A transfer is executed at the rail at most once: its id is the rail's idempotency
key; a run whose lease ran out is taken over with a new attempt, and its transfers are first looked up at the
rail (then resent, with the same ids, if the rail never saw them); an outcome reported under an older attempt
changes nothing. When the rail does not answer, the run's lease ends after a back-off and another attempt
asks again; after too many the run is parked, for a DBA (bps.parked_transfers).

Polling is adaptive: at once while there is work, backing off to `idle_poll_max_seconds` when there is none.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections import Counter, defaultdict
from datetime import timedelta

import asyncpg

from . import db
from .metrics import ExecutorMetrics
from .rail import Outcome, Payment, Rail, RailError

log = logging.getLogger("bps.executor")

CLAIM_SQL = "SELECT * FROM bps_executor.claim_transfers($1, $2, $3)"
SETTLE_SQL = "SELECT bps_executor.settle_transfers($1, $2, $3, $4, $5)"
RELEASE_SQL = "SELECT bps_executor.release_runs($1, $2, $3)"

# Errors that leave the database's state as it was: retried (a connection asyncpg left mid-operation, as when
# a node dies under it, is closed by db.connection_of).
DATABASE_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def executor_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Executor:
    def __init__(
        self,
        pool: asyncpg.Pool,
        rail: Rail,
        *,
        name: str | None = None,
        batch: int = 1000,
        concurrency: int = 2,
        lease_seconds: float = 30.0,
        idle_poll_seconds: float = 0.05,
        idle_poll_max_seconds: float = 1.0,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self.pool = pool
        self.rail = rail
        self.name = name or executor_name()
        self.batch = batch
        self.concurrency = concurrency
        self.lease = timedelta(seconds=lease_seconds)
        self.idle_poll = idle_poll_seconds
        self.idle_poll_max = idle_poll_max_seconds
        self.metrics = metrics or ExecutorMetrics()
        self.settled = 0  # transfers this executor settled
        self.rail_failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Works until `stop` is set; a batch in hand is finished (or its lease left to run out) first."""
        log.info("executor %s: %d worker(s), batches of %d", self.name, self.concurrency, self.batch)
        await asyncio.gather(*(self.worker(stop) for _ in range(self.concurrency)))

    async def worker(self, stop: asyncio.Event) -> None:
        idle = self.idle_poll
        while not stop.is_set():
            try:
                done = await self.once()
            except DATABASE_ERRORS as error:
                self.metrics.database_errors.inc()
                log.warning("executor %s: database unavailable (%s); retrying", self.name, type(error).__name__)
                done = 0
                idle = self.idle_poll_max
            if done:
                idle = self.idle_poll
                continue
            try:
                await asyncio.wait_for(stop.wait(), idle * random.uniform(0.5, 1.5))
            except TimeoutError:
                pass
            idle = min(idle * 2, self.idle_poll_max)

    async def once(self) -> int:
        """Claims one batch and takes it to the rail and back; returns how many transfers it claimed."""
        async with db.connection_of(self.pool) as connection:
            claimed = await connection.fetch(CLAIM_SQL, self.name, self.batch, self.lease)
        if not claimed:
            return 0
        self.metrics.claimed.inc(len(claimed))
        attempts = {row["run_id"]: row["attempt"] for row in claimed}
        outcomes: dict[int, Outcome] = {}
        failed_runs: dict[int, str] = {}

        recovering = [row for row in claimed if row["recovering"]]
        if recovering:
            # A run taken over: its transfers may have reached the rail already. Ask before anything else.
            try:
                outcomes.update(await self.call_rail("lookup", [row["transfer_id"] for row in recovering]))
            except RailError as error:
                failed_runs.update({row["run_id"]: str(error) for row in recovering})

        to_send = [row for row in claimed if row["transfer_id"] not in outcomes and row["run_id"] not in failed_runs]
        if to_send:
            try:
                outcomes.update(await self.call_rail("submit", [payment_of(row) for row in to_send]))
            except RailError as error:
                self.rail_failures += 1
                failed_runs.update({row["run_id"]: str(error) for row in to_send})

        answered = [row for row in claimed if row["transfer_id"] in outcomes]
        unanswered = {row["run_id"] for row in claimed if row["transfer_id"] not in outcomes}
        await self.settle(attempts, answered, outcomes)
        if unanswered:
            errors = defaultdict(list)
            for run_id in unanswered:
                errors[failed_runs.get(run_id, "the rail did not answer for every payment")].append(run_id)
            self.metrics.released.inc(len(unanswered))
            async with db.connection_of(self.pool) as connection:
                for error, run_ids in errors.items():
                    await connection.fetchval(RELEASE_SQL, run_ids, [attempts[r] for r in run_ids], error)
        return len(claimed)

    async def call_rail(self, operation: str, items: list) -> dict[int, Outcome]:
        """The rail's submit or lookup, counted and timed."""
        started = time.perf_counter()
        try:
            outcomes = await getattr(self.rail, operation)(items)
        except RailError:
            self.metrics.rail_calls.labels(operation, "error").inc()
            raise
        finally:
            self.metrics.rail_seconds.labels(operation).observe(time.perf_counter() - started)
        self.metrics.rail_calls.labels(operation, "ok").inc()
        return outcomes

    async def settle(self, attempts: dict[int, int], answered: list, outcomes: dict[int, Outcome]) -> None:
        if not answered:
            return
        run_ids = sorted({row["run_id"] for row in answered})
        ids = [row["transfer_id"] for row in answered]
        arguments = (
            run_ids,
            [attempts[r] for r in run_ids],
            ids,
            [outcomes[i].status for i in ids],
            [outcomes[i].reason for i in ids],
        )
        # A database that is briefly away should not cost the outcomes in hand: if it stays away, the leases
        # run out and another attempt asks the rail again, which answers the same.
        for attempt in range(5):
            try:
                async with db.connection_of(self.pool) as connection:
                    settled = await connection.fetchval(SETTLE_SQL, *arguments)
                # (Added after the await: `self.settled += await ...` reads the count before the await, and
                # loses what the executor's other workers add meanwhile.)
                self.settled += settled
                for outcome, count in Counter(outcomes[i] for i in ids).items():
                    self.metrics.outcomes.labels(outcome.status, outcome.reason or "").inc(count)
                return
            except DATABASE_ERRORS:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2 * 2**attempt * random.uniform(0.5, 1.5))


def payment_of(row: asyncpg.Record) -> Payment:
    return Payment(
        id=row["transfer_id"],
        amount_cents=row["amount_cents"],
        currency=row["currency"],
        creditor_name=row["counterparty_name"],
        creditor_iban=row["counterparty_iban"],
        creditor_bic=row["counterparty_bic"],
        remittance=row["description"],
        end_to_end_id=row["client_reference"],
    )
