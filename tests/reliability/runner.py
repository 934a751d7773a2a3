"""The phases of `make reliability` (soak, access, crash, dbfault, hostile and the execution phases), their
figures and the final verdict."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import psycopg

from service import access as service_access
from service import db
from service.processes import Process

from . import abuse, fuzz, hostile
from .checks import Check, Checks, check_answers, check_database
from .cluster import Cluster, free_port
from .execution import check_execution, wait_final
from .options import from_env
from .workload import CRASH_MIX, Account, Clients, Generator, Mix, Stats

PHASES = ("soak", "access", "crash", "dbfault", "hostile", "fuzz", "exec-crash", "rail-fault", "exec-dbfault")
# The least a run must have to count as the proof; a smaller run is reported as a try-out.
PROOF_MINIMUMS = {
    "clients": 64,
    "requests": 100_000,
    "kills": 20,
    "db_restarts": 3,
    "hostile": 10_000,
    "fuzz_seconds": 300,
    "executor_kills": 20,
    "rail_kills": 2,
}


def env(name: str, default):
    return from_env("BPS_REL", name, default)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.reliability",
        description="Soak, crash, database-fault and hostile-input runs against BPS, checked from the database. "
        "Every option also reads BPS_REL_<NAME> from the environment (e.g. BPS_REL_REQUESTS=5000).",
    )
    p.add_argument(
        "--phases", default=env("phases", ",".join(PHASES)), help="comma-separated subset of " + ",".join(PHASES)
    )
    p.add_argument("--seed", type=int, default=env("seed", random.randrange(1_000_000)))
    p.add_argument("--clients", type=int, default=env("clients", 64), help="concurrent clients (all load phases)")
    p.add_argument("--requests", type=int, default=env("requests", 100_000), help="HTTP requests of the soak")
    p.add_argument("--accounts", type=int, default=env("accounts", 500), help="ordinary accounts (plus one hot one)")
    p.add_argument(
        "--hot-share", type=float, default=env("hot_share", 0.25), help="share of requests on the hot account"
    )
    p.add_argument("--services", type=int, default=env("services", 2), help="serve processes in soak and dbfault")
    p.add_argument("--workers", type=int, default=env("workers", 2), help="BPS_WORKERS of each serve process")
    p.add_argument("--soak-seconds", type=float, default=env("soak_seconds", 360.0), help="time bound of the soak")
    p.add_argument("--kills", type=int, default=env("kills", 24), help="kill -9 of service processes")
    p.add_argument("--crash-services", type=int, default=env("crash_services", 3))
    p.add_argument(
        "--crash-requests",
        type=int,
        default=env("crash_requests", 5_000),
        help="at least this many requests in the crash phase",
    )
    p.add_argument("--db-restarts", type=int, default=env("db_restarts", 3), help="immediate stops of PostgreSQL")
    p.add_argument("--db-down-seconds", type=float, default=env("db_down_seconds", 2.0))
    p.add_argument("--hostile", type=int, default=env("hostile", 10_000), help="hypothesis examples")
    p.add_argument(
        "--fuzz-seconds", type=float, default=env("fuzz_seconds", 300.0), help="the schema-driven fuzz's duration"
    )
    p.add_argument(
        "--access-requests", type=int, default=env("access_requests", 20_000), help="HTTP requests of the access phase"
    )
    p.add_argument(
        "--attackers", type=int, default=env("attackers", 16), help="clients with bad keys in the access phase"
    )
    p.add_argument("--executors", type=int, default=env("executors", 3), help="executor processes (exec phases)")
    p.add_argument("--executor-kills", type=int, default=env("executor_kills", 24), help="kill -9 of executors")
    p.add_argument("--rail-kills", type=int, default=env("rail_kills", 3), help="kill -9 of the simulated rail")
    p.add_argument(
        "--exec-requests", type=int, default=env("exec_requests", 4_000), help="requests during each exec phase"
    )
    p.add_argument(
        "--rail-latency-ms", type=float, default=env("rail_latency_ms", 150.0), help="the slow rail of exec-crash"
    )
    p.add_argument("--idle", type=int, default=env("idle", 1_000), help="idle connections held open")
    p.add_argument("--slow", type=int, default=env("slow", 200), help="slowloris connections")
    p.add_argument("--slow-seconds", type=float, default=env("slow_seconds", 10.0))
    p.add_argument(
        "--max-latency", type=float, default=env("max_latency", 5.0), help="bound for a well-behaved client under abuse"
    )
    p.add_argument("--fsync", default=env("fsync", "on"), choices=["on", "off"], help="fsync of the harness's cluster")
    p.add_argument(
        "--max-memory-gb", type=float, default=env("max_memory_gb", 8.0), help="address-space ceiling (0: none)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a try-out (about a minute)")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in dict(
            clients=16,
            requests=3_000,
            accounts=30,
            kills=4,
            crash_requests=1_000,
            db_restarts=1,
            hostile=300,
            fuzz_seconds=20.0,
            access_requests=2_000,
            attackers=4,
            executor_kills=6,
            rail_kills=1,
            exec_requests=800,
            idle=100,
            slow=20,
            slow_seconds=3.0,
        ).items():
            setattr(args, name, value)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    return args


class Run:
    """Shared state of one harness run: the cluster, the log folder, the checks and the figures."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster, logs: Path) -> None:
        self.args = args
        self.cluster = cluster
        self.logs = logs
        self.checks: list[Check] = []
        self.figures: list[dict] = []
        self.services: list[Process] = []

    def new_services(self, url: str, count: int, workers: int, phase: str) -> list[Process]:
        made = [bps("serve", url, self.logs / f"{phase}-service-{i}.log", free_port(), workers) for i in range(count)]
        self.services += made
        return made

    def stop_services(self) -> None:
        for service in self.services:
            service.stop()


