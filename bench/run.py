"""`python -m bench`: BPS against PostgreSQL's own floor, in one run.

It creates a fresh database (or uses BPS_BENCH_URL), migrates it, opens accounts, starts the service with
several workers, then runs each case for a fixed window with closed-loop clients in separate processes:

  health  GET /health                                    (the batch-1 yardstick)
  floor   one INSERT ... SELECT FROM jsonb_to_recordset per request, from asyncpg into a plain table shaped
          like bps.transfers: no HTTP, no rules          (what PostgreSQL itself allows)
  many    POST /bulk_transfer, each concurrent client debiting accounts no other client touches
  hot     POST /bulk_transfer, every client debiting ONE account
  xml     POST /bulk_transfer of the many case's request as a pain.001 file (one PmtInf), accounts as many's

at each batch size and concurrency. Every request body is unique (a counter stamped in place) and every
account can pay for the whole run, so a correct service answers 201 to each; anything else is reported.
It prints a table, writes JSON, a Markdown report and a PNG plot under bench/results/, and also records where
the CPU went, what PostgreSQL's backends waited on, and (BPS_BENCH_PROFILE=1) py-spy profiles of the workers.

Environment (all optional):
  BPS_BENCH_URL            use this database (migrated, kept) instead of a fresh one (dropped at the end)
  BPS_BENCH_ADMIN_URL      where fresh databases are made (default postgresql://postgres@127.0.0.1:5432/postgres)
  BPS_BENCH_SECONDS        measured seconds per case (default 6: the whole run takes about 9 minutes)
  BPS_BENCH_WARMUP         warm-up seconds per case, not measured (default 1)
  BPS_BENCH_BATCHES        transfers per request (default 1,10,100,1000,10000)
  BPS_BENCH_CONCURRENCY    concurrent clients (default 1,4,16)
  BPS_BENCH_CASES          which cases to run (default health,floor,many,hot,xml)
  BPS_BENCH_WORKERS        service worker processes (default: the service's own, one per core)
  BPS_BENCH_POOL_MAX_SIZE  database connections per worker (default: the service's own default)
  BPS_BENCH_ACCOUNTS       accounts for the many-accounts cases (default 1000)
  BPS_BENCH_CLIENTS        load generator processes (default 1)
  BPS_BENCH_PORT           the service's port (default: a free one)
  BPS_BENCH_PROFILE        1: py-spy records the workers during each HTTP case (it costs CPU: profile runs
                           explain a case, their rates are not the table's)
  BPS_BENCH_EXPLAIN        0: skip the per-statement breakdown of bps.bulk_transfer (auto_explain)
  BPS_BENCH_ANALYZE        0: skip the ANALYZE (and VACUUM of bps.bank_accounts) run before each case in
                           autovacuum's stead; it is off on some servers, and plans cached while the tables
                           were empty then never change
  BPS_BENCH_OUT            results directory (default bench/results)
  BPS_BENCH_EXECUTION      0: skip the executor's cases (bench/execution.py)
  BPS_BENCH_EXECUTORS      executor processes in those cases (default 2)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

from service import db
from service.config import Config
from service.processes import Process

from . import database, execution, load, report, system
from .server import ROOT, Profiler, py_spy, service

HOST = "127.0.0.1"
DRAIN_TIMEOUT = 120.0
CASE_STRIDE = 10**15  # the counter space of one case (see load.SLOT_STRIDE)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Settings:
    url: str | None
    admin_url: str
    seconds: float
    warmup: float
    batches: list[int]
    concurrency: list[int]
    cases: list[str]
    workers: int
    pool_max_size: int
    accounts: int
    clients: int
    port: int
    profile: bool
    explain: bool
    analyze: bool
    out: Path
    execution: bool
    executors: int

    @classmethod
    def from_env(cls, env=os.environ) -> Settings:
        concurrency = _ints(env.get("BPS_BENCH_CONCURRENCY") or "1,4,16")
        return cls(
            url=env.get("BPS_BENCH_URL") or None,
            admin_url=env.get("BPS_BENCH_ADMIN_URL") or database.ADMIN_URL,
            seconds=float(env.get("BPS_BENCH_SECONDS") or 6),
            warmup=float(env.get("BPS_BENCH_WARMUP") or 1),
            batches=_ints(env.get("BPS_BENCH_BATCHES") or "1,10,100,1000,10000"),
            concurrency=concurrency,
            cases=[c.strip() for c in (env.get("BPS_BENCH_CASES") or "health,floor,many,hot,xml").split(",")],
            workers=int(env.get("BPS_BENCH_WORKERS") or Config().workers),
            pool_max_size=int(env.get("BPS_BENCH_POOL_MAX_SIZE") or Config().pool_max_size),
            accounts=int(env.get("BPS_BENCH_ACCOUNTS") or 1000),
            clients=int(env.get("BPS_BENCH_CLIENTS") or 1),
            port=int(env.get("BPS_BENCH_PORT") or _free_port()),
            profile=(env.get("BPS_BENCH_PROFILE") or "0") not in ("0", ""),
            explain=(env.get("BPS_BENCH_EXPLAIN") or "1") not in ("0", ""),
            analyze=(env.get("BPS_BENCH_ANALYZE") or "1") not in ("0", ""),
            out=Path(env.get("BPS_BENCH_OUT") or ROOT / "bench" / "results"),
            execution=(env.get("BPS_BENCH_EXECUTION") or "1") not in ("0", ""),
            executors=int(env.get("BPS_BENCH_EXECUTORS") or 2),
        )


@dataclass(frozen=True)
class Case:
    kind: str
    batch: int  # 0 for health
    concurrency: int

    @property
    def name(self) -> str:
        return f"{self.kind}-b{self.batch}-c{self.concurrency}"


def plan(settings: Settings) -> list[Case]:
    """Health first; then per batch size and concurrency the floor and both account shapes side by side,
    so each ratio compares cases run moments apart on tables of about the same size."""
    cases = [Case("health", 0, c) for c in settings.concurrency if "health" in settings.cases]
    for batch in settings.batches:
        for concurrency in settings.concurrency:
            cases += [Case(kind, batch, concurrency) for kind in report.KINDS if kind in settings.cases]
    return cases


class Clients:
    """The load generator processes (spawned: nothing of this process's state is shared with them)."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes = []
        self.processes = []
        for _ in range(count):
            mine, theirs = context.Pipe()
            process = context.Process(target=load.serve, args=(theirs,), daemon=True)
            process.start()
            self.pipes.append(mine)
            self.processes.append(process)

    @property
    def pids(self) -> set[int]:
        return {process.pid for process in self.processes}

    async def ask(self, index: int, command: str, argument) -> object:
        self.pipes[index].send((command, argument))
        kind, answer = await asyncio.to_thread(self.pipes[index].recv)
        if kind == "error":
            raise RuntimeError(f"load generator {index} failed:\n{answer}")
        return answer

    async def stop(self) -> None:
        for index, process in enumerate(self.processes):
            if process.is_alive():
                try:
                    await asyncio.wait_for(self.ask(index, "stop", None), 10)
                except (Exception, asyncio.CancelledError):
                    pass
            process.join(5)
            if process.is_alive():
                process.kill()


async def run_case(
    index: int,
    case: Case,
    settings: Settings,
    accounts: dict,
    url: str,
    clients: Clients,
    server: Process,
    sampler: database.WaitSampler,
    profiler: Profiler | None,
) -> dict:
    shares = [[s for s in range(case.concurrency) if s % len(clients.pipes) == p] for p in range(len(clients.pipes))]
    busy = [p for p, slots in enumerate(shares) if slots]
    account_list = [accounts["hot"]] if case.kind == "hot" else accounts["many"]
    if settings.analyze:
        await database.autovacuum_stand_in(url)
    for p in busy:
        spec = load.Spec(
            kind=case.kind,
            batch=case.batch,
            slots=shares[p],
            concurrency=case.concurrency,
            seconds=settings.seconds,
            warmup=settings.warmup,
            drain_timeout=DRAIN_TIMEOUT,
            host=HOST,
            port=server.port,
            database_url=url,
            counter_base=(index + 1) * CASE_STRIDE,
            accounts=account_list,
        )
        await clients.ask(p, "prepare", spec)

    start_at = time.monotonic() + settings.warmup + 0.1
    until = start_at + settings.seconds
    answers = [asyncio.ensure_future(clients.ask(p, "go", start_at)) for p in busy]
    waits = asyncio.ensure_future(sampler.sample(start_at, until))
    service_pids = set(server.pids())
    database_name = db.database_name(url)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    before = system.snapshot(service_pids, clients.pids, database_name)
    calls_before = await asyncio.to_thread(group_calls, server.port)
    if profiler is not None and case.kind != "floor":
        profiler.start(case.name, server.worker_pids(), settings.seconds)
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    after = system.snapshot(service_pids, clients.pids, database_name)
    calls_after = await asyncio.to_thread(group_calls, server.port)
    cores = system.cores_used(before, after, settings.seconds)

    records, samples, stuck, client_cpu = [], {}, 0, 0.0
    for answer in await asyncio.gather(*answers):
        records += answer["records"]
        samples.update(answer["samples"])
        stuck += answer["stuck"]
        client_cpu += answer["cpu_seconds"]
    result = {**asdict(case), **report.measure(case.kind, case.batch, records, start_at, until)}
    result.update(
        seconds=settings.seconds,
        cores=cores,
        client_cpu_cores=round(client_cpu / settings.seconds, 3),
        cpu_ms_per_request={
            group: round(1000 * cores[group] / rate, 3) if (rate := result["requests_per_second"]) else None
            for group in ("service", "pg", "client")
        },
        waits=await waits,
        stuck_requests=stuck,
        requests_per_call=requests_per_call(calls_before, calls_after),
    )
    if samples:
        result["samples"] = samples
    if profiler is not None and case.kind != "floor":
        result["profile"] = await asyncio.to_thread(profiler.finish)
    return result


def group_calls(port: int) -> tuple[int, int]:
    """The service's running totals of bulk transfer requests and of the calls that took them to PostgreSQL
    (its group commit's histogram, summed over the workers)."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = dict.fromkeys(("sum", "count"), 0)
    for line in text.splitlines():
        for total in totals:
            if line.startswith(f"bps_bulk_transfer_call_requests_{total} "):
                totals[total] = int(Decimal(line.split()[1]))  # (whole numbers, written as 12.0)
    return totals["sum"], totals["count"]


def requests_per_call(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The mean group size over a case: requests over calls (None: no bulk transfer call in it)."""
    calls = after[1] - before[1]
    return round((after[0] - before[0]) / calls, 2) if calls else None


def progress(index: int, total: int, r: dict) -> str:
    tps = "" if r["transfers_per_second"] is None else f"{r['transfers_per_second']:>11,.0f} transfers/s"
    cores = r["cores"]
    return (
        f"[{index:>2}/{total}] {r['kind']:<6} batch {r['batch'] or '-':>5} c{r['concurrency']:<3}"
        f"{r['requests_per_second']:>9,.1f} req/s{tps:>24}  p99 {r['p99_ms'] or 0:>8.1f} ms"
        f"  not-ok {r['not_ok']}  cores svc {cores['service']:.2f} pg {cores['pg']:.2f}"
        f" client {cores['client']:.2f} other {cores['other']:.2f}"
    )


def git_facts() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    return {"commit": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain", "--", "sql", "service")}


async def bench(settings: Settings) -> dict:
    cases = plan(settings)
    per_case = settings.warmup + settings.seconds + 0.5
    print(
        f"bps bench: {len(cases)} cases x ~{per_case:.1f}s (+ drain of the longest requests), "
        f"{settings.workers} workers x {settings.pool_max_size} connections, port {settings.port}",
        flush=True,
    )
    if settings.profile and py_spy() is None:
        raise SystemExit("BPS_BENCH_PROFILE=1 needs py-spy (pip install py-spy)")
    settings.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fresh = settings.url is None
    url = await db.create_database(settings.admin_url, "bps_bench") if fresh else settings.url
    server = clients = sampler = None
    document: dict = {
        "command": "make bench",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items() if k != "url"},
        "git": git_facts(),
        "machine": system.machine_description(),
    }
    try:
        print(f"database {db.database_name(url)}: migrating, opening {settings.accounts + 2} accounts", flush=True)
        accounts = await database.prepare(url, settings.accounts, random.randrange(10**6))
        document["postgres"] = await database.server_facts(url)
        server = service(
            url, HOST, settings.port, settings.workers, settings.pool_max_size, settings.out / "service.log"
        )
        await asyncio.to_thread(server.start)
        clients = Clients(settings.clients)
        sampler = database.WaitSampler(url)
        await sampler.open()
        profiler = Profiler(settings.out / "profiles" / stamp) if settings.profile else None
        results = []
        for index, case in enumerate(cases, 1):
            result = await run_case(index, case, settings, accounts, url, clients, server, sampler, profiler)
            results.append(result)
            print(progress(index, len(cases), result), flush=True)
            for status, sample in result.get("samples", {}).items():
                print(f"      {status}: {sample[:300]}", flush=True)
        document["cases"] = results
        if settings.execution:
            print("executor cases (a database of their own)...", flush=True)

            async def case(i, case, accounts, url, server, sampler):
                result = await run_case(i, case, settings, accounts, url, clients, server, sampler, None)
                print(progress(i, len(cases) + 2, result), flush=True)
                return result

            async def sampler_for(url):
                made = database.WaitSampler(url)
                await made.open()
                return made

            document["execution"] = await execution.execution_cases(
                settings, case, clients, sampler_for, _free_port(), _free_port(), len(cases) + 1
            )
            print(execution.text(document["execution"]), flush=True)
        if settings.explain:
            print("function breakdown (plain calls, then auto_explain), per batch size...", flush=True)
            if settings.analyze:
                await database.autovacuum_stand_in(url)
            document["function_breakdown"] = await database.function_breakdown(
                url, accounts["explain"], settings.batches, (len(cases) + 1) * CASE_STRIDE
            )
        document["table_sizes"] = await database.table_sizes(url)
    finally:
        if sampler is not None:
            await sampler.close()
        if clients is not None:
            await clients.stop()
        if server is not None:
            await asyncio.to_thread(server.stop, 45)
        if fresh and os.environ.get("BPS_BENCH_KEEP") != "1":
            await db.drop_database(settings.admin_url, url)
    document["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write(settings.out, stamp, document)
    return document


def write(out: Path, stamp: str, document: dict) -> None:
    results = document["cases"]
    report.add_ratios(results)
    document["goals"] = report.goals(results)
    plans = []
    for batch, entry in document.get("function_breakdown", {}).items():
        if isinstance(entry, dict):
            plans.append(f"===== batch {batch}: bps.bulk_transfer, every statement =====")
            plans += entry.pop("plans", [])
            plans.append(f"===== batch {batch}: the floor's insert =====")
            plans += entry.pop("floor_plan", [])
    machine = document["machine"]
    title = (
        f"BPS bench {document['started_at']} - {machine['cores']} cores {machine['cpu_model']}, "
        f"{document['postgres']['version'].split(' on ')[0]}, {document['settings']['workers']} workers, "
        f"{document['settings']['seconds']}s per case"
    )
    text = "\n\n".join(
        [
            f"# {title}",
            report.table(results),
            "## Goals\n\n" + report.goals_text(document["goals"]),
            "## Where the time went (average cores; PostgreSQL's active backends by wait)\n\n"
            + report.resources_table(results),
        ]
        + (["## The executor\n\n" + execution.text(document["execution"])] if "execution" in document else [])
    )
    base = out / f"run-{stamp}"
    report.write_json(base.with_suffix(".json"), document)
    base.with_suffix(".md").write_text(text + "\n")
    if plans:
        Path(f"{base}-plans.txt").write_text("\n".join(plans) + "\n")
    report.plot(base.with_suffix(".png"), results, title)
    for suffix in (".json", ".md", ".png"):
        shutil.copyfile(base.with_suffix(suffix), (out / "latest").with_suffix(suffix))
    print("\n" + text + "\n")
    print(f"wrote {base}.json, .md, .png (and latest.*) in {out}")


def main() -> int:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__)
        return 0
    settings = Settings.from_env()
    document = asyncio.run(bench(settings))
    return 0 if all(r["not_ok"] == 0 for r in document["cases"]) else 1
