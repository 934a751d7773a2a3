"""Input rules: required fields, types, lengths, unknown keys, organization name, currency,
counterparty checking. Every rejection is a 422 validation_failed listing every problem, and changes nothing."""

from __future__ import annotations

import json

import pytest
from support import (
    Account,
    assert_rejected_unchanged,
    balance_of,
    for_account,
    random_iban,
    request_for,
    sample,
    transfer,
)

TRANSFER_FIELDS = ["amount", "counterparty_name", "counterparty_iban", "counterparty_bic", "description"]
TEXT_FIELDS = ["counterparty_name", "counterparty_iban", "counterparty_bic", "description"]
TOP_LEVEL_REQUIRED = ["organization_iban", "organization_bic", "credit_transfers"]
LIMITS = [("counterparty_name", 70), ("description", 140), ("counterparty_iban", 34), ("counterparty_bic", 11)]
WRONG_TYPES = [123, 1.5, True, ["x"], {"x": "y"}]
WRONG_TYPES_OR_NULL = WRONG_TYPES + [None]  # null is no value for a required field

VALID_IBANS = ["DE89370400440532013000", "GB82WEST12345698765432", "FR1420041010050500013M02606", "NL24ABNA5055036109"]
VALID_BICS = ["DEUTDEFF", "DEUTDEFF500", "BNPAFRPPXXX", "ZDRPLBQI"]
INVALID_IBANS = [
    "DE89370400440532013001",  # check digits do not match
    "DE8937040044053201300",  # DE IBANs have 22 characters
    "FR14200410100505000130260",  # FR IBANs have 27 characters
    "XX89370400440532013000",  # no such country
    "EE383680981021245685",  # the samples' placeholder, fails mod-97
    "not an iban",
]
INVALID_BICS = ["DEUTDEF", "DEUTDEFF5", "DEUT1EFF", "DE-TDEFF", "DEUTDEFF50", "DEUTDE"]


def without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


# Required fields, types, empty strings


@pytest.mark.parametrize("field", TRANSFER_FIELDS)
async def test_missing_transfer_field_is_rejected(client, make_account, pool, field):
    account = await make_account()
    payload = request_for(account, [transfer("1.00"), without(transfer("2.00"), field)])
    await assert_rejected_unchanged(client, pool, account, payload, {f"/credit_transfers/1/{field}"})


@pytest.mark.parametrize("field", TOP_LEVEL_REQUIRED)
async def test_missing_top_level_field_is_rejected(client, make_account, pool, field):
    account = await make_account()
    payload = without(request_for(account, [transfer("1.00")]), field)
    await assert_rejected_unchanged(client, pool, account, payload, {f"/{field}"})


@pytest.mark.parametrize(
    ("field", "value"),
    [(f, v) for f in TEXT_FIELDS for v in WRONG_TYPES_OR_NULL]
    + [(f, v) for f in ("currency", "client_reference") for v in WRONG_TYPES],
)
async def test_transfer_field_of_wrong_type_is_rejected(client, make_account, pool, field, value):
    account = await make_account()
    payload = request_for(account, [transfer("1.00", **{field: value})])
    await assert_rejected_unchanged(client, pool, account, payload, {f"/credit_transfers/0/{field}"})


@pytest.mark.parametrize(
    ("field", "value"),
    [(f, v) for f in ("organization_iban", "organization_bic") for v in WRONG_TYPES_OR_NULL]
    + [("organization_name", v) for v in WRONG_TYPES],
)
async def test_top_level_field_of_wrong_type_is_rejected(client, make_account, pool, field, value):
    account = await make_account()
    payload = request_for(account, [transfer("1.00")], **{field: value})
    await assert_rejected_unchanged(client, pool, account, payload, {f"/{field}"})


@pytest.mark.parametrize("field", TEXT_FIELDS)
async def test_empty_transfer_field_is_rejected(client, make_account, pool, field):
    account = await make_account()
    payload = request_for(account, [transfer("1.00", **{field: ""})])
    await assert_rejected_unchanged(client, pool, account, payload, {f"/credit_transfers/0/{field}"})


