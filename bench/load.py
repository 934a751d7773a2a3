"""The load generator: a process of its own (so its CPU is never the service's), holding `slots` closed-loop
clients. Each slot owns one pre-encoded request buffer and stamps a fresh IBAN and counter into it before
each send. The floor slots send the same bodies straight to PostgreSQL with asyncpg."""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe

import asyncpg

from .http import Connection
from .payloads import Stamp, Template, health_request

# The floor: one set-based insert per request, no HTTP, no rules, into a table shaped like bps.transfers.
FLOOR_TABLE = "bench.floor_transfers"
FLOOR_SQL = f"""
INSERT INTO {FLOOR_TABLE} (bank_account_id, bulk_transfer_id, position, counterparty_name, counterparty_iban,
                           counterparty_bic, amount_cents, amount_currency, description, client_reference)
SELECT $2, $3, t.n - 1, t.counterparty_name, t.counterparty_iban, t.counterparty_bic,
       (t.amount::numeric * 100)::bigint, coalesce(t.currency, 'EUR'), t.description, t.client_reference
  FROM ROWS FROM (jsonb_to_recordset($1::jsonb -> 'credit_transfers')
                  AS (amount text, currency text, counterparty_name text, counterparty_iban text,
                      counterparty_bic text, description text, client_reference text))
       WITH ORDINALITY AS t(amount, currency, counterparty_name, counterparty_iban, counterparty_bic,
                            description, client_reference, n)
"""
# Server settings the service's pool uses too, so the floor's statements run under the same rules.
FLOOR_SERVER_SETTINGS = {"application_name": "bps-bench-floor", "jit": "off"}

SLOT_STRIDE = 10**11  # counter = case base + slot * stride + sequence: unique for the whole run
MAX_SAMPLES = 5


@dataclass
class Spec:
    """One case as this process runs it: `slots` are its share of the case's global slot numbers."""

    kind: str  # many | hot | xml | floor | health
    batch: int
    slots: list[int]
    concurrency: int
    seconds: float
    warmup: float
    drain_timeout: float
    host: str
    port: int
    database_url: str
    counter_base: int
    # (id, iban, API key) of the accounts a slot may debit: slot k uses accounts k, k + concurrency, ...
    accounts: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass
class Slot:
    send: object  # async callable (buffer) -> status
    buffer: bytearray | bytes
    stamp: Stamp | None
    accounts: list[tuple[int, bytes, bytes]]
    counter0: int
    close: object


