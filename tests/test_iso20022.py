"""ISO 20022, as a client sees it: pain.001 Customer Credit Transfer Initiation files posted to /bulk_transfer
and /transfers/bulk (each PmtInf one bulk transfer, the whole file at once or not at all), and the
pain.002.001.10 Customer Payment Status Report of a bulk transfer (GET /bulk_transfers/{id} with
Accept: application/xml), checked against the official schema in tests/data/iso20022/.

The files come from two sources: the `sepaxml` package, an implementation of its own, for pain.001.001.03
and .09 (it validates what it exports against its copy of those schemas); and the small template builder
below for what sepaxml cannot make (the other versions, national variants, IBAN-only debtors, several
accounts in one file, structured references, DtTm dates, odd amounts, broken files).

The module has a database of its own: statuses are driven from SQL by claims, which take the oldest due
transfers of the whole database (see tests/test_execution.py); a test that claims drains the queue first.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
import re
import secrets
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
import sepaxml
import xmlschema
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sepaxml import SepaTransfer
from support import (
    DATA_DIR,
    Account,
    assert_problem,
    balance_of,
    database_fixtures,
    random_iban,
    request_for,
    rows_of,
    transfer,
)

PAIN001 = "urn:iso:std:iso:20022:tech:xsd:"
# Every pain.001 message accepted, by name, with its namespace.
MESSAGES = {
    **{f"pain.001.001.{v:02d}": f"{PAIN001}pain.001.001.{v:02d}" for v in range(3, 13)},
    "pain.001.002.03": f"{PAIN001}pain.001.002.03",
    "pain.001.003.03": f"{PAIN001}pain.001.003.03",
    "pain.001.001.03.ch.02": "http://www.six-interbank-clearing.com/de/pain.001.001.03.ch.02.xsd",
}
PAIN002 = "urn:iso:std:iso:20022:tech:xsd:pain.002.001.10"
PAIN002_XSD = DATA_DIR / "iso20022" / "pain.002.001.10.xsd"
SEPAXML_XSD = Path(sepaxml.__file__).parent / "schemas"  # the pain.001 schemas sepaxml validates against
ROOT = "/Document/CstmrCdtTrfInitn"

BOTH = ["transfers:write", "transfers:read"]
CLAIM_SQL = "SELECT * FROM bps.claim_transfers($1, $2, $3::text::interval)"
SETTLE_SQL = "SELECT bps.settle_transfers($1::bigint[], $2::integer[], $3::bigint[], $4::text[], $5::text[])"
QUEUED_SQL = """
    SELECT count(*) FROM pg_stat_activity
     WHERE datname = current_database() AND pid <> pg_backend_pid()
       AND wait_event_type = 'Lock' AND query LIKE '%bulk_transfer_xml(%'
"""
STORED_SQL = """
    SELECT amount_cents, counterparty_name, counterparty_iban, counterparty_bic, description, client_reference
      FROM bps.transfers_of($1) ORDER BY id
"""


# ---------------------------------------------------------------------------------------------------------
# A database of this module's own (the conftest fixtures of the same names, on it)


database_url, service_url, pool, session_key = database_fixtures("module", "bps_iso20022_test")


# ---------------------------------------------------------------------------------------------------------
# A pain.001 template builder

AUTO = "<computed>"  # NbOfTxs and CtrlSum: the right value; None: the element is left out


def token() -> str:
    return secrets.token_hex(6)


@dataclass
class Tx:
    """One CdtTrfTxInf; None leaves an element out."""

    amount: str = "14.50"
    currency: str | None = "EUR"
    name: str | None = "Bip Bip"
    iban: str | None = "EE383680981021245685"
    bic: str | None = "CRLYFRPPTOU"  # CdtrAgt/FinInstnId/BIC (BICFI from .04 on)
    description: str | None = field(default_factory=lambda: f"Wonderland/{token()}")  # RmtInf/Ustrd
    reference: str | None = None  # RmtInf/Strd/CdtrRefInf/Ref
    end_to_end_id: str = field(default_factory=lambda: f"E2E-{token()}")


@dataclass
class Block:
    """One PmtInf debiting `iban` (at the agent `bic`; None: DbtrAgt/FinInstnId/Othr/Id NOTPROVIDED)."""

    iban: str | None
    bic: str | None
    txs: list[Tx]
    id: str = field(default_factory=lambda: f"PMT-{token()}")
    date: str | None = None  # ReqdExctnDt (its Dt from .09 on)
    date_time: str | None = None  # ReqdExctnDt/DtTm (.09 on)
    nb_of_txs: str | None = AUTO
    ctrl_sum: str | None = AUTO


def block(account: Account, txs: Iterable[Tx] | None = None, *, iban_only: bool = False, **fields) -> Block:
    return Block(account.iban, None if iban_only else account.bic, list(txs or [Tx()]), **fields)


def bic_element(message: str) -> str:
    """BIC up to version .03 (and its national variants), BICFI after."""
    return "BIC" if message.split(".")[3] == "03" else "BICFI"


def dates_are_a_choice(message: str) -> bool:
    """ReqdExctnDt is a date up to .08, a choice of Dt and DtTm from .09 on."""
    return int(message.split(".")[3]) >= 9


def decimal_sum(amounts: Iterable[str]) -> str | None:
    """The sum of xs:decimal amounts; None when one is not an xs:decimal."""
    total = Decimal(0)
    for amount in amounts:
        if not re.fullmatch(r"\s*\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*", amount):
            return None
        total += Decimal(amount.strip())
    return str(total)


def sub(parent: ET.Element, tag: str, text: str | None = None, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    element.text = text
    return element


def pain001(
    blocks: list[Block],
    *,
    message: str = "pain.001.001.03",
    msg_id: str | None = None,
    nb_of_txs: str | None = AUTO,
    ctrl_sum: str | None = AUTO,
    namespace: str | None = None,
    encoding: str | None = "UTF-8",
    pretty: bool = False,
) -> str:
    """A pain.001 document of these blocks (with an XML declaration naming `encoding`, unless None)."""
    bic = bic_element(message)
    root = ET.Element("Document", {"xmlns": namespace or MESSAGES[message]})
    initiation = sub(root, "CstmrCdtTrfInitn")
    header = sub(initiation, "GrpHdr")
    sub(header, "MsgId", msg_id or f"MSG-{token()}")
    sub(header, "CreDtTm", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    if nb_of_txs is not None:
        sub(header, "NbOfTxs", str(sum(len(b.txs) for b in blocks)) if nb_of_txs == AUTO else nb_of_txs)
    total = decimal_sum(t.amount for b in blocks for t in b.txs) if ctrl_sum == AUTO else ctrl_sum
    if total is not None:
        sub(header, "CtrlSum", total)
    sub(sub(header, "InitgPty"), "Nm", "ACME Corp")
    for b in blocks:
        info = sub(initiation, "PmtInf")
        sub(info, "PmtInfId", b.id)
        sub(info, "PmtMtd", "TRF")
        if b.nb_of_txs is not None:
            sub(info, "NbOfTxs", str(len(b.txs)) if b.nb_of_txs == AUTO else b.nb_of_txs)
        block_sum = decimal_sum(t.amount for t in b.txs) if b.ctrl_sum == AUTO else b.ctrl_sum
        if block_sum is not None:
            sub(info, "CtrlSum", block_sum)
        sub(sub(sub(info, "PmtTpInf"), "SvcLvl"), "Cd", "SEPA")
        if dates_are_a_choice(message):
            if b.date is not None or b.date_time is not None:
                when = sub(info, "ReqdExctnDt")
                if b.date is not None:
                    sub(when, "Dt", b.date)
                else:
                    sub(when, "DtTm", b.date_time)
        elif b.date is not None:
            sub(info, "ReqdExctnDt", b.date)
        sub(sub(info, "Dbtr"), "Nm", "ACME Corp")
        if b.iban is not None:
            sub(sub(sub(info, "DbtrAcct"), "Id"), "IBAN", b.iban)
        agent = sub(sub(info, "DbtrAgt"), "FinInstnId")
        if b.bic is not None:
            sub(agent, bic, b.bic)
        else:
            sub(sub(agent, "Othr"), "Id", "NOTPROVIDED")
        sub(info, "ChrgBr", "SLEV")
        for t in b.txs:
            tx = sub(info, "CdtTrfTxInf")
            sub(sub(tx, "PmtId"), "EndToEndId", t.end_to_end_id)
            amount = sub(sub(tx, "Amt"), "InstdAmt", t.amount)
            if t.currency is not None:
                amount.set("Ccy", t.currency)
            if t.bic is not None:
                sub(sub(sub(tx, "CdtrAgt"), "FinInstnId"), bic, t.bic)
            if t.name is not None:
                sub(sub(tx, "Cdtr"), "Nm", t.name)
            if t.iban is not None:
                sub(sub(sub(tx, "CdtrAcct"), "Id"), "IBAN", t.iban)
            if t.description is not None or t.reference is not None:
                remittance = sub(tx, "RmtInf")
                if t.description is not None:
                    sub(remittance, "Ustrd", t.description)
                if t.reference is not None:
                    sub(sub(sub(remittance, "Strd"), "CdtrRefInf"), "Ref", t.reference)
    if pretty:
        ET.indent(root)
    text = ET.tostring(root, encoding="unicode")
    return text if encoding is None else f'<?xml version="1.0" encoding="{encoding}"?>\n{text}'


def msg_id_of(document: str | bytes) -> str:
    return re.search(r"<MsgId>([^<]*)</MsgId>", document if isinstance(document, str) else document.decode()).group(1)


def sepaxml_file(account: Account, payments: list[dict], schema: str, batch: bool) -> tuple[bytes, str, list[str]]:
    """A file exported (and validated against its schema) by sepaxml: the document, its MsgId, its PmtInfIds."""
    config = {
        "name": account.organization_name,
        "IBAN": account.iban,
        "BIC": account.bic,
        "batch": batch,
        "currency": account.currency,
    }
    sepa = SepaTransfer(config, schema=schema, clean=True)
    for payment in payments:
        sepa.add_payment(dict(payment))
    document = sepa.export(validate=True)
    ids = [e.text for e in ET.fromstring(document).iter(f"{{{PAIN001}{schema}}}PmtInfId")]
    return document, sepa.msg_id, ids


# ---------------------------------------------------------------------------------------------------------
# Requests and what they left


async def post_xml(
    client, document: str | bytes, *, path: str = "/bulk_transfer", content_type: str = "application/xml", **headers
):
    data = document.encode() if isinstance(document, str) else document
    return await client.post(path, data=data, headers={"Content-Type": content_type, **headers})


async def accepted(client, document: str | bytes, **kwargs) -> dict:
    response = await post_xml(client, document, **kwargs)
    assert response.status == 201, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def stored(pool: asyncpg.Pool, bulk_id: int) -> list[tuple]:
    """The transfers of a bulk transfer, as bps.transfers holds them."""
    return [tuple(r) for r in await pool.fetch(STORED_SQL, bulk_id)]


async def bulk_row(pool: asyncpg.Pool, bulk_id: int) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM bps.bulk_transfers WHERE id = $1", bulk_id)


def expected(tx: Tx, cents: int | None = None) -> tuple:
    """What bps.transfers holds for a transaction of the builder."""
    return (
        cents if cents is not None else int(Decimal(tx.amount) * 100),
        tx.name,
        tx.iban,
        tx.bic if tx.bic is not None else "NOTPROVIDED",
        tx.description if tx.description is not None else tx.reference or tx.end_to_end_id,
        tx.end_to_end_id,
    )


async def snapshot(pool: asyncpg.Pool, accounts: Iterable[Account]) -> list[dict]:
    return [await rows_of(pool, account, keys=True) for account in accounts]


async def assert_problem_unchanged(response, pool, accounts, before, status: int, code: str | None) -> dict:
    """A problem with this status and code, never a pointer, and nothing written on the accounts."""
    body = await assert_problem(response, status, code)
    assert "pointer" not in json.dumps(body)
    assert "Location" not in response.headers
    assert await snapshot(pool, accounts) == before
    return body


async def file_errors(response, pool, accounts, before) -> list[tuple[str, str]]:
    """The (path, code) of each error of a 422 validation_failed, each with its detail; nothing written."""
    body = await assert_problem_unchanged(response, pool, accounts, before, 422, "validation_failed")
    for error in body["errors"]:
        assert set(error) == {"path", "code", "detail"}, error
        assert error["detail"], error
    return [(e["path"], e["code"]) for e in body["errors"]]


async def new_key(pool: asyncpg.Pool, accounts: Iterable[Account], scopes: list[str] = BOTH) -> str:
    return await pool.fetchval(
        "SELECT bps.create_api_key($1::bigint[], 'iso20022 test', $2::text[])", [a.id for a in accounts], scopes
    )


async def today(pool: asyncpg.Pool) -> date:
    return await pool.fetchval("SELECT bps.today()")


def tx_path(block_n: int, tx_n: int, step: str) -> str:
    return f"{ROOT}/PmtInf[{block_n}]/CdtTrfTxInf[{tx_n}]/{step}"


# ---------------------------------------------------------------------------------------------------------
# Execution from SQL (as tests/test_execution.py drives it)


async def claim(pool: asyncpg.Pool, budget: int = 100_000, lease: str = "1 hour") -> list[asyncpg.Record]:
    return await pool.fetch(CLAIM_SQL, "iso20022-test", budget, lease)


async def drain(pool: asyncpg.Pool) -> None:
    """Claims, for a day, every due transfer earlier tests left: the queue is then empty."""
    while await pool.fetch(CLAIM_SQL, "drain", 100_000, "1 day"):
        pass


async def settle(pool: asyncpg.Pool, rows: list[asyncpg.Record], outcomes: dict[int, str] | None = None) -> int:
    """The rail's answers for claimed rows: a failure reason by transfer id, else executed."""
    runs = sorted({(r["run_id"], r["attempt"]) for r in rows})
    ids = [r["transfer_id"] for r in rows]
    answers = [(outcomes or {}).get(t, "executed") for t in ids]
    return await pool.fetchval(
        SETTLE_SQL,
        [run for run, _ in runs],
        [attempt for _, attempt in runs],
        ids,
        ["executed" if a == "executed" else "failed" for a in answers],
        [None if a == "executed" else a for a in answers],
    )


