"""API keys: every refusal of the access table over HTTP, keys made and revoked in SQL, and the key's
accounts as the only ones a request may touch (another account's answer is exactly a missing one's)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import asyncpg
import pytest
from support import assert_problem, balance_of, request_for, rows_of, transfer

from service import access
from service.app import UNAUTHORIZED_DETAIL

BOTH = ["transfers:write", "transfers:read"]


async def new_key(pool: asyncpg.Pool, account_ids: list[int], scopes: list[str] = BOTH, **more) -> str:
    columns = ", ".join(f"{name} => ${i}" for i, name in enumerate(more, 4))
    return await pool.fetchval(
        f"SELECT bps.create_api_key($1, $2, $3{', ' + columns if columns else ''})",
        account_ids,
        "test key",
        scopes,
        *more.values(),
    )


async def key_id(pool: asyncpg.Pool, key: str) -> int:
    return await pool.fetchval(
        "SELECT id FROM bps.api_credentials WHERE key_hash = sha256(convert_to($1, 'UTF8'))", key
    )


async def shown(pool: asyncpg.Pool, key: str, column: str):
    """A column of the key's row in bps.api_keys."""
    return await pool.fetchval(f"SELECT {column} FROM bps.api_keys WHERE id = $1", await key_id(pool, key))


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def assert_unauthorized(response) -> dict:
    body = await assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="bps"'
    return body


@pytest.fixture
async def anonymous(make_client):
    """A client that sends no Authorization header unless a test gives one."""
    return await make_client(key=None)


# ---------------------------------------------------------------------------------------------------------
# The key itself


async def test_a_key_is_bps_and_190_random_bits_and_a_checksum(pool, make_account):
    account = await make_account()
    keys = {await new_key(pool, [account.id]) for _ in range(20)}

    assert len(keys) == 20
    for key in keys:
        assert re.fullmatch(r"bps_[0-9A-Za-z]{38}", key), key
        assert access.is_well_formed(key)
    # 32 base62 characters are 190 bits; across 20 keys every position varies.
    assert all(len({key[4 + i] for key in keys}) > 1 for i in range(32))


async def test_a_key_is_stored_only_as_its_hash_and_the_view_shows_no_secret(pool, make_account):
    account = await make_account()
    key = await new_key(pool, [account.id], ["transfers:read"])

    stored = await pool.fetchrow(
        "SELECT * FROM bps.api_credentials WHERE key_hash = sha256(convert_to($1, 'UTF8'))", key
    )
    assert stored is not None
    assert key not in json.dumps({k: str(v) for k, v in dict(stored).items()})
    everything = await pool.fetchval("SELECT string_agg(t::text, '') FROM bps.api_credentials AS t")
    assert key not in everything and key[4:36] not in everything
    shown = await pool.fetchrow("SELECT * FROM bps.api_keys WHERE id = $1", stored["id"])
    assert set(dict(shown)) == {
        "id",
        "label",
        "hint",
        "bank_account_ids",
        "scopes",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
        "state",
    }
    assert shown["bank_account_ids"] == [account.id]
    assert shown["scopes"] == ["transfers:read"]
    assert shown["state"] == "live"
    assert shown["hint"] == "bps_…" + key[-4:]


async def test_a_mistyped_key_fails_its_checksum(pool, make_account):
    key = await new_key(pool, [(await make_account()).id])
    for i in range(4, len(key)):
        for replacement in "0aZ":
            if key[i] != replacement:
                assert not access.is_well_formed(key[:i] + replacement + key[i + 1 :]), (i, replacement)


@pytest.mark.parametrize(
    "call, message",
    [
        ("bps.create_api_key(ARRAY[]::bigint[], 'x')", "at least one bank account"),
        ("bps.create_api_key(ARRAY[NULL]::bigint[], 'x')", "at least one bank account"),
        ("bps.create_api_key(ARRAY[9223372036854775807], 'x')", "no bank account with id 9223372036854775807"),
        ("bps.create_api_key(ARRAY[$1::bigint], 'x', ARRAY['transfers:delete'])", "scopes must be"),
        ("bps.create_api_key(ARRAY[$1::bigint], 'x', ARRAY[]::text[])", "scopes must be"),
        ("bps.create_api_key(ARRAY[$1::bigint], 'x', expires_at => now() - interval '1 s')", "not in the future"),
        ("bps.create_api_key(ARRAY[$1::bigint], '  ')", "check constraint"),
    ],
    ids=["no accounts", "null account", "unknown account", "unknown scope", "no scope", "expired", "blank label"],
)
async def test_create_api_key_refuses_what_would_make_a_useless_or_wrong_key(pool, make_account, call, message):
    account = await make_account()
    with pytest.raises(asyncpg.PostgresError, match=message):
        await pool.fetchval(f"SELECT {call}", *([account.id] if "$1" in call else []))