def bps(command: str, url: str, log: Path, port: int | None = None, workers: int = 1, **env: str) -> Process:
    """`python -m service <command>` on the database `url`, its output appended to `log`; not started."""
    env = {"DATABASE_URL": url, "BPS_HOST": "127.0.0.1", "BPS_SHUTDOWN_TIMEOUT": "2", **env}
    if command == "serve":
        env["BPS_WORKERS"] = str(workers)
    return Process(command, env, port=port, log=log)


async def new_database(run: Run, name: str) -> str:
    admin = await asyncpg.connect(run.cluster.url())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = run.cluster.url(name)
    await db.migrate(url)
    return url


async def make_accounts(
    url: str, rng: random.Random, count: int, demand_per_account: float, hot_demand: float
) -> list[Account]:
    """`count` ordinary accounts (a quarter of them short of what they will be asked) and one hot account
    funded for about 70% of its demand, so it runs dry under load and its last cents are fought over."""
    connection = await asyncpg.connect(url)
    accounts = []
    try:
        for i in range(count + 1):
            hot = i == count
            name = "Hot Account SA" if hot else f"Org {i} GmbH"
            iban = "FR76" + "".join(rng.choice("0123456789") for _ in range(23))
            bic = rng.choice(["OIVUSCLQXXX", "BNPAFRPPXXX", "COBADEFFXXX", "CRLYFRPPTOU"])
            opening = int(0.7 * hot_demand) if hot else int(demand_per_account * rng.uniform(0.5, 3.0))
            opening = max(opening, 1)
            account_id = await connection.fetchval(
                "SELECT bps.create_bank_account($1, $2, $3, $4)", name, iban, bic, opening
            )
            key = await connection.fetchval("SELECT bps.create_api_key(ARRAY[$1::bigint], $2)", account_id, name)
            accounts.append(Account(account_id, name, iban, bic, opening, hot, key))
    finally:
        await connection.close()
    return accounts


async def start_services(services: list[Process], within: float = 60) -> None:
    for service in services:
        service.start(wait=False)
    await asyncio.gather(*(s.ready(within) for s in services))


def figures(phase: str, stats: Stats, clients: Clients | None, faults: str, seconds: float, **more) -> dict:
    sent = clients.sent if clients else []
    accepted = len({(r.rid) for r in sent if 201 in r.statuses})
    return {
        "phase": phase,
        "http requests": stats.http_requests,
        "logical requests": len(sent),
        "accepted (201)": accepted,
        "no answer (conn)": stats.no_answer,
        "503": stats.statuses.get(503, 0),
        "gave up": sum(1 for r in sent if r.gave_up),
        "faults injected": faults,
        "p50/p99 s": f"{stats.p(0.5):.3f}/{stats.p(0.99):.3f}",
        "seconds": round(seconds, 1),
        **more,
    }


def demand(args: argparse.Namespace, requests: int) -> tuple[float, float]:
    """Expected cents asked of an ordinary account and of the hot one over `requests` requests."""
    per_request = 5.5 * 10_000  # about 5.5 transfers of 100 EUR on average (see Generator)
    paying = requests * 0.6
    return paying * (1 - args.hot_share) * per_request / max(args.accounts, 1), paying * args.hot_share * per_request


async def soak(run: Run) -> None:
    args = run.args
    started = time.monotonic()
    checks = Checks("soak")
    url = await new_database(run, "bps_soak")
    rng = random.Random(args.seed)
    accounts = await make_accounts(url, rng, args.accounts, *demand(args, args.requests))
    services = run.new_services(url, args.services, args.workers, "soak")
    await start_services(services)
    generator = Generator(rng, "S", accounts, Mix(), args.hot_share)
    stats = Stats()
    clients = Clients(generator, [s.url for s in services], stats, retry=True, attempt_timeout=60)
    await clients.run(args.clients, args.requests, args.soak_seconds)
    checks.expect(
        f"{args.requests} requests sent within {args.soak_seconds:.0f}s",
        stats.http_requests >= args.requests,
        f"only {stats.http_requests} sent",
    )
    checks.expect("service processes stayed up", all(s.alive() and s.starts == 1 for s in services), "one died")
    for service in services:
        service.stop()
    check_answers(checks, clients.sent, stats, everyone_answered=True)
    await check_database(checks, url, accounts, generator.requests, clients.sent, everyone_answered=True)
    run.checks += checks.items
    hot = next(a for a in accounts if a.hot)
    hot_balance = await fetch_balance(url, hot.id)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(generator.kinds.items()))
    run.figures.append(
        figures(
            "soak",
            stats,
            clients,
            f"0 ({len(services)}x{args.workers} workers)",
            time.monotonic() - started,
            note=f"hot account {hot.opening_cents} -> {hot_balance} cents; mix: {kinds}",
        )
    )


async def fetch_balance(url: str, account_id: int) -> int:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval("SELECT balance_cents FROM bps.bank_accounts WHERE id = $1", account_id)
    finally:
        await connection.close()


