"""HTTP: both paths, the 201 answer, and every row of the error table over HTTP."""

from __future__ import annotations

import dataclasses
import json

import pytest
from support import (
    account_locked,
    assert_duplicate_of,
    assert_insufficient_funds,
    assert_problem,
    assert_rejected_unchanged,
    assert_unavailable,
    balance_of,
    post_raw,
    request_for,
    rows_of,
    transfer,
)

PATHS = ["/bulk_transfer", "/transfers/bulk"]
UNREACHABLE_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/bps"


# Success


@pytest.mark.parametrize("path", PATHS)
async def test_accepted_request_answers_201_with_its_figures_and_location(client, make_account, pool, path):
    account = await make_account(10_000)
    transfers = [transfer("14.5", client_reference="a"), transfer("0.29"), transfer("1.13", client_reference="c")]

    response = await client.post(path, json=request_for(account, transfers))

    assert response.status == 201, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert isinstance(body["bulk_transfer_id"], int)
    assert body["transfer_count"] == 3
    assert body["total_cents"] == 1450 + 29 + 113
    assert [t["client_reference"] for t in body["transfers"]] == ["a", None, "c"]
    assert await balance_of(pool, account) == 10_000 - 1592

    shown = await client.get(response.headers["Location"])
    assert shown.status == 200
    assert shown.content_type == "application/json"
    detail = await shown.json()
    assert detail["bulk_transfer_id"] == body["bulk_transfer_id"]
    assert detail["transfer_count"] == 3
    assert detail["total_cents"] == 1592
    assert [t["amount_cents"] for t in detail["transfers"]] == [1450, 29, 113]
    assert [t["counterparty_name"] for t in detail["transfers"]] == ["Bip Bip"] * 3
    assert [t["description"] for t in detail["transfers"]] == [t["description"] for t in transfers]


async def test_both_paths_are_one_endpoint_sharing_duplicate_detection(client, make_account, pool):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])

    first = await client.post("/bulk_transfer", json=payload)
    second = await client.post("/transfers/bulk", json=payload)

    assert first.status == 201
    await assert_duplicate_of(second, (await first.json())["bulk_transfer_id"])
    assert await balance_of(pool, account) == 9_900


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
async def test_json_content_type_with_or_without_charset_is_accepted(client, make_account, content_type):
    account = await make_account(10_000)
    data = json.dumps(request_for(account, [transfer("1.00")])).encode()

    response = await post_raw(client, "/bulk_transfer", data, content_type)

    assert response.status == 201, await response.text()


async def test_unknown_bulk_transfer_is_a_404_problem(client):
    await assert_problem(await client.get("/bulk_transfers/999999999"), 404, None)


async def test_unknown_path_is_a_404_problem(client):
    await assert_problem(await client.post("/no/such/path", json={}), 404, None)


async def test_health_is_200_when_the_database_is_reachable(client):
    response = await client.get("/health")
    assert response.status == 200


# 400 invalid_json

