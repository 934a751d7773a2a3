"""Hostile input: hypothesis strategies for request bodies and headers, and the checks one answer must pass.

Shared by the long run (`python -m tests.reliability`) and the fast test (tests/test_hostile_input.py).
Properties: never a 5xx, and a request that is not accepted never changes the database (an accepted one
changes exactly what its 201 says).
"""

from __future__ import annotations

import functools
import gzip
import http.client
import json
import re
import socket
import zlib
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from hypothesis import strategies as st

from service import access

PATHS = ["/bulk_transfer", "/transfers/bulk"]

# Amount spellings around the contract's edges, valid and not.
TRICKY_AMOUNTS = [
    "14.5",
    "13.2",
    "61238",
    "8024.99",
    "0.29",
    "1.13",
    "700",
    "0.01",
    "999999999.99",
    "000000001.00",
    "0",
    "0.00",
    "-5",
    "-0.5",
    "",
    " 1",
    "1 ",
    "1,5",
    "5.",
    ".5",
    "1e2",
    "1.234",
    "NaN",
    "Infinity",
    "-Infinity",
    "abc",
    "1000000000",
    "999999999.999",
    "1000000000.00",
    "+1",
    "0x10",
    "1_000",
    "１",
    "١٢",
    "٣.٥",
    "1\u00a0",
    "\u200b1",
    "1.0e1",
    "9" * 400,
    "0." + "0" * 300 + "1",
    "1" + "0" * 30,
    "00000000000000000000000000001",
    "1.",
    "1..2",
    "1.2.3",
    "--1",
    "½",
    "Ⅻ",
    "𝟏",
    "1\x00",
    "1\n",
    "\t1",
]

ODD_TEXT = [
    "",
    " ",
    "\u0000",
    "a\u0000b",
    "\ud800",
    "\udfff",
    "\ud83d\ude00",
    "😀" * 10,
    "\u202eevil",
    "e\u0301",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "Ω" * 71,
    "x" * 141,
    "'; DROP TABLE bps.transfers; --",
    "\\",
    '"',
    "\n\r\t",
    "null",
    "<script>",
    "%s%n",
    "${jndi:ldap://x}",
    "ACME Corp",
    " acme corp ",
    "ACME CORP\u0000",
]

# Enormous strings: mostly moderately so (each costs the whole round trip), sometimes megabytes.
HUGE_SIZES = st.sampled_from([1_000, 10_000, 100_000, 100_000, 1_000_000, 3_000_000])

FIELDS = [
    "amount",
    "counterparty_name",
    "counterparty_iban",
    "counterparty_bic",
    "description",
    "currency",
    "client_reference",
]
TOP = ["organization_name", "organization_iban", "organization_bic", "credit_transfers"]


@dataclass(frozen=True)
class Credential:
    """An Authorization header a hostile request may carry (None: none), and what it must be answered."""

    name: str
    header: bytes | None
    status: int | None = None  # the status every request with it gets; None: any (a key that may write)
    may_write: bool = False


def credentials(connection, account_ids: list[int], other_account_id: int) -> list[Credential]:
    """The valid key of `account_ids` first, then keys and headers that must not write: a read-only key,
    another account's key, revoked and expired keys, a well-formed key that was never made, and headers
    that are no key at all. Made as the owner, on a psycopg (sync, autocommit) connection."""

    def key(accounts: list[int], label: str, scopes: str = "{transfers:write,transfers:read}") -> str:
        return connection.execute(
            "SELECT bps.create_api_key(%s::bigint[], %s, %s::text[])", (accounts, label, scopes)
        ).fetchone()[0]

    def bearer(text: str) -> bytes:
        return f"Bearer {text}".encode()

    valid = key(account_ids, "hostile: valid")
    revoked = key(account_ids, "hostile: revoked")
    connection.execute("SELECT bps.revoke_api_key(%s)", (revoked,))
    expired = key(account_ids, "hostile: expired")
    connection.execute(
        "UPDATE bps.api_credentials SET expires_at = now() - interval '1 second' "
        "WHERE key_hash = sha256(convert_to(%s, 'UTF8'))",
        (expired,),
    )
    never_made = "bps_" + "N" * 32
    never_made += access.checksum(never_made)
    return [
        Credential("valid", bearer(valid), may_write=True),
        Credential("read-only", bearer(key(account_ids, "hostile: read-only", "{transfers:read}")), 403),
        Credential("another account's", bearer(key([other_account_id], "hostile: other account"))),
        Credential("revoked", bearer(revoked), 401),
        Credential("expired", bearer(expired), 401),
        Credential("never made", bearer(never_made), 401),
        Credential("mistyped", bearer(valid[:-1] + ("A" if valid[-1] != "A" else "B")), 401),
        Credential("no Authorization", None, 401),
        Credential("Basic", b"Basic dXNlcjpwYXNz", 401),
        Credential("empty Bearer", b"Bearer ", 401),
        Credential("lower-case bearer, valid key", f"bearer {valid}".encode(), may_write=True),
    ]