async def access(run: Run) -> None:
    """The soak's load with clients holding bad keys mixed in (revoked, expired, never made, mistyped, read-only,
    another account's, none at all), and the keys of some ordinary accounts revoked while their clients are
    sending: no bad key writes anything, a revoked key stops at once, and every check of the soak holds."""
    args = run.args
    started = time.monotonic()
    checks = Checks("access")
    url = await new_database(run, "bps_access")
    rng = random.Random(args.seed + 4)
    accounts = await make_accounts(url, rng, max(args.accounts // 5, 10), *demand(args, args.access_requests))
    ordinary = [a for a in accounts if not a.hot]
    doomed = ordinary[: max(len(ordinary) // 10, 1)]  # their keys are revoked during the run
    connection = await asyncpg.connect(url)
    try:
        bystander = await connection.fetchval(
            "SELECT bps.create_bank_account('Bystander SARL', 'FR7611111111111111111111111', 'BYSTFRPPXXX', 1000)"
        )
        bad: list[tuple[str, str | None, int, Account | None]] = []  # (kind, Authorization, status, account)
        for account in rng.sample(ordinary, min(len(ordinary), 20)):

            async def key(scopes: str, account_id: int = account.id) -> str:
                return await connection.fetchval(
                    "SELECT bps.create_api_key(ARRAY[$1::bigint], 'access phase', $2::text::text[])",
                    account_id,
                    scopes,
                )

            revoked = await key("{transfers:write,transfers:read}")
            await connection.execute("SELECT bps.revoke_api_key($1::text)", revoked)
            expired = await key("{transfers:write,transfers:read}")
            await connection.execute(
                "UPDATE bps.api_credentials SET expires_at = now() WHERE key_hash = sha256(convert_to($1, 'UTF8'))",
                expired,
            )
            mistyped = account.api_key[:-1] + ("A" if account.api_key[-1] != "A" else "B")
            bad += [
                ("revoked", f"Bearer {revoked}", 401, account),
                ("expired", f"Bearer {expired}", 401, account),
                ("mistyped", f"Bearer {mistyped}", 401, account),
                ("read-only", f"Bearer {await key('{transfers:read}')}", 403, account),
                ("another account's", f"Bearer {await key('{transfers:write}', bystander)}", 404, account),
            ]
        never_made = "bps_" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(32))
        bad += [
            ("never made", f"Bearer {never_made}{service_access.checksum(never_made)}", 401, None),
            ("none", None, 401, None),
            ("Basic", "Basic dXNlcjpwYXNz", 401, None),
        ]
    finally:
        await connection.close()

    services = run.new_services(url, args.services, args.workers, "access")
    await start_services(services)
    generator = Generator(rng, "A", accounts, Mix(), args.hot_share)
    for account in doomed:
        generator.also_allowed[account.id] = {(401, "unauthorized")}
    stats = Stats()
    clients = Clients(generator, [s.url for s in services], stats, retry=True, attempt_timeout=60)
    stop = asyncio.Event()
    attacker_statuses: Counter = Counter()
    attacker_violations: list[str] = []
    revocation: dict = {}

    async def attacker(n: int, session: aiohttp.ClientSession) -> None:
        sent = 0
        while not stop.is_set():
            kind, authorization, expected, account = rng.choice(bad)
            target = account or rng.choice(ordinary)
            rid = f"X{n}.{sent}"
            sent += 1
            body = json.dumps(generator._payload(rid, target, [rng.randint(1, 5_000)])).encode()
            headers = {"Content-Type": "application/json"}
            if authorization is not None:
                headers["Authorization"] = authorization
            if rng.random() < 0.3:
                headers["Idempotency-Key"] = f"attack-{rid}"
            url_ = rng.choice(services).url + "/bulk_transfer"
            try:
                async with session.post(url_, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as error:
                status = type(error).__name__
            attacker_statuses[(kind, status)] += 1
            if status != expected:
                attacker_violations.append(f"{kind} key: HTTP {status}, expected {expected}")

    async def revoke_some() -> None:
        # Once about a third of the load is sent, so the doomed keys are used before and after.
        threshold = args.access_requests * rng.uniform(0.2, 0.4)
        for _ in range(int(args.soak_seconds / 0.05)):
            if stats.http_requests >= threshold:
                break
            await asyncio.sleep(0.05)
        connection = await asyncpg.connect(url)
        try:
            revocation["key_ids"] = [
                await connection.fetchval(
                    "SELECT id FROM bps.api_credentials WHERE key_hash = sha256(convert_to($1, 'UTF8'))", a.api_key
                )
                for a in doomed
            ]
            await connection.execute(
                "SELECT bps.revoke_api_key(id) FROM unnest($1::bigint[]) AS id", revocation["key_ids"]
            )
            # Read after the revocation committed: a request that began after this must not have written.
            revocation["committed_by"] = await connection.fetchval("SELECT clock_timestamp()")
        finally:
            await connection.close()

    async with aiohttp.ClientSession() as session:
        attackers = [asyncio.create_task(attacker(n, session)) for n in range(args.attackers)]
        revoker = asyncio.create_task(revoke_some())
        await clients.run(args.clients, args.access_requests, args.soak_seconds)
        stop.set()
        await asyncio.gather(*attackers, revoker)
    for service in services:
        service.stop()

    check_answers(checks, clients.sent, stats, everyone_answered=True)
    await check_database(checks, url, accounts, generator.requests, clients.sent, everyone_answered=True)
    attacks = sum(attacker_statuses.values())
    checks.add(
        "every request with a bad key refused as the access table says (401, 403, 404)", attacks, attacker_violations
    )
    connection = await asyncpg.connect(url)
    try:
        written = await connection.fetchval("SELECT count(*) FROM bps.transfers WHERE client_reference LIKE 'X%'")
        late = await connection.fetch(
            "SELECT id, created_at FROM bps.bulk_transfers WHERE api_key_id = ANY($1::bigint[]) AND created_at > $2",
            revocation["key_ids"],
            revocation["committed_by"],
        )
    finally:
        await connection.close()
    checks.expect("no request with a bad key wrote anything", written == 0, f"{written} transfers written")
    checks.add(
        "a revoked key stops at once: nothing it made began after its revocation committed",
        len(doomed),
        [f"bulk {r['id']} began at {r['created_at']}, after {revocation['committed_by']}" for r in late],
    )
    refused_after = sum(1 for r in clients.sent if r.account_id in {a.id for a in doomed} and r.final_status == 401)
    checks.expect("the revoked keys' clients were refused afterwards", refused_after > 0, "no 401 for a revoked key")
    run.checks += checks.items
    run.figures.append(
        figures(
            "access",
            stats,
            clients,
            f"{args.attackers} bad-key clients, {len(doomed)} keys revoked",
            time.monotonic() - started,
            note=f"bad-key requests {attacks}: "
            + ", ".join(f"{k} {s} x{n}" for (k, s), n in sorted(attacker_statuses.items(), key=str))
            + f"; revoked keys' requests refused afterwards: {refused_after}",
        )
    )


async def crash(run: Run) -> None:
    args = run.args
    started = time.monotonic()
    checks = Checks("crash")
    url = await new_database(run, "bps_crash")
    rng = random.Random(args.seed + 1)
    accounts = await make_accounts(url, rng, max(args.accounts // 5, 5), *demand(args, args.crash_requests * 4))
    services = run.new_services(url, args.crash_services, 1, "crash")
    await start_services(services)
    generator = Generator(rng, "C", accounts, CRASH_MIX, args.hot_share)
    stats = Stats()
    clients = Clients(generator, [s.url for s in services], stats, retry=True, attempt_timeout=20, give_up_after=60)
    stop = asyncio.Event()
    kills = 0
    in_flight_at_kill = []
    restart_waits = []
    problems = []
    kill_orders = Counter()

    async def restart(service: Process) -> None:
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        service.start(wait=False)
        orders_before = kill_orders[service.port]
        try:
            restart_waits.append(await service.ready(60))
        except (TimeoutError, RuntimeError) as error:
            if (
                kill_orders[service.port] == orders_before
            ):  # (not killed again while starting: that has its own restart)
                problems.append(str(error))

    async def killer() -> None:
        nonlocal kills
        restarts = []
        try:
            await asyncio.sleep(1.0)  # let the load build up
            while kills < args.kills:
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                alive = [s for s in services if s.alive()]
                if not alive:
                    continue
                victim = rng.choice(alive)
                in_flight_at_kill.append(stats.http_requests - sum(len(r.statuses) for r in clients.sent))
                kill_orders[victim.port] += 1  # (before the kill, which runs in a thread)
                await asyncio.to_thread(victim.kill9)
                kills += 1
                restarts.append(asyncio.create_task(restart(victim)))
            await asyncio.gather(*restarts)
        finally:
            stop.set()

    kill_task = asyncio.create_task(killer())
    await clients.run(args.clients, 10**9, 300, stop=stop, min_requests=args.crash_requests)
    await kill_task
    healthy = await asyncio.gather(*(s.ready(30) for s in services), return_exceptions=True)
    checks.expect(
        f"{args.kills} kill -9 done, each process restarted",
        kills >= args.kills and not problems,
        f"{kills} kills; {problems[:3]}",
    )
    checks.expect(
        "every service healthy after the last restart", all(isinstance(h, float) for h in healthy), str(healthy)
    )
    for service in services:
        service.stop()
    check_answers(checks, clients.sent, stats, everyone_answered=False)
    await check_database(checks, url, accounts, generator.requests, clients.sent, everyone_answered=False)
    run.checks += checks.items
    gave_up = [r for r in clients.sent if r.gave_up]
    run.figures.append(
        figures(
            "crash",
            stats,
            clients,
            f"{kills} kill -9",
            time.monotonic() - started,
            note=f"in flight at kills: avg {sum(in_flight_at_kill) / max(len(in_flight_at_kill), 1):.0f}; "
            f"restart to healthy: max {max(restart_waits, default=0):.2f}s; gave up: {len(gave_up)}",
        )
    )


async def dbfault(run: Run) -> None:
    args = run.args
    started = time.monotonic()
    checks = Checks("dbfault")
    url = await new_database(run, "bps_dbfault")
    rng = random.Random(args.seed + 2)
    accounts = await make_accounts(url, rng, max(args.accounts // 5, 5), *demand(args, 20_000))
    services = run.new_services(url, args.services, args.workers, "dbfault")
    await start_services(services)
    generator = Generator(rng, "D", accounts, CRASH_MIX, args.hot_share)
    stats = Stats()
    clients = Clients(generator, [s.url for s in services], stats, retry=True, attempt_timeout=20, give_up_after=90)
    stop = asyncio.Event()
    pids_before = {s.port: s.pids() for s in services}
    outages = []
    probes = Counter()
    bad_probes = []
    recoveries = []
    probe_clients: list[asyncio.Task] = []
    probe_session = aiohttp.ClientSession()

    async def faults() -> None:
        async with aiohttp.ClientSession() as session:
            try:
                for _ in range(args.db_restarts):
                    await asyncio.sleep(rng.uniform(1.5, 3.0))
                    await asyncio.to_thread(run.cluster.stop, "immediate")
                    down = time.monotonic()
                    for service in services:
                        for method, path in (("GET", "/health"), ("POST", "/bulk_transfer")):
                            probe = generator.next()[0] if method == "POST" else None
                            status, retry_after = await probe_once(session, service, method, path, probe)
                            probes[status] += 1
                            if status != 503 or not (retry_after or "").isdigit():
                                bad_probes.append(
                                    f"{method} {path} on :{service.port}: {status} Retry-After={retry_after}"
                                )
                            if probe is not None:  # the client of that probe goes on retrying, like the others
                                probe_clients.append(asyncio.create_task(clients.send(probe_session, probe)))
                    await asyncio.sleep(max(0.0, args.db_down_seconds - (time.monotonic() - down)))
                    await asyncio.to_thread(run.cluster.start)
                    outages.append(time.monotonic() - down)
                    waits = await asyncio.gather(*(s.ready(60) for s in services))
                    recoveries.append(max(waits))
            finally:
                stop.set()

    fault_task = asyncio.create_task(faults())
    await clients.run(args.clients, 10**9, 300, stop=stop, min_requests=0)
    await fault_task
    await asyncio.sleep(0)
    checks.expect(
        f"{args.db_restarts} immediate stops of PostgreSQL under load",
        len(outages) >= args.db_restarts,
        f"{len(outages)} done",
    )
    checks.add("503 with Retry-After while the database is down (health and POST)", sum(probes.values()), bad_probes)
    checks.expect(
        "services recovered without a restart",
        {s.port: s.pids() for s in services} == pids_before and all(s.starts == 1 for s in services),
        f"pids before {pids_before}",
    )
    if probe_clients:  # let the probes' clients finish their retries (bounded)
        await asyncio.wait(probe_clients, timeout=90)
    await probe_session.close()
    for service in services:
        service.stop()
    check_answers(checks, clients.sent, stats, everyone_answered=False)
    await check_database(checks, url, accounts, generator.requests, clients.sent, everyone_answered=False)
    run.checks += checks.items
    run.figures.append(
        figures(
            "dbfault",
            stats,
            clients,
            f"{len(outages)} pg_ctl stop -m immediate",
            time.monotonic() - started,
            note=f"down {', '.join(f'{o:.1f}s' for o in outages)}; recovered in max "
            f"{max(recoveries, default=0):.2f}s; probes while down {dict(probes)}",
        )
    )


async def probe_once(session: aiohttp.ClientSession, service: Process, method: str, path: str, probe):
    headers = {"Content-Type": "application/json"}
    if probe is not None and probe.key:
        headers["Idempotency-Key"] = probe.key
    if probe is not None and probe.api_key:
        headers["Authorization"] = f"Bearer {probe.api_key}"
    try:
        async with session.request(
            method,
            service.url + path,
            data=probe.body if probe else None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=15),
        ) as response:
            await response.read()
            return response.status, response.headers.get("Retry-After")
    except (aiohttp.ClientError, TimeoutError) as error:
        return type(error).__name__, None


def hypothesis_run(
    port: int, url: str, accounts: list[dict], choices: list[hostile.Credential], examples: int, seed: int
) -> dict:
    """Sends `examples` hypothesis-generated requests one by one, with good and bad keys, judging each against
    the database."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    statuses = Counter()
    by_kind: dict[str, list] = {}
    slowest: list = []
    spent = Counter()
    count = 0
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as connection:

        @hypothesis_seed(seed)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(hostile.hostile_requests(accounts, choices))
        def prop(request: hostile.Hostile) -> None:
            nonlocal count
            count += 1
            t0 = time.monotonic()
            before = hostile.fingerprint(connection)
            t1 = time.monotonic()
            try:
                status, headers, body = hostile.send(port, request)
            except (ConnectionResetError, BrokenPipeError):
                statuses["closed early (reset)"] += 1  # the server refused it at the HTTP level and closed
                return
            except (OSError, http.client.HTTPException) as error:
                status, headers, body = None, {}, f"{type(error).__name__}: {error}"
            t2 = time.monotonic()
            slowest.append((t2 - t1, request.note[:60], len(request.body), status))
            slowest.sort(key=lambda x: x[0], reverse=True)
            del slowest[5:]
            spent["requests"] += t2 - t1
            if status is None:
                statuses["no answer"] += 1
                by_kind.setdefault(f"no answer with {hostile.signature(request)}", []).append(f"{body} <- {request!r}")
                return
            statuses[status] += 1
            problem = hostile.judge(request, status, headers, body, before, hostile.fingerprint(connection))
            spent["database checks"] += time.monotonic() - t2 + t1 - t0
            if problem:
                kind = f"{problem.split(':')[0]} with {hostile.signature(request)}"
                by_kind.setdefault(kind, []).append(f"{problem} <- {request!r}")

        try:
            prop()
        except Exception as error:  # hypothesis itself gave up: say so, as a violation
            by_kind.setdefault("hypothesis stopped", []).append(f"{type(error).__name__}: {error}")
    spent["generating"] = time.monotonic() - started - spent["requests"] - spent["database checks"]
    # One example of each kind of failure first (with how many there were), then the others.
    kinds = sorted(by_kind.items(), key=lambda item: -len(item[1]))
    violations = [f"[{len(v)} x {kind}] {v[0]}" for kind, v in kinds]
    violations += [example for v in by_kind.values() for example in v[1:]]
    return {"statuses": statuses, "violations": violations, "count": count, "slowest": slowest, "spent": spent}


async def hostile_phase(run: Run) -> None:
    args = run.args
    started = time.monotonic()
    checks = Checks("hostile")
    url = await new_database(run, "bps_hostile")
    rng = random.Random(args.seed + 3)
    accounts = await make_accounts(url, rng, 3, 50_000, 10_000)
    targets = [{"name": a.name, "iban": a.iban, "bic": a.bic} for a in accounts]
    with psycopg.connect(url, autocommit=True) as connection:
        other = connection.execute(
            "SELECT bps.create_bank_account('Bystander SARL', 'FR7611111111111111111111111', 'BYSTFRPPXXX', 1000)"
        ).fetchone()[0]
        choices = hostile.credentials(connection, [a.id for a in accounts], other)
    valid = choices[0].header
    (service,) = run.new_services(url, 1, 1, "hostile")
    await start_services([service])
    pid = service.process.pid

    result = await asyncio.to_thread(hypothesis_run, service.port, url, targets, choices, args.hostile, args.seed)
    statuses, violations, count, slowest = result["statuses"], result["violations"], result["count"], result["slowest"]
    (run.logs / "hostile-violations.txt").write_text("\n".join(violations))
    checks.add(f"hypothesis: never a 5xx, rejected requests change nothing ({count} examples)", count, violations)
    checks.expect(f"{args.hostile} hypothesis examples run", count >= args.hostile, f"only {count}")

    limit = int(os.environ.get("BPS_MAX_BODY_BYTES", 16 * 1024 * 1024))
    big = await abuse.oversized(service.port, limit, valid)
    checks.add(
        "oversized, compressed-bomb and mis-encoded bodies: answered, never a 5xx", len(big.figures), big.problems
    )

    def valid_bodies():
        n = 0
        while True:
            n += 1
            payload = hostile.valid_payload(targets[0])
            payload["credit_transfers"][0]["description"] = f"well-behaved {n} {rng.random()}"
            payload["credit_transfers"][0]["amount"] = "0.01"
            yield json.dumps(payload).encode()

    slow = await abuse.slow_and_idle(
        service.port,
        valid_bodies(),
        valid,
        idle=args.idle,
        slow=args.slow,
        seconds=args.slow_seconds,
        max_latency=args.max_latency,
    )
    checks.add("slow and idle clients: others still served promptly", 1, slow.problems)
    try:
        await service.ready(10)
        up = service.alive() and service.process.pid == pid and service.starts == 1
    except (TimeoutError, RuntimeError):
        up = False
    checks.expect("service stayed up through all hostile input (same process, healthy)", up, "it did not")
    service.stop()
    connection = await asyncpg.connect(url)
    try:
        inconsistent = await connection.fetchval("SELECT count(*) FROM bps.account_audit WHERE NOT consistent")
    finally:
        await connection.close()
    checks.expect("journal agrees with balance after hostile input", inconsistent == 0, f"{inconsistent} accounts")
    run.checks += checks.items
    more = {**big.figures, **slow.figures}
    run.figures.append(
        {
            "phase": "hostile",
            "http requests": count + slow.figures.get("requests served meanwhile", 0) + len(big.figures),
            "logical requests": count,
            "accepted (201)": statuses.get(201, 0),
            "no answer (conn)": statuses.get("no answer", 0),
            "503": statuses.get(503, 0),
            "gave up": 0,
            "faults injected": f"{count} hostile, {args.slow} slow, {args.idle} idle, {len(big.figures)} odd bodies",
            "p50/p99 s": "-",
            "seconds": round(time.monotonic() - started, 1),
            "note": f"statuses {dict(sorted(statuses.items(), key=str))}; "
            + "; ".join(f"{k}: {v}" for k, v in more.items())
            + "; time spent: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in result["spent"].items())
            + "; slowest hostile answers: "
            + ", ".join(f"{t:.2f}s {note} ({size} B, {status})" for t, note, size, status in slowest),
        }
    )


# Execution phases: intake with cancels beside executors and the simulated rail, under one kind of fault;
# then the faults stop, everything drains to a final status, and the rail's record is compared with BPS's.
EXECUTION_SETTINGS = "UPDATE bps.settings SET execution_max_attempts = 100000, execution_retry_cap = '1 second'"
EXECUTION_MIX = Mix(
    valid=0.5, keyed=0.2, key_retry=0.03, key_race=0.02, dup=0.1, key_reuse=0.0, short=0.05, invalid=0.1
)


async def set_rail_faults(rail: Process, **faults: float) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{rail.url}/admin/faults", json=faults) as response:
            response.raise_for_status()


async def execution(run: Run, phase: str) -> None:
    args = run.args
    started = time.monotonic()
    checks = Checks(phase)
    url = await new_database(run, f"bps_{phase.replace('-', '_')}")
    rng = random.Random(args.seed + sum(map(ord, phase)))
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(EXECUTION_SETTINGS)
    finally:
        await connection.close()
    accounts = await make_accounts(url, rng, max(args.accounts // 10, 10), *demand(args, args.exec_requests))
    record = run.logs / f"{phase}-rail.sqlite3"
    rail = bps(
        "rail-simulator",
        url,
        run.logs / f"{phase}-rail.log",
        free_port(),
        BPS_RAIL_RECORD=str(record),
        BPS_RAIL_LATENCY_MS=str(args.rail_latency_ms if phase == "exec-crash" else 5),
        BPS_RAIL_FAILURE_RATE="0.05",
        BPS_RAIL_HANG_SECONDS="3",
    )
    run.services.append(rail)
    services = run.new_services(url, 2, 1, phase)
    executors = [
        bps(
            "execute",
            url,
            run.logs / f"{phase}-executor-{i}.log",
            BPS_RAIL_URL=rail.url,
            BPS_RAIL_TIMEOUT_SECONDS="1",
            BPS_EXECUTOR_LEASE_SECONDS="3",
            BPS_EXECUTOR_BATCH="100",
            BPS_EXECUTOR_IDLE_POLL_SECONDS="0.2",
        )
        for i in range(args.executors)
    ]
    run.services += executors
    await start_services([rail])
    await start_services(services)
    for executor in executors:
        executor.start(wait=False)
    generator = Generator(rng, phase[:2].upper(), accounts, EXECUTION_MIX, args.hot_share)
    stats = Stats()
    clients = Clients(
        generator, [s.url for s in services], stats, retry=True, attempt_timeout=20, give_up_after=90,
        cancel_share=0.15,
    )  # fmt: skip
    stop = asyncio.Event()
    injected: list[str] = []

    async def restart_later(process: Process, delay: float) -> None:
        await asyncio.sleep(delay)
        process.start(wait=False)

    async def faults() -> None:
        restarts = []
        try:
            await asyncio.sleep(1.5)  # let transfers pile up
            if phase == "exec-crash":
                for _ in range(args.executor_kills):
                    await asyncio.sleep(rng.uniform(0.2, 0.8))
                    victim = rng.choice([e for e in executors if e.alive()] or executors)
                    if victim.alive():
                        await asyncio.to_thread(victim.kill9)
                        injected.append("executor kill -9")
                    restarts.append(asyncio.create_task(restart_later(victim, rng.uniform(0.0, 0.5))))
            elif phase == "rail-fault":
                await set_rail_faults(rail, error_rate=0.2, timeout_rate=0.1)
                injected.append("rail 20% 503, 10% executed without an answer")
                for _ in range(args.rail_kills):
                    await asyncio.sleep(rng.uniform(1.5, 3.0))
                    await asyncio.to_thread(rail.kill9)
                    injected.append("rail kill -9")
                    await asyncio.sleep(rng.uniform(0.5, 1.5))
                    await start_services([rail])
                    await set_rail_faults(rail, error_rate=0.2, timeout_rate=0.1)
                await asyncio.sleep(2.0)
                await set_rail_faults(rail, error_rate=0.0, timeout_rate=0.0)
            else:
                for _ in range(args.db_restarts):
                    await asyncio.sleep(rng.uniform(1.5, 3.0))
                    await asyncio.to_thread(run.cluster.stop, "immediate")
                    injected.append("pg_ctl stop -m immediate")
                    await asyncio.sleep(args.db_down_seconds)
                    await asyncio.to_thread(run.cluster.start)
            await asyncio.gather(*restarts)
        finally:
            stop.set()

    fault_task = asyncio.create_task(faults())
    await clients.run(args.clients, 10**9, 300, stop=stop, min_requests=args.exec_requests)
    await fault_task
    for executor in executors:
        if not executor.alive():
            executor.start(wait=False)
    still_open, drained = await wait_final(url, within=180)
    for process in [*executors, *services, rail]:
        process.stop()
    check_answers(checks, clients.sent, stats, everyone_answered=False)
    await check_database(checks, url, accounts, generator.requests, clients.sent, everyone_answered=False)
    checks.add(
        "every cancel answered 200 or 409",
        sum(clients.cancels.values()),
        [f"{n} x HTTP {status}" for status, n in clients.cancels.items() if status not in (200, 409)],
    )
    facts = await check_execution(checks, url, record)
    run.checks += checks.items
    kinds = Counter(injected)
    run.figures.append(
        figures(
            phase,
            stats,
            clients,
            ", ".join(f"{n} {kind}" for kind, n in kinds.items()),
            time.monotonic() - started,
            note=f"{args.executors} executors; cancels {dict(clients.cancels)}; final after the faults in "
            f"{drained:.1f}s ({still_open} not final); transfers {facts['transfers by status']}; "
            f"runs {facts['runs']}; rail payments {facts['rail payments']}",
        )
    )


async def exec_crash(run: Run) -> None:
    await execution(run, "exec-crash")


async def rail_fault(run: Run) -> None:
    await execution(run, "rail-fault")


async def fuzz_phase(run: Run) -> None:
    """schemathesis against a real service from the document it serves (tests/reliability/fuzz.py): every
    operation's examples, generated valid and invalid cases and link sequences, for --fuzz-seconds."""
    args = run.args
    started = time.monotonic()
    checks = Checks("fuzz")
    url = await new_database(run, "bps_fuzz")
    connection = await asyncpg.connect(url)
    try:
        name, iban, bic = fuzz.EXAMPLE_ACCOUNT
        account = await connection.fetchval(
            "SELECT bps.create_bank_account($1, $2, $3, $4)", name, iban, bic, 10_000_000_000
        )
        key = await connection.fetchval("SELECT bps.create_api_key(ARRAY[$1::bigint], 'fuzz')", account)
    finally:
        await connection.close()
    (service,) = run.new_services(url, 1, 1, "fuzz")
    await start_services([service])
    result = await asyncio.to_thread(fuzz.run_fuzz, service.url, key, args.fuzz_seconds, args.seed)
    service.stop()
    (run.logs / "fuzz.txt").write_text(fuzz.summary(result))
    checks.add(f"schemathesis: no 5xx ({result['requests']} requests)", result["requests"],
               [f"{result['server_errors']} 5xx seen, {result['served_5xx']} counted by /metrics"]
               if result["server_errors"] or result["served_5xx"] else [])  # fmt: skip
    checks.add("schemathesis: every answer as the document describes", result["cases"],
               [str(f) for f in result["failures"]][:8] if result["violations"] else [])  # fmt: skip
    checks.add("schemathesis ran without errors", result["cases"], [str(e) for e in result["errors"]])
    run.checks += checks.items
    run.figures.append(
        {
            "phase": "fuzz",
            "http requests": result["served"],
            "logical requests": result["requests"],
            "accepted (201)": result["statuses"].get(201, result["statuses"].get("201", 0)),
            "no answer (conn)": 0,
            "503": result["statuses"].get(503, result["statuses"].get("503", 0)),
            "gave up": 0,
            "faults injected": f"{result['cases']} cases, {result['link_steps']} link steps",
            "p50/p99 s": "-",
            "seconds": round(time.monotonic() - started, 1),
            "note": f"statuses {result['statuses']}; violations {result['violations']}",
        }
    )


async def exec_dbfault(run: Run) -> None:
    await execution(run, "exec-dbfault")


PHASE_FUNCTIONS = {
    "soak": soak,
    "access": access,
    "crash": crash,
    "dbfault": dbfault,
    "hostile": hostile_phase,
    "fuzz": fuzz_phase,
    "exec-crash": exec_crash,
    "rail-fault": rail_fault,
    "exec-dbfault": exec_dbfault,
}


def print_report(run: Run, seconds: float) -> tuple[int, int]:
    columns = [
        "phase",
        "http requests",
        "logical requests",
        "accepted (201)",
        "no answer (conn)",
        "503",
        "gave up",
        "faults injected",
        "violations",
        "p50/p99 s",
        "seconds",
    ]
    rows = []
    for f in run.figures:
        violations = sum(c.violations for c in run.checks if c.phase == f["phase"])
        rows.append([str(f.get(c, violations if c == "violations" else "")) for c in columns])
    total_violations = sum(c.violations for c in run.checks)
    rows.append(
        [
            "total",
            str(sum(f["http requests"] for f in run.figures)),
            str(sum(f["logical requests"] for f in run.figures)),
            str(sum(f["accepted (201)"] for f in run.figures)),
            "",
            "",
            "",
            "",
            str(total_violations),
            "",
            f"{seconds:.1f}",
        ]
    )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = "+".join("-" * (w + 2) for w in widths)
    print()
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print(line)
    for row in rows:
        print(
            " | ".join(
                v.rjust(w) if v.replace(".", "").isdigit() else v.ljust(w) for v, w in zip(row, widths, strict=True)
            )
        )
    print()
    for f in run.figures:
        if f.get("note"):
            print(f"{f['phase']}: {f['note']}")
    print()
    for check in run.checks:
        mark = "PASS" if check.passed else "FAIL"
        print(f"{mark}  [{check.phase}] {check.name}  (examined {check.examined}, violations {check.violations})")
        for example in check.examples:
            print(f"        {str(example)[:1500]}")
    below = [f"{k} {getattr(run.args, k)} < {v}" for k, v in PROOF_MINIMUMS.items() if getattr(run.args, k) < v]
    if below:
        print(f"\nnote: smaller than the proof needs ({', '.join(below)}): a try-out, not the proof.")
    passed = sum(c.passed for c in run.checks)
    failed = len(run.checks) - passed
    return passed, failed


def limit_memory(gigabytes: float) -> None:
    """A ceiling on this process's address space (inherited by what it starts): a runaway is a MemoryError
    here, not the machine's OOM killer picking a victim."""
    if gigabytes > 0:
        limit = int(gigabytes * 1024**3)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    limit_memory(args.max_memory_gb)
    started = time.monotonic()
    logs = Path(tempfile.mkdtemp(prefix="bps-reliability-logs-"))
    print(f"bps reliability: phases {','.join(args.phases)}, seed {args.seed}, logs in {logs}", flush=True)
    cluster = Cluster(fsync=args.fsync == "on")
    run = Run(args, cluster, logs)
    try:
        cluster.init()
        cluster.start()
        cluster.wait_accepting()
        for phase in args.phases:
            phase_started = time.monotonic()
            print(f"-- {phase} ...", flush=True)
            try:
                asyncio.run(PHASE_FUNCTIONS[phase](run))
            except Exception as error:  # a phase that cannot finish is a failed check, and the run goes on
                traceback.print_exc()
                run.checks.append(Check(phase, "phase ran to completion", 1, 1, [f"{type(error).__name__}: {error}"]))
                if not cluster.is_running():
                    cluster.start()
            finally:
                run.stop_services()
            print(f"   {phase} done in {time.monotonic() - phase_started:.1f}s", flush=True)
    finally:
        run.stop_services()
        shutil.copy(cluster.log, logs / "postgres.log") if cluster.log.exists() else None
        cluster.destroy()
    passed, failed = print_report(run, time.monotonic() - started)
    if failed == 0:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"\nservice and PostgreSQL logs kept in {logs}")
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
