"""The memory a hostile pain.001 body costs the PostgreSQL backend that parses it.

Each body goes, as the service sends it (text, at most the service's body limit), through bps_api.bulk_transfer_xml
on a connection of its own: a fresh backend, warmed up by one small file first, whose peak resident memory (VmHWM
of /proc/self/status, read by the backend itself with pg_read_file, so the server need not be this machine) is
read before and after. Every body is refused with a 4xx, writes nothing, and the backend's peak grows with the
body, never with what it would expand to: below peak_bound(body). Run with -s to see each body's peak.
"""

from __future__ import annotations

import re

import asyncpg
import pytest
from support import database_fixtures, random_iban

from service.config import Config

database_url, service_url, pool, session_key = database_fixtures("module", "bps_xml_memory_test")

LIMIT = Config().max_body_bytes  # the largest body the service passes on to the database (16 MiB)
MIB = 1024 * 1024


def peak_bound(size: int) -> int:
    """A warmed-up backend (about 25 MiB) plus what libxml2's tree of `size` bytes can take: a valid file of
    55,000 transfers in 16 MiB peaks near 470 MiB (29 times its size), 4 million empty elements near 670 (42)."""
    return 64 * MIB + 48 * size


PAIN001 = "urn:iso:std:iso:20022:tech:xsd:pain.001.001.03"
ORGANIZATION, BIC = "Memory Org", "MEMOFRPPXXX"

# ---------------------------------------------------------------------------------------------------------
# The bodies


def transaction(n: int, description: str = "Invoice") -> str:
    return (
        f'<CdtTrfTxInf><PmtId><EndToEndId>E2E-{n:07d}</EndToEndId></PmtId><Amt><InstdAmt Ccy="EUR">1.00</InstdAmt>'
        "</Amt><CdtrAgt><FinInstnId><BIC>CRLYFRPPTOU</BIC></FinInstnId></CdtrAgt><Cdtr><Nm>Bip Bip</Nm></Cdtr>"
        f"<CdtrAcct><Id><IBAN>EE383680981021245685</IBAN></Id></CdtrAcct><RmtInf><Ustrd>{description}</Ustrd>"
        "</RmtInf></CdtTrfTxInf>"
    )


def pain001(iban: str, transactions: str, *, doctype: str = "", encoding: str = "UTF-8", count: str = "1") -> str:
    """A pain.001.001.03 file of one PmtInf debiting `iban`, with these CdtTrfTxInf."""
    return (
        f'<?xml version="1.0" encoding="{encoding}"?>{doctype}<Document xmlns="{PAIN001}"><CstmrCdtTrfInitn>'
        f"<GrpHdr><MsgId>MSG-MEMORY</MsgId><CreDtTm>2026-01-01T00:00:00</CreDtTm><NbOfTxs>{count}</NbOfTxs>"
        f"<InitgPty><Nm>{ORGANIZATION}</Nm></InitgPty></GrpHdr><PmtInf><PmtInfId>P1</PmtInfId><PmtMtd>TRF</PmtMtd>"
        f"<ReqdExctnDt>2026-01-01</ReqdExctnDt><Dbtr><Nm>{ORGANIZATION}</Nm></Dbtr><DbtrAcct><Id><IBAN>{iban}</IBAN>"
        f"</Id></DbtrAcct><DbtrAgt><FinInstnId><BIC>{BIC}</BIC></FinInstnId></DbtrAgt>{transactions}</PmtInf>"
        "</CstmrCdtTrfInitn></Document>"
    )