def ids_of(bulk_id: int, count: int) -> list[int]:
    return [bulk_id * 100_000 + position for position in range(count)]


# ---------------------------------------------------------------------------------------------------------
# pain.002 reports


@functools.cache
def pain002_schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(PAIN002_XSD))


NS = {"s": PAIN002}


def assert_valid_pain002(document: str) -> ET.Element:
    """The report, parsed, once it is well-formed and valid against the official pain.002.001.10 schema."""
    try:
        root = ET.fromstring(document)
    except ET.ParseError as error:
        raise AssertionError(f"the report is not well-formed XML ({error}): {document[:300]!r}") from None
    errors = [str(e) for e in pain002_schema().iter_errors(document)]
    assert not errors, errors[:3]
    return root


async def report_of(client, bulk_id: int, accept: str = "application/xml") -> ET.Element:
    """The pain.002 report GET /bulk_transfers/{id} answers, checked against the official schema."""
    response = await client.get(f"/bulk_transfers/{bulk_id}", headers={"Accept": accept})
    assert response.status == 200, await response.text()
    assert response.content_type == "application/xml"
    assert "accept" in [v.strip().lower() for v in response.headers.get("Vary", "").split(",")]
    return assert_valid_pain002((await response.read()).decode("utf-8"))


def find(element: ET.Element, path: str) -> str | None:
    found = element.find(path, NS)
    return None if found is None else found.text


@dataclass(frozen=True)
class Report:
    msg_id: str
    original_msg_id: str
    original_msg_name: str
    group_status: str
    pmt_inf_id: str
    pmt_inf_status: str
    nb_of_txs: str
    ctrl_sum: str
    per_status: dict[str, tuple[str, str]]  # DtldSts -> (DtldNbOfTxs, DtldCtrlSum)
    txs: list[tuple[str | None, str, str | None, str]]  # (OrgnlEndToEndId, TxSts, Rsn/Cd, InstdAmt)


def read_report(document: ET.Element) -> Report:
    group = document.find("s:CstmrPmtStsRpt/s:OrgnlGrpInfAndSts", NS)
    info = document.find("s:CstmrPmtStsRpt/s:OrgnlPmtInfAndSts", NS)
    return Report(
        msg_id=find(document, "s:CstmrPmtStsRpt/s:GrpHdr/s:MsgId"),
        original_msg_id=find(group, "s:OrgnlMsgId"),
        original_msg_name=find(group, "s:OrgnlMsgNmId"),
        group_status=find(group, "s:GrpSts"),
        pmt_inf_id=find(info, "s:OrgnlPmtInfId"),
        pmt_inf_status=find(info, "s:PmtInfSts"),
        nb_of_txs=find(info, "s:OrgnlNbOfTxs"),
        ctrl_sum=find(info, "s:OrgnlCtrlSum"),
        per_status={
            find(s, "s:DtldSts"): (find(s, "s:DtldNbOfTxs"), find(s, "s:DtldCtrlSum"))
            for s in info.findall("s:NbOfTxsPerSts", NS)
        },
        txs=[
            (
                find(t, "s:OrgnlEndToEndId"),
                find(t, "s:TxSts"),
                find(t, "s:StsRsnInf/s:Rsn/s:Cd"),
                find(t, "s:OrgnlTxRef/s:Amt/s:InstdAmt"),
            )
            for t in info.findall("s:TxInfAndSts", NS)
        ],
    )


# ---------------------------------------------------------------------------------------------------------
# 1. Files sepaxml makes


async def test_a_sepaxml_pain_001_001_03_file_is_one_bulk_transfer_per_pmtinf_with_every_field_mapped(
    client, pool, make_account
):
    account = await make_account(1_000_000)
    day = await today(pool)
    first_day, second_day = day + timedelta(days=1), day + timedelta(days=2)
    payments = [
        {"name": "Bip Bip", "IBAN": "EE383680981021245685", "BIC": "CRLYFRPPTOU", "amount": 1450,
         "execution_date": first_day, "description": "Invoice 17", "endtoend_id": "E2E-17"},
        {"name": "Wile E. Coyote", "IBAN": "DE89370400440532013000", "amount": 29,
         "execution_date": second_day, "description": "Rockets", "endtoend_id": "E2E-18"},
        {"name": "Road Runner", "IBAN": "FR1420041010050500013M02606", "BIC": "PSSTFRPPXXX", "amount": 100000,
         "execution_date": first_day, "description": "Seeds", "endtoend_id": "E2E-19"},
    ]  # fmt: skip
    document, msg_id, pmt_inf_ids = sepaxml_file(account, payments, "pain.001.001.03", batch=True)
    assert len(pmt_inf_ids) == 2  # one PmtInf per execution date, in the order of their first payment

    response = await post_xml(client, document)

    assert response.status == 201, await response.text()
    body = await response.json()
    assert (body["message_id"], body["message_name"]) == (msg_id, "pain.001.001.03")
    assert (body["transfer_count"], body["total_cents"]) == (3, 101479)
    first, second = body["bulk_transfers"]
    assert [b["payment_information_id"] for b in body["bulk_transfers"]] == pmt_inf_ids
    assert (first["transfer_count"], first["total_cents"]) == (2, 101450)
    assert (second["transfer_count"], second["total_cents"]) == (1, 29)
    assert [t["id"] for t in first["transfers"]] == ids_of(first["bulk_transfer_id"], 2)
    assert response.headers["Location"] == f"/bulk_transfers/{first['bulk_transfer_id']}"
    assert await stored(pool, first["bulk_transfer_id"]) == [
        (1450, "Bip Bip", "EE383680981021245685", "CRLYFRPPTOU", "Invoice 17", "E2E-17"),
        (100000, "Road Runner", "FR1420041010050500013M02606", "PSSTFRPPXXX", "Seeds", "E2E-19"),
    ]
    assert await stored(pool, second["bulk_transfer_id"]) == [
        (29, "Wile E. Coyote", "DE89370400440532013000", "NOTPROVIDED", "Rockets", "E2E-18"),
    ]
    for made, day_, pmt_inf_id in ((first, first_day, pmt_inf_ids[0]), (second, second_day, pmt_inf_ids[1])):
        row = await bulk_row(pool, made["bulk_transfer_id"])
        assert (row["bank_account_id"], row["requested_execution_date"]) == (account.id, day_)
        assert (row["message_id"], row["message_name"], row["payment_information_id"]) == (
            msg_id,
            "pain.001.001.03",
            pmt_inf_id,
        )
    assert await balance_of(pool, account) == 1_000_000 - 101479
    assert await pool.fetchval("SELECT consistent FROM bps.account_audit WHERE bank_account_id = $1", account.id)