def authorizations(choices: list[Credential]) -> st.SearchStrategy:
    """Mostly the first (valid) credential, so most hostile bodies reach the rules; the others a fifth of the time."""
    return st.integers(0, 4 * len(choices) - 1).map(lambda i: choices[0] if i >= len(choices) else choices[i])


@dataclass
class Hostile:
    body: bytes
    headers: list  # [(name bytes, value bytes)]
    path: str
    note: str
    key: bytes | None = None
    credential: Credential | None = None

    def __repr__(self) -> str:  # short enough for hypothesis' falsifying example
        head = self.body[:300]
        return (
            f"Hostile(note={self.note!r}, path={self.path!r}, headers={self.headers!r}, body[:300]={head!r}, "
            f"len={len(self.body)})"
        )


@functools.cache
def big_ints() -> st.SearchStrategy:
    return st.one_of(
        st.integers(),
        st.integers(min_value=-(10**400), max_value=10**400),
        st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**1000]),
    )


@functools.cache
def odd_text(max_size: int = 40) -> st.SearchStrategy:
    return st.one_of(
        st.text(max_size=max_size),
        st.text(st.characters(codec=None, exclude_categories=()), max_size=max_size),
        st.sampled_from(ODD_TEXT),
        st.builds(
            lambda c, n: c * n,
            st.sampled_from(["x", "é", "😀", "\u0000", "\\", '"']),
            st.sampled_from([0, 1, 35, 36, 70, 71, 140, 141, 255, 256, 3_000]),
        ),
    )


@functools.cache
def amounts() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(TRICKY_AMOUNTS), st.from_regex(r"-?[0-9]{0,12}(\.[0-9]{0,3})?", fullmatch=True), odd_text()
    )


@functools.cache
def json_values(max_leaves: int = 12) -> st.SearchStrategy:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        big_ints(),
        st.floats(allow_nan=True, allow_infinity=True),
        odd_text(),
        st.sampled_from(TRICKY_AMOUNTS),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(odd_text(12), children, max_size=4)),
        max_leaves=max_leaves,
    )


def valid_transfer(i: int) -> dict:
    return {
        "amount": "1.00",
        "counterparty_name": "Bip Bip",
        "counterparty_iban": "EE383680981021245685",
        "counterparty_bic": "CRLYFRPPTOU",
        "description": f"hostile #{i}",
    }


def valid_payload(account: dict, n: int = 1) -> dict:
    return {
        "organization_name": account["name"],
        "organization_iban": account["iban"],
        "organization_bic": account["bic"],
        "credit_transfers": [valid_transfer(i) for i in range(n)],
    }


def nest(value, depth: int, kind: str):
    """`value` inside `depth` arrays (or objects)."""
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


