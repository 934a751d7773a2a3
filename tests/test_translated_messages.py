"""A server whose messages are translated (lc_messages German): the service tells an unreadable body from a
failure by SQLSTATE, never by message text, so the answers are those of an English server."""

from __future__ import annotations

import asyncpg
import pytest
from support import database_fixtures, request_for, transfer

from service import db

database_url, service_url, pool, session_key = database_fixtures("module", "bps_german_test")


@pytest.fixture(scope="module", autouse=True)
async def german(database_url: str) -> None:
    """The database's sessions speak German from now on (tests/ensure-postgres.sh makes the locale)."""
    owner = await asyncpg.connect(database_url)
    try:
        name = db.database_name(database_url)
        await owner.execute(f"ALTER DATABASE \"{name}\" SET lc_messages = 'de_DE.UTF-8'")
    finally:
        await owner.close()
    probe = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError, match="(?i)division durch null"):
            await probe.fetchval("SELECT 1 / 0")
    finally:
        await probe.close()


@pytest.mark.parametrize(
    "body",
    [b"{", b"not json", b'{"a": "\\u0000"}', b"[" * 10_000 + b"]" * 10_000, b'{"a": 1e999999}', b'"\\ud800"'],
    ids=["truncated", "words", "escaped NUL", "nested too deep", "number out of range", "lone surrogate"],
)
async def test_an_unreadable_body_is_400_invalid_json_on_a_translated_server(client, body: bytes) -> None:
    response = await client.post("/bulk_transfer", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400, await response.text()
    assert (await response.json())["code"] == "invalid_json"


async def test_the_business_answers_are_unchanged_on_a_translated_server(client, make_account) -> None:
    account = await make_account(100)
    short = await client.post("/bulk_transfer", json=request_for(account, [transfer("5.00")]))
    assert (short.status, (await short.json())["code"]) == (422, "insufficient_funds")
    invalid = await client.post("/bulk_transfer", json=request_for(account, [transfer("1.234")]))
    assert (invalid.status, (await invalid.json())["errors"][0]["code"]) == (422, "invalid_amount")