NOT_A_JSON_OBJECT = {
    "not_json": b"{not json",
    "single_quotes": b"{'organization_iban': 'x'}",
    "truncated": b'{"organization_iban": "FR76',
    "empty_body": b"",
    "whitespace_only": b"   \n",
    "array": b"[]",
    "array_of_request": b'[{"organization_iban": "x", "organization_bic": "y", "credit_transfers": []}]',
    "string": b'"hello"',
    "number": b"42",
    "true": b"true",
    "null": b"null",
    "escaped_nul_in_string": b'{"organization_name": "ACME\\u0000Corp"}',
    "raw_nul_in_string": b'{"organization_name": "ACME\x00Corp"}',
    "invalid_utf8": b'{"organization_name": "ACME \xff\xfe Corp"}',
    "lone_surrogate": b'{"organization_name": "\\udc00"}',
    "deeply_nested_array": b"[" * 100_000 + b"]" * 100_000,
    "deeply_nested_value": b'{"organization_name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "trailing_garbage": b'{"organization_name": "x"} {}',
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("data", NOT_A_JSON_OBJECT.values(), ids=NOT_A_JSON_OBJECT.keys())
async def test_body_that_is_not_a_json_object_is_400_invalid_json(client, path, data):
    await assert_problem(await post_raw(client, path, data), 400, "invalid_json")


@pytest.mark.parametrize(
    "value",
    [b"1e1000000", b"-1e1000000", b"1" * 200_000, b'"' + b"x" * 2_000_000 + b'"'],
    ids=["huge_exponent", "huge_negative_exponent", "200000_digits", "2MB_string"],
)
async def test_extreme_values_are_a_client_error_not_a_5xx(client, make_account, pool, value):
    account = await make_account(10_000)
    text = json.dumps(request_for(account, [transfer("1.00", description="PLACEHOLDER")]))
    data = text.encode().replace(b'"PLACEHOLDER"', value)

    response = await post_raw(client, "/bulk_transfer", data)

    assert response.status in (400, 422), await response.text()
    await assert_problem(response, response.status, None)
    assert await balance_of(pool, account) == 10_000


async def test_invalid_json_for_a_real_account_changes_nothing(client, make_account, pool):
    account = await make_account(10_000)
    before = await rows_of(pool, account)
    text = json.dumps(request_for(account, [transfer("1.00", description="a\x00b")]))
    assert "\\u0000" in text  # json.dumps escapes NUL; PostgreSQL text cannot hold it

    await assert_problem(await post_raw(client, "/bulk_transfer", text.encode()), 400, "invalid_json")
    assert await rows_of(pool, account) == before


# 422 validation_failed (details in test_validation.py and test_amounts.py)


@pytest.mark.parametrize(
    ("change", "pointer"),
    [
        (lambda p: p["credit_transfers"][0].pop("description"), "/credit_transfers/0/description"),
        (lambda p: p["credit_transfers"][0].update(amount=14.5), "/credit_transfers/0/amount"),
        (lambda p: p["credit_transfers"][0].update(amount="1,5"), "/credit_transfers/0/amount"),
        (lambda p: p.update(organisation_iban="x"), "/organisation_iban"),
        (lambda p: p.update(organization_name="Someone Else"), "/organization_name"),
        (lambda p: p.update(credit_transfers=[]), "/credit_transfers"),
        (lambda p: p["credit_transfers"][0].update(currency="USD"), "/credit_transfers/0/currency"),
    ],
    ids=["missing_field", "wrong_type", "bad_amount", "unknown_key", "name_mismatch", "empty_list", "currency"],
)
async def test_invalid_request_is_422_validation_failed_with_pointers(client, make_account, pool, change, pointer):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    change(payload)

    await assert_rejected_unchanged(client, pool, account, payload, [pointer])


# 422 insufficient_funds, 409 duplicate_request, 422 idempotency_key_reused (details in their own files)


async def test_total_over_the_balance_is_422_insufficient_funds(client, make_account, pool):
    account = await make_account(1_000)

    response = await client.post("/bulk_transfer", json=request_for(account, [transfer("6"), transfer("5")]))

    await assert_insufficient_funds(response, 1_000, 1_100)
    assert await balance_of(pool, account) == 1_000


async def test_same_payload_accepted_before_is_409_duplicate_request(client, make_account):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    original = await client.post("/bulk_transfer", json=payload)

    await assert_duplicate_of(
        await client.post("/bulk_transfer", json=payload), (await original.json())["bulk_transfer_id"]
    )


async def test_same_key_other_payload_is_422_idempotency_key_reused(client, make_account, pool):
    account = await make_account(10_000)
    headers = {"Idempotency-Key": "k-http"}
    first = await client.post("/bulk_transfer", json=request_for(account, [transfer("1.00")]), headers=headers)
    assert first.status == 201

    other = await client.post("/bulk_transfer", json=request_for(account, [transfer("2.00")]), headers=headers)

    await assert_problem(other, 422, "idempotency_key_reused")
    assert await balance_of(pool, account) == 9_900


# 404 account_not_found


@pytest.mark.parametrize(
    ("iban", "bic"),
    [("right", "BNPAFRPPXXX"), ("FR7600000000000000000000000", "right"), ("FR7600000000000000000000000", "NONEXIST")],
    ids=["right_iban_wrong_bic", "wrong_iban_right_bic", "both_wrong"],
)
async def test_account_must_match_iban_and_bic_together_else_404(client, make_account, pool, iban, bic):
    account = await make_account(10_000, bic="OIVUSCLQXXX")
    payload = request_for(account, [transfer("1.00")])
    if iban != "right":
        payload["organization_iban"] = iban
    if bic != "right":
        payload["organization_bic"] = bic

    await assert_problem(await client.post("/bulk_transfer", json=payload), 404, "account_not_found")
    assert await balance_of(pool, account) == 10_000


async def test_account_with_same_bic_other_iban_is_not_debited(client, make_account, pool):
    debited = await make_account(10_000)
    bystander = await make_account(10_000)

    response = await client.post("/bulk_transfer", json=request_for(debited, [transfer("1.00")]))

    assert response.status == 201
    assert await balance_of(pool, debited) == 9_900
    assert await balance_of(pool, bystander) == 10_000


# 413 payload_too_large


async def test_more_transfers_than_the_configured_maximum_is_413(client, make_account, pool):
    account = await make_account(10_000)
    original = await pool.fetchval("SELECT max_transfers_per_request FROM bps.settings")
    await pool.execute("UPDATE bps.settings SET max_transfers_per_request = 3")
    try:
        before = await rows_of(pool, account)
        over = await client.post("/bulk_transfer", json=request_for(account, [transfer("1.00")] * 4))
        await assert_problem(over, 413, "payload_too_large")
        assert await rows_of(pool, account) == before

        at_limit = await client.post("/bulk_transfer", json=request_for(account, [transfer("1.00")] * 3))
        assert at_limit.status == 201, await at_limit.text()
    finally:
        await pool.execute("UPDATE bps.settings SET max_transfers_per_request = $1", original)
    assert await balance_of(pool, account) == 10_000 - 300


async def test_more_than_10000_transfers_is_413_by_default(client, make_account, pool):
    assert await pool.fetchval("SELECT max_transfers_per_request FROM bps.settings") == 10_000
    account = await make_account(10_000_000)
    before = await rows_of(pool, account)

    response = await client.post("/bulk_transfer", json=request_for(account, [transfer("1.00")] * 10_001))

    await assert_problem(response, 413, "payload_too_large")
    assert await rows_of(pool, account) == before


def longest_transfer(n: int) -> dict:
    """A transfer with every field at its longest, its text in non-ASCII characters."""
    return {
        "amount": "999999999.99",
        "currency": "EUR",
        "counterparty_name": (f"{n:08d}" + "é" * 70)[:70],
        "counterparty_iban": "I" * 34,
        "counterparty_bic": "B" * 11,
        "description": (f"{n:08d}" + "é" * 140)[:140],
        "client_reference": (f"{n:08d}" + "é" * 35)[:35],
    }


async def test_body_limit_fits_the_maximum_number_of_longest_transfers(client, make_account, pool):
    account = await make_account(10**15)
    # json.dumps escapes every "é" as \u00e9: 6 bytes a character, about 15 MB in all.
    data = json.dumps(request_for(account, [longest_transfer(n) for n in range(10_000)])).encode()
    assert len(data) > 10 * 1024 * 1024  # far above aiohttp's default limit of 1 MiB

    response = await post_raw(client, "/bulk_transfer", data)

    assert response.status == 201, await response.text()
    body = await response.json()
    assert body["transfer_count"] == 10_000
    assert body["total_cents"] == 10_000 * 99_999_999_999
    assert await balance_of(pool, account) == 10**15 - 10_000 * 99_999_999_999


@pytest.fixture
async def small_body_client(make_client, config):
    return await make_client(dataclasses.replace(config, max_body_bytes=2_000))


async def test_body_over_the_configured_limit_is_413(small_body_client, make_account, pool):
    account = await make_account(10_000)
    big = json.dumps(request_for(account, [transfer("1.00", description="D" * 140) for _ in range(20)])).encode()
    assert len(big) > 2_000

    await assert_problem(await post_raw(small_body_client, "/bulk_transfer", big), 413, "payload_too_large")
    assert await balance_of(pool, account) == 10_000

    small = await small_body_client.post("/bulk_transfer", json=request_for(account, [transfer("1.00")]))
    assert small.status == 201, await small.text()


async def test_chunked_body_over_the_configured_limit_is_413(small_body_client, make_account, pool):
    account = await make_account(10_000)
    big = json.dumps(request_for(account, [transfer("1.00", description="D" * 140) for _ in range(20)])).encode()

    async def chunks():
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    response = await small_body_client.post(
        "/bulk_transfer", data=chunks(), headers={"Content-Type": "application/json"}
    )

    await assert_problem(response, 413, "payload_too_large")
    assert await balance_of(pool, account) == 10_000


# 415 unsupported_media_type


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/octet-stream", "text/json"],
    ids=["missing", "text_plain", "form", "octet_stream", "text_json"],
)
async def test_body_not_sent_as_json_is_415(client, make_account, pool, path, content_type):
    account = await make_account(10_000)
    data = json.dumps(request_for(account, [transfer("1.00")])).encode()
    if content_type is None:
        response = await client.post(path, data=data, skip_auto_headers=["Content-Type"])
    else:
        response = await post_raw(client, path, data, content_type)

    await assert_problem(response, 415, "unsupported_media_type")
    assert await balance_of(pool, account) == 10_000