@pytest.mark.parametrize("blank", [" ", "\t\r\n", "\u00a0", "\u3000\u2003", "\u2028 \u202f"], ids=repr)
async def test_transfer_field_of_white_space_only_is_empty(client, make_account, pool, blank):
    """Blank is blank whatever the white space: every character Unicode calls White_Space counts."""
    account = await make_account()
    payload = request_for(account, [transfer("1.00", counterparty_name=blank, description=f"{blank}x{blank}")])
    errors = await assert_rejected_unchanged(client, pool, account, payload, {"/credit_transfers/0/counterparty_name"})
    assert [e["code"] for e in errors] == ["empty"]


@pytest.mark.parametrize("field", ["organization_iban", "organization_bic"])
async def test_empty_top_level_field_is_rejected(client, make_account, pool, field):
    account = await make_account()
    payload = request_for(account, [transfer("1.00")], **{field: ""})
    await assert_rejected_unchanged(client, pool, account, payload, {f"/{field}"})


@pytest.mark.parametrize("value", [[], {}, "transfers", 5, None, True], ids=repr)
async def test_credit_transfers_must_be_a_non_empty_array(client, make_account, pool, value):
    account = await make_account()
    payload = request_for(account, value)
    await assert_rejected_unchanged(client, pool, account, payload, {"/credit_transfers"})


@pytest.mark.parametrize("value", ["transfer", 5, None, [], [transfer("1.00")], True], ids=repr)
async def test_transfer_that_is_not_an_object_is_rejected(client, make_account, pool, value):
    account = await make_account()
    payload = request_for(account, [transfer("1.00"), value, transfer("2.00")])
    await assert_rejected_unchanged(client, pool, account, payload, {"/credit_transfers/1"})


# Length limits (in characters)


@pytest.mark.parametrize(("field", "limit"), LIMITS + [("client_reference", 35)])
@pytest.mark.parametrize("char", ["A", "é"], ids=["ascii", "non_ascii"])
async def test_field_at_its_length_limit_is_accepted_and_stored(client, make_account, pool, field, limit, char):
    account = await make_account(10_000)
    value = char * limit

    response = await client.post("/bulk_transfer", json=request_for(account, [transfer("1.00", **{field: value})]))

    assert response.status == 201, await response.text()
    body = await response.json()
    stored = await pool.fetchval(
        f"SELECT {field} FROM bps.transfers WHERE bulk_transfer_id = $1", body["bulk_transfer_id"]
    )
    assert stored == value
    assert await balance_of(pool, account) == 10_000 - 100


@pytest.mark.parametrize(("field", "limit"), LIMITS + [("client_reference", 35)])
async def test_field_over_its_length_limit_is_rejected(client, make_account, pool, field, limit):
    account = await make_account()
    payload = request_for(account, [transfer("1.00", **{field: "A" * (limit + 1)})])
    errors = await assert_rejected_unchanged(client, pool, account, payload, {f"/credit_transfers/0/{field}"})
    assert str(limit) in errors[0]["detail"]


async def test_client_references_are_echoed_back_per_transfer(client, make_account):
    account = await make_account()
    transfers = [
        transfer("1.00", client_reference="invoice-1"),
        transfer("2.00"),
        transfer("3.00", client_reference="R" * 35),
    ]

    response = await client.post("/bulk_transfer", json=request_for(account, transfers))

    assert response.status == 201, await response.text()
    body = await response.json()
    assert [t.get("client_reference") for t in body["transfers"]] == ["invoice-1", None, "R" * 35]
    shown = await (await client.get(response.headers["Location"])).json()
    assert [t.get("client_reference") for t in shown["transfers"]] == ["invoice-1", None, "R" * 35]


# Unknown keys


@pytest.mark.parametrize(("key", "pointer"), [("organisation_name", "/organisation_name"), ("a/b~c", "/a~1b~0c")])
async def test_unknown_top_level_key_is_rejected_by_name(client, make_account, pool, key, pointer):
    account = await make_account()
    payload = request_for(account, [transfer("1.00")], **{key: "ACME Corp"})
    errors = await assert_rejected_unchanged(client, pool, account, payload, {pointer})
    assert key in errors[0]["detail"]


