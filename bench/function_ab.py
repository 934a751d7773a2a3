"""`python -m bench.function_ab REF [BATCH ...] [--group G]`: the backend CPU of one bps.bulk_transfer call, at
git revision REF against the working tree, in interleaved rounds on one machine. With --group G, of one
request inside the service's own group statement (service/app.py's, through asyncpg as the service sends
it): G requests of BATCH transfers per call, each on an account of its own with its own API key. With
--pmtinf K, of one bps.bulk_transfer_xml call: a pain.001 file of K PmtInf of BATCH transfers, each PmtInf on an
account of its own.

It makes two fresh databases (BPS_BENCH_ADMIN_URL's server), migrates both with this tree's migrations, then
applies REF's sql/ files to the first and this tree's to the second, so the two differ only in their
functions. Each
round calls bps.bulk_transfer N times per database on one connection (each call its own transaction;
synchronous_commit off, so no WAL flush is timed; jit off, as in the service's sessions) and reads the
backend's CPU time (utime + stime from /proc: the server must run on this machine) before and after. CPU
time, not a rate: on a busy machine it is what moves least. It prints the fastest round per side and their
ratio. The databases are dropped at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import asyncpg
import psycopg

from service import db

from . import database, payloads

ROUNDS = 5
CALLS = {1: 3000, 10: 1500, 100: 400, 1000: 150}
ACCOUNT = ("ACME Corp", "FR10474608000002006107XXXXX", "OIVUSCLQXXX")
GROUP_ACCOUNTS = 64  # the group mode's accounts: request k of a call debits account k % 64


def group_iban(k: int) -> str:
    return f"FR76300060000112345678{k:05d}"


def transfers(batch: int, tag: str) -> list[dict]:
    return [
        {
            "amount": f"1.{i % 100:02d}",
            "counterparty_name": "Bip Bip",
            "counterparty_iban": "FR7630006000011234567890189",
            "counterparty_bic": "CRLYFRPPTOU",
            "description": "Wonderland/4410",
            "client_reference": f"{tag}-{i}",
        }
        for i in range(batch)
    ]


def payload(batch: int, tag: str, iban: str = ACCOUNT[1]) -> str:
    name, _, bic = ACCOUNT
    return json.dumps(
        {
            "organization_name": name,
            "organization_iban": iban,
            "organization_bic": bic,
            "credit_transfers": transfers(batch, tag),
        }
    )


def pain001(batch: int, tag: str, pmtinf: int) -> str:
    """A pain.001 file of `pmtinf` PmtInf of `batch` transfers each, PmtInf k on group account k."""
    name, _, bic = ACCOUNT
    return payloads.pain001(
        tag, name, [(f"{tag}-{k}", group_iban(k % GROUP_ACCOUNTS), bic, transfers(batch, tag)) for k in range(pmtinf)]
    )


def backend_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_database(admin_url: str, ref: str | None) -> str:
    url = asyncio.run(db.create_database(admin_url, "bps_function_ab"))
    if ref is None:
        asyncio.run(db.migrate(url))
    else:
        db.apply_migrations(url)  # (this tree's: REF's functions then go on tables they know)
    with psycopg.connect(url, autocommit=True) as connection:
        if ref is not None:
            files = subprocess.run(
                ["git", "ls-tree", "--name-only", ref, "sql/"], capture_output=True, text=True, check=True
            ).stdout.split()
            for path in sorted(files):
                text = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True, check=True)
                connection.execute(text.stdout)
        connection.execute("SELECT bps.create_bank_account(%s, %s, %s, 900000000000000)", ACCOUNT)
        for k in range(GROUP_ACCOUNTS):
            name, _, bic = ACCOUNT
            connection.execute(
                "SELECT bps.create_bank_account(%s, %s, %s, 900000000000000)", (name, group_iban(k), bic)
            )
        connection.execute("ANALYZE")
    return url


async def per_request_microseconds(url: str, batch: int, calls: int, group: int) -> float:
    """The backend CPU of one request in calls of the service's group statement, G requests each."""
    from service.app import BULK_TRANSFERS_SQL

    connection = await asyncpg.connect(url, server_settings={"jit": "off", "synchronous_commit": "off"})
    try:
        keys = [
            await connection.fetchval(
                "SELECT bps.create_api_key(ARRAY[a.id], 'function_ab') FROM bps.bank_accounts AS a WHERE a.iban = $1",
                group_iban(k),
            )
            for k in range(GROUP_ACCOUNTS)
        ]
        pid = await connection.fetchval("SELECT pg_backend_pid()")
        statement = await connection.prepare(BULK_TRANSFERS_SQL)

        async def call(i: int) -> None:
            tag = uuid.uuid4().hex[:16]
            slots = [(i * group + j) % GROUP_ACCOUNTS for j in range(group)]
            rows = await statement.fetch(
                f"ab-{i}", [keys[k] for k in slots], [payload(batch, tag, group_iban(k)) for k in slots], [None] * group
            )
            if any(row["status"] != 201 for row in rows):
                raise SystemExit(
                    f"the group statement answered {[row['status'] for row in rows]}: {rows[0]['body'][:300]}"
                )

        for i in range(20):  # plans cached, caches warm
            await call(i)
        before = backend_cpu(pid)
        for i in range(calls):
            await call(20 + i)
        return (backend_cpu(pid) - before) / (calls * group) * 1e6
    finally:
        await connection.close()


