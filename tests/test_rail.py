"""The simulated rail: its deterministic outcomes, idempotency by payment id, its durable record, its faults,
and the HTTP adapter the executor speaks to it through."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest

from service import rail_simulator
from service.rail import HttpRail, Outcome, Payment, RailError

VALID_IBAN = "DE89370400440532013000"
VALID_BIC = "COBADEFFXXX"


def payment(id: int, iban: str = VALID_IBAN, bic: str = VALID_BIC, cents: int = 100) -> dict:
    return {
        "id": str(id),
        "amount_cents": cents,
        "currency": "EUR",
        "creditor_name": "Bip Bip",
        "creditor_iban": iban,
        "creditor_bic": bic,
        "remittance": "test",
    }


@pytest.fixture
def settings(tmp_path) -> rail_simulator.Settings:
    return rail_simulator.Settings(record=tmp_path / "record.sqlite3", latency_ms=0)


@pytest.fixture
async def rail(aiohttp_client, settings):
    return await aiohttp_client(rail_simulator.create_app(settings))


async def submit(rail, payments: list[dict]) -> dict[str, tuple]:
    response = await rail.post("/payments", json={"payments": payments})
    assert response.status == 200, await response.text()
    return {r["id"]: (r["status"], r["reason"]) for r in (await response.json())["results"]}


@pytest.mark.parametrize(
    "iban, bic, outcome",
    [
        (VALID_IBAN, VALID_BIC, ("executed", None)),
        ("DE89 3704 0044 0532 0130 00", VALID_BIC, ("executed", None)),
        ("f", VALID_BIC, ("failed", "AC01")),  # the demo request's placeholder
        ("DE89370400440532013001", VALID_BIC, ("failed", "AC01")),  # mod 97
        ("DE8937040044053201300", VALID_BIC, ("failed", "AC01")),  # the country's length
        ("XX89370400440532013000", VALID_BIC, ("failed", "AC01")),  # no such country
        (VALID_IBAN, "e", ("failed", "RC01")),  # the demo request's placeholder
        (VALID_IBAN, "COBADEFF", ("executed", None)),
        (VALID_IBAN, "COBA1EFFXXX", ("failed", "RC01")),
        ("f", "e", ("failed", "AC01")),
    ],
)
async def test_outcomes_follow_the_iban_and_bic_rules(rail, iban, bic, outcome):
    assert await submit(rail, [payment(1, iban, bic)]) == {"1": outcome}


async def test_a_payment_submitted_again_gets_its_first_outcome_and_is_executed_once(rail, settings):
    first = await submit(rail, [payment(7), payment(8, iban="f")])
    again = await submit(rail, [payment(7), payment(8, iban="f"), payment(9)])

    assert first == {"7": ("executed", None), "8": ("failed", "AC01")}
    assert again == {**first, "9": ("executed", None)}
    record = sqlite3.connect(settings.record)
    executions = dict(record.execute("SELECT payment_id, count(*) FROM executions GROUP BY payment_id"))
    assert executions == {"7": 1, "9": 1}
    submissions = dict(record.execute("SELECT id, submissions FROM payments"))
    assert submissions == {"7": 2, "8": 2, "9": 1}


async def test_lookup_answers_only_for_payments_it_has_seen(rail):
    await submit(rail, [payment(1), payment(2, bic="x")])
    response = await rail.post("/payments/lookup", json={"ids": ["1", "2", "3"]})
    results = (await response.json())["results"]
    assert {r["id"]: (r["status"], r["reason"]) for r in results} == {"1": ("executed", None), "2": ("failed", "RC01")}
    assert (await rail.get("/payments/3")).status == 404
    assert (await (await rail.get("/payments/1")).json())["status"] == "executed"


async def test_the_failure_rate_is_decided_by_the_payment_id(aiohttp_client, settings):
    rail = await aiohttp_client(rail_simulator.create_app(dataclasses.replace(settings, failure_rate=0.3)))
    outcomes = await submit(rail, [payment(i) for i in range(1000)])
    failed = {i for i, (status, reason) in outcomes.items() if status == "failed"}
    assert {outcomes[i][1] for i in failed} == {"MS03"}
    assert 230 < len(failed) < 370
    assert failed == {str(i) for i in range(1000) if rail_simulator.share(str(i)) < 0.3}


async def test_the_record_survives_a_restart(aiohttp_client, settings):
    first = await aiohttp_client(rail_simulator.create_app(settings))
    await submit(first, [payment(5)])
    second = await aiohttp_client(rail_simulator.create_app(settings))
    assert await submit(second, [payment(5)]) == {"5": ("executed", None)}
    record = sqlite3.connect(settings.record)
    assert record.execute("SELECT count(*) FROM executions").fetchone() == (1,)


async def test_an_error_rate_refuses_requests_before_executing_anything(aiohttp_client, settings):
    rail = await aiohttp_client(rail_simulator.create_app(dataclasses.replace(settings, error_rate=1.0)))
    response = await rail.post("/payments", json={"payments": [payment(1)]})
    assert response.status == 503
    assert sqlite3.connect(settings.record).execute("SELECT count(*) FROM payments").fetchone() == (0,)


async def test_a_timeout_executes_and_then_withholds_the_answer(aiohttp_server, settings):
    server = await aiohttp_server(
        rail_simulator.create_app(dataclasses.replace(settings, timeout_rate=1.0, hang_seconds=5))
    )
    adapter = HttpRail(str(server.make_url("/")), timeout_seconds=0.5)
    try:
        with pytest.raises(RailError):
            await adapter.submit([Payment(11, 100, "EUR", "n", VALID_IBAN, VALID_BIC, "r")])
        assert await adapter.lookup([11, 12]) == {11: Outcome("executed")}
    finally:
        await adapter.close()


async def test_malformed_submissions_are_400(rail):
    for document in ({}, {"payments": "x"}, {"payments": [{"id": 1}]}, {"payments": [{"id": "1"}]}):
        assert (await rail.post("/payments", json=document)).status == 400
    assert (await rail.post("/payments/lookup", json={"ids": [1]})).status == 400


async def test_the_adapter_reads_outcomes_and_calls_anything_else_a_rail_error(aiohttp_server, settings):
    server = await aiohttp_server(rail_simulator.create_app(settings))
    adapter = HttpRail(str(server.make_url("/")), timeout_seconds=5)
    try:
        outcomes = await adapter.submit(
            [Payment(1, 100, "EUR", "n", VALID_IBAN, VALID_BIC, "r"), Payment(2, 100, "EUR", "n", "f", "e", "r")]
        )
        assert outcomes == {1: Outcome("executed"), 2: Outcome("failed", "AC01")}
    finally:
        await adapter.close()
    nowhere = HttpRail("http://127.0.0.1:1", timeout_seconds=1)
    try:
        with pytest.raises(RailError):
            await nowhere.lookup([1])
    finally:
        await nowhere.close()


def test_iban_check_agrees_with_the_database_rule_on_the_samples():
    assert rail_simulator.iban_is_valid("FR1420041010050500013M02606")
    assert rail_simulator.iban_is_valid("GB29NWBK60161331926819")
    assert not rail_simulator.iban_is_valid("FR10474608000002006107XXXXX")  # the demo account's own placeholder
    assert not rail_simulator.iban_is_valid("EE383680981021245686")
