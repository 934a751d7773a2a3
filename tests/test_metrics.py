"""GET /metrics of a real service with two worker processes: the counts of known traffic, the same from any
worker, and the database's figures."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import database_fixtures, request_for, service_process, transfer

database_url, service_url, pool, session_key = database_fixtures("module", "bps_metrics_test")
POLL_SECONDS = 0.1
FLUSH_POLLS = 50  # 5 s, five times the workers' flush interval


@pytest.fixture(scope="module")
def service(database_url: str):
    process = service_process(database_url, BPS_WORKERS="2", BPS_ACCESS_LOG="0")
    process.start()
    yield process
    process.stop()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    # A connection of its own each time: the kernel spreads new connections over the workers.
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return samples(await response.text())


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def post(port: int, key: str, payload, **headers) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/bulk_transfer",
            data=json.dumps(payload),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
        ) as response,
    ):
        await response.read()
        return response.status


async def test_a_scrape_counts_every_workers_requests_and_the_database_figures(
    service, make_account, session_key
) -> None:
    account = await make_account(1_000_000)
    before = await scrape(service.port)

    created = await asyncio.gather(
        *(post(service.port, session_key.key, request_for(account, [transfer(f"1.0{i}")] * 3)) for i in range(6))
    )
    invalid = await asyncio.gather(
        *(post(service.port, session_key.key, request_for(account, [transfer("0")])) for _ in range(2))
    )
    keyed = request_for(account, [transfer("2.00")])
    first = await post(service.port, session_key.key, keyed, **{"Idempotency-Key": "metrics-1"})
    replay = await post(service.port, session_key.key, keyed, **{"Idempotency-Key": "metrics-1"})
    assert (created, invalid, first, replay) == ([201] * 6, [422] * 2, 201, 201)

    post_201 = {"method": "POST", "route": "/bulk_transfer", "status": "201"}

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # A worker adds its counts to the shared figures once a second: poll (bounded) until every worker has.
    after = await scrape(service.port)
    for _ in range(FLUSH_POLLS):
        if delta("bps_bulk_transfer_requests_total", outcome="validation_failed") == 2 and (
            delta("bps_http_requests_total", **post_201) == 8
        ):
            break
        await asyncio.sleep(POLL_SECONDS)
        after = await scrape(service.port)
    scrapes = [after, *[await scrape(service.port) for _ in range(5)]]

    assert delta("bps_http_requests_total", **post_201) == 8
    assert delta("bps_http_requests_total", method="POST", route="/bulk_transfer", status="422") == 2
    assert delta("bps_http_request_duration_seconds_count", method="POST", route="/bulk_transfer") == 10
    assert delta("bps_bulk_transfer_requests_total", outcome="created") == 7
    assert delta("bps_bulk_transfer_requests_total", outcome="replayed") == 1
    assert delta("bps_bulk_transfer_requests_total", outcome="validation_failed") == 2
    assert delta("bps_transfers", status="pending", due="now") == 6 * 3 + 1
    # The group commit may have sent some of the ten together: every request went in a call, each call on a
    # connection of its own.
    assert delta("bps_bulk_transfer_call_requests_sum") == 10
    assert delta("bps_db_pool_acquire_seconds_count") >= delta("bps_bulk_transfer_call_requests_count") >= 1
    assert value(after, "bps_database_up") == 1
    assert value(after, "bps_oldest_due_pending_transfer_age_seconds") >= 0
    # Whichever worker answered, the same totals (the scrapes themselves are counted too: leave them out).
    assert {value(s, "bps_http_requests_total", **post_201) for s in scrapes} == {
        value(after, "bps_http_requests_total", **post_201)
    }
    assert len({value(s, "bps_bulk_transfer_requests_total", outcome="created") for s in scrapes}) == 1


async def test_no_label_holds_what_a_client_sent(service, session_key) -> None:
    """Routes are templates: an unknown path or a transfer id never becomes a label value."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {session_key.key}"}) as session:
        for path in ("/no/such/FR7630006000011234567890189", "/transfers/123456789", "/bulk_transfers/secret-id"):
            async with session.get(f"http://127.0.0.1:{service.port}{path}") as response:
                await response.read()
    routes = {dict(labels).get("route") for _, labels in await scrape(service.port)}
    assert {"(unmatched)", "/transfers/{id}", "/bulk_transfers/{id}"} <= routes
    assert not any(route and ("FR76" in route or "secret" in route or "123456789" in route) for route in routes)


def test_counts_kept_in_memory_reach_the_registry_as_prometheus_client_would_record_them() -> None:
    """A worker's in-memory counts, once flushed, are what Counter.inc and Histogram.observe would have made:
    the same buckets (bounds included), sum and count."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from service.metrics import Metrics

    waits = [0.0, 0.0001, 0.00011, 0.0005, 0.003, 0.05, 0.7, 5.0, 12.5] * 3
    metrics = Metrics()
    reference = CollectorRegistry()
    expected = Histogram(
        "bps_db_pool_acquire_seconds", "", buckets=metrics.pool_acquire._upper_bounds[:-1], registry=reference
    )
    for wait in waits:
        metrics.observe_pool_wait(wait)
        expected.observe(wait)
        metrics.observe_outcome("created")
    assert samples(generate_latest(metrics.registry).decode()).get(("bps_db_pool_acquire_seconds_count", ())) == 0
    metrics.flush()
    got = samples(generate_latest(metrics.registry).decode())
    want = samples(generate_latest(reference).decode())
    histogram = {
        k: v for k, v in got.items() if k[0].startswith("bps_db_pool_acquire_seconds_") and "created" not in k[0]
    }
    assert histogram == {k: v for k, v in want.items() if "created" not in k[0]}
    assert got[("bps_bulk_transfer_requests_total", (("outcome", "created"),))] == len(waits)
    metrics.flush()  # nothing counted twice
    assert samples(generate_latest(metrics.registry).decode())[("bps_db_pool_acquire_seconds_count", ())] == len(waits)