async def test_revoke_is_true_only_for_a_live_key(pool, make_account):
    account = await make_account()
    key = await new_key(pool, [account.id])
    other = await new_key(pool, [account.id])
    other_id = await key_id(pool, other)

    assert await pool.fetchval("SELECT bps.revoke_api_key($1::text)", key) is True
    assert await pool.fetchval("SELECT bps.revoke_api_key($1::text)", key) is False
    assert await pool.fetchval("SELECT bps.revoke_api_key($1::text)", "bps_never_made") is False
    assert await pool.fetchval("SELECT bps.revoke_api_key($1::bigint)", other_id) is True
    assert await pool.fetchval("SELECT bps.revoke_api_key($1::bigint)", other_id) is False
    assert await shown(pool, key, "state") == await shown(pool, other, "state") == "revoked"


async def test_last_use_is_recorded(client, pool, make_account, make_client):
    account = await make_account()
    key = await new_key(pool, [account.id])
    keyed = await make_client(key=key)
    assert await shown(pool, key, "last_used_at") is None

    response = await keyed.post("/bulk_transfer", json=request_for(account, [transfer()]))

    assert response.status == 201
    assert await shown(pool, key, "last_used_at") is not None


async def test_the_services_401_is_the_databases(pool):
    body = json.loads(await pool.fetchval("SELECT bps.unauthorized()::text"))
    assert body["detail"] == UNAUTHORIZED_DETAIL


# ---------------------------------------------------------------------------------------------------------
# 401: no valid key, whatever else the request holds


NOT_A_KEY = {
    "no header": None,
    "empty": "",
    "basic": "Basic dXNlcjpwYXNz",
    "bearer without key": "Bearer",
    "bearer space": "Bearer ",
    "not a bps key": "Bearer sk_live_0123456789",
    "bps prefix only": "Bearer bps_",
    "wrong checksum": "Bearer bps_" + "A" * 38,
    "two keys": "Bearer bps_x bps_y",
}


@pytest.mark.parametrize("header", NOT_A_KEY.values(), ids=NOT_A_KEY.keys())
async def test_a_request_without_a_valid_key_is_401_and_changes_nothing(anonymous, make_account, pool, header):
    account = await make_account(10_000)
    before = await rows_of(pool, account)
    headers = {} if header is None else {"Authorization": header}

    await assert_unauthorized(
        await anonymous.post("/bulk_transfer", json=request_for(account, [transfer()]), headers=headers)
    )
    await assert_unauthorized(await anonymous.get("/bulk_transfers/1", headers=headers))

    assert await rows_of(pool, account) == before


async def test_a_well_formed_key_that_was_never_made_is_401(anonymous, make_account):
    body = "bps_" + "Z" * 32
    key = body + access.checksum(body)
    account = await make_account()
    await assert_unauthorized(
        await anonymous.post("/bulk_transfer", json=request_for(account, [transfer()]), headers=bearer(key))
    )


async def test_the_scheme_is_case_insensitive(anonymous, pool, make_account):
    account = await make_account()
    key = await new_key(pool, [account.id])
    response = await anonymous.post(
        "/bulk_transfer", json=request_for(account, [transfer()]), headers={"Authorization": f"bearer {key}"}
    )
    assert response.status == 201, await response.text()


UNAUTHENTICATED_BODIES = {
    "not json": (b"{not json", "application/json"),
    "invalid request": (b'{"credit_transfers": 5}', "application/json"),
    "wrong content type": (b"<xml/>", "text/plain"),
    "not utf-8": (b'{"a": "\xff"}', "application/json"),
    "too large": (b"x" * 20_000, "application/json"),
}


