"""The command line: `python -m service run|serve|execute|rail-simulator|migrate|seed-demo`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import tempfile

from aiohttp import web

from . import db, embedded, logs, metrics, rail_simulator
from .app import create_app
from .config import Config, cores
from .executor import Executor
from .metrics import ExecutorMetrics
from .processes import Process
from .rail import HttpRail

log = logging.getLogger("bps")


def simulated_rail_url() -> str:
    """Where `rail-simulator` listens, as BPS_RAIL_HOST and BPS_RAIL_PORT say."""
    settings = rail_simulator.Settings.from_env()
    return f"http://{settings.host}:{settings.port}"


def serve_one(config: Config) -> None:
    """One worker process: uvloop, the app, SO_REUSEPORT so several workers share the port."""
    import uvloop

    uvloop.install()
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        reuse_port=config.workers > 1,
        access_log=logging.getLogger("bps.access") if config.access_log else None,
        access_log_class=logs.AccessLogger,
        access_log_format=config.log_format,
        shutdown_timeout=config.shutdown_timeout_seconds,
        print=lambda message: log.info(message.strip()),
    )


def serve(config: Config) -> None:
    if config.workers <= 1:
        serve_one(config)
        return
    # The workers' metrics meet in files there, so that any worker's /metrics counts them all.
    made = metrics.MULTIPROC_DIR not in os.environ
    metrics_dir = os.environ.setdefault(metrics.MULTIPROC_DIR, tempfile.mkdtemp(prefix="bps-metrics-"))
    metrics.prepare_multiprocess_dir(metrics_dir)
    workers = [multiprocessing.Process(target=serve_one, args=(config,)) for _ in range(config.workers)]
    for worker in workers:
        worker.start()

    def stop_workers(_signum, _frame):
        # Each worker shuts down gracefully on SIGTERM: it finishes requests in flight, then closes its pool.
        for worker in workers:
            if worker.is_alive():
                worker.terminate()

    signal.signal(signal.SIGTERM, stop_workers)
    signal.signal(signal.SIGINT, stop_workers)
    for worker in workers:
        worker.join()
    metrics.prepare_multiprocess_dir(metrics_dir)
    if made:
        os.rmdir(metrics_dir)


async def execute(config: Config) -> None:
    """One executor, until SIGTERM or SIGINT."""
    if config.executor_lease_seconds <= config.rail_timeout_seconds:
        raise SystemExit("BPS_EXECUTOR_LEASE_SECONDS must be longer than BPS_RAIL_TIMEOUT_SECONDS")
    url = config.executor_database_url or await db.login_url(config.database_url, "executor")
    pool = await db.connection_pool(url, config.executor_concurrency + 1, config.statement_timeout_ms, "bps-executor")
    rail = HttpRail(config.rail_url or simulated_rail_url(), config.rail_timeout_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    executor_metrics = ExecutorMetrics()
    if config.executor_metrics_port is not None:
        executor_metrics.serve(config.host, config.executor_metrics_port)
        log.info("executor metrics on http://%s:%d/metrics", config.host, config.executor_metrics_port)
    try:
        await Executor(
            pool,
            rail,
            metrics=executor_metrics,
            batch=config.executor_batch,
            concurrency=config.executor_concurrency,
            lease_seconds=config.executor_lease_seconds,
            idle_poll_max_seconds=config.executor_idle_poll_seconds,
        ).run(stop)
    finally:
        await rail.close()
        await pool.close()


def run(config: Config) -> None:
    """The HTTP service with the simulated rail and an executor beside it, until Ctrl+C stops all three."""
    children: list[Process] = []
    env = {"DATABASE_URL": config.database_url, "BPS_SERVICE_DATABASE_URL": config.service_database_url}
    try:
        if config.rail_url is None:
            rail = rail_simulator.Settings.from_env()
            children.append(Process("rail-simulator", env, port=rail.port).start())
        if config.executor:
            children.append(Process("execute", env).start())
        else:
            log.info("BPS_EXECUTOR is off: no executor runs; transfers stay pending")
        serve(config)
    finally:
        for child in children:
            child.stop()


def command(args: argparse.Namespace, config: Config, parser: argparse.ArgumentParser) -> None:
    """The command the arguments name, on the database `config` names."""
    migrating = args.command in ("migrate", "run") or getattr(args, "migrate", False)
    seeding = args.command in ("seed-demo", "run") or getattr(args, "seed_demo", False)
    if (migrating or seeding or args.command == "execute") and config.database_url is None:
        parser.error("migrating, seeding and executing need the owner's DATABASE_URL")

    if migrating:
        applied = asyncio.run(db.migrate(config.database_url))
        log.info("migrated (%d new migrations), functions re-applied", len(applied))
    if seeding:
        created, key = asyncio.run(db.seed_demo(config.database_url))
        log.info(
            "demo account %s; a new demo API key was made (printed on stdout, not logged)",
            "created" if created else "already present",
        )
        # On stdout, once, for the person who ran the command; never through logging.
        print(f"\nThe demo account's API key (shown only now):\n\n    export BPS_API_KEY={key}\n", flush=True)
    if args.command in ("serve", "run") and config.service_database_url is None:
        config = dataclasses.replace(config, service_database_url=asyncio.run(db.login_url(config.database_url)))
    if args.command in ("serve", "run"):
        log.info(
            "serving on http://%s:%d: %d worker(s) x %d database connection(s), on %d core(s)",
            config.host,
            config.port,
            config.workers,
            config.pool_max_size,
            cores(),
        )
        (serve if args.command == "serve" else run)(config)
    elif args.command == "execute":
        import gc

        import uvloop

        # Batches of a thousand rows make many short-lived objects and few cycles: collect less often.
        gc.set_threshold(50_000, 20, 20)
        uvloop.run(execute(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="BPS bulk payment service")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "run", help="migrate, seed the demo, and serve with the simulated rail and an executor (make run)"
    )
    serve_parser = commands.add_parser("serve", help="serve HTTP on BPS_HOST:BPS_PORT")
    serve_parser.add_argument("--migrate", action="store_true", help="migrate the database first")
    serve_parser.add_argument(
        "--seed-demo", action="store_true", help="create the demo account first, and print a new API key for it"
    )
    commands.add_parser("execute", help="run one executor: claim due transfers, send them to the rail, settle")
    commands.add_parser("rail-simulator", help="serve the simulated payment rail on BPS_RAIL_HOST:BPS_RAIL_PORT")
    commands.add_parser("migrate", help="apply migrations and re-apply the sql/ functions")
    commands.add_parser(
        "seed-demo", help="create the demo account (ACME Corp) unless it exists, and print a new API key for it"
    )
    args = parser.parse_args(argv)

    config = Config.from_env()
    logs.configure(config.log_format, config.log_level)
    if args.command == "rail-simulator":
        rail_simulator.serve(rail_simulator.Settings.from_env())
        return 0
    server = None
    if config.database_url is None and config.service_database_url is None:
        try:
            server, url = embedded.start()
        except embedded.EmbeddedError as error:
            parser.exit(1, f"{parser.prog}: {error}\n")
        config = dataclasses.replace(config, database_url=url)
        log.info("DATABASE_URL is not set: using the embedded PostgreSQL in %s", embedded.PGDATA)
    try:
        command(args, config, parser)
    finally:
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