def filled(iban: str, unit: str, *, around: tuple[str, str] = ("", ""), **options) -> str:
    """A file whose one Ustrd holds `unit` repeated (between `around`) until the file is LIMIT bytes long."""
    empty = pain001(iban, transaction(1, "{}"), **options)
    room = LIMIT - len(empty.encode()) - len("".join(around).encode())
    repeated = unit * (room // len(unit.encode()))
    return empty.replace("{}", around[0] + repeated + around[1])


def billion_laughs(iban: str) -> str:
    entities = '<!ENTITY lol "lol">' + "".join(
        f'<!ENTITY lol{n} "{(f"&lol{n - 1};" if n > 1 else "&lol;") * 10}">' for n in range(1, 10)
    )
    return pain001(iban, transaction(1, "&lol9;"), doctype=f"<!DOCTYPE Document [{entities}]>")


def quadratic_blowup(iban: str) -> str:
    """One 64 kB entity, referenced until the file is LIMIT bytes long (no nesting: defeats depth limits)."""
    return filled(iban, "&big;", doctype=f'<!DOCTYPE Document [<!ENTITY big "{"x" * 65536}">]>')


def external_entity(iban: str) -> str:
    doctype = '<!DOCTYPE Document [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    return pain001(iban, transaction(1, "&xxe;"), doctype=doctype)


def parameter_entity(iban: str) -> str:
    doctype = '<!DOCTYPE Document [<!ENTITY % remote SYSTEM "http://127.0.0.1:9/evil.dtd"> %remote;]>'
    return pain001(iban, transaction(1), doctype=doctype)


def nested(levels: int) -> str:
    return "<a>" * levels + "</a>" * levels


def deeply_nested_at_the_limit(iban: str) -> str:
    empty = pain001(iban, transaction(1, "{}"))
    return empty.replace("{}", nested((LIMIT - len(empty)) // 7))


def many_transactions(iban: str) -> str:
    """As many CdtTrfTxInf as the limit holds (some 50,000), on an account without the funds for them."""
    one = transaction(0)
    count = (LIMIT - len(pain001(iban, ""))) // len(one)
    return pain001(iban, "".join(transaction(n) for n in range(count)), count=str(count))


def many_attributes(iban: str, count: int = 10_000) -> str:
    """One element with `count` distinct attributes, refused before the parser (a tag over 1000 characters).
    Not more: should that check fail, libxml2 2.9 checks each attribute against all before it, in a loop that
    neither a cancel nor statement_timeout interrupts (100,000 attributes, about 1 MiB, some 2 minutes a parse)."""
    return pain001(iban, transaction(1, "<a" + "".join(f' a{n}=""' for n in range(count)) + "/>"))


def truncated_at_the_end(iban: str) -> str:
    return many_transactions(iban)[:-20]


BODIES = {
    "billion laughs": billion_laughs,
    "quadratic blowup (16 MiB)": quadratic_blowup,
    "external entity (XXE)": external_entity,
    "parameter entity (remote DTD)": parameter_entity,
    "100k levels deep": lambda iban: pain001(iban, transaction(1, nested(100_000))),
    "2.4M levels deep (16 MiB)": deeply_nested_at_the_limit,
    "4M empty elements (16 MiB)": lambda iban: filled(iban, "<a/>"),
    "10k distinct attributes": many_attributes,
    "55k transactions (16 MiB)": many_transactions,
    "16 MiB of text in one element": lambda iban: filled(iban, "x"),
    "16 MiB, truncated at the end": truncated_at_the_end,
    "mis-encoded: UTF-16 declared, 16 MiB of multibyte text": lambda iban: filled(iban, "€😀", encoding="UTF-16"),
    "mis-encoded: unknown encoding declared": lambda iban: pain001(iban, transaction(1), encoding="x-no-such"),
    "16 MiB tag name": lambda iban: filled(iban, "a", around=("<", "/>")),
}

# ---------------------------------------------------------------------------------------------------------
# The measurement

PEAK = re.compile(r"^VmHWM:\s+(\d+) kB$", re.MULTILINE)
CALL_SQL = "SELECT status, body::text FROM bps_api.bulk_transfer_xml($1, $2)"
WRITTEN_SQL = """
    SELECT a.balance_cents, (SELECT count(*) FROM bps.bulk_transfers), (SELECT count(*) FROM bps.transfers),
           (SELECT count(*) FROM bps.account_entries), (SELECT count(*) FROM bps.idempotency_keys)
      FROM bps.bank_accounts a WHERE a.iban = $1
"""


async def peak_of(connection: asyncpg.Connection) -> int:
    """The backend's peak resident memory so far, in bytes (it reads its own /proc/self/status)."""
    status = await connection.fetchval("SELECT pg_read_file('/proc/self/status')")
    return int(PEAK.search(status).group(1)) * 1024


@pytest.fixture(scope="module")
async def account(pool: asyncpg.Pool) -> tuple[str, str]:
    """An account with 1.00 EUR (no file here can be paid) and a key for it: (iban, key)."""
    iban = random_iban()
    account_id = await pool.fetchval("SELECT bps.create_bank_account($1, $2, $3, 100)", ORGANIZATION, iban, BIC)
    key = await pool.fetchval("SELECT bps.create_api_key(ARRAY[$1::bigint], 'xml memory')", account_id)
    return iban, key


@pytest.mark.parametrize("make", BODIES.values(), ids=BODIES.keys())
async def test_a_hostile_xml_body_is_refused_with_a_4xx_writes_nothing_and_keeps_the_backend_small(
    database_url, pool, account, make, request
):
    iban, key = account
    document = make(iban)
    assert len(document.encode()) <= LIMIT
    before = await pool.fetchrow(WRITTEN_SQL, iban)
    connection = await asyncpg.connect(database_url)
    try:
        # Warm-up: PL/pgSQL, libxml2 and the functions' plans loaded, so that the peak is the body's.
        broken = pain001(iban, transaction(1)).replace("</Ustrd>", "")
        assert (await connection.fetchrow(CALL_SQL, key, broken))["status"] == 400
        start = await peak_of(connection)

        status, body = await connection.fetchrow(CALL_SQL, key, document)

        peak = await peak_of(connection)
    finally:
        await connection.close()
    mib = MIB
    size = len(document.encode()) / mib
    growth = f"+{(peak - start) / mib:.1f} MiB over the warmed-up {start / mib:.1f} MiB"
    print(
        f"\n{request.node.callspec.id}: {size:.1f} MiB body -> {status}; backend peak {peak / mib:.1f} MiB ({growth})"
    )
    assert 400 <= status < 500, body
    assert await pool.fetchrow(WRITTEN_SQL, iban) == before
    bound = peak_bound(len(document.encode()))
    assert peak < bound, f"the backend peaked at {peak / mib:.0f} MiB, over {bound / mib:.0f}"