async def test_a_sepaxml_pain_001_001_09_file_of_one_pmtinf_per_payment_is_accepted_with_its_dt_dates(
    client, pool, make_account
):
    account = await make_account(100_000)
    day = await today(pool)
    payments = [
        {"name": f"Creditor {n}", "IBAN": "EE383680981021245685", "BIC": "CRLYFRPPTOU", "amount": 100 * n,
         "execution_date": day + timedelta(days=n), "description": f"Payment {n}", "endtoend_id": f"E2E-{n}"}
        for n in (1, 2, 3)
    ]  # fmt: skip
    document, msg_id, pmt_inf_ids = sepaxml_file(account, payments, "pain.001.001.09", batch=False)
    assert b"<BICFI>" in document and b"<Dt>" in document

    body = await accepted(client, document, path="/transfers/bulk")

    assert (body["message_id"], body["message_name"], body["transfer_count"]) == (msg_id, "pain.001.001.09", 3)
    assert [b["payment_information_id"] for b in body["bulk_transfers"]] == pmt_inf_ids
    for n, made in enumerate(body["bulk_transfers"], start=1):
        assert (made["transfer_count"], made["total_cents"]) == (1, 100 * n)
        assert await stored(pool, made["bulk_transfer_id"]) == [
            (100 * n, f"Creditor {n}", "EE383680981021245685", "CRLYFRPPTOU", f"Payment {n}", f"E2E-{n}")
        ]
        row = await bulk_row(pool, made["bulk_transfer_id"])
        assert row["requested_execution_date"] == day + timedelta(days=n)
        assert (row["message_id"], row["message_name"]) == (msg_id, "pain.001.001.09")
    assert await balance_of(pool, account) == 100_000 - 600


@pytest.mark.parametrize("message", ["pain.001.001.03", "pain.001.001.09", "pain.001.001.10", "pain.001.001.11"])
def test_the_template_builders_files_are_valid_against_the_schemas_sepaxml_ships(message):
    """The builder is an oracle too: its files (IBAN-only debtors, Strd references, DtTm dates) are valid."""
    txs = [Tx(), Tx(bic=None, description=None, reference="RF18539007547034"), Tx(amount="+0012.50")]
    blocks = [
        Block("FR7630006000011234567890189", "OIVUSCLQXXX", txs, date="2026-12-24"),
        Block("FR7630006000011234567890189", None, [Tx()], date_time="2026-12-24T10:30:00"),
    ]
    if not dates_are_a_choice(message):
        blocks[1].date = "2026-12-24"
    schema = xmlschema.XMLSchema(str(SEPAXML_XSD / f"{message}.xsd"))
    errors = [str(e) for e in schema.iter_errors(pain001(blocks, message=message, pretty=True))]
    assert not errors, errors[:3]


# ---------------------------------------------------------------------------------------------------------
# 2. The versions accepted, and what is not a pain.001


@pytest.mark.parametrize("message", MESSAGES)
async def test_every_accepted_pain_001_version_is_read_with_its_own_bic_element(client, pool, make_account, message):
    account = await make_account(100_000)
    tx = Tx(amount="3.10", bic="PSSTFRPPXXX")
    document = pain001([block(account, [tx])], message=message)
    assert f"<{bic_element(message)}>PSSTFRPPXXX<" in document

    body = await accepted(client, document)

    assert body["message_name"] == message
    (made,) = body["bulk_transfers"]
    assert await stored(pool, made["bulk_transfer_id"]) == [expected(tx)]
    assert (await bulk_row(pool, made["bulk_transfer_id"]))["message_name"] == message
    assert await balance_of(pool, account) == 100_000 - 310


@pytest.mark.parametrize(
    "content_type", ["application/xml", "text/xml", "application/xml; charset=utf-8", "text/xml; charset=UTF-8"]
)
@pytest.mark.parametrize("path", ["/bulk_transfer", "/transfers/bulk"])
async def test_both_endpoints_take_application_xml_and_text_xml(client, pool, make_account, path, content_type):
    account = await make_account(10_000)
    body = await accepted(client, pain001([block(account)]), path=path, content_type=content_type)
    assert body["transfer_count"] == 1
    assert await balance_of(pool, account) == 10_000 - 1450


NOT_PAIN001 = {
    "pain.001.001.02": f"{PAIN001}pain.001.001.02",
    "pain.001.001.13": f"{PAIN001}pain.001.001.13",
    "pain.001.004.03": f"{PAIN001}pain.001.004.03",
    "pain.008 direct debit": f"{PAIN001}pain.008.001.02",
    "pain.002 status report": PAIN002,
    "camt.053": f"{PAIN001}camt.053.001.02",
    "another Swiss message": "http://www.six-interbank-clearing.com/de/pain.001.001.03.ch.01.xsd",
    "no namespace": "",
}


@pytest.mark.parametrize("namespace", NOT_PAIN001.values(), ids=NOT_PAIN001.keys())
async def test_a_document_of_another_namespace_is_415_unsupported_media_type(client, pool, make_account, namespace):
    account = await make_account()
    document = pain001([block(account)], namespace=namespace or " ").replace('xmlns=" "', "")
    before = await snapshot(pool, [account])

    response = await post_xml(client, document)

    await assert_problem_unchanged(response, pool, [account], before, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "root",
    [
        '<CstmrCdtTrfInitn xmlns="{ns}"><GrpHdr/></CstmrCdtTrfInitn>',
        '<Dokument xmlns="{ns}"><CstmrCdtTrfInitn/></Dokument>',
        '<p:Envelope xmlns:p="urn:envelope"><Document xmlns="{ns}"/></p:Envelope>',
    ],
    ids=["CstmrCdtTrfInitn", "Dokument", "an envelope"],
)
async def test_a_root_that_is_not_a_pain_001_document_is_415(client, root):
    response = await post_xml(client, root.format(ns=MESSAGES["pain.001.001.03"]))
    await assert_problem(response, 415, "unsupported_media_type")


async def test_a_document_with_a_namespace_prefix_is_read_as_well(client, pool, make_account):
    account = await make_account(10_000)
    document = pain001([block(account)], encoding=None)
    prefixed = re.sub(r"<(/?)([A-Za-z]+)", r"<\1p:\2", document).replace('<p:Document xmlns="', '<p:Document xmlns:p="')
    assert prefixed.startswith('<p:Document xmlns:p="urn:iso:std:iso:20022:tech:xsd:pain.001.001.03">')

    body = await accepted(client, prefixed)

    assert body["transfer_count"] == 1
    assert await balance_of(pool, account) == 10_000 - 1450


# ---------------------------------------------------------------------------------------------------------
# 3. Files that are not well-formed, DTDs and entities, encodings