@st.composite
def mutated_payload(draw, accounts: list[dict]):
    """A request-shaped payload (for a real account, so rules past validation are reached) with mutations."""
    account = draw(st.sampled_from(accounts))
    payload = valid_payload(account, draw(st.integers(1, 4)))
    notes = []
    for _ in range(draw(st.integers(0, 4))):
        transfers = payload.get("credit_transfers")
        target = payload
        if isinstance(transfers, list) and transfers and isinstance(transfers[0], dict) and draw(st.booleans()):
            target = transfers[draw(st.integers(0, len(transfers) - 1))]
            if not isinstance(target, dict):
                continue
        fields = FIELDS if target is not payload else TOP
        op = draw(st.sampled_from(["amount", "text", "value", "delete", "extra", "huge", "nest", "many", "number"]))
        field = draw(st.sampled_from(fields))
        notes.append(f"{op}:{field}")
        if op == "amount":
            target["amount" if target is not payload else field] = draw(amounts())
        elif op == "text":
            target[field] = draw(odd_text())
        elif op == "value":
            target[field] = draw(json_values())
        elif op == "delete":
            target.pop(field, None)
        elif op == "extra":
            target[draw(odd_text(20))] = draw(json_values(4))
        elif op == "huge":
            target[field] = draw(st.sampled_from(["x", "9", "é", "\\u0000"])) * draw(HUGE_SIZES)
        elif op == "nest":  # (deeper nesting is in hostile_bodies' "deep", written as text)
            target[field] = nest(
                draw(json_values(2)), draw(st.integers(1, 500)), draw(st.sampled_from(["list", "obj"]))
            )
        elif op == "many" and target is payload:
            # Copies of one transfer (not the same object repeated: a later "huge" would then be in every one).
            one = valid_transfer(0)
            payload["credit_transfers"] = [
                dict(one) for _ in range(draw(st.sampled_from([0, 2, 3, 50, 500, 10_001, 9_999])))
            ]
        elif op == "number":
            target[field] = draw(
                st.one_of(big_ints(), st.floats(allow_nan=False), st.decimals(allow_nan=False).map(float))
            )
    return payload, ",".join(notes)


def serialize(value, draw) -> bytes:
    """JSON text, sometimes with NaN/Infinity, unescaped lone surrogates or odd whitespace."""
    ascii_only = draw(st.booleans())
    indent = draw(st.sampled_from([None] * 8 + [0, 2]))
    try:
        text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
        if indent is not None and len(text) < 50_000:  # (the indenting encoder is pure Python: slow on big values)
            text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True, indent=indent)
    except (ValueError, RecursionError):
        text = repr(value)[:100_000]
    return text.encode("utf-8", "surrogatepass")