@pytest.mark.parametrize("kind", ["none", "revoked", "expired", "unknown"])
@pytest.mark.parametrize("data, content_type", UNAUTHENTICATED_BODIES.values(), ids=UNAUTHENTICATED_BODIES.keys())
async def test_authentication_comes_first_whatever_else_is_wrong(
    make_client, config, pool, make_account, kind, data, content_type
):
    account = await make_account()
    key = await new_key(pool, [account.id])
    if kind == "revoked":
        await pool.execute("SELECT bps.revoke_api_key($1::text)", key)
    elif kind == "expired":
        await pool.execute(
            "UPDATE bps.api_credentials SET expires_at = now() - interval '1 s' "
            "WHERE key_hash = sha256(convert_to($1, 'UTF8'))",
            key,
        )
    elif kind == "unknown":
        key = "bps_" + "Q" * 32 + access.checksum("bps_" + "Q" * 32)
    small = await make_client(dataclasses.replace(config, max_body_bytes=10_000), key=None if kind == "none" else key)

    response = await small.post("/bulk_transfer", data=data, headers={"Content-Type": content_type})

    await assert_unauthorized(response)


async def test_a_revoked_key_stops_at_once_on_a_connection_the_service_already_holds(
    make_client, config, pool, make_account
):
    account = await make_account()
    key = await new_key(pool, [account.id])
    one_connection = await make_client(dataclasses.replace(config, pool_min_size=1, pool_max_size=1), key=key)
    assert (await one_connection.post("/bulk_transfer", json=request_for(account, [transfer()]))).status == 201
    assert (await one_connection.get("/bulk_transfers/1")).status in (200, 404)

    assert await pool.fetchval("SELECT bps.revoke_api_key($1::text)", key)

    await assert_unauthorized(await one_connection.post("/bulk_transfer", json=request_for(account, [transfer()])))
    await assert_unauthorized(await one_connection.get("/bulk_transfers/1"))


async def test_an_expired_key_stops_working(make_client, pool, make_account):
    account = await make_account()
    key = await new_key(pool, [account.id], expires_at=await pool.fetchval("SELECT now() + interval '1 hour'"))
    keyed = await make_client(key=key)
    assert (await keyed.post("/bulk_transfer", json=request_for(account, [transfer()]))).status == 201

    await pool.execute(
        "UPDATE bps.api_credentials SET expires_at = now() WHERE key_hash = sha256(convert_to($1, 'UTF8'))", key
    )

    await assert_unauthorized(await keyed.post("/bulk_transfer", json=request_for(account, [transfer()])))
    assert await shown(pool, key, "state") == "expired"


# ---------------------------------------------------------------------------------------------------------
# 403: the key lacks the scope


async def test_a_read_only_key_cannot_post_and_a_write_only_key_cannot_read(make_client, pool, make_account):
    account = await make_account(10_000)
    before = await rows_of(pool, account)
    reader = await make_client(key=await new_key(pool, [account.id], ["transfers:read"]))
    writer = await make_client(key=await new_key(pool, [account.id], ["transfers:write"]))

    body = await assert_problem(
        await reader.post("/bulk_transfer", json=request_for(account, [transfer()])), 403, "forbidden"
    )
    assert "transfers:write" in body["detail"]
    assert await rows_of(pool, account) == before

    created = await writer.post("/bulk_transfer", json=request_for(account, [transfer()]))
    assert created.status == 201
    location = created.headers["Location"]
    await assert_problem(await writer.get(location), 403, "forbidden")
    assert (await reader.get(location)).status == 200


async def test_a_read_only_key_is_403_before_its_body_is_judged(make_client, pool, make_account):
    account = await make_account()
    reader = await make_client(key=await new_key(pool, [account.id], ["transfers:read"]))
    for data, content_type in UNAUTHENTICATED_BODIES.values():
        response = await reader.post("/bulk_transfer", data=data, headers={"Content-Type": content_type})
        await assert_problem(response, 403, "forbidden")


# ---------------------------------------------------------------------------------------------------------
# 404: another account's resources look exactly like missing ones