class Runner:
    def __init__(self) -> None:
        self.templates: dict[tuple[str, int], Template] = {}
        self.slots: list[Slot] = []
        self.spec: Spec | None = None

    def template(self, batch: int, kind: str = "many") -> Template:
        """The body of a case: a pain.001 file for the xml cases, JSON for every other."""
        if (kind, batch) not in self.templates:
            self.templates[kind, batch] = Template.build_xml(batch) if kind == "xml" else Template.build(batch)
        return self.templates[kind, batch]

    async def prepare(self, spec: Spec) -> None:
        await self.close()
        self.spec = spec
        for slot in spec.slots:
            mine = spec.accounts[slot :: spec.concurrency] or spec.accounts[:1]
            accounts = [(account_id, iban.encode(), key.encode()) for account_id, iban, key in mine]
            counter0 = spec.counter_base + slot * SLOT_STRIDE
            if spec.kind == "health":
                connection = Connection(spec.host, spec.port)
                await connection.open()
                self.slots.append(
                    Slot(http_sender(connection), health_request(spec.host, spec.port), None, [], 0, connection.close)
                )
            elif spec.kind == "floor":
                template = self.template(spec.batch)
                buffer = bytearray(template.body)
                connection = await asyncpg.connect(spec.database_url, server_settings=FLOOR_SERVER_SETTINGS)
                await connection.prepare(FLOOR_SQL)
                self.slots.append(
                    Slot(
                        floor_sender(connection),
                        buffer,
                        Stamp(template, buffer, 0),
                        accounts,
                        counter0,
                        connection.close,
                    )
                )
            else:
                template = self.template(spec.batch, spec.kind)
                buffer, body_at, key_at = template.http_request(spec.host, spec.port)
                connection = Connection(spec.host, spec.port)
                await connection.open()
                self.slots.append(
                    Slot(
                        http_sender(connection),
                        buffer,
                        Stamp(template, buffer, body_at, key_at),
                        accounts,
                        counter0,
                        connection.close,
                    )
                )

    async def close(self) -> None:
        for slot in self.slots:
            result = slot.close()
            if asyncio.iscoroutine(result):
                await result
        self.slots = []

    async def go(self, start_at: float) -> dict:
        spec = self.spec
        until = start_at + spec.seconds
        records: list[tuple[float, float, str]] = []
        samples: dict[str, str] = {}
        cpu: dict[str, float] = {}

        async def meter() -> None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            cpu["start"] = time.process_time()
            await asyncio.sleep(max(0.0, until - time.monotonic()))
            cpu["end"] = time.process_time()

        async def run(slot: Slot) -> None:
            n = 0
            accounts = slot.accounts
            while True:
                t0 = time.monotonic()
                if t0 >= until:
                    return
                if slot.stamp is not None:
                    account_id, iban, key = accounts[n % len(accounts)]
                    slot.stamp(iban, slot.counter0 + n, key)
                    status, detail = await slot.send(slot.buffer, account_id, slot.counter0 + n)
                else:
                    status, detail = await slot.send(slot.buffer, 0, 0)
                records.append((t0, time.monotonic(), status))
                if detail is not None and status not in samples and len(samples) < MAX_SAMPLES:
                    samples[status] = detail
                n += 1

        await asyncio.sleep(max(0.0, start_at - spec.warmup - time.monotonic()))
        timeout = until - time.monotonic() + spec.drain_timeout
        tasks = [asyncio.ensure_future(run(slot)) for slot in self.slots]
        metering = asyncio.ensure_future(meter())
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                samples.setdefault("exception", repr(task.exception()))
        await metering
        # Connections stay open until the next case: a backend that exits now would take its CPU time along.
        return {"records": records, "samples": samples, "cpu_seconds": cpu["end"] - cpu["start"], "stuck": len(pending)}


OK = {"health": "200", "many": "201", "hot": "201", "xml": "201", "floor": "ok"}


def http_sender(connection: Connection):
    async def send(buffer, _account_id: int, _counter: int) -> tuple[str, str | None]:
        try:
            status, body = await connection.request(buffer)
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            connection.close()
            return f"error:{type(error).__name__}", repr(error)
        if 200 <= status < 300:
            return str(status), None
        return str(status), body[:400].decode(errors="replace")

    return send


def floor_sender(connection: asyncpg.Connection):
    async def send(buffer, account_id: int, counter: int) -> tuple[str, str | None]:
        try:
            await connection.execute(FLOOR_SQL, buffer.decode("utf-8"), account_id, counter)
        except asyncpg.PostgresError as error:
            return f"error:{type(error).__name__}", str(error)[:400]
        return "ok", None

    return send


def serve(pipe: Pipe) -> None:
    """The process's main loop: ("prepare", Spec) -> "ready", ("go", start_at) -> result, ("stop", None)."""
    import uvloop

    async def main() -> None:
        runner = Runner()
        loop = asyncio.get_running_loop()
        while True:
            command, argument = await loop.run_in_executor(None, pipe.recv)
            try:
                if command == "prepare":
                    await runner.prepare(argument)
                    pipe.send(("ready", None))
                elif command == "go":
                    pipe.send(("result", await runner.go(argument)))
                else:
                    await runner.close()
                    pipe.send(("stopped", None))
                    return
            except Exception:  # reported to the orchestrator, which stops the run
                await runner.close()
                pipe.send(("error", traceback.format_exc()))

    uvloop.run(main())