@pytest.mark.parametrize("key", ["note", "amount_cents", "Amount"])
async def test_unknown_transfer_key_is_rejected_by_name(client, make_account, pool, key):
    account = await make_account()
    payload = request_for(account, [transfer("1.00"), transfer("2.00", **{key: "x"})])
    errors = await assert_rejected_unchanged(client, pool, account, payload, {f"/credit_transfers/1/{key}"})
    assert key in errors[0]["detail"]


async def test_misspelt_field_reports_the_typo_and_the_missing_field(client, make_account, pool):
    account = await make_account()
    misspelt = without(transfer("1.00"), "description") | {"descripton": "Wonderland"}
    payload = request_for(account, [misspelt])
    await assert_rejected_unchanged(
        client, pool, account, payload, {"/credit_transfers/0/descripton", "/credit_transfers/0/description"}
    )


# organization_name


async def test_organization_name_is_optional(client, make_account, pool):
    account = await make_account(10_000)
    payload = without(request_for(account, [transfer("1.00")]), "organization_name")

    response = await client.post("/bulk_transfer", json=payload)

    assert response.status == 201, await response.text()
    assert await balance_of(pool, account) == 9_900


@pytest.mark.parametrize(
    ("account_name", "name"),
    [
        ("ACME Corp", "ACME Corp"),
        ("ACME Corp", "acme corp"),
        ("ACME Corp", "ACME CORP"),
        ("ACME Corp", "  Acme Corp  "),
        ("ACME Corp", "aCmE cOrP "),
        ("ACME Corp", "ACME Corp\n"),
        ("ACME Corp", "\tACME Corp"),
        ("Société Générale", "SOCIÉTÉ GÉNÉRALE"),
    ],
)
async def test_organization_name_matches_case_insensitively_and_trimmed(client, make_account, pool, account_name, name):
    account = await make_account(10_000, organization_name=account_name)

    response = await client.post(
        "/bulk_transfer", json=request_for(account, [transfer("1.00")], organization_name=name)
    )

    assert response.status == 201, await response.text()
    assert await balance_of(pool, account) == 9_900


@pytest.mark.parametrize("name", ["Other Corp", "ACME", "ACME Corp Ltd", "ACMECorp", ""])
async def test_organization_name_that_does_not_match_is_rejected(client, make_account, pool, name):
    account = await make_account(organization_name="ACME Corp")
    payload = request_for(account, [transfer("1.00")], organization_name=name)
    await assert_rejected_unchanged(client, pool, account, payload, {"/organization_name"})


# Currency


@pytest.mark.parametrize(("account_currency", "sent"), [("EUR", "EUR"), ("EUR", None), ("USD", "USD"), ("USD", None)])
async def test_currency_equal_to_the_account_currency_or_absent_is_accepted(
    client, make_account, pool, account_currency, sent
):
    account = await make_account(10_000, currency=account_currency)
    fields = {} if sent is None else {"currency": sent}

    response = await client.post("/bulk_transfer", json=request_for(account, [transfer("1.00", **fields)]))

    assert response.status == 201, await response.text()
    body = await response.json()
    stored = await pool.fetchval(
        "SELECT amount_currency FROM bps.transfers WHERE bulk_transfer_id = $1", body["bulk_transfer_id"]
    )
    assert stored == account_currency
    assert await balance_of(pool, account) == 9_900


@pytest.mark.parametrize(("account_currency", "sent"), [("EUR", "USD"), ("EUR", "GBP"), ("USD", "EUR"), ("EUR", "")])
async def test_currency_different_from_the_account_currency_is_rejected(
    client, make_account, pool, account_currency, sent
):
    account = await make_account(currency=account_currency)
    payload = request_for(account, [transfer("1.00"), transfer("2.00", currency=sent)])
    await assert_rejected_unchanged(client, pool, account, payload, {"/credit_transfers/1/currency"})


# Every problem listed