PASSWD = Path("/etc/passwd").read_text(errors="replace")
EXTERNAL_ENTITY = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE Document [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pain.001.001.03"><CstmrCdtTrfInitn><GrpHdr><MsgId>&xxe;</MsgId>
</GrpHdr></CstmrCdtTrfInitn></Document>"""
BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n<!ENTITY lol "lol">\n'
    + "".join(f'<!ENTITY lol{n} "{f"&lol{n - 1};" * 10 if n > 1 else "&lol;" * 10}">\n' for n in range(1, 10))
    + ']>\n<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pain.001.001.03"><CstmrCdtTrfInitn><GrpHdr>'
    "<MsgId>&lol9;</MsgId></GrpHdr></CstmrCdtTrfInitn></Document>"
)
PARAMETER_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE Document [<!ENTITY % remote SYSTEM "http://127.0.0.1:9/evil.dtd"> %remote;]>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pain.001.001.03"/>"""
EXTERNAL_DTD = """<?xml version="1.0"?>
<!DOCTYPE Document SYSTEM "file:///etc/passwd">
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pain.001.001.03"/>"""


def with_doctype(document: str, doctype: str) -> str:
    declaration, _, rest = document.partition("\n")
    return f"{declaration}\n{doctype}\n{rest}"


@pytest.mark.parametrize(
    "make",
    [
        lambda valid: EXTERNAL_ENTITY,
        lambda valid: BILLION_LAUGHS,
        lambda valid: PARAMETER_ENTITY,
        lambda valid: EXTERNAL_DTD,
        # A valid file with a harmless DTD, and one whose entity a creditor's name uses.
        lambda valid: with_doctype(valid, "<!DOCTYPE Document>"),
        lambda valid: with_doctype(valid, '<!DOCTYPE Document [<!ENTITY who "Bip Bip">]>').replace(
            "<Nm>Bip Bip</Nm>", "<Nm>&who;</Nm>"
        ),
        lambda valid: with_doctype(valid, '<!DOCTYPE Document [<!ENTITY pw SYSTEM "file:///etc/passwd">]>').replace(
            "<Nm>Bip Bip</Nm>", "<Nm>&pw;</Nm>"
        ),
    ],
    ids=["external entity", "billion laughs", "parameter entity", "external DTD", "DOCTYPE", "entity", "file"],
)
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
async def test_a_dtd_or_entity_declaration_is_400_invalid_xml_and_nothing_of_it_is_read(
    client, pool, make_account, make, encoding
):
    account = await make_account()
    document = make(pain001([block(account)], encoding=encoding.upper()))
    before = await snapshot(pool, [account])

    response = await post_xml(client, document.encode(encoding))

    body = await assert_problem_unchanged(response, pool, [account], before, 400, "invalid_xml")
    answer = await response.text()
    assert "root:" not in answer
    assert not [line for line in PASSWD.splitlines() if len(line) > 8 and line in answer]
    assert "lollol" not in answer and len(answer) < 2000
    assert "pointer" not in body


@pytest.mark.parametrize(
    "make",
    [
        lambda valid: valid[: len(valid) // 2],
        lambda valid: valid.replace("</Nm>", "</Name>", 1),
        lambda valid: valid + "<Document/>",
        lambda valid: valid.replace("<Nm>Bip Bip</Nm>", "<Nm>Bip &amp Bip</Nm>"),
        lambda valid: valid.replace("<Nm>Bip Bip</Nm>", "<Nm>&nbsp;</Nm>"),  # an entity no DTD declares
        lambda valid: valid.replace("<Nm>Bip Bip</Nm>", "<Nm>Bip\x01Bip</Nm>"),
        lambda valid: "hello, world",
        lambda valid: "",
        lambda valid: '{"credit_transfers": []}',
    ],
    ids=["truncated", "mismatched tag", "two roots", "bare ampersand", "undeclared entity", "control character",
         "text", "empty", "JSON"],
)  # fmt: skip
async def test_a_body_that_is_not_well_formed_xml_is_400_invalid_xml(client, pool, make_account, make):
    account = await make_account()
    before = await snapshot(pool, [account])

    response = await post_xml(client, make(pain001([block(account)])))

    await assert_problem_unchanged(response, pool, [account], before, 400, "invalid_xml")


@pytest.mark.parametrize(
    "make, content_type",
    [
        (lambda doc: doc.replace("Bip Bip", "Bip \xffBip").encode("utf-8").replace(b"\xc3\xbf", b"\xff"), None),
        (lambda doc: doc.replace("Bip Bip", "M\xfcller").encode("latin-1"), None),  # declared UTF-8
        (lambda doc: doc.replace("UTF-8", "x-no-such-encoding").encode(), None),
        (lambda doc: doc.replace("UTF-8", "ISO-8859-1").replace("Bip Bip", "M\xfcller").encode("latin-1"),
         "application/xml; charset=utf-8"),  # the Content-Type's charset decides (RFC 7303)
        (lambda doc: doc.encode("utf-16-le"), None),  # UTF-16 without its byte order mark
        (lambda doc: doc.encode(), "text/xml; charset=x-no-such-charset"),
    ],
    ids=["invalid UTF-8", "latin-1 declared UTF-8", "unknown encoding", "charset of the header", "UTF-16 no BOM",
         "unknown charset"],
)  # fmt: skip
async def test_bytes_that_cannot_be_decoded_are_400_invalid_xml(client, pool, make_account, make, content_type):
    account = await make_account()
    before = await snapshot(pool, [account])

    response = await post_xml(client, make(pain001([block(account)])), content_type=content_type or "application/xml")

    await assert_problem_unchanged(response, pool, [account], before, 400, "invalid_xml")


ENCODINGS = {
    "ISO-8859-1 declared": ("ISO-8859-1", lambda text: text.encode("latin-1"), "application/xml"),
    "ISO-8859-1 declared, text/xml": ("ISO-8859-1", lambda text: text.encode("latin-1"), "text/xml"),
    "UTF-8 with a BOM": ("UTF-8", lambda text: codecs.BOM_UTF8 + text.encode("utf-8"), "application/xml"),
    "UTF-16 LE with a BOM": ("UTF-16", lambda text: text.encode("utf-16"), "application/xml"),
    "UTF-16 BE with a BOM": ("UTF-16", lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"), "text/xml"),
}


@pytest.mark.parametrize("encoding, encode, content_type", ENCODINGS.values(), ids=ENCODINGS.keys())
async def test_a_file_in_the_encoding_it_declares_is_decoded_as_such(
    client, pool, make_account, encoding, encode, content_type
):
    account = await make_account(10_000)
    tx = Tx(name="Müller & Söhne", description="Überweisung für März")
    document = encode(pain001([block(account, [tx])], encoding=encoding))

    body = await accepted(client, document, content_type=content_type)

    assert await stored(pool, body["bulk_transfers"][0]["bulk_transfer_id"]) == [expected(tx)]


PROLOGS = {
    "a comment": "<!-- made by the payroll system -->",
    "a processing instruction": '<?xml-stylesheet type="text/xsl" href="payments.xsl"?>',
    "a comment quoting another pain.001 root": f'<!-- was: <Document xmlns="{MESSAGES["pain.001.001.09"]}"> -->',
}


# The root element decides the namespace, whatever comes before it (a comment may quote another root).
@pytest.mark.parametrize("prolog", PROLOGS.values(), ids=PROLOGS.keys())
async def test_a_file_with_a_comment_or_instruction_before_its_root_is_read_by_its_root(
    client, pool, make_account, prolog
):
    account = await make_account(10_000)
    document = with_doctype(pain001([block(account)]), prolog)

    body = await accepted(client, document)

    assert body["message_name"] == "pain.001.001.03"
    assert await balance_of(pool, account) == 10_000 - 1450


async def test_cdata_comments_and_character_references_are_read_as_the_text_they_stand_for(client, pool, make_account):
    account = await make_account(10_000)
    document = pain001([block(account, [Tx(name="NAME", description="TEXT", end_to_end_id="E2E")])])
    document = document.replace("<Nm>NAME</Nm>", "<Nm><![CDATA[Bip & <Bip>]]> M&#252;ller</Nm>")
    document = document.replace("<Ustrd>TEXT</Ustrd>", "<Ustrd>Invoice<!-- internal: 17 --> 17 &#x20AC;</Ustrd>")

    body = await accepted(client, document)

    assert await stored(pool, body["bulk_transfers"][0]["bulk_transfer_id"]) == [
        (1450, "Bip & <Bip> Müller", "EE383680981021245685", "CRLYFRPPTOU", "Invoice 17 €", "E2E")
    ]


async def test_an_xinclude_is_not_followed(client, pool, make_account):
    account = await make_account(10_000)
    include = '<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="file:///etc/passwd" parse="text"/>'
    document = pain001([block(account, [Tx(description="Invoice 9")])]).replace("<Ustrd>", "<Ustrd>" + include)

    response = await post_xml(client, document)

    answer = await response.text()
    assert response.status in (201, 400, 422), answer
    assert "root:" not in answer
    described = await pool.fetchval(
        "SELECT string_agg(description || counterparty_name, '') FROM bps.transfers WHERE bank_account_id = $1",
        account.id,
    )
    assert "root:" not in (described or "")
    if response.status == 201:
        assert described == "Invoice 9Bip Bip"


async def test_a_document_nested_deeper_than_the_parser_allows_is_refused_without_a_5xx(client, pool, make_account):
    account = await make_account()
    deep = "<a>" * 200_000 + "</a>" * 200_000
    document = pain001([block(account)]).replace("<Ustrd>", "<Ustrd>" + deep)
    before = await snapshot(pool, [account])

    response = await post_xml(client, document)

    await assert_problem_unchanged(response, pool, [account], before, response.status, None)
    assert 400 <= response.status < 500


# ---------------------------------------------------------------------------------------------------------
# 4. Accounts: each PmtInf its own, every one covered by the key, the whole file or nothing


async def test_each_pmtinf_is_a_bulk_transfer_on_its_own_account_in_file_order(client, pool, make_account):
    x, y = await make_account(100_000), await make_account(100_000)
    blocks = [
        block(y, [Tx(amount="1.00"), Tx(amount="2.00")]),
        block(x, [Tx(amount="3.00")], iban_only=True),
        block(y, [Tx(amount="4.00")]),
    ]

    response = await post_xml(client, pain001(blocks))

    assert response.status == 201, await response.text()
    body = await response.json()
    made = body["bulk_transfers"]
    assert [m["payment_information_id"] for m in made] == [b.id for b in blocks]
    assert [(m["transfer_count"], m["total_cents"]) for m in made] == [(2, 300), (1, 300), (1, 400)]
    assert (body["transfer_count"], body["total_cents"]) == (4, 1000)
    assert [(await bulk_row(pool, m["bulk_transfer_id"]))["bank_account_id"] for m in made] == [y.id, x.id, y.id]
    assert response.headers["Location"] == f"/bulk_transfers/{made[0]['bulk_transfer_id']}"
    assert (await balance_of(pool, x), await balance_of(pool, y)) == (100_000 - 300, 100_000 - 700)


@pytest.mark.parametrize("poor_opened_first", [False, True], ids=["poor account newer", "poor account older"])
async def test_a_file_whose_second_pmtinf_lacks_funds_is_422_insufficient_funds_and_writes_nothing(
    client, pool, make_account, poor_opened_first
):
    if poor_opened_first:
        poor, rich = await make_account(1_000), await make_account(100_000)
    else:
        rich, poor = await make_account(100_000), await make_account(1_000)
    blocks = [block(rich, [Tx(amount="5.00")]), block(poor, [Tx(amount="9.00"), Tx(amount="1.01")])]
    before = await snapshot(pool, [rich, poor])

    response = await post_xml(client, pain001(blocks))

    body = await assert_problem_unchanged(response, pool, [rich, poor], before, 422, "insufficient_funds")
    assert body["path"] == f"{ROOT}/PmtInf[2]"
    assert body["payment_information_id"] == blocks[1].id
    assert (body["balance_cents"], body["required_cents"]) == (1_000, 1_001)


async def test_two_pmtinf_on_one_account_that_together_exceed_its_balance_are_refused_whole(client, pool, make_account):
    account = await make_account(1_000)
    blocks = [block(account, [Tx(amount="6.00")]), block(account, [Tx(amount="4.01")])]
    before = await snapshot(pool, [account])

    response = await post_xml(client, pain001(blocks))

    body = await assert_problem_unchanged(response, pool, [account], before, 422, "insufficient_funds")
    assert (body["path"], body["payment_information_id"]) == (f"{ROOT}/PmtInf[2]", blocks[1].id)


@pytest.mark.parametrize("uncovered_at", [1, 2])
@pytest.mark.parametrize("iban_only", [False, True], ids=["by IBAN and BIC", "by IBAN alone"])
async def test_a_pmtinf_on_an_account_the_key_does_not_cover_is_404_and_nothing_is_written(
    make_client, pool, make_account, uncovered_at, iban_only
):
    covered, other = await make_account(100_000), await make_account(100_000)
    key_client = await make_client(key=await new_key(pool, [covered]))
    blocks = [block(covered)]
    blocks.insert(uncovered_at - 1, block(other, iban_only=iban_only))
    before = await snapshot(pool, [covered, other])

    response = await post_xml(key_client, pain001(blocks))

    await assert_problem_unchanged(response, pool, [covered, other], before, 404, "account_not_found")


@pytest.mark.parametrize(
    "debtor",
    [
        lambda account: (account.iban, "PSSTFRPPXXX"),  # the right IBAN at another bank
        lambda account: (random_iban(), account.bic),  # no such account
        lambda account: (random_iban(), None),
    ],
    ids=["other BIC", "unknown IBAN", "unknown IBAN alone"],
)
async def test_a_debtor_account_that_does_not_exist_is_404_account_not_found(client, pool, make_account, debtor):
    account = await make_account()
    iban, bic = debtor(account)
    before = await snapshot(pool, [account])

    response = await post_xml(client, pain001([block(account), Block(iban, bic, [Tx()])]))

    await assert_problem_unchanged(response, pool, [account], before, 404, "account_not_found")


async def test_a_debtor_given_by_iban_alone_or_with_an_8_character_bic_is_found(client, pool, make_account):
    account = await make_account(10_000)
    blocks = [block(account, iban_only=True), Block(account.iban.lower(), account.bic[:8], [Tx()])]
    body = await accepted(client, pain001(blocks))
    assert [(await bulk_row(pool, m["bulk_transfer_id"]))["bank_account_id"] for m in body["bulk_transfers"]] == [
        account.id,
        account.id,
    ]


# ---------------------------------------------------------------------------------------------------------
# 5. What each transaction becomes


async def test_every_field_of_a_transaction_is_mapped_with_its_fallbacks(client, pool, make_account):
    account = await make_account(100_000)
    day = await today(pool)
    txs = [
        Tx(amount="1.00", name="Bip Bip", iban="EE383680981021245685", bic="CRLYFRPPTOU", description="Invoice 1",
           end_to_end_id="INV-1"),
        Tx(amount="2.00", description=None, reference="RF18539007547034", end_to_end_id="INV-2"),
        Tx(amount="3.00", description=None, end_to_end_id="INV-3"),  # neither: the EndToEndId
        Tx(amount="4.00", bic=None, description="Both", reference="RF712348231", end_to_end_id="INV-4"),
        Tx(amount="5.00", name="A & B <Ltd>", description="'quoted' \"text\" & more", end_to_end_id="A&B<5>"),
    ]  # fmt: skip
    blocks = [
        block(account, txs, date=(day - timedelta(days=3)).isoformat()),  # made ahead, sent late: at once
        block(account, [Tx(amount="0.50")], iban_only=True, date=day.isoformat()),
        block(account, [Tx(amount="0.25")]),  # no date at all
    ]

    body = await accepted(client, pain001(blocks, pretty=True))

    first, second, third = body["bulk_transfers"]
    assert await stored(pool, first["bulk_transfer_id"]) == [
        (100, "Bip Bip", "EE383680981021245685", "CRLYFRPPTOU", "Invoice 1", "INV-1"),
        (200, "Bip Bip", "EE383680981021245685", "CRLYFRPPTOU", "RF18539007547034", "INV-2"),
        (300, "Bip Bip", "EE383680981021245685", "CRLYFRPPTOU", "INV-3", "INV-3"),
        (400, "Bip Bip", "EE383680981021245685", "NOTPROVIDED", "Both", "INV-4"),
        (500, "A & B <Ltd>", "EE383680981021245685", "CRLYFRPPTOU", "'quoted' \"text\" & more", "A&B<5>"),
    ]
    assert [t["client_reference"] for t in first["transfers"]] == ["INV-1", "INV-2", "INV-3", "INV-4", "A&B<5>"]
    dates = [(await bulk_row(pool, m["bulk_transfer_id"]))["requested_execution_date"] for m in (first, second, third)]
    assert dates == [None, day, None]
    assert (first["requested_execution_date"], second["requested_execution_date"]) == (None, day.isoformat())
    assert third["requested_execution_date"] is None


@pytest.mark.parametrize(
    "message, kind, days, stored_days",
    [
        ("pain.001.001.09", "date_time", 2, 2),
        ("pain.001.001.09", "date_time", -1, None),
        ("pain.001.001.10", "date", 1, 1),
        ("pain.001.001.11", "date", -30, None),
        ("pain.001.001.12", "date_time", 0, 0),
        ("pain.001.001.05", "date", 365, 365),
        ("pain.001.001.03.ch.02", "date", -1, None),
    ],
)
async def test_the_requested_execution_date_is_read_from_dt_or_dttm_and_a_past_day_means_at_once(
    client, pool, make_account, message, kind, days, stored_days
):
    account = await make_account(10_000)
    day = await today(pool) + timedelta(days=days)
    when = {"date": day.isoformat()} if kind == "date" else {"date_time": f"{day.isoformat()}T10:30:00"}

    body = await accepted(client, pain001([block(account, **when)], message=message))

    row = await bulk_row(pool, body["bulk_transfers"][0]["bulk_transfer_id"])
    assert row["requested_execution_date"] == (
        None if stored_days is None else await today(pool) + timedelta(stored_days)
    )


@pytest.mark.parametrize(
    "value, code", [(366, "date_out_of_range"), (1000, "date_out_of_range"), ("2026-02-30", "invalid_date"),
                    ("tomorrow", "invalid_date")]
)  # fmt: skip
async def test_a_requested_execution_date_too_far_ahead_or_no_date_is_422(client, pool, make_account, value, code):
    account = await make_account()
    day = (await today(pool) + timedelta(days=value)).isoformat() if isinstance(value, int) else value
    before = await snapshot(pool, [account])

    response = await post_xml(client, pain001([block(account), block(account, date=day)]))

    assert await file_errors(response, pool, [account], before) == [(f"{ROOT}/PmtInf[2]/ReqdExctnDt", code)]


ACCEPTED_AMOUNTS = {
    "+0012.50": 1250,
    "7.": 700,
    "1.230": 123,
    "0012.5": 1250,
    ".5": 50,
    "1": 100,
    "1.2300000": 123,
    " 3.00\n": 300,  # xs:decimal collapses white space
    "999999999.99": 99_999_999_999,
}
REFUSED_AMOUNTS = {
    "1.234": "invalid_amount",
    "-5": "invalid_amount",
    "1e2": "invalid_amount",
    "0": "amount_not_positive",
    "0.00": "amount_not_positive",
    "abc": "invalid_amount",
    "1,50": "invalid_amount",
    "": "invalid_amount",
    "1000000000": "amount_too_large",
    "0.001": "invalid_amount",
}


@pytest.mark.parametrize("amount, cents", ACCEPTED_AMOUNTS.items(), ids=map(repr, ACCEPTED_AMOUNTS))
async def test_an_amount_is_an_xs_decimal_in_cents(client, pool, make_account, amount, cents):
    account = await make_account(100_000_000_000)
    body = await accepted(client, pain001([block(account, [Tx(amount=amount)])]))
    assert (await stored(pool, body["bulk_transfers"][0]["bulk_transfer_id"]))[0][0] == cents
    assert body["total_cents"] == cents
    assert await balance_of(pool, account) == 100_000_000_000 - cents


@pytest.mark.parametrize("amount, code", REFUSED_AMOUNTS.items(), ids=map(repr, REFUSED_AMOUNTS))
async def test_an_amount_that_is_not_a_positive_xs_decimal_of_cents_is_422_at_its_path(
    client, pool, make_account, amount, code
):
    account = await make_account()
    before = await snapshot(pool, [account])

    document = pain001([block(account, [Tx(), Tx(amount=amount)], ctrl_sum=None)], ctrl_sum=None)
    response = await post_xml(client, document)

    assert await file_errors(response, pool, [account], before) == [(tx_path(1, 2, "Amt/InstdAmt"), code)]


async def test_an_instructed_amount_without_its_currency_is_422_at_its_ccy(client, pool, make_account):
    """Ccy is required by every pain.001 schema: an amount of no stated currency is not the account's."""
    account = await make_account(10_000)
    before = await snapshot(pool, [account])

    response = await post_xml(client, pain001([block(account, [Tx(), Tx(currency=None)])]))

    assert [path for path, _ in await file_errors(response, pool, [account], before)] == [
        tx_path(1, 2, "Amt/InstdAmt/@Ccy")
    ]


@pytest.mark.parametrize(
    "account_currency, ccy, errors",
    [
        ("EUR", "EUR", []),
        ("USD", "USD", []),
        ("EUR", "USD", [(tx_path(1, 1, "Amt/InstdAmt/@Ccy"), "currency_mismatch")]),
        ("CHF", "EUR", [(tx_path(1, 1, "Amt/InstdAmt/@Ccy"), "currency_mismatch")]),
    ],
)
async def test_the_instructed_amounts_currency_must_be_the_accounts(
    client, pool, make_account, account_currency, ccy, errors
):
    account = await make_account(10_000, currency=account_currency)
    before = await snapshot(pool, [account])

    response = await post_xml(client, pain001([block(account, [Tx(currency=ccy)])]))

    if errors:
        assert await file_errors(response, pool, [account], before) == errors
    else:
        assert response.status == 201, await response.text()
        assert await balance_of(pool, account) == 10_000 - 1450


async def test_an_account_in_strict_mode_checks_the_creditors_iban_and_bic_and_takes_an_absent_agent(
    client, pool, make_account
):
    account = await make_account(10_000, counterparty_check="strict")
    before = await snapshot(pool, [account])
    valid = "DE89370400440532013000"  # ISO 13616's check digits hold
    txs = [Tx(iban=valid), Tx(iban="DE89370400440532013001"), Tx(iban=valid, bic="CRLY-FRPP")]

    response = await post_xml(client, pain001([block(account, txs)]))

    assert await file_errors(response, pool, [account], before) == [
        (tx_path(1, 2, "CdtrAcct/Id/IBAN"), "invalid_iban"),
        (tx_path(1, 3, "CdtrAgt/FinInstnId/BIC"), "invalid_bic"),
    ]
    tx = Tx(iban=valid, bic=None)  # IBAN-only SEPA: the placeholder is a BIC in form
    body = await accepted(client, pain001([block(account, [tx])]))
    assert await stored(pool, body["bulk_transfers"][0]["bulk_transfer_id"]) == [expected(tx)]


# ---------------------------------------------------------------------------------------------------------
# 6. Counts, control sums, every problem at once


def three_blocks(account: Account) -> list[Block]:
    return [
        block(account, [Tx(amount="1.00"), Tx(amount="2.50")]),
        block(account, [Tx(amount="3.00")]),
        block(account, [Tx(amount="0.25"), Tx(amount="0.25"), Tx(amount="0.50")]),
    ]


COUNT_PROBLEMS = {
    "GrpHdr/NbOfTxs too small": ({"nb_of_txs": "5"}, None, [(f"{ROOT}/GrpHdr/NbOfTxs", "count_mismatch")]),
    "GrpHdr/NbOfTxs too large": ({"nb_of_txs": "7"}, None, [(f"{ROOT}/GrpHdr/NbOfTxs", "count_mismatch")]),
    "GrpHdr/NbOfTxs missing": ({"nb_of_txs": None}, None, [(f"{ROOT}/GrpHdr/NbOfTxs", "count_mismatch")]),
    "PmtInf/NbOfTxs": ({}, (2, "nb_of_txs", "2"), [(f"{ROOT}/PmtInf[2]/NbOfTxs", "count_mismatch")]),
    "GrpHdr/CtrlSum": ({"ctrl_sum": "7.51"}, None, [(f"{ROOT}/GrpHdr/CtrlSum", "sum_mismatch")]),
    "GrpHdr/CtrlSum not a number": ({"ctrl_sum": "seven"}, None, [(f"{ROOT}/GrpHdr/CtrlSum", "sum_mismatch")]),
    "PmtInf/CtrlSum": ({}, (3, "ctrl_sum", "1.01"), [(f"{ROOT}/PmtInf[3]/CtrlSum", "sum_mismatch")]),
    "PmtInf/CtrlSum negative": ({}, (1, "ctrl_sum", "-3.50"), [(f"{ROOT}/PmtInf[1]/CtrlSum", "sum_mismatch")]),
}


@pytest.mark.parametrize("header, in_block, errors", COUNT_PROBLEMS.values(), ids=COUNT_PROBLEMS.keys())
async def test_counts_and_control_sums_must_agree_with_the_transactions(
    client, pool, make_account, header, in_block, errors
):
    account = await make_account()
    blocks = three_blocks(account)
    if in_block:
        n, name, value = in_block
        setattr(blocks[n - 1], name, value)
    before = await snapshot(pool, [account])

    response = await post_xml(client, pain001(blocks, **header))

    assert await file_errors(response, pool, [account], before) == errors


@pytest.mark.parametrize(
    "header, changes",
    [
        ({"ctrl_sum": None}, {"ctrl_sum": None}),  # both optional
        ({"ctrl_sum": "7.5"}, {"ctrl_sum": "3"}),  # the same sums, written otherwise
        ({"ctrl_sum": "+007.500"}, {"nb_of_txs": None}),
        ({"nb_of_txs": "06"}, {"nb_of_txs": "001"}),  # Max15NumericText: the same counts
    ],
    ids=["no CtrlSum", "CtrlSum 7.5", "CtrlSum +007.500, no PmtInf/NbOfTxs", "NbOfTxs 06 and 001"],
)
async def test_control_sums_left_out_or_written_otherwise_are_accepted(client, pool, make_account, header, changes):
    account = await make_account(10_000)
    blocks = three_blocks(account)
    for name, value in changes.items():
        setattr(blocks[1], name, value)
    body = await accepted(client, pain001(blocks, **header))
    assert (body["transfer_count"], body["total_cents"]) == (6, 750)


async def test_every_problem_of_a_file_is_listed_at_once_by_its_path(client, pool, make_account):
    a, b = await make_account(), await make_account()
    blocks = [
        block(a, [Tx(), Tx(), Tx(amount="1.234")]),
        block(b, [Tx(name=None), Tx(iban="")], ctrl_sum="99.00"),
        block(a, [Tx(description="x" * 141, bic="")], id=""),
    ]
    before = await snapshot(pool, [a, b])

    response = await post_xml(client, pain001(blocks, nb_of_txs="5"))

    assert sorted(await file_errors(response, pool, [a, b], before)) == sorted(
        [
            (f"{ROOT}/GrpHdr/NbOfTxs", "count_mismatch"),
            (f"{ROOT}/PmtInf[1]/CdtTrfTxInf[3]/Amt/InstdAmt", "invalid_amount"),
            (f"{ROOT}/PmtInf[2]/CtrlSum", "sum_mismatch"),
            (f"{ROOT}/PmtInf[2]/CdtTrfTxInf[1]/Cdtr/Nm", "required"),
            (f"{ROOT}/PmtInf[2]/CdtTrfTxInf[2]/CdtrAcct/Id/IBAN", "empty"),
            (f"{ROOT}/PmtInf[3]/PmtInfId", "empty"),
            (f"{ROOT}/PmtInf[3]/CdtTrfTxInf[1]/RmtInf/Ustrd", "too_long"),
            (f"{ROOT}/PmtInf[3]/CdtTrfTxInf[1]/CdtrAgt/FinInstnId/BIC", "empty"),
        ]
    )


async def test_transaction_problems_in_several_pmtinf_are_listed_at_once_and_the_valid_ones_are_undone(
    client, pool, make_account
):
    a, b = await make_account(), await make_account()
    blocks = [
        block(a, [Tx(amount="1.00")]),  # valid: made, then undone with the rest
        block(b, [Tx(amount="2.00"), Tx(amount="abc"), Tx(name="")]),
        block(a, [Tx(iban="X" * 35)]),
    ]
    before = await snapshot(pool, [a, b])

    response = await post_xml(client, pain001(blocks))

    assert await file_errors(response, pool, [a, b], before) == [
        (tx_path(2, 2, "Amt/InstdAmt"), "invalid_amount"),
        (tx_path(2, 3, "Cdtr/Nm"), "empty"),
        (tx_path(3, 1, "CdtrAcct/Id/IBAN"), "too_long"),
    ]


# An element given twice where the schema allows it once is an error at its own path, listed with the file's
# other problems.
async def test_an_element_given_twice_is_422_at_its_path_and_listed_with_the_files_other_problems(
    client, pool, make_account
):
    account = await make_account()
    txs = [Tx(), Tx(name="First Name"), Tx(amount="abc")]
    document = pain001([block(account, txs, ctrl_sum=None)], ctrl_sum=None)
    document = document.replace("<Nm>First Name</Nm>", "<Nm>First Name</Nm><Nm>Second Name</Nm>")
    before = await snapshot(pool, [account])

    response = await post_xml(client, document)

    errors = await file_errors(response, pool, [account], before)
    assert (tx_path(1, 3, "Amt/InstdAmt"), "invalid_amount") in errors, errors
    assert [path for path, _ in errors if path.startswith(tx_path(1, 2, ""))], errors


@pytest.mark.parametrize(
    "change, errors",
    [
        (lambda doc: doc.replace("<MsgId>", "<MsgId>" + "m" * 36, 1), [(f"{ROOT}/GrpHdr/MsgId", "too_long")]),
        (lambda doc: re.sub("<MsgId>[^<]*</MsgId>", "", doc), [(f"{ROOT}/GrpHdr/MsgId", "required")]),
        (lambda doc: re.sub("<PmtInfId>[^<]*</PmtInfId>", "", doc), [(f"{ROOT}/PmtInf[1]/PmtInfId", "required")]),
        (lambda doc: doc.replace("<PmtMtd>TRF</PmtMtd>", "<PmtMtd>CHK</PmtMtd>"),
         [(f"{ROOT}/PmtInf[1]/PmtMtd", "unsupported_payment_method")]),
        (lambda doc: doc.replace("<PmtMtd>TRF</PmtMtd>", ""), [(f"{ROOT}/PmtInf[1]/PmtMtd", "required")]),
        (lambda doc: re.sub("<DbtrAcct>.*</DbtrAcct>", "", doc), [(f"{ROOT}/PmtInf[1]/DbtrAcct/Id/IBAN", "required")]),
    ],
    ids=["MsgId too long", "no MsgId", "no PmtInfId", "a cheque", "no PmtMtd", "no DbtrAcct"],
)  # fmt: skip
async def test_group_header_and_payment_information_problems_are_422_at_their_path(
    client, pool, make_account, change, errors
):
    account = await make_account()
    before = await snapshot(pool, [account])

    response = await post_xml(client, change(pain001([block(account)])))

    assert await file_errors(response, pool, [account], before) == errors


# ---------------------------------------------------------------------------------------------------------
# 7. Duplicates and idempotency


async def test_the_same_file_again_is_409_duplicate_request_naming_the_bulk_transfer(client, pool, make_account):
    account = await make_account(10_000)
    document = pain001([block(account)])
    first = await accepted(client, document)
    before = await snapshot(pool, [account])

    response = await post_xml(client, document)

    body = await assert_problem_unchanged(response, pool, [account], before, 409, "duplicate_request")
    assert body["bulk_transfer_id"] == first["bulk_transfers"][0]["bulk_transfer_id"]
    assert await balance_of(pool, account) == 10_000 - 1450


async def test_another_file_with_a_message_id_already_accepted_for_the_account_is_409(client, pool, make_account):
    account, other = await make_account(10_000), await make_account(10_000)
    msg_id = f"MSG-{token()}"
    first = await accepted(client, pain001([block(account)], msg_id=msg_id))
    before = await snapshot(pool, [account, other])

    response = await post_xml(client, pain001([block(other), block(account, [Tx(amount="2.00")])], msg_id=msg_id))

    body = await assert_problem_unchanged(response, pool, [account, other], before, 409, "duplicate_request")
    assert body["bulk_transfer_id"] == first["bulk_transfers"][0]["bulk_transfer_id"]
    # The same message id on another account alone is another message.
    assert (await accepted(client, pain001([block(other)], msg_id=msg_id)))["message_id"] == msg_id


async def test_a_two_account_file_sent_twice_is_409_and_the_first_stays_alone(client, pool, make_account):
    x, y = await make_account(10_000), await make_account(10_000)
    document = pain001([block(y), block(x, [Tx(amount="1.00")])])
    first = await accepted(client, document)
    before = await snapshot(pool, [x, y])

    body = await assert_problem_unchanged(
        await post_xml(client, document), pool, [x, y], before, 409, "duplicate_request"
    )

    assert body["bulk_transfer_id"] in {m["bulk_transfer_id"] for m in first["bulk_transfers"]}


async def test_a_message_id_accepted_before_the_dedup_window_is_accepted_again(client, pool, make_account):
    account = await make_account(10_000)
    document = pain001([block(account)])
    first = await accepted(client, document)
    await pool.execute(
        "UPDATE bps.bulk_transfers SET created_at = now() - (SELECT dedup_window FROM bps.settings)"
        " - interval '1 second' WHERE id = $1",
        first["bulk_transfers"][0]["bulk_transfer_id"],
    )

    again = await accepted(client, document)

    assert again["bulk_transfers"][0]["bulk_transfer_id"] != first["bulk_transfers"][0]["bulk_transfer_id"]
    assert await balance_of(pool, account) == 10_000 - 2 * 1450


async def test_the_same_file_with_the_same_idempotency_key_is_replayed_and_changes_nothing(client, pool, make_account):
    x, y = await make_account(10_000), await make_account(10_000)
    document = pain001([block(x), block(y, [Tx(amount="1.00")])])
    key = f"file-{token()}"
    first = await post_xml(client, document, **{"Idempotency-Key": key})
    assert first.status == 201, await first.text()
    assert "Idempotent-Replayed" not in first.headers
    before = await snapshot(pool, [x, y])

    again = await post_xml(client, document, **{"Idempotency-Key": key})

    assert again.status == 201, await again.text()
    assert await again.json() == await first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert await snapshot(pool, [x, y]) == before


async def test_another_file_with_the_same_idempotency_key_is_422_idempotency_key_reused(client, pool, make_account):
    account = await make_account(10_000)
    key = f"file-{token()}"
    assert (await post_xml(client, pain001([block(account)]), **{"Idempotency-Key": key})).status == 201
    before = await snapshot(pool, [account])

    response = await post_xml(client, pain001([block(account, [Tx(amount="1.00")])]), **{"Idempotency-Key": key})

    await assert_problem_unchanged(response, pool, [account], before, 422, "idempotency_key_reused")


# The Idempotency-Key is claimed on every account a file debits, not only its first PmtInf's.
async def test_another_file_on_the_same_accounts_with_the_same_key_is_422_whatever_its_first_pmtinf(
    client, pool, make_account
):
    x, y = await make_account(10_000), await make_account(10_000)
    key = f"file-{token()}"
    first = pain001([block(x, [Tx(amount="1.00")]), block(y, [Tx(amount="2.00")])])
    assert (await post_xml(client, first, **{"Idempotency-Key": key})).status == 201
    before = await snapshot(pool, [x, y])

    # Another file, debiting the same two accounts, its first PmtInf on the other one.
    second = pain001([block(y, [Tx(amount="3.00")]), block(x, [Tx(amount="4.00")])])
    response = await post_xml(client, second, **{"Idempotency-Key": key})

    await assert_problem_unchanged(response, pool, [x, y], before, 422, "idempotency_key_reused")


async def test_a_file_with_the_idempotency_key_of_a_json_request_is_422_idempotency_key_reused(
    client, pool, make_account
):
    account = await make_account(10_000)
    key = f"json-{token()}"
    response = await client.post(
        "/bulk_transfer", json=request_for(account, [transfer()]), headers={"Idempotency-Key": key}
    )
    assert response.status == 201, await response.text()
    before = await snapshot(pool, [account])

    response = await post_xml(client, pain001([block(account)]), **{"Idempotency-Key": key})

    await assert_problem_unchanged(response, pool, [account], before, 422, "idempotency_key_reused")


async def test_with_idempotency_keys_the_message_id_does_not_deduplicate(client, pool, make_account):
    account = await make_account(10_000)
    document = pain001([block(account)])

    first = await accepted(client, document, **{"Idempotency-Key": f"a-{token()}"})
    second = await accepted(client, document, **{"Idempotency-Key": f"b-{token()}"})

    assert first["bulk_transfers"][0]["bulk_transfer_id"] != second["bulk_transfers"][0]["bulk_transfer_id"]
    assert await balance_of(pool, account) == 10_000 - 2 * 1450
    assert (await rows_of(pool, account))["bulk_transfers"] == 2


# ---------------------------------------------------------------------------------------------------------
# 8. The pain.002 status report


async def test_the_report_of_a_new_file_names_the_original_message_and_accepts_every_transaction(
    client, pool, make_account
):
    account = await make_account(100_000)
    txs = [Tx(amount="1.00", end_to_end_id="E2E-A&B"), Tx(amount="2.50", end_to_end_id="E2E-2")]
    blocks = [block(account, txs), block(account, [Tx(amount="0.75", end_to_end_id="E2E-3")])]
    document = pain001(blocks)
    body = await accepted(client, document)
    first, second = (m["bulk_transfer_id"] for m in body["bulk_transfers"])

    report = read_report(await report_of(client, first))

    assert report.original_msg_id == msg_id_of(document)
    assert report.original_msg_name == "pain.001.001.03"
    assert (report.pmt_inf_id, report.nb_of_txs, report.ctrl_sum) == (blocks[0].id, "2", "3.50")
    assert (report.group_status, report.pmt_inf_status) == ("ACSP", "ACSP")
    assert report.per_status == {"ACSP": ("2", "3.50")}
    assert report.txs == [("E2E-A&B", "ACSP", None, "1.00"), ("E2E-2", "ACSP", None, "2.50")]
    assert report.msg_id and report.msg_id != report.original_msg_id
    other = read_report(await report_of(client, second))
    assert (other.original_msg_id, other.pmt_inf_id) == (report.original_msg_id, blocks[1].id)
    assert other.txs == [("E2E-3", "ACSP", None, "0.75")]


# (how many of the 3 transfers are claimed, the rail's answers for them, whether the rest is cancelled)
# -> (GrpSts and PmtInfSts, each transaction's (TxSts, reason)).
REPORT_SCENARIOS = {
    "pending": (0, None, False, "ACSP", [("ACSP", None)] * 3),
    "processing": (3, None, False, "ACSP", [("ACSP", None)] * 3),
    "partly processing": (1, None, False, "ACSP", [("ACSP", None)] * 3),
    "executed": (3, ["executed"] * 3, False, "ACSC", [("ACSC", None)] * 3),
    "failed": (3, ["AC01", "AM04", "AC01"], False, "RJCT", [("RJCT", "AC01"), ("RJCT", "AM04"), ("RJCT", "AC01")]),
    "executed and failed": (3, ["executed", "AC01", "executed"], False, "PART",
                            [("ACSC", None), ("RJCT", "AC01"), ("ACSC", None)]),
    "executed and pending": (1, ["executed"], False, "PART", [("ACSC", None), ("ACSP", None), ("ACSP", None)]),
    "cancelled": (0, None, True, "CANC", [("CANC", None)] * 3),
    "processing and cancelled": (1, None, True, "PART", [("ACSP", None), ("CANC", None), ("CANC", None)]),
    "failed and cancelled": (2, ["RC01", "RC01"], True, "PART", [("RJCT", "RC01"), ("RJCT", "RC01"), ("CANC", None)]),
}  # fmt: skip


@pytest.mark.parametrize("claimed, answers, cancel, group, txs", REPORT_SCENARIOS.values(), ids=REPORT_SCENARIOS.keys())
async def test_the_report_shows_each_transactions_status_and_the_common_one_or_part(
    client, pool, make_account, claimed, answers, cancel, group, txs
):
    account = await make_account(100_000)
    await drain(pool)
    amounts = ["1.00", "2.00", "4.00"]
    blocks = [block(account, [Tx(amount=a, end_to_end_id=f"E2E-{n}") for n, a in enumerate(amounts)])]
    bulk = (await accepted(client, pain001(blocks)))["bulk_transfers"][0]["bulk_transfer_id"]
    if claimed:
        rows = await claim(pool, budget=claimed)
        assert [r["transfer_id"] for r in rows] == ids_of(bulk, 3)[:claimed]
        if answers:
            assert await settle(pool, rows, dict(zip(ids_of(bulk, 3), answers, strict=False))) == claimed
    if cancel:
        assert (await client.post(f"/bulk_transfers/{bulk}/cancel")).status == 200

    report = read_report(await report_of(client, bulk))

    assert (report.group_status, report.pmt_inf_status) == (group, group)
    assert [(status, reason) for _, status, reason, _ in report.txs] == txs
    assert [(e2e, amount) for e2e, _, _, amount in report.txs] == [
        ("E2E-0", "1.00"),
        ("E2E-1", "2.00"),
        ("E2E-2", "4.00"),
    ]
    per_status: dict[str, list[Decimal]] = {}
    for (status, _), amount in zip(txs, amounts, strict=True):
        per_status.setdefault(status, []).append(Decimal(amount))
    assert report.per_status == {s: (str(len(a)), f"{sum(a):.2f}") for s, a in per_status.items()}
    assert (report.nb_of_txs, report.ctrl_sum) == ("3", "7.00")


@pytest.mark.parametrize(
    "accept",
    [
        "application/xml",
        "text/xml",
        "application/json;q=0.5, application/xml",
        "text/xml;q=0.9, application/json;q=0.1",
        "application/xml, */*;q=0.1",
        "Application/XML",
    ],
)
async def test_an_accept_header_preferring_xml_gets_the_report(client, make_account, accept):
    account = await make_account()
    bulk = (await accepted(client, pain001([block(account)])))["bulk_transfers"][0]["bulk_transfer_id"]
    assert read_report(await report_of(client, bulk, accept)).group_status == "ACSP"


@pytest.mark.parametrize(
    "accept", [None, "application/json", "*/*", "application/xml;q=0.1, application/json", "application/xml;q=0"]
)
async def test_without_a_preference_for_xml_the_answer_is_the_json_one(client, make_account, accept):
    account = await make_account()
    bulk = (await accepted(client, pain001([block(account)])))["bulk_transfers"][0]["bulk_transfer_id"]

    response = await client.get(f"/bulk_transfers/{bulk}", headers={"Accept": accept} if accept else {})

    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert (body["bulk_transfer_id"], body["bank_account_id"], body["status"]) == (bulk, account.id, "pending")
    assert "accept" in response.headers.get("Vary", "").lower()


async def test_a_json_bulk_transfers_report_is_valid_too(client, pool, make_account):
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00", client_reference="ref-1"), transfer("2.00")])
    response = await client.post("/bulk_transfer", json=payload)
    assert response.status == 201, await response.text()
    bulk = (await response.json())["bulk_transfer_id"]

    report = read_report(await report_of(client, bulk))

    assert report.original_msg_id and report.original_msg_name and report.pmt_inf_id
    assert (report.group_status, report.nb_of_txs, report.ctrl_sum) == ("ACSP", "2", "3.00")
    assert report.txs == [("ref-1", "ACSP", None, "1.00"), (None, "ACSP", None, "2.00")]


# A JSON client_reference may hold C0 control characters, which XML 1.0 cannot (not even as references): the
# report replaces them, and stays well-formed.
@pytest.mark.parametrize("reference", ["ref\x01", "esc\x1b[0m", "bell\x07", "nul-ish\x0b\x0c"])
async def test_a_json_bulk_transfers_report_is_valid_whatever_characters_its_client_reference_holds(
    client, make_account, reference
):
    """JSON strings may hold characters XML 1.0 cannot (C0 controls): the report must stay a valid document."""
    account = await make_account(10_000)
    payload = request_for(account, [transfer("1.00", client_reference=reference), transfer("2.00")])
    response = await client.post("/bulk_transfer", json=payload)
    assert response.status == 201, await response.text()
    bulk = (await response.json())["bulk_transfer_id"]

    report = read_report(await report_of(client, bulk))

    assert [status for _, status, _, _ in report.txs] == ["ACSP", "ACSP"]


async def test_another_accounts_report_is_404_exactly_as_a_missing_one(client, make_client, pool, make_account):
    mine, theirs = await make_account(), await make_account()
    bulk = (await accepted(client, pain001([block(theirs)])))["bulk_transfers"][0]["bulk_transfer_id"]
    missing = await pool.fetchval("SELECT max(id) + 1000000 FROM bps.bulk_transfers")
    only_mine = await make_client(key=await new_key(pool, [mine], ["transfers:read"]))
    xml = {"Accept": "application/xml"}

    to_theirs = await assert_problem(await only_mine.get(f"/bulk_transfers/{bulk}", headers=xml), 404, None)
    to_nobody = await assert_problem(await only_mine.get(f"/bulk_transfers/{missing}", headers=xml), 404, None)

    assert to_theirs["code"] == "bulk_transfer_not_found"
    assert to_theirs == to_nobody | {"detail": to_nobody["detail"].replace(str(missing), str(bulk))}
    await assert_problem(await only_mine.get("/bulk_transfers/abc", headers=xml), 404, "bulk_transfer_not_found")


async def test_a_report_needs_a_key_with_the_read_scope(make_client, client, pool, make_account):
    account = await make_account()
    bulk = (await accepted(client, pain001([block(account)])))["bulk_transfers"][0]["bulk_transfer_id"]
    xml = {"Accept": "application/xml"}
    anonymous = await make_client(key=None)
    writer = await make_client(key=await new_key(pool, [account], ["transfers:write"]))

    response = await anonymous.get(f"/bulk_transfers/{bulk}", headers=xml)
    await assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    unknown = await make_client(key="bps_" + "0" * 38)
    await assert_problem(await unknown.get(f"/bulk_transfers/{bulk}", headers=xml), 401, "unauthorized")
    await assert_problem(await writer.get(f"/bulk_transfers/{bulk}", headers=xml), 403, "forbidden")


# ---------------------------------------------------------------------------------------------------------
# 9. JSON and pain.001 agree (property)

JSON_AND_XML_AMOUNTS = [
    "12.50", "0.01", "7", "007.50", "1.5", "999999999.99", "250000.00",  # both read them as the same cents
    "1.234", "-5", "1e2", "0", "0.00", "abc", "", "1000000000.00", "12,50",  # both refuse them
]  # fmt: skip
TEXT = st.text(alphabet=st.sampled_from(list("abcXYZ 09-/&<>'\"üé€\t\n\u00a0")), max_size=12)
LONG_TEXT = st.text(alphabet=st.sampled_from(list("ab c")), min_size=60, max_size=150)


@st.composite
def transfers_drawn(draw) -> dict:
    return {
        "amount": draw(st.sampled_from(JSON_AND_XML_AMOUNTS)),
        "counterparty_name": draw(st.one_of(TEXT, LONG_TEXT)),
        "counterparty_iban": draw(st.sampled_from(["EE383680981021245685", "DE89370400440532013000", "", "X" * 35])),
        "counterparty_bic": draw(st.sampled_from(["CRLYFRPPTOU", "DEUTDEFF", "NOTPROVIDED", "", "B" * 12])),
        "description": draw(st.one_of(TEXT, LONG_TEXT)),
        "client_reference": draw(st.one_of(TEXT, st.text(alphabet="r", min_size=30, max_size=40))),
    }


def as_tx(t: dict) -> Tx:
    return Tx(
        amount=t["amount"],
        name=t["counterparty_name"],
        iban=t["counterparty_iban"],
        bic=t["counterparty_bic"],
        description=t["description"],
        end_to_end_id=t["client_reference"],
    )


def error_codes(body: dict) -> Counter:
    return Counter(e["code"] for e in body.get("errors", [])) or Counter([body["code"]])


VALID_TRANSFER = {
    "amount": "12.50",
    "counterparty_name": "Bip & Bip",
    "counterparty_iban": "EE383680981021245685",
    "counterparty_bic": "CRLYFRPPTOU",
    "description": "Wonderland",
    "client_reference": "ref-1",
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(drawn=[VALID_TRANSFER, VALID_TRANSFER | {"amount": "007.50", "counterparty_bic": "DEUTDEFF"}], days=1)
@example(drawn=[VALID_TRANSFER | {"amount": "abc"}], days=None)  # an amount that is not a number
@given(drawn=st.lists(transfers_drawn(), min_size=1, max_size=4), days=st.sampled_from([None, 0, 1, 365, 366]))
async def test_a_json_request_and_the_same_transfers_as_a_pain_001_get_the_same_answer(
    client, pool, make_account, drawn, days
):
    json_account, xml_account = await make_account(50_000_000), await make_account(50_000_000)
    day = None if days is None else (await today(pool) + timedelta(days=days)).isoformat()
    extra = {} if day is None else {"requested_execution_date": day}

    as_json = await client.post("/bulk_transfer", json=request_for(json_account, drawn, **extra))
    document = pain001([block(xml_account, [as_tx(t) for t in drawn], date=day, ctrl_sum=None)], ctrl_sum=None)
    as_xml = await post_xml(client, document)

    json_body, xml_body = await as_json.json(content_type=None), await as_xml.json(content_type=None)
    assert as_xml.status == as_json.status, (json_body, xml_body)
    if as_json.status == 201:
        (made,) = xml_body["bulk_transfers"]
        assert await stored(pool, made["bulk_transfer_id"]) == await stored(pool, json_body["bulk_transfer_id"])
        assert (made["transfer_count"], made["total_cents"]) == (json_body["transfer_count"], json_body["total_cents"])
        assert made["requested_execution_date"] == json_body["requested_execution_date"]
    else:
        assert as_json.status == 422, json_body
        assert error_codes(xml_body) == error_codes(json_body), (json_body, xml_body)
        assert await rows_of(pool, xml_account) == await rows_of(pool, json_account)


# ---------------------------------------------------------------------------------------------------------
# 10. Concurrency


async def race(database_url: str, held: Account, calls: list[Callable[[], Awaitable]], queued: int) -> list:
    """Runs every call at once while `held`'s row is locked, and frees it once `queued` of them wait on a lock
    in the database: they then race for real (no sleeps, no timing)."""
    holder = await asyncpg.connect(database_url)
    watcher = await asyncpg.connect(database_url)
    tasks: list[asyncio.Task] = []
    try:
        transaction = holder.transaction()
        await transaction.start()
        try:
            await holder.execute("SELECT 1 FROM bps.bank_accounts WHERE id = $1 FOR NO KEY UPDATE", held.id)
            tasks = [asyncio.create_task(call()) for call in calls]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while await watcher.fetchval(QUEUED_SQL) < queued:
                finished = next((t for t in tasks if t.done()), None)
                assert finished is None, f"a request completed while its account was held: {finished.result()!r}"
                assert loop.time() < deadline, "the requests never queued behind the held account"
                await asyncio.sleep(0.01)
        finally:
            await transaction.rollback()
    except BaseException:
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        await watcher.close()
        await holder.close()
    return list(await asyncio.gather(*tasks))


def sender(client, document: str, **headers) -> Callable[[], Awaitable[tuple[int, dict, dict]]]:
    async def send() -> tuple[int, dict, dict]:
        response = await post_xml(client, document, **headers)
        kept = {k: response.headers[k] for k in ("Location", "Idempotent-Replayed") if k in response.headers}
        return response.status, await response.json(content_type=None), kept

    return send


async def test_files_and_grouped_json_requests_on_the_same_accounts_at_once_never_deadlock(client, pool, make_account):
    """Files of two PmtInf (in both orders) and one-transfer JSON requests (which the service groups while its
    calls are busy) on the same two accounts, all sent at once, twice. A file takes its locks in the order every
    call does, so all are accepted (none 503 from a deadlock), and each account is debited what was accepted."""
    opening = 10_000_000
    x, y = await make_account(opening), await make_account(opening)  # x is older: the lower id

    def file(n: int) -> str:
        first, second = (x, y) if n % 2 == 0 else (y, x)
        return pain001([block(first, [Tx(amount=f"{n + 1}.00")]), block(second, [Tx(amount="0.25")])])

    async def json_request(n: int) -> tuple[int, dict, dict]:
        account = (x, y)[n % 2]
        response = await client.post("/bulk_transfer", json=request_for(account, [transfer(amount=f"0.{n + 10}")]))
        return response.status, await response.json(), {}

    # (Not behind a held account, as race() sends: the JSON requests on y alone would not wait for it.)
    outcomes = []
    for _ in range(2):
        calls = [
            c
            for n in range(12)
            for c in (sender(client, file(n)), *(functools.partial(json_request, 2 * n + i) for i in (0, 1)))
        ]
        outcomes += await asyncio.gather(*(call() for call in calls))

    assert [status for status, _, _ in outcomes] == [201] * 72, [b for s, b, _ in outcomes if s != 201][:3]
    debited = {x.id: 0, y.id: 0}
    for _, body, _ in outcomes:
        for made in body.get("bulk_transfers", [body]):
            debited[(await bulk_row(pool, made["bulk_transfer_id"]))["bank_account_id"]] += made["total_cents"]
    assert (await balance_of(pool, x), await balance_of(pool, y)) == (opening - debited[x.id], opening - debited[y.id])
    for account in (x, y):
        assert await pool.fetchval("SELECT consistent FROM bps.account_audit WHERE bank_account_id = $1", account.id)


async def test_the_same_file_sent_16_times_at_once_is_accepted_once_and_409_for_the_rest(
    client, config, database_url, pool, make_account
):
    account = await make_account(100_000)
    document = pain001([block(account, [Tx(amount="10.00"), Tx(amount="0.99")])])

    outcomes = await race(database_url, account, [sender(client, document)] * 16, min(16, config.pool_max_size))

    created = [body for status, body, _ in outcomes if status == 201]
    assert len(created) == 1, [(status, body.get("code")) for status, body, _ in outcomes]
    bulk_id = created[0]["bulk_transfers"][0]["bulk_transfer_id"]
    refused = [(status, body["code"], body["bulk_transfer_id"]) for status, body, _ in outcomes if status != 201]
    assert refused == [(409, "duplicate_request", bulk_id)] * 15
    assert await pool.fetchval("SELECT count(*) FROM bps.bulk_transfers WHERE bank_account_id = $1", account.id) == 1
    assert await balance_of(pool, account) == 100_000 - 1099


async def test_the_same_file_with_one_idempotency_key_16_times_at_once_is_accepted_once_and_replayed(
    client, config, database_url, pool, make_account
):
    account = await make_account(100_000)
    document = pain001([block(account, [Tx(amount="10.00")]), block(account, [Tx(amount="0.50")])])
    send = sender(client, document, **{"Idempotency-Key": f"race-{token()}"})

    outcomes = await race(database_url, account, [send] * 16, min(16, config.pool_max_size))

    assert {status for status, _, _ in outcomes} == {201}, outcomes
    bodies = [body for _, body, _ in outcomes]
    assert all(body == bodies[0] for body in bodies)
    assert sum(headers.get("Idempotent-Replayed") == "true" for _, _, headers in outcomes) == 15
    first = bodies[0]["bulk_transfers"][0]["bulk_transfer_id"]
    assert {headers["Location"] for _, _, headers in outcomes} == {f"/bulk_transfers/{first}"}
    assert await pool.fetchval("SELECT count(*) FROM bps.bulk_transfers WHERE bank_account_id = $1", account.id) == 2
    assert await balance_of(pool, account) == 100_000 - 1050


async def test_files_debiting_two_accounts_in_opposite_orders_at_once_never_deadlock(
    client, config, database_url, pool, make_account
):
    opening = 10_000_000
    x, y = await make_account(opening), await make_account(opening)  # x is older: the lower id

    def files(count: int) -> list[str]:
        return [
            pain001([block(x, [Tx(amount=f"{n + 1}.00")]), block(y, [Tx(amount="0.10"), Tx(amount="0.20")])])
            if n % 2 == 0
            else pain001([block(y, [Tx(amount=f"0.0{n % 9 + 1}")]), block(x, [Tx(amount="1.50")])])
            for n in range(count)
        ]

    held = files(24)
    outcomes = await race(database_url, x, [sender(client, d) for d in held], min(24, config.pool_max_size))
    free = files(24)
    outcomes += await asyncio.gather(*(sender(client, d)() for d in free))

    assert [status for status, _, _ in outcomes] == [201] * 48, [b for s, b, _ in outcomes if s != 201][:3]
    per_account = {x.id: 0, y.id: 0}
    for _, body, _ in outcomes:
        for made in body["bulk_transfers"]:
            per_account[(await bulk_row(pool, made["bulk_transfer_id"]))["bank_account_id"]] += made["total_cents"]
    assert (await balance_of(pool, x), await balance_of(pool, y)) == (
        opening - per_account[x.id],
        opening - per_account[y.id],
    )
    assert per_account[x.id] > 0 and per_account[y.id] > 0
    for account in (x, y):
        assert await pool.fetchval("SELECT consistent FROM bps.account_audit WHERE bank_account_id = $1", account.id)
