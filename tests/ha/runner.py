"""`make ha`: BPS on a Patroni cluster behind HAProxy, under the reliability workload, while the primary is
killed, its Patroni alone is killed, the primary is switched over and an etcd member dies; then every
invariant, checked on the final primary and against what the clients were told, and each fault's recovery."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import asyncpg

from service import db
from service.processes import Process
from tests.reliability.checks import Check, Checks, check_answers, check_database
from tests.reliability.execution import check_execution, wait_final
from tests.reliability.options import from_env
from tests.reliability.workload import Account, Generator, Mix, Stats

from .load import TimedClients
from .timeline import (
    FAULT_KINDS,
    Fault,
    fault_table,
    first_accepted_after,
    format_table,
    plan,
    recovery,
    server_errors,
    summary_table,
    sync_standby_of,
    window_counts,
)
from .topology import Topology, free_ports, get_json

# The failures under failover seen so far, what they mean and the fix proposed for BPS (service/, not here).
PROPOSED_FIXES = {
    "ReadOnlySQLTransactionError": "SQLSTATE 25006: the statement reached a PostgreSQL not (yet) writable (a node "
    "HAProxy still sent connections to while its promotion or demotion was under way); nothing was written. "
    "Answer it as the database being unavailable (503 with Retry-After): add asyncpg.ReadOnlySQLTransactionError "
    "to UNAVAILABLE in service/app.py (the executor already retries every PostgresError).",
    "InternalClientError": "asyncpg's 'cannot switch to state N; another operation is in progress': a pooled "
    "connection whose session the server ended mid-operation (a node shut down by the failover) is left in a "
    "broken state and handed out again. The service answers 500 and the executor, whose DATABASE_ERRORS lack it, "
    "dies. Add asyncpg.InternalClientError to UNAVAILABLE (service/app.py) and to DATABASE_ERRORS "
    "(service/executor.py), and terminate() such a connection instead of returning it to the pool.",
}

# What the issue asks at least of one run.
MINIMUMS = {"node_kills": 5, "patroni_kills": 3, "switchovers": 2, "etcd_kills": 1}
EXECUTION_SETTINGS = "UPDATE bps.settings SET execution_max_attempts = 100000, execution_retry_cap = '1 second'"
FINGERPRINT_SQL = """SELECT (SELECT count(*) FROM bps.bulk_transfers) AS bulks,
                            (SELECT count(*) FROM bps.transfers) AS transfers,
                            (SELECT coalesce(sum(amount_cents), 0) FROM bps.transfers) AS transfer_cents,
                            (SELECT coalesce(sum(balance_cents), 0) FROM bps.bank_accounts) AS balances,
                            (SELECT count(*) FROM bps.idempotency_keys) AS keys,
                            (SELECT count(*) FROM bps.account_entries) AS entries"""


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def env(name: str, default):
    return from_env("BPS_HA", name, default)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.ha",
        description="BPS on Patroni + etcd + HAProxy under load, with the primary killed, checked from the final "
        "primary. Every option also reads BPS_HA_<NAME> from the environment (e.g. BPS_HA_SEED=7).",
    )
    p.add_argument("--seed", type=int, default=env("seed", random.randrange(1_000_000)))
    p.add_argument("--clients", type=int, default=env("clients", 16), help="concurrent clients")
    p.add_argument("--accounts", type=int, default=env("accounts", 60), help="ordinary accounts (plus a hot one)")
    p.add_argument("--hot-share", type=float, default=env("hot_share", 0.25))
    p.add_argument("--services", type=int, default=env("services", 2), help="BPS service instances")
    p.add_argument("--executors", type=int, default=env("executors", 2))
    p.add_argument("--node-kills", type=int, default=env("node_kills", 5), help="kill -9 of the primary node")
    p.add_argument("--patroni-kills", type=int, default=env("patroni_kills", 3), help="kill -9 of its Patroni")
    p.add_argument("--switchovers", type=int, default=env("switchovers", 2), help="patronictl switchover")
    p.add_argument("--etcd-kills", type=int, default=env("etcd_kills", 1), help="kill -9 of an etcd member")
    p.add_argument(
        "--steady-seconds", type=float, default=env("steady_seconds", 4.0), help="load on a whole cluster per fault"
    )
    p.add_argument("--fsync", default=env("fsync", "on"), choices=["on", "off"])
    p.add_argument("--max-minutes", type=float, default=env("max_minutes", 25.0), help="the whole run's bound")
    p.add_argument("--keep-logs", action="store_true", default=bool(env("keep_logs", 0)))
    p.add_argument("--quick", action="store_true", help="one fault of each kind (a try-out, a few minutes)")
    args = p.parse_args(argv)
    if args.quick:
        args.node_kills = args.patroni_kills = args.switchovers = args.etcd_kills = 1
        args.accounts = min(args.accounts, 20)
    return args


async def make_accounts(url: str, rng: random.Random, count: int, requests: int, hot_share: float) -> list[Account]:
    """`count` ordinary accounts funded for half to three times what about `requests` requests will ask of them,
    and a hot account funded for 70% of its demand: it runs dry, and its last cents are fought over."""
    per_request = 0.6 * 5.5 * 10_000  # 60% of requests pay, about 5.5 transfers of 100 EUR
    ordinary = requests * (1 - hot_share) * per_request / count
    hot_demand = requests * hot_share * per_request
    connection = await asyncpg.connect(url)
    accounts = []
    try:
        for i in range(count + 1):
            hot = i == count
            name = "Hot Account SA" if hot else f"Org {i} GmbH"
            iban = "FR76" + "".join(rng.choice("0123456789") for _ in range(23))
            bic = rng.choice(["OIVUSCLQXXX", "BNPAFRPPXXX", "COBADEFFXXX", "CRLYFRPPTOU"])
            opening = max(1, int(0.7 * hot_demand if hot else ordinary * rng.uniform(0.5, 3.0)))
            account_id = await connection.fetchval(
                "SELECT bps.create_bank_account($1, $2, $3, $4)", name, iban, bic, opening
            )
            key = await connection.fetchval("SELECT bps.create_api_key(ARRAY[$1::bigint], $2)", account_id, name)
            accounts.append(Account(account_id, name, iban, bic, opening, hot, key))
    finally:
        await connection.close()
    return accounts


class HaRun:
    def __init__(self, args: argparse.Namespace, topology: Topology, logs: Path) -> None:
        self.args = args
        self.topology = topology
        self.logs = logs
        self.rng = random.Random(args.seed)
        self.checks = Checks("ha")
        self.faults: list[Fault] = []
        self.processes: list[Process] = []
        self.services: list[Process] = []
        self.executors: list[Process] = []
        self.rail: Process | None = None
        self.clients: TimedClients | None = None
        self.stats = Stats()
        self.figures: dict = {}
        self.events: list[str] = []
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {message}"
        self.events.append(line)
        print(line, flush=True)

    # -- BPS

    def bps(self, command: str, name: str, port: int | None = None, **extra: str) -> Process:
        environment = {
            "DATABASE_URL": self.topology.owner_url(),
            "BPS_HOST": "127.0.0.1",
            "BPS_LOG_LEVEL": "info",
            "BPS_ACCESS_LOG": "off",
            "BPS_SHUTDOWN_TIMEOUT": "2",
            **extra,
        }
        process = Process(command, environment, port=port, log=self.logs / f"{name}.log")
        self.processes.append(process)
        return process

    async def start_bps(self) -> str:
        url = self.topology.owner_url()
        admin = await asyncpg.connect(self.topology.owner_url("postgres"))
        try:
            await admin.execute("CREATE DATABASE bps")
        finally:
            await admin.close()
        await db.migrate(url)
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(EXECUTION_SETTINGS)
        finally:
            await connection.close()
        (rail_port,) = free_ports(1)
        self.record = self.logs / "rail.sqlite3"
        self.rail = self.bps(
            "rail-simulator",
            "rail",
            rail_port,
            BPS_RAIL_RECORD=str(self.record),
            BPS_RAIL_LATENCY_MS="5",
            BPS_RAIL_FAILURE_RATE="0.05",
        )
        await asyncio.to_thread(self.rail.start)
        for i, port in enumerate(self.topology.service_ports):
            self.services.append(self.bps("serve", f"service-{i + 1}", port, BPS_WORKERS="1", BPS_POOL_MAX_SIZE="4"))
        for i in range(self.args.executors):
            self.executors.append(
                self.bps(
                    "execute",
                    f"executor-{i + 1}",
                    BPS_RAIL_URL=self.rail.url,
                    BPS_RAIL_TIMEOUT_SECONDS="2",
                    BPS_EXECUTOR_LEASE_SECONDS="5",
                    BPS_EXECUTOR_BATCH="100",
                    BPS_EXECUTOR_IDLE_POLL_SECONDS="0.2",
                )
            )
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in self.services))
        for e in self.executors:
            e.start()
        front = self.topology.front_url + "/health"
        await asyncio.to_thread(
            self.topology.wait, "the HTTP front", lambda: get_json(front, timeout=2)[0] == 200, 60, 0.25
        )
        return url

    # -- faults

    async def cluster(self):
        return await asyncio.to_thread(self.topology.cluster)

    async def wait_for(self, what: str, ready, within: float, every: float = 0.25):
        """Polls the (blocking) `ready()` in a thread until truthy; None after `within` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            value = await asyncio.to_thread(ready)
            if value:
                return value
            await asyncio.sleep(every)
        self.say(f"   {what}: not within {within:.0f}s")
        return None

    async def wait_whole(self, within: float = 240) -> bool:
        return bool(await self.wait_for("the cluster whole again", lambda: self.topology.health()[0], within, 0.5))

    async def wait_new_leader(self, old: str | None, within: float = 90) -> str | None:
        def new() -> str | None:
            leader = self.topology.leader()
            return leader if leader not in (None, old) else None

        return await self.wait_for("a new leader", new, within, 0.2)

    async def wait_accepted(self, fault: Fault, start_index: int, within: float = 120) -> None:
        """Until a request sent after the fault is accepted (201): its recovery seconds."""
        deadline = fault.injected + within
        seen = start_index
        while time.monotonic() < deadline:
            attempts = self.clients.attempts
            found = first_accepted_after(attempts[seen:], fault.injected)
            if found is not None:
                fault.first_201_seconds = found
                return
            seen = max(start_index, len(attempts) - 2_000)  # later answers, and some still in flight
            await asyncio.sleep(0.1)

    async def inject(self, kind: str) -> Fault:
        topology = self.topology
        leader = await asyncio.to_thread(topology.leader)
        if kind == "etcd":
            member = await asyncio.to_thread(topology.etcd_leader) or self.rng.choice(topology.etcd)
            fault = Fault(kind, member.name, time.monotonic(), leader_before=leader)
            fault.injected = await asyncio.to_thread(member.kill9)
        elif kind == "switchover":
            candidate = sync_standby_of(await self.cluster())
            fault = Fault(kind, f"{leader} -> {candidate}", time.monotonic(), leader_before=leader)
            node = topology.node(leader)
            result = await asyncio.to_thread(
                subprocess.run,
                ["patronictl", "-c", str(node.config), "switchover", "--leader", leader, "--candidate", candidate,
                 "--force", "bps-ha"],
                capture_output=True, text=True, timeout=90,
            )  # fmt: skip
            if result.returncode != 0:
                output = f"{result.stdout[-300:]} {result.stderr[-300:]}".strip()
                fault.notes.append(f"patronictl exit {result.returncode}: {output}")
        else:
            node = topology.node(leader)
            fault = Fault(kind, leader, time.monotonic(), leader_before=leader)
            fault.injected = await asyncio.to_thread(node.kill_node if kind == "node" else node.kill_patroni)
        return fault

    async def restore(self, fault: Fault) -> None:
        """What brings the cluster back to whole after the fault: the dead node or Patroni restarted (once a
        new leader is there, as an operator or systemd would), the etcd member restarted."""
        topology = self.topology
        if fault.kind == "etcd":
            await asyncio.sleep(self.rng.uniform(3, 6))
            member = next(m for m in topology.etcd if m.name == fault.victim)
            await asyncio.to_thread(member.start)
            await self.wait_for("etcd member healthy", member.healthy, 60)
            fault.leader_after = await asyncio.to_thread(topology.leader)
            return
        expected = fault.victim.split(" -> ")[1] if fault.kind == "switchover" else None
        new = await self.wait_new_leader(fault.leader_before)
        if new is not None:
            fault.new_leader_seconds = time.monotonic() - fault.injected
        fault.leader_after = new
        if expected is not None and new != expected:
            fault.notes.append(f"switchover went to {new}, not {expected}")
        if fault.kind in ("node", "patroni"):
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
            await asyncio.to_thread(topology.node(fault.victim).start)

    async def inject_all(self, stop: asyncio.Event) -> None:
        args = self.args
        counts = {
            "node": args.node_kills,
            "patroni": args.patroni_kills,
            "switchover": args.switchovers,
            "etcd": args.etcd_kills,
        }
        order = plan(self.rng, counts)
        self.say(f"faults, in order: {', '.join(order)}")
        try:
            await asyncio.sleep(args.steady_seconds)
            for i, kind in enumerate(order, 1):
                if not await self.wait_whole():
                    self.say("   the cluster did not become whole: the remaining faults are not injected")
                    break
                await asyncio.sleep(self.rng.uniform(0.5, 1.5) * args.steady_seconds)
                start_index = len(self.clients.attempts)
                fault = await self.inject(kind)
                self.faults.append(fault)
                self.say(f"fault {i}/{len(order)}: {FAULT_KINDS[kind]}: {fault.victim}")
                accepted = asyncio.create_task(self.wait_accepted(fault, start_index))
                await self.restore(fault)
                await accepted
                if await self.wait_whole():
                    fault.restored_seconds = time.monotonic() - fault.injected
                stall = recovery(self.clients.attempts[start_index:], fault.injected, time.monotonic())
                if stall is not None:
                    fault.recovery_seconds, fault.stall_seconds = stall
                self.say(
                    f"   leader {fault.leader_before} -> {fault.leader_after} "
                    f"after {seconds(fault.new_leader_seconds)}; "
                    f"accepting again after {seconds(fault.recovery_seconds)} "
                    f"(stall {seconds(fault.stall_seconds)}, first 201 {seconds(fault.first_201_seconds)}); "
                    f"whole again after {seconds(fault.restored_seconds)}"
                    + (f"; {'; '.join(fault.notes)}" if fault.notes else "")
                )
            await asyncio.sleep(args.steady_seconds)
        finally:
            stop.set()

    # -- the run

    async def run(self) -> None:
        args = self.args
        self.say(f"bringing up 3 etcd, 3 Patroni/PostgreSQL 15, HAProxy in {self.topology.root}")
        await asyncio.to_thread(self.topology.up)
        self.say(f"cluster whole, leader {await asyncio.to_thread(self.topology.leader)}")
        await self.start_bps()
        self.say(
            f"BPS up: {len(self.services)} services, {len(self.executors)} executors, the rail; front "
            f"{self.topology.front_url}"
        )
        url = self.topology.owner_url()
        faults_total = args.node_kills + args.patroni_kills + args.switchovers + args.etcd_kills
        expected_requests = int(max(faults_total, 1) * 40 * 100)  # about 40 s per fault at about 100 requests/s
        self.accounts = await make_accounts(url, self.rng, args.accounts, expected_requests, args.hot_share)
        self.generator = Generator(self.rng, "H", self.accounts, Mix(), args.hot_share)
        self.clients = TimedClients(
            self.generator, [self.topology.front_url], self.stats, retry=True, attempt_timeout=30, give_up_after=150
        )
        self.pids_before = {id(p): p.pids() for p in [*self.services, *self.executors]}
        stop = asyncio.Event()
        fault_task = asyncio.create_task(self.inject_all(stop))
        load_started = time.monotonic()
        await self.clients.run(args.clients, 10**9, args.max_minutes * 60, stop=stop, min_requests=0)
        await fault_task
        self.figures["load seconds"] = round(time.monotonic() - load_started, 1)
        self.say(f"load done: {self.stats.http_requests} HTTP requests")
        await self.final_checks()

    async def final_checks(self) -> None:
        checks = self.checks
        topology = self.topology
        args = self.args
        # Which node is the primary now, straight from Patroni and PostgreSQL, not through HAProxy.
        leader = await asyncio.to_thread(topology.leader)
        node = topology.node(leader)
        final_url = topology.owner_url(port=node.pg_port)
        connection = await asyncpg.connect(final_url)
        try:
            in_recovery = await connection.fetchval("SELECT pg_is_in_recovery()")
        finally:
            await connection.close()
        checks.expect(f"the final primary ({leader}) is Patroni's leader and writable", not in_recovery, "in recovery")
        status, routed = await asyncio.to_thread(self.routed_port)
        checks.expect("HAProxy routes the database connections to the final primary", routed == node.pg_port,
                      f"through HAProxy: port {routed}, the leader's {node.pg_port}")  # fmt: skip
        # Services and executors: the same processes as at the start, up, and answering.
        for what, group in (("service instances", self.services), ("executors", self.executors)):
            bad = [
                f"{p.log.stem}: alive {p.alive()}, starts {p.starts}, exit {p.process.returncode}"
                for p in group
                if not (p.alive() and p.starts == 1 and p.pids() == self.pids_before[id(p)])
            ]
            checks.add(f"{what} rode out every fault without a restart (alive, same pids, one start each)",
                       len(group), bad)  # fmt: skip
        dead = [e for e in self.executors if not e.alive()]
        for executor in dead:  # so that what they left is taken to the rail, and the execution checks mean something
            self.say(f"restarting {executor.log.stem}, which died (exit {executor.process.returncode})")
            executor.start()
        health = [get_json(s.url + "/health", timeout=5)[0] for s in self.services]
        checks.add("each service instance answers /health 200 directly", len(health),
                   [f"{s.url}: {h}" for s, h in zip(self.services, health, strict=True) if h != 200])  # fmt: skip
        # The transfers the executors still have to take to the rail, then everything stops.
        still_open, drained = await wait_final(final_url, within=180)
        self.figures["drained to final s"] = round(drained, 1)
        for process in [*self.executors, *self.services, self.rail]:
            await asyncio.to_thread(process.stop)
        # Faults as planned, each recovered.
        kinds = Counter(f.kind for f in self.faults)
        for kind, wanted in (("node", args.node_kills), ("patroni", args.patroni_kills),
                             ("switchover", args.switchovers), ("etcd", args.etcd_kills)):  # fmt: skip
            checks.expect(f"{wanted} x {FAULT_KINDS[kind]}", kinds[kind] >= wanted, f"{kinds[kind]} injected")
        checks.add("every fault followed by an accepted request (within 120 s)", len(self.faults),
                   [f"{f.kind} on {f.victim}" for f in self.faults if f.recovery_seconds is None])  # fmt: skip
        checks.add("the cluster whole again after every fault", len(self.faults),
                   [f"{f.kind} on {f.victim}" for f in self.faults if f.restored_seconds is None])  # fmt: skip
        leader_changes = [f for f in self.faults if f.kind != "etcd"]
        checks.add("every primary kill and switchover gave a new leader", len(leader_changes),
                   [f"{f.kind} on {f.victim}: {f.leader_before} -> {f.leader_after}"
                    for f in leader_changes if f.leader_after in (None, f.leader_before)])  # fmt: skip
        for fault in self.faults:
            end = fault.injected + (fault.recovery_seconds or 0)
            fault.window = window_counts(self.clients.attempts, fault.injected, end)
        front_503 = sum(1 for a in self.clients.attempts if a.status == 503 and a.code == "no_service_instance")
        checks.expect("the HTTP front always had a service instance up (no 503 of HAProxy's own)", front_503 == 0,
                      f"{front_503} answers of HAProxy's own 503")  # fmt: skip
        # What the clients were told, against the final primary's data and the rail's record.
        check_answers(checks, self.clients.sent, self.stats, everyone_answered=False)
        await check_database(checks, final_url, self.accounts, self.generator.requests, self.clients.sent,
                             everyone_answered=False)  # fmt: skip
        facts = await check_execution(checks, final_url, self.record)
        self.figures["transfers by status"] = facts["transfers by status"]
        self.figures["rail payments"] = facts["rail payments"]
        await self.replicas_agree(final_url, leader)

    def routed_port(self) -> tuple[int, int | None]:
        result = subprocess.run(
            ["psql", "-Atc", "SELECT inet_server_port()", self.topology.owner_url()],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        try:
            return result.returncode, int(result.stdout.strip())
        except ValueError:
            return result.returncode, None

    async def replicas_agree(self, final_url: str, leader: str) -> None:
        """Every replica, once it has replayed all the primary wrote, holds the same."""
        primary = await asyncpg.connect(final_url)
        try:
            lsn = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
            want = dict(await primary.fetchrow(FINGERPRINT_SQL))
        finally:
            await primary.close()
        bad = []
        replicas = [n for n in self.topology.nodes if n.name != leader]
        for node in replicas:
            try:
                connection = await asyncpg.connect(self.topology.owner_url(port=node.pg_port))
            except (OSError, asyncpg.PostgresError) as error:
                bad.append(f"{node.name}: {type(error).__name__}")
                continue
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    replayed = await connection.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn)
                    if replayed:
                        break
                    await asyncio.sleep(0.2)
                got = dict(await connection.fetchrow(FINGERPRINT_SQL))
                if got != want:
                    bad.append(f"{node.name}: {got}, the primary {want}")
            finally:
                await connection.close()
        self.checks.add("every replica holds what the primary holds", len(replicas), bad)
        self.figures["final data"] = want

    # -- the report

    def report(self, seconds: float, leftovers: list) -> int:
        attempts = self.clients.attempts if self.clients else []
        sent = self.clients.sent if self.clients else []
        statuses = self.stats.statuses
        print()
        print(format_table(fault_table(self.faults)))
        print()
        print(format_table(summary_table(self.faults)))
        print()
        other_5xx = sum(n for s, n in statuses.items() if s >= 500 and s != 503)
        violations = sum(c.violations for c in self.checks.items) + len(leftovers)
        totals = [
            ["faults", "HTTP requests", "logical requests", "201s", "accepted requests", "503s", "no answer",
             "other 5xx", "gave up", "violations", "seconds"],
            [str(len(self.faults)), str(self.stats.http_requests), str(len(sent)), str(statuses.get(201, 0)),
             str(len({r.rid for r in sent if 201 in r.statuses})), str(statuses.get(503, 0)),
             str(self.stats.no_answer), str(other_5xx), str(sum(r.gave_up for r in sent)), str(violations),
             f"{seconds:.0f}"],
        ]  # fmt: skip
        print(format_table(totals))
        print()
        print(f"statuses: {dict(sorted(statuses.items()))}; kinds: {dict(sorted(self.generator.kinds.items()))}"
              if self.clients else "")  # fmt: skip
        for name, value in self.figures.items():
            print(f"{name}: {value}")
        errors = server_errors(attempts, self.faults)
        if errors:
            print(f"\n5xx answers other than BPS's 503 with Retry-After ({len(errors)}):")
            for line in errors[:30]:
                print(f"    {line}")
        defects = self.defects()
        if defects:
            print("\nBPS DEFECTS FOUND UNDER FAILOVER (counted as violations above; the fix is BPS's, not this run's):")
            for kind, lines in defects.items():
                print(f"  {kind}: {len(lines)} x")
                print(f"    proposed: {PROPOSED_FIXES.get(kind, 'unknown: read the logs kept below')}")
                for line in lines[:6]:
                    print(f"      {line}")
        print()
        for check in self.checks.items:
            mark = "PASS" if check.passed else "FAIL"
            print(f"{mark}  {check.name}  (examined {check.examined}, violations {check.violations})")
            for example in check.examples:
                print(f"        {str(example)[:1500]}")
        mark = "PASS" if not leftovers else "FAIL"
        print(f"{mark}  teardown left no process  (violations {len(leftovers)})")
        for pid, cmdline in leftovers[:8]:
            print(f"        {pid}: {cmdline[:300]}")
        below = [f"{k} {getattr(self.args, k)} < {v}" for k, v in MINIMUMS.items() if getattr(self.args, k) < v]
        if below:
            print(f"\nnote: fewer faults than the proof needs ({', '.join(below)}): a try-out, not the proof.")
        summary = {
            "seed": self.args.seed,
            "faults": dict(Counter(f.kind for f in self.faults)),
            "recovery_seconds": {
                kind: [round(f.recovery_seconds, 2) if f.recovery_seconds is not None else None
                       for f in self.faults if f.kind == kind]
                for kind in FAULT_KINDS
            },
            "recovery_median_max": [
                round(statistics.median(r), 2) if (r := [f.recovery_seconds for f in self.faults
                                                         if f.recovery_seconds is not None]) else None,
                round(max(r), 2) if r else None,
            ],
            "http_requests": self.stats.http_requests,
            "201": statuses.get(201, 0),
            "503": statuses.get(503, 0),
            "other_5xx": other_5xx,
            "violations": violations,
            "seconds": round(seconds),
        }  # fmt: skip
        print(f"\nsummary: {json.dumps(summary)}")
        return violations

    def defects(self) -> dict[str, list[str]]:
        """What the services answered 500 for, and what killed an executor, by error type, from their logs."""
        found: dict[str, list[str]] = {}
        for log in sorted(self.logs.glob("service-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if " failed: " in line:
                    kind = line.split(" failed: ", 1)[1].split()[0]
                    found.setdefault(kind, []).append(f"{log.stem}: {line.strip()[:200]}")
        for log in sorted(self.logs.glob("executor-*.log")):
            lines = log.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if line.startswith("Traceback"):
                    last = next((x for x in lines[i + 1 :] if x and not x.startswith((" ", "Traceback"))), "?")
                    kind = last.split(":", 1)[0].rsplit(".", 1)[-1]
                    found.setdefault(kind, []).append(f"{log.stem} died: {last[:200]}")
                    break
        return found

    def service_failures(self) -> list[str]:
        lines = []
        for log in sorted(self.logs.glob("service-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if "failed:" in line:
                    lines.append(f"{log.stem}: {line.strip()[:300]}")
        return lines


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    logs = Path(tempfile.mkdtemp(prefix="bps-ha-logs-"))
    print(
        f"bps ha: seed {args.seed}; faults: {args.node_kills} node kills, {args.patroni_kills} Patroni kills, "
        f"{args.switchovers} switchovers, {args.etcd_kills} etcd kills; {args.clients} clients; logs in {logs}",
        flush=True,
    )

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    topology = Topology(fsync=args.fsync == "on", services=args.services)
    run = HaRun(args, topology, logs)
    leftovers: list = []
    try:
        asyncio.run(asyncio.wait_for(run.run(), timeout=args.max_minutes * 60))
    except Exception as error:  # a run that cannot finish is a failed check
        traceback.print_exc()
        run.checks.items.append(Check("ha", "the run ran to completion", 1, 1, [f"{type(error).__name__}: {error}"]))
    finally:
        for process in run.processes:
            try:
                process.kill9() if process.alive() else None
            except Exception:  # noqa: BLE001 - teardown goes on whatever one process does
                pass
        for log in topology.root.glob("*.log"):
            shutil.copy(log, logs / log.name)
        leftovers = topology.destroy()
        leftovers += [(pid, cmd) for pid, cmd in topology.leftovers() if (pid, cmd) not in leftovers]
        topology.remove()
    violations = run.report(time.monotonic() - started, leftovers)
    if violations == 0 and not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"\nlogs (BPS, Patroni, etcd, HAProxy) kept in {logs}")
    print(f"{'PASS' if violations == 0 else 'FAIL'}: {violations} violations in {time.monotonic() - started:.0f}s")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