async def test_every_problem_of_a_request_is_listed(client, make_account, pool):
    account = await make_account(currency="EUR")
    payload = request_for(
        account,
        [
            without(transfer("1.00"), "amount"),
            transfer("1.00", memo="x"),
            "not a transfer",
            transfer("1,5", counterparty_name="", description="D" * 141, currency="USD"),
            transfer("1.00"),
            transfer(3, counterparty_bic="B" * 12, client_reference="R" * 36),
        ],
        organization_name="Someone Else",
        extra="x",
    )
    await assert_rejected_unchanged(
        client,
        pool,
        account,
        payload,
        {
            "/organization_name",
            "/extra",
            "/credit_transfers/0/amount",
            "/credit_transfers/1/memo",
            "/credit_transfers/2",
            "/credit_transfers/3/amount",
            "/credit_transfers/3/counterparty_name",
            "/credit_transfers/3/description",
            "/credit_transfers/3/currency",
            "/credit_transfers/5/amount",
            "/credit_transfers/5/counterparty_bic",
            "/credit_transfers/5/client_reference",
        },
    )


# Counterparty checking: basic (default) vs strict


async def test_new_account_defaults_to_basic_checking_in_eur(client, pool, cover):
    iban = random_iban()
    account_id = await pool.fetchval("SELECT bps.create_bank_account('ACME Corp', $1, 'OIVUSCLQXXX', 10000)", iban)
    await cover(account_id)
    account = Account(account_id, "ACME Corp", iban, "OIVUSCLQXXX", "EUR")
    placeholder = transfer("1.00", counterparty_iban="f", counterparty_bic="e", currency="EUR")

    response = await client.post("/bulk_transfer", json=request_for(account, [placeholder]))

    assert response.status == 201, await response.text()
    assert await balance_of(pool, account) == 9_900


@pytest.mark.parametrize(("iban", "bic"), list(zip(VALID_IBANS, VALID_BICS, strict=True)))
async def test_strict_account_accepts_valid_iban_and_bic(client, make_account, pool, iban, bic):
    account = await make_account(10_000, counterparty_check="strict")

    response = await client.post(
        "/bulk_transfer",
        json=request_for(account, [transfer("1.00", counterparty_iban=iban, counterparty_bic=bic)]),
    )

    assert response.status == 201, await response.text()
    assert await balance_of(pool, account) == 9_900


@pytest.mark.parametrize("iban", INVALID_IBANS)
async def test_strict_account_rejects_invalid_iban(client, make_account, pool, iban):
    account = await make_account(counterparty_check="strict")
    payload = request_for(
        account, [transfer("1.00", counterparty_iban=VALID_IBANS[0]), transfer("1.00", counterparty_iban=iban)]
    )
    # The default transfer's BIC is a valid ISO 9362 shape; only the IBAN is wrong.
    await assert_rejected_unchanged(client, pool, account, payload, {"/credit_transfers/1/counterparty_iban"})


@pytest.mark.parametrize("bic", INVALID_BICS)
async def test_strict_account_rejects_invalid_bic(client, make_account, pool, bic):
    account = await make_account(counterparty_check="strict")
    payload = request_for(account, [transfer("1.00", counterparty_iban=VALID_IBANS[0], counterparty_bic=bic)])
    await assert_rejected_unchanged(client, pool, account, payload, {"/credit_transfers/0/counterparty_bic"})


@pytest.mark.parametrize("iban", INVALID_IBANS)
async def test_basic_account_accepts_placeholder_iban(client, make_account, pool, iban):
    account = await make_account(10_000)

    response = await client.post(
        "/bulk_transfer", json=request_for(account, [transfer("1.00", counterparty_iban=iban, counterparty_bic="e")])
    )

    assert response.status == 201, await response.text()
    assert await balance_of(pool, account) == 9_900


async def test_samples_pass_a_basic_account_but_not_a_strict_one(client, make_account, pool):
    basic = await make_account(10_000_000)
    strict = await make_account(10_000_000, counterparty_check="strict")

    await assert_rejected_unchanged(
        client,
        pool,
        strict,
        for_account(sample("sample1.json"), strict),
        # EE38...: bad check digits; DE99... (27 characters, DE has 22) and FR00...: bad length or check digits.
        {f"/credit_transfers/{n}/counterparty_iban" for n in range(3)},
    )
    response = await client.post("/bulk_transfer", json=for_account(sample("sample1.json"), basic))
    assert response.status == 201, await response.text()
    assert await balance_of(pool, basic) == 3_774_850