# 405


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_the_post_paths_are_405(client, path, method):
    response = await client.request(method, path)

    await assert_problem(response, 405, None)
    assert "POST" in response.headers["Allow"]


# 503 service_unavailable


@pytest.fixture
async def unreachable_client(make_client, config):
    return await make_client(
        dataclasses.replace(config, service_database_url=UNREACHABLE_DATABASE_URL, pool_timeout_seconds=2)
    )


async def test_post_is_503_with_retry_after_when_the_database_is_unreachable(unreachable_client):
    for path in PATHS:
        response = await unreachable_client.post(path, json={"organization_iban": "x"})
        await assert_unavailable(response)


async def test_health_is_503_with_retry_after_when_the_database_is_unreachable(unreachable_client):
    await assert_unavailable(await unreachable_client.get("/health"))


async def test_bulk_transfer_lookup_is_503_when_the_database_is_unreachable(unreachable_client):
    await assert_unavailable(await unreachable_client.get("/bulk_transfers/1"))


async def test_a_database_still_read_only_is_503_and_nothing_is_written(make_client, config, make_account, pool):
    """A node that is still read-only (a standby a failover is promoting, reached a moment early): 25006 is
    an outage to retry, not a server error."""
    sep = "&" if "?" in config.service_database_url else "?"
    read_only = f"{config.service_database_url}{sep}default_transaction_read_only=on"
    client = await make_client(dataclasses.replace(config, service_database_url=read_only))
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    before = await rows_of(pool, account)
    await assert_unavailable(await client.post("/bulk_transfer", json=payload))
    assert await rows_of(pool, account) == before


async def test_overloaded_database_is_503_and_nothing_is_written(make_client, config, make_account, pool):
    """A request stuck behind a lock past the statement timeout is cancelled: 503, and no trace of it."""
    client = await make_client(dataclasses.replace(config, statement_timeout_ms=300))
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00")])
    before = await rows_of(pool, account)

    async with account_locked(pool, account):
        await assert_unavailable(await client.post("/bulk_transfer", json=payload))

    assert await rows_of(pool, account) == before
    retried = await client.post("/bulk_transfer", json=payload)
    assert retried.status == 201, await retried.text()
    assert await balance_of(pool, account) == 9_900
