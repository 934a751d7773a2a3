"""The command line: `python -m service serve|migrate|seed-demo`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import multiprocessing
import signal
import sys

from aiohttp import web

from . import db, embedded, logs
from .app import create_app
from .config import Config

log = logging.getLogger("bps")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="BPS bulk payment service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve HTTP on BPS_HOST:BPS_PORT")
    serve_parser.add_argument("--migrate", action="store_true", help="migrate the database first")
    serve_parser.add_argument(
        "--seed-demo", action="store_true", help="create the demo account first, and print a new API key for it"
    )
    commands.add_parser("migrate", help="apply migrations and re-apply the sql/ functions")
    commands.add_parser(
        "seed-demo", help="create the seed's demo account (ACME Corp) unless it exists, and print a new API key for it"
    )
    args = parser.parse_args(argv)

    config = Config.from_env()
    logs.configure(config.log_format, config.log_level)
    server = None
    if config.database_url is None and config.service_database_url is None:
        server, url = embedded.start()
        config = dataclasses.replace(config, database_url=url)
        log.info("DATABASE_URL is not set: using the embedded PostgreSQL in %s", embedded.PGDATA)
    migrating = args.command == "migrate" or getattr(args, "migrate", False)
    seeding = args.command == "seed-demo" or getattr(args, "seed_demo", False)
    if (migrating or seeding) and config.database_url is None:
        parser.error("migrating and seeding need the owner's DATABASE_URL")

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
    if args.command == "serve":
        if config.service_database_url is None:
            config = dataclasses.replace(config, service_database_url=asyncio.run(db.login_url(config.database_url)))
        log.info("serving on http://%s:%d with %d worker(s)", config.host, config.port, config.workers)
        serve(config)
    if server is not None:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