# The fast path (bps.transfer_is_valid over text columns) and the detailed error list (bps.transfer_problems
# over jsonb) share every field rule; this checks they agree on transfers whose values are all strings,
# including absent fields, blanks, limits, edge amounts and strict IBAN/BIC checking.
FIELD_CANDIDATES = {
    "amount": [
        "14.50",
        "0.01",
        "999999999.99",
        "1000000000",
        "0",
        "0.00",
        "00012.3",
        "1.234",
        "1e3",
        " 1",
        "",
        "-1",
        "0" * 40 + "1",
        "9" * 40,
        None,
    ],
    "currency": ["EUR", "USD", "eur", "", None],
    "counterparty_name": ["Bip Bip", "N" * 70, "N" * 71, "  ", "\t\n", "\u00a0\u3000", "\u00a0N", "é" * 70, None],
    "counterparty_iban": ["DE89370400440532013000", "EE383680981021245685", "I" * 34, "I" * 35, " ", None],
    "counterparty_bic": ["DEUTDEFF", "DEUTDEFF500", "DEUTDEF", "B" * 12, "", None],
    "description": ["Invoice", "D" * 140, "D" * 141, " \r ", None],
    "client_reference": ["ref-1", "R" * 35, "R" * 36, "", None],
}


async def test_fast_and_detailed_validation_agree_on_every_transfer(pool):
    disagreements = await pool.fetchrow(
        """
        WITH candidates AS (
            SELECT key AS field, array_agg(value) AS values
              FROM jsonb_each($1::jsonb) AS f(key, list), jsonb_array_elements(list) AS v(value)
             GROUP BY key
        ), transfers AS (
            SELECT jsonb_strip_nulls(jsonb_build_object(
                       'amount', a, 'currency', c, 'counterparty_name', n, 'counterparty_iban', i,
                       'counterparty_bic', b, 'description', d, 'client_reference', r)) AS transfer
              FROM unnest((SELECT values FROM candidates WHERE field = 'amount')) AS a,
                   unnest((SELECT values FROM candidates WHERE field = 'currency')) AS c,
                   unnest((SELECT values FROM candidates WHERE field = 'counterparty_name')) AS n,
                   unnest((SELECT values FROM candidates WHERE field = 'counterparty_iban')) AS i,
                   unnest((SELECT values FROM candidates WHERE field = 'counterparty_bic')) AS b,
                   unnest((SELECT values FROM candidates WHERE field = 'description')) AS d,
                   unnest((SELECT values FROM candidates WHERE field = 'client_reference')) AS r
             WHERE hashtext(concat_ws('|', a, c, n, i, b, d, r)) % 12 = 0  -- a fixed twelfth: ~50,000
        )
        SELECT count(*) AS compared, count(*) FILTER (WHERE fast) AS valid,
               (array_agg(jsonb_build_object('transfer', t.transfer, 'strict', strict, 'fast', fast,
                                             'detailed', detailed))
                    FILTER (WHERE fast IS DISTINCT FROM (detailed = '{}')))[1:5] AS disagreements
          FROM transfers AS t, (VALUES (false), (true)) AS s(strict),
               jsonb_populate_record(NULL::bps.transfer_input, t.transfer) AS f,
               LATERAL (SELECT bps.transfer_is_valid(f, 'EUR', strict) AS fast,
                               bps.transfer_problems(t.transfer, 'EUR', strict) AS detailed) AS v
        """,
        json.dumps(FIELD_CANDIDATES),
    )
    assert disagreements["disagreements"] is None
    assert disagreements["compared"] > 10_000 and 0 < disagreements["valid"] < disagreements["compared"]


async def test_the_keys_a_transfer_may_carry_are_the_fields_it_is_read_as(pool):
    """bps.transfer_fields() (the unknown-key rule) and the type bps.transfer_input (what the fast path reads)
    name the same fields."""
    fields = await pool.fetchval("SELECT bps.transfer_fields()")
    columns = await pool.fetchval(
        """SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute AS a
            WHERE a.attrelid = (SELECT typrelid FROM pg_type WHERE oid = 'bps.transfer_input'::regtype)
              AND a.attnum > 0 AND NOT a.attisdropped"""
    )
    assert sorted(fields) == sorted(columns) and len(fields) == 7