async def test_a_key_of_account_a_naming_account_b_gets_the_answer_of_an_unknown_account(
    make_client, pool, make_account
):
    a = await make_account(10_000)
    b = await make_account(10_000, organization_name="Other Corp")
    a_only = await make_client(key=await new_key(pool, [a.id]))
    before = await rows_of(pool, b)
    unknown = dataclasses.replace(b, iban="FR7600000000000000000000000")

    to_b = await a_only.post("/bulk_transfer", json=request_for(b, [transfer()]))
    to_nobody = await a_only.post("/bulk_transfer", json=request_for(unknown, [transfer()]))

    assert (await assert_problem(to_b, 404, "account_not_found")) == await to_nobody.json(content_type=None)
    assert await rows_of(pool, b) == before


async def test_rules_that_depend_on_the_account_say_nothing_about_an_account_the_key_does_not_cover(
    make_client, pool, make_account
):
    """A name mismatch, a wrong currency or a strict IBAN check would tell the account exists: for an account
    the key does not cover, the answer is the one an unknown account gets."""
    a = await make_account()
    b = await make_account(organization_name="Secret Corp", currency="USD", counterparty_check="strict")
    a_only = await make_client(key=await new_key(pool, [a.id]))
    payload = request_for(b, [transfer(currency="EUR", counterparty_iban="f")], organization_name="Guess Corp")
    unknown = payload | {"organization_iban": "FR7600000000000000000000000"}

    to_b = await a_only.post("/bulk_transfer", json=payload)
    to_nobody = await a_only.post("/bulk_transfer", json=unknown)

    assert to_b.status == to_nobody.status
    assert await to_b.json(content_type=None) == await to_nobody.json(content_type=None)


async def test_a_key_of_several_accounts_may_debit_each(make_client, pool, make_account):
    a, b = await make_account(10_000), await make_account(10_000)
    both = await make_client(key=await new_key(pool, [a.id, b.id]))
    for account in (a, b):
        assert (await both.post("/bulk_transfer", json=request_for(account, [transfer("1.00")]))).status == 201
        assert await balance_of(pool, account) == 9_900


async def test_another_accounts_bulk_transfer_is_not_found_exactly_as_a_missing_one(
    client, make_client, pool, make_account
):
    a, b = await make_account(), await make_account()
    created = await client.post("/bulk_transfer", json=request_for(b, [transfer()]))
    b_bulk = (await created.json())["bulk_transfer_id"]
    a_only = await make_client(key=await new_key(pool, [a.id]))
    missing = await pool.fetchval("SELECT coalesce(max(id), 0) + 1000000 FROM bps.bulk_transfers")

    theirs = await a_only.get(f"/bulk_transfers/{b_bulk}")
    nobodys = await a_only.get(f"/bulk_transfers/{missing}")

    body = await assert_problem(theirs, 404, "bulk_transfer_not_found")
    other = await assert_problem(nobodys, 404, "bulk_transfer_not_found")
    assert body == other | {"detail": other["detail"].replace(str(missing), str(b_bulk))}


@pytest.mark.parametrize("path_id", ["abc", "-1", "1.5", "99999999999999999999", "00"])
async def test_a_malformed_bulk_transfer_id_is_404_after_the_key_is_checked(client, anonymous, path_id):
    await assert_problem(await client.get(f"/bulk_transfers/{path_id}"), 404, "bulk_transfer_not_found")
    await assert_unauthorized(await anonymous.get(f"/bulk_transfers/{path_id}"))


# ---------------------------------------------------------------------------------------------------------
# What needs no key


@pytest.mark.parametrize("path", ["/health"])
async def test_health_needs_no_key(anonymous, path):
    assert (await anonymous.get(path)).status == 200


async def test_many_requests_of_one_key_at_once_do_not_wait_on_its_last_use(make_client, config, pool, make_account):
    """The key's row is written at most once a minute, and never waited on: a burst of one key's requests all
    succeed at once, and its last use is recorded."""
    account = await make_account(10_000_000)
    key = await new_key(pool, [account.id])
    keyed = await make_client(dataclasses.replace(config, pool_max_size=10), key=key)
    answers = await asyncio.gather(
        *(keyed.post("/bulk_transfer", json=request_for(account, [transfer()])) for _ in range(40))
    )
    assert [a.status for a in answers] == [201] * 40
    assert await shown(pool, key, "last_used_at") is not None
