"""All configuration, read once from the environment."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

MIB = 1024 * 1024


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    # The owner's URL: migrations, the demo seed, and making the service's own login (below) when it is unset.
    database_url: str | None = None
    # The URL the service's connections log in with, as the role that may only execute schema bps_api.
    service_database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # One worker process per core: a worker is one event loop, and the JSON it relays costs CPU (docs/performance.md).
    workers: int = dataclasses.field(default_factory=cores)
    pool_min_size: int = 2
    # Per worker. About the database's cores divided by the workers: beyond that, requests wait on
    # PostgreSQL's locks and CPU instead of queueing cheaply here (make bench, 2 workers on 2 cores: one hot
    # account at 16 clients ran 1.9x faster at 4 than at 16, and 15 to 24% faster again at 2 than at 4).
    pool_max_size: int = 2
    pool_timeout_seconds: float = 10.0
    statement_timeout_ms: int = 60_000
    # 10000 transfers at their longest fields, JSON-escaped, stay well below this.
    max_body_bytes: int = 16 * MIB
    retry_after_seconds: int = 1
    # Group commit (service/intake.py): the most requests and body bytes one call takes; 0 requests: each
    # request its own call. A request whose body is larger than group_alone_bytes (about 300 transfers) has
    # a call of its own.
    group_max_requests: int = 64
    group_max_calls: int = 1  # group calls in flight per worker (the rest of its pool: other requests)
    group_max_bytes: int = MIB
    group_alone_bytes: int = 64 * 1024
    shutdown_timeout_seconds: float = 30.0
    access_log: bool = True
    log_format: str = "text"
    log_level: str = "info"
    # The executor (service/executor.py) and the rail it sends to.
    executor_database_url: str | None = None  # the executor role's login; unset: made from database_url
    executor: bool = True  # whether `run` starts one
    rail_url: str | None = None  # unset: `run` starts the simulated rail and uses it
    rail_timeout_seconds: float = 10.0
    executor_batch: int = 1000
    executor_concurrency: int = 2
    # Longer than the rail's timeout: a batch in hand is answered (or released) before its lease ends.
    executor_lease_seconds: float = 30.0
    executor_idle_poll_seconds: float = 1.0  # the longest wait between claims when there is nothing to do
    executor_metrics_port: int | None = None  # GET /metrics of an executor, on BPS_HOST; unset: not served

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        def get(name: str, cast, default):
            value = env.get(name)
            return default if value in (None, "") else cast(value)

        def flag(value: str) -> bool:
            return value.strip().lower() in ("1", "true", "yes", "on")

        def log_format(value: str) -> str:
            if value.strip().lower() not in ("text", "json"):
                raise ValueError(f"BPS_LOG_FORMAT must be text or json, not {value!r}")
            return value.strip().lower()

        d = cls()
        return cls(
            database_url=get("DATABASE_URL", str, d.database_url),
            service_database_url=get("BPS_SERVICE_DATABASE_URL", str, d.service_database_url),
            host=get("BPS_HOST", str, d.host),
            port=get("BPS_PORT", int, d.port),
            workers=get("BPS_WORKERS", int, d.workers),
            pool_min_size=get("BPS_POOL_MIN_SIZE", int, d.pool_min_size),
            pool_max_size=get("BPS_POOL_MAX_SIZE", int, d.pool_max_size),
            pool_timeout_seconds=get("BPS_POOL_TIMEOUT", float, d.pool_timeout_seconds),
            statement_timeout_ms=get("BPS_STATEMENT_TIMEOUT_MS", int, d.statement_timeout_ms),
            max_body_bytes=get("BPS_MAX_BODY_BYTES", int, d.max_body_bytes),
            retry_after_seconds=get("BPS_RETRY_AFTER", int, d.retry_after_seconds),
            group_max_requests=get("BPS_GROUP_MAX_REQUESTS", int, d.group_max_requests),
            group_max_calls=get("BPS_GROUP_MAX_CALLS", int, d.group_max_calls),
            group_max_bytes=get("BPS_GROUP_MAX_BYTES", int, d.group_max_bytes),
            group_alone_bytes=get("BPS_GROUP_ALONE_BYTES", int, d.group_alone_bytes),
            shutdown_timeout_seconds=get("BPS_SHUTDOWN_TIMEOUT", float, d.shutdown_timeout_seconds),
            access_log=get("BPS_ACCESS_LOG", flag, d.access_log),
            log_format=get("BPS_LOG_FORMAT", log_format, d.log_format),
            log_level=get("BPS_LOG_LEVEL", str, d.log_level),
            executor_database_url=get("BPS_EXECUTOR_DATABASE_URL", str, d.executor_database_url),
            executor=get("BPS_EXECUTOR", flag, d.executor),
            rail_url=get("BPS_RAIL_URL", str, d.rail_url),
            rail_timeout_seconds=get("BPS_RAIL_TIMEOUT_SECONDS", float, d.rail_timeout_seconds),
            executor_batch=get("BPS_EXECUTOR_BATCH", int, d.executor_batch),
            executor_concurrency=get("BPS_EXECUTOR_CONCURRENCY", int, d.executor_concurrency),
            executor_lease_seconds=get("BPS_EXECUTOR_LEASE_SECONDS", float, d.executor_lease_seconds),
            executor_idle_poll_seconds=get("BPS_EXECUTOR_IDLE_POLL_SECONDS", float, d.executor_idle_poll_seconds),
            executor_metrics_port=get("BPS_EXECUTOR_METRICS_PORT", int, d.executor_metrics_port),
        )
