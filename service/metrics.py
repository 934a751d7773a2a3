"""Prometheus metrics: what the service's workers count, and what the database says at scrape time.

With several worker processes each writes its values to files in PROMETHEUS_MULTIPROC_DIR (set by `serve`
before the workers start, as prometheus-client requires), and a scrape that reaches any worker adds them all
up. A worker counts its requests in memory and adds them to its files once a second and before it answers a
scrape, so another worker's last second of requests may show in the next scrape. The figures of the work
itself (transfers by status, the oldest due pending transfer) are read from the database at scrape time,
from the small index of bulk transfers with pending transfers and the open runs.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from time import perf_counter

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Seconds: a one-transfer request takes about a millisecond, a 10000-transfer one a few hundred.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Read at scrape time, as the owner's functions see it (sql/10_metrics.sql).
DATABASE_SQL = "SELECT * FROM bps_api.metrics()"


class Metrics:
    """The service's metrics, in a registry of their own (one per application, so tests can make many)."""

    def __init__(self) -> None:
        # Imported here, not at the top: prometheus-client picks its multi-process mode when first imported.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = MULTIPROC_DIR in os.environ
        self.requests = Counter(
            "bps_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bps_http_request_duration_seconds",
            "Time from a request reaching the application to its answer, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bulk_transfers = Counter(
            "bps_bulk_transfer_requests",
            "Bulk transfer requests (JSON and pain.001) by outcome: created, replayed, or the problem code.",
            ["outcome"],
            registry=self.registry,
        )
        self.database_errors = Counter(
            "bps_database_errors",
            "Statements that failed: unavailable (answered 503) or the SQLSTATE class of an unexpected error.",
            ["kind"],
            registry=self.registry,
        )
        self.pool_acquire = Histogram(
            "bps_db_pool_acquire_seconds",
            "Time a request waited for a database connection from its worker's pool.",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=self.registry,
        )
        self.call_requests = Histogram(
            "bps_bulk_transfer_call_requests",
            "Bulk transfer requests per call to the database: the group commit's groups (1: a request alone).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.group_retries = Counter(
            "bps_bulk_transfer_group_retries",
            "Group calls that failed (a body PostgreSQL could not parse, a deadlock) and were sent again one by one.",
            registry=self.registry,
        )
        self.queued = Gauge(
            "bps_bulk_transfer_queued_requests",
            "Bulk transfer requests waiting for a connection of their worker to take them in its next call.",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.pool_connections = Gauge(
            "bps_db_pool_connections",
            "Connections of the workers' pools: open, in use, and the most they may open.",
            ["state"],
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        # Label lookups cost more than the increments: each label set's child, found once.
        self._request_children: dict[tuple[str, str, int], tuple] = {}
        self._outcome_children: dict[str, object] = {}
        # What this worker counted since its last flush: a child's count, and a histogram child's sum and
        # per-bucket counts. An increment of a shared file takes a lock and a write (about 3 us, several per
        # request); these are added to the files once a second (flush) and before a scrape.
        self._counts: dict[object, int] = {}
        self._observed: dict[object, list] = {}

    def count(self, child) -> None:
        self._counts[child] = self._counts.get(child, 0) + 1

    def observe(self, child, seconds: float) -> None:
        observed = self._observed.get(child)
        if observed is None:
            observed = self._observed[child] = [0.0, [0] * len(child._upper_bounds)]
        observed[0] += seconds
        observed[1][bisect_left(child._upper_bounds, seconds)] += 1

    def flush(self) -> None:
        """Adds what this worker counted to the registry (the shared files with several workers)."""
        counts, self._counts = self._counts, {}
        observed, self._observed = self._observed, {}
        for child, n in counts.items():
            child.inc(n)
        for child, (total, buckets) in observed.items():
            # Histogram.observe does the same per observation: the sum, and the one bucket the value falls in.
            child._sum.inc(total)
            for bucket, n in zip(child._buckets, buckets, strict=True):
                if n:
                    bucket.inc(n)

    def observe_request(self, method: str, route: str, status: int, started: float) -> None:
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(method, route),
            )
        self.count(children[0])
        self.observe(children[1], perf_counter() - started)

    def observe_outcome(self, outcome: str) -> None:
        child = self._outcome_children.get(outcome)
        if child is None:
            child = self._outcome_children[outcome] = self.bulk_transfers.labels(outcome)
        self.count(child)

    def observe_call(self, requests: int) -> None:
        self.observe(self.call_requests, requests)

    def observe_pool_wait(self, seconds: float) -> None:
        self.observe(self.pool_acquire, seconds)

    def observe_queue(self, intake) -> None:
        self.queued.set(len(intake.queue) if intake is not None else 0)

    def observe_pool(self, pool) -> None:
        """The pool's figures, as this worker sees them now (each worker's gauges are summed)."""
        size = pool.get_size()
        self.pool_connections.labels("open").set(size)
        self.pool_connections.labels("in_use").set(size - pool.get_idle_size())
        self.pool_connections.labels("max").set(pool.get_max_size())

    def exposition(self, database_rows) -> bytes:
        """The text a scrape gets: every worker's counts, then the database's figures."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        self.flush()
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        else:
            registry = self.registry
        return generate_latest(registry) + database_text(database_rows).encode()


class ExecutorMetrics:
    """An executor's counts, served on BPS_EXECUTOR_METRICS_PORT (each executor process its own: a scraper
    sums them). What the rail decided, how the calls to it went, and what went back unanswered."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.claimed = Counter(
            "bps_executor_claimed_transfers",
            "Transfers claimed for the rail (a run taken over after its lease lapsed counts again).",
            registry=self.registry,
        )
        self.outcomes = Counter(
            "bps_executor_outcomes",
            "Transfers the rail answered for, once settled: executed, or failed with its ISO 20022 reason code.",
            ["status", "reason"],
            registry=self.registry,
        )
        self.rail_calls = Counter(
            "bps_executor_rail_calls",
            "Calls to the rail by operation (submit, lookup) and result (ok, error: a timeout or an error status).",
            ["operation", "result"],
            registry=self.registry,
        )
        self.rail_seconds = Histogram(
            "bps_executor_rail_call_seconds",
            "Time of a call to the rail, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.released = Counter(
            "bps_executor_released_runs",
            "Runs given back without every answer (the rail failed or did not answer): retried after a back-off.",
            registry=self.registry,
        )
        self.database_errors = Counter(
            "bps_executor_database_errors",
            "Claims or settles that failed because the database was unavailable (retried).",
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> None:
        """GET /metrics on host:port, from a thread of this process."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)


def database_text(rows) -> str:
    """The database's figures (name, help, type, labels, value rows) in the exposition format."""
    lines, described = [], set()
    for name, help_text, kind, labels, value in rows:
        labels = json.loads(labels) if isinstance(labels, str) else labels  # jsonb arrives as text
        if name not in described:
            described.add(name)
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        label_text = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
        lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")
    return "\n".join(lines) + ("\n" if lines else "")


def prepare_multiprocess_dir(directory: str) -> None:
    """An empty directory for this service's workers' files (values a previous run left would add up)."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))