@st.composite
def hostile_bodies(draw, accounts: list[dict]):
    kind = draw(st.sampled_from(["payload", "payload", "payload", "json", "bytes", "broken", "deep", "dupkeys"]))
    if kind == "payload":
        payload, note = draw(mutated_payload(accounts))
        return serialize(payload, draw), f"payload[{note}]"
    if kind == "json":
        return serialize(draw(json_values()), draw), "json value"
    if kind == "bytes":
        return draw(st.binary(max_size=300)), "bytes"
    if kind == "deep":
        depth = draw(st.integers(1, 200_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"credit_transfers":[', "]}")]))
        body = opener * depth + draw(st.sampled_from(["1", "null", '"x"', ""])) + closer * draw(st.integers(0, depth))
        return body.encode(), f"deep {depth}"
    if kind == "dupkeys":
        account = draw(st.sampled_from(accounts))
        text = json.dumps(valid_payload(account))
        return (text[:-1] + ', "organization_iban": ' + json.dumps(draw(odd_text())) + "}").encode(), "duplicate keys"
    # A valid request's text, broken: truncated, spliced with bytes, prefixed by a BOM, trailing garbage.
    body = json.dumps(valid_payload(draw(st.sampled_from(accounts)))).encode()
    how = draw(st.sampled_from(["truncate", "splice", "bom", "trailing"]))
    if how == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif how == "splice":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    elif how == "bom":
        body = b"\xef\xbb\xbf" + body
    else:
        body = body + draw(st.sampled_from([b"x", b"{}", b"\x00", b" ,", b"]"]))
    return body, f"broken {how}"


PAIN001 = "urn:iso:std:iso:20022:tech:xsd:pain.001.001.03"
# Attacks on XML parsers: entities (external, expanding), DTDs to fetch, and their spellings.
XML_ATTACKS = [
    '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><Document>&x;</Document>',
    '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>'
    "<Document>&d;</Document>",
    '<!DOCTYPE Document SYSTEM "http://127.0.0.1:9/pain.dtd"><Document xmlns="' + PAIN001 + '"/>',
    '<?xml version="1.0"?><!doctype d [<!entity % p SYSTEM "file:///etc/hostname"> %p;]><Document/>',
    '<?xml version="1.0"?><Document xmlns="' + PAIN001 + '">'
    "<CstmrCdtTrfInitn>&undeclared;</CstmrCdtTrfInitn></Document>",
    '<?xml version="1.0"?><Document xmlns:xi="http://www.w3.org/2001/XInclude"><xi:include href="file:///etc/passwd"/>'
    "</Document>",
    '<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pain.008.001.02"><CstmrDrctDbtInitn/></Document>',
    '<Other xmlns="' + PAIN001 + '"/>',
    "<Document/>",
    "<",
    "",
]


def pain001(account: dict, transfers: list[dict], message_id: str, count: str | None = None) -> str:
    """A pain.001.001.03 file of one PmtInf debiting `account`; values escaped, not checked."""
    rows = "".join(
        "<CdtTrfTxInf><PmtId><EndToEndId>{}</EndToEndId></PmtId><Amt><InstdAmt Ccy={}>{}</InstdAmt></Amt>"
        "<CdtrAgt><FinInstnId><BIC>{}</BIC></FinInstnId></CdtrAgt><Cdtr><Nm>{}</Nm></Cdtr>"
        "<CdtrAcct><Id><IBAN>{}</IBAN></Id></CdtrAcct><RmtInf><Ustrd>{}</Ustrd></RmtInf></CdtTrfTxInf>".format(
            escape(t.get("client_reference", "NOTPROVIDED")),
            quoteattr(t.get("currency", "EUR")),
            escape(t["amount"]),
            escape(t["counterparty_bic"]),
            escape(t["counterparty_name"]),
            escape(t["counterparty_iban"]),
            escape(t["description"]),
        )
        for t in transfers
    )
    count = str(len(transfers)) if count is None else count
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Document xmlns="{PAIN001}"><CstmrCdtTrfInitn><GrpHdr>'
        f"<MsgId>{escape(message_id)}</MsgId><CreDtTm>2026-01-01T00:00:00</CreDtTm><NbOfTxs>{escape(count)}</NbOfTxs>"
        f"<InitgPty><Nm>x</Nm></InitgPty></GrpHdr><PmtInf><PmtInfId>p1</PmtInfId><PmtMtd>TRF</PmtMtd>"
        f"<ReqdExctnDt>2026-01-01</ReqdExctnDt><Dbtr><Nm>x</Nm></Dbtr><DbtrAcct><Id><IBAN>{escape(account['iban'])}"
        f"</IBAN></Id></DbtrAcct><DbtrAgt><FinInstnId><BIC>{escape(account['bic'])}</BIC></FinInstnId></DbtrAgt>"
        f"{rows}</PmtInf></CstmrCdtTrfInitn></Document>"
    )


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


@st.composite
def hostile_xml_bodies(draw, accounts: list[dict]):
    """pain.001 files, odd and valid; parser attacks; broken documents; other encodings."""
    kind = draw(st.sampled_from(["file", "file", "file", "attack", "broken", "encoding"]))
    account = draw(st.sampled_from(accounts))
    message_id = draw(st.one_of(st.uuids().map(lambda u: u.hex[:35]), odd_text(40)))
    transfers = [valid_transfer(i) for i in range(draw(st.integers(1, 3)))]
    if kind == "attack":
        return draw(st.sampled_from(XML_ATTACKS)).encode(), "xml attack"
    if kind == "file":
        field = draw(st.sampled_from(["amount", "counterparty_name", "description", "client_reference", "none"]))
        if field != "none":
            transfers[0][field] = draw(amounts() if field == "amount" else odd_text())
        count = draw(st.sampled_from([None] * 4 + ["0", "99", "", "x"]))
        return utf8(pain001(account, transfers, message_id, count)), f"xml file[{field}]"
    text = pain001(account, transfers, message_id)
    if kind == "encoding":
        how = draw(st.sampled_from(["latin-1", "utf-16", "bogus", "undeclared-latin-1"]))
        if how == "latin-1":
            latin = text.replace("UTF-8", "ISO-8859-1").replace("x</Nm>", "Müller</Nm>")
            return latin.encode("latin-1", "replace"), "xml latin-1"
        if how == "utf-16":
            return text.replace("UTF-8", "UTF-16").encode("utf-16", "surrogatepass"), "xml utf-16"
        if how == "bogus":
            bogus = draw(st.sampled_from(["x-unknown", "rot13", "base64", "utf-32"]))
            return utf8(text.replace("UTF-8", bogus)), "xml bogus encoding"
        return text.replace("x</Nm>", "Müller</Nm>").encode("latin-1", "replace"), "xml undeclared latin-1"
    body = utf8(text)
    how = draw(st.sampled_from(["truncate", "splice", "trailing"]))
    if how == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif how == "splice":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    else:
        body = body + draw(st.sampled_from([b"x", b"<a/>", b"\x00", b"<!--", b"]]>"]))
    return body, f"xml broken {how}"


HEADER_OK = re.compile(rb"[^\r\n]*")


JSON_TYPES = [b"application/json"] * 12 + [
    b"application/json; charset=utf-8",
    b"application/problem+json",
    b"APPLICATION/JSON",
    b"application/x+json",
]
OTHER_TYPES = [
    b"text/plain",
    b"",
    b"application/jsonx",
    b"multipart/form-data; boundary=x",
    b"application/json; charset=latin-1",
    None,
]
ENCODINGS = [None] * 14 + ["gzip", "deflate", "bad-gzip", "bad-deflate", "br", "identity", "x-unknown"]
XML_TYPES = [b"application/xml"] * 4 + [b"text/xml", b"application/xml; charset=utf-8", b"text/xml; charset=latin-1"]


@functools.cache
def idempotency_keys() -> st.SearchStrategy:
    """Header values as bytes: text (UTF-8), raw bytes (not always UTF-8), and the 255-character edge."""
    return st.one_of(
        st.none(),
        st.none(),
        st.text(min_size=0, max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.binary(max_size=300),
        st.sampled_from([b"", b" ", b"k" * 255, b"k" * 256, b"\xff\xfe", "clé".encode(), "clé".encode("latin-1")]),
    ).filter(lambda k: k is None or HEADER_OK.fullmatch(k) is not None)


@st.composite
def hostile_requests(draw, accounts: list[dict], choices: list[Credential], headers: bool = True):
    """One hostile HTTP request, with one of the credentials `choices`. With `headers`, the Content-Type,
    Idempotency-Key and Content-Encoding are hostile too; without, it is a JSON POST with no Idempotency-Key
    and only the body is hostile."""
    xml = draw(st.integers(0, 3)) == 0
    body, note = draw(hostile_xml_bodies(accounts) if xml else hostile_bodies(accounts))
    credential = draw(authorizations(choices))
    note += f" ({credential.name} key)"
    if not headers:
        path = draw(st.sampled_from(PATHS))
        plain = b"application/xml" if xml else b"application/json"
        return Hostile(body, [(b"Content-Type", plain)], path, note, credential=credential)
    sent = []
    content_type = draw(st.sampled_from((XML_TYPES if xml else JSON_TYPES) + OTHER_TYPES))
    if content_type is not None:
        sent.append((b"Content-Type", content_type))
    key = draw(idempotency_keys())
    if key is not None:
        sent.append((b"Idempotency-Key", key))
    encoding = draw(st.sampled_from(ENCODINGS))
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    if encoding is not None:
        sent.append((b"Content-Encoding", encoding.removeprefix("bad-").encode()))
        note += f" +{encoding}"
    return Hostile(body, sent, draw(st.sampled_from(PATHS)), note, key, credential)


def signature(request: Hostile) -> str:
    """The likely cause of a failure, to group the failures found: an Idempotency-Key that is not UTF-8, a body
    that is not what its Content-Encoding says, or else what the request's headers hold."""
    encoding = next((v.decode() for k, v in request.headers if k == b"Content-Encoding"), None)
    if request.key is not None:
        try:
            request.key.decode("utf-8")
        except UnicodeDecodeError:
            return "an Idempotency-Key that is not UTF-8"
    if "+bad-" in request.note:
        return f"a body that is not what its Content-Encoding: {encoding} says"
    parts = [f"key {request.key!r}"[:40] if request.key is not None else "no key"]
    if encoding is not None:
        parts.append(f"Content-Encoding {encoding}")
    return ", ".join(parts)


def send(port: int, request: Hostile, timeout: float = 5) -> tuple[int, dict, bytes]:
    """Sends one request over a fresh connection; returns (status, headers, body).

    The server may answer before the whole body is sent (a bad header, a body over the limit) and close:
    the answer is still read. Raises TimeoutError when no answer comes, ConnectionError when the
    connection is reset before any answer could be read."""
    head = [f"POST {request.path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    head += [name + b": " + value for name, value in request.headers]
    if request.credential is not None and request.credential.header is not None:
        head.append(b"Authorization: " + request.credential.header)
    head.append(f"Content-Length: {len(request.body)}".encode())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + request.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered early and closed: read that answer
        response = http.client.HTTPResponse(sock, method="POST")
        try:
            response.begin()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            response.close()


FINGERPRINT_SQL = """
SELECT (SELECT count(*) FROM bps.bulk_transfers) AS bulks,
       (SELECT count(*) FROM bps.transfers) AS transfers,
       (SELECT count(*) FROM bps.account_entries) AS entries,
       (SELECT count(*) FROM bps.idempotency_keys) AS keys,
       (SELECT coalesce(sum(balance_cents), 0) FROM bps.bank_accounts) AS balances,
       (SELECT coalesce(sum(version), 0) FROM bps.bank_accounts) AS versions,
       (SELECT count(*) FROM bps.bank_accounts) AS accounts,
       (SELECT coalesce(max(id), 0) FROM bps.bulk_transfers) AS last_bulk
"""


def fingerprint(connection) -> dict:
    """What a request could change, from a psycopg (sync, autocommit) connection."""
    cursor = connection.execute(FINGERPRINT_SQL)
    names = [c.name for c in cursor.description]
    return dict(zip(names, cursor.fetchone(), strict=True))


def judge(request: Hostile, status: int, headers: dict, body: bytes, before: dict, after: dict) -> str | None:
    """None when the answer and the database change are right; else what is wrong."""
    if status >= 500:
        return f"HTTP {status}: {body[:300]!r}"
    if b"root:x:0:0" in body:
        return "the answer holds /etc/passwd: an XML entity was expanded"
    credential = request.credential
    # A request HTTP itself refuses (aiohttp's parser: a NUL in a header, ...) never reaches the key check.
    reached = headers.get("Content-Type", "").split(";")[0] in ("application/json", "application/problem+json")
    if reached and credential is not None and credential.status is not None and status != credential.status:
        return f"HTTP {status} for a request with the {credential.name} key (must be {credential.status})"
    if credential is not None and not credential.may_write and status == 201:
        return f"HTTP 201 for a request with the {credential.name} key, which may not write there"
    delta = {k: after[k] - before[k] for k in before}
    if status != 201 or headers.get("Idempotent-Replayed") == "true":
        allowed_keys = 0
        if request.key is not None and status in (409, 422):
            try:
                code = json.loads(body).get("code")
            except (ValueError, AttributeError):
                code = None
            allowed_keys = 1 if code == "insufficient_funds" else 0  # a keyed business rejection is stored
        changed = {k: v for k, v in delta.items() if v and not (k == "keys" and v <= allowed_keys)}
        if changed:
            return f"HTTP {status} (not accepted) but the database changed: {changed}"
        return None
    try:
        answer = json.loads(body)
        count, total = answer["transfer_count"], answer["total_cents"]
        bulks = len(answer.get("bulk_transfers", [answer]))  # a pain.001 file: one per PmtInf
    except (ValueError, KeyError, TypeError):
        return f"HTTP 201 without transfer_count/total_cents: {body[:300]!r}"
    expected = {
        "bulks": bulks,
        "transfers": count,
        "entries": bulks,
        "balances": -total,
        "versions": bulks,
        "accounts": 0,
        "keys": 1 if request.key is not None else 0,
    }
    wrong = {k: (delta[k], v) for k, v in expected.items() if delta[k] != v}
    return f"HTTP 201 but the database changed by {wrong} (got, expected)" if wrong else None