def per_call_microseconds(url: str, batch: int, calls: int, pmtinf: int = 0) -> float:
    """A bps.bulk_transfer call's backend CPU; with pmtinf, a bps.bulk_transfer_xml call's, of a file of that many."""
    if pmtinf:
        sql = "SELECT * FROM bps.bulk_transfer_xml(%s)"
        bodies = [pain001(batch, uuid.uuid4().hex[:16], pmtinf) for _ in range(calls + 20)]
    else:
        sql = "SELECT * FROM bps.bulk_transfer(%s::jsonb)"
        bodies = [payload(batch, uuid.uuid4().hex[:16]) for _ in range(calls + 20)]
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SET synchronous_commit = off; SET jit = off")  # jit: as the service's sessions
        pid = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        for body in bodies[:20]:  # plans cached, caches warm
            connection.execute(sql, (body,))
        before = backend_cpu(pid)
        for body in bodies[20:]:
            status, answer = connection.execute(sql, (body,)).fetchone()
            if status != 201:
                raise SystemExit(f"the call answered {status}: {str(answer)[:300]}")
        return (backend_cpu(pid) - before) / calls * 1e6


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    options = {"--group": 0, "--pmtinf": 0}
    for option in options:
        if option in argv:
            at = argv.index(option)
            options[option] = int(argv[at + 1])
            argv = argv[:at] + argv[at + 2 :]
    group, pmtinf = options["--group"], options["--pmtinf"]
    if group and pmtinf:
        raise SystemExit("--group or --pmtinf, not both")
    ref, batches = argv[0], [int(b) for b in argv[1:]] or [1, 100, 1000]
    admin_url = os.environ.get("BPS_BENCH_ADMIN_URL") or database.ADMIN_URL
    urls = {}
    try:
        urls = {"ref": make_database(admin_url, ref), "tree": make_database(admin_url, None)}
        for batch in batches:
            calls = CALLS.get(batch, max(20, 60_000 // batch))
            if group:
                calls = max(20, calls * 2 // group)
            if pmtinf:
                calls = max(20, calls // pmtinf)
            runs = {"ref": [], "tree": []}
            for _ in range(ROUNDS):
                for side in ("ref", "tree"):
                    if group:
                        runs[side].append(asyncio.run(per_request_microseconds(urls[side], batch, calls, group)))
                    else:
                        runs[side].append(per_call_microseconds(urls[side], batch, calls, pmtinf))
            old, new = min(runs["ref"]), min(runs["tree"])
            unit = "per call"
            if group:
                unit = f"per request in calls of {group}"
            elif pmtinf:
                unit = f"per file of {pmtinf} PmtInf"
            print(
                f"batch {batch:>5}: {ref} {old:8.0f} us, working tree {new:8.0f} us {unit} "
                f"(fastest of {ROUNDS} rounds of {calls} calls); tree/ref {new / old:.3f}",
                flush=True,
            )
    finally:
        for url in urls.values():
            asyncio.run(db.drop_database(admin_url, url))


if __name__ == "__main__":
    main(sys.argv[1:])
