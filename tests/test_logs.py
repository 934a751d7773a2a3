"""No log line holds an API key, an IBAN, a BIC, a name, a description or a request body: a real service
process, logging at debug level in both formats, gets requests full of distinctive values on every path
(accepted, refused, malformed, unauthenticated, unreadable HTTP, a database error that quotes the row), and
its whole output is searched for them. Each request's id must be there, so the test notices logging off."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import uuid

import psycopg
import pytest
from support import create_database, drop_database, service_process

from service import db

NAME = "Zebediah Quuxworth-Distinct"
IBAN = "DE44500105175407324931"
BIC = "QUUXDEFFXXX"
ORGANIZATION = "Quuxcorp Distinct Holdings"
ORGANIZATION_IBAN = "FR7630006000011234567890189"
ORGANIZATION_BIC = "QUUXFRPPXXX"
DESCRIPTION = "Salary of the distinct Mr Quuxworth"
REFERENCE = "quux-ref-31337"


@pytest.fixture
def database() -> str:
    url = asyncio.run(create_database("bps_logs_test"))
    asyncio.run(db.migrate(url))
    yield url
    asyncio.run(drop_database(url))


def transfer(**fields) -> dict:
    return {
        "amount": "10.00",
        "counterparty_name": NAME,
        "counterparty_iban": IBAN,
        "counterparty_bic": BIC,
        "description": DESCRIPTION,
        "client_reference": REFERENCE,
        **fields,
    }


def payload(**top) -> dict:
    return {
        "organization_name": ORGANIZATION,
        "organization_iban": ORGANIZATION_IBAN,
        "organization_bic": ORGANIZATION_BIC,
        "credit_transfers": [transfer()],
        **top,
    }


def send(port: int, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    finally:
        connection.close()


def send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        try:
            return sock.recv(65536)
        except OSError:
            return b""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_log_line_holds_a_key_or_personal_data_and_every_request_is_logged_by_its_id(database, log_format):
    with psycopg.connect(database, autocommit=True) as owner:
        account = owner.execute(
            "SELECT bps.create_bank_account(%s, %s, %s, 100000)", (ORGANIZATION, ORGANIZATION_IBAN, ORGANIZATION_BIC)
        ).fetchone()[0]
        key = owner.execute("SELECT bps.create_api_key(ARRAY[%s::bigint], 'logs')", (account,)).fetchone()[0]
        revoked = owner.execute("SELECT bps.create_api_key(ARRAY[%s::bigint], 'logs')", (account,)).fetchone()[0]
        owner.execute("SELECT bps.revoke_api_key(%s)", (revoked,))
        # A database error whose message quotes the row: the transfer's own fields.
        owner.execute(
            f"ALTER TABLE bps.transfers ADD CONSTRAINT quotes_the_row CHECK (description <> '{DESCRIPTION} (boom)')"
        )

    service = service_process(database, BPS_LOG_LEVEL="debug", BPS_LOG_FORMAT=log_format, BPS_ACCESS_LOG="1")
    service.start()
    sent_ids: list[str] = []
    answered_ids: list[str] = []
    try:

        def call(
            method: str, path: str, body=None, api_key: str | None = key, content_type="application/json", **extra
        ):
            request_id = f"rid-{uuid.uuid4().hex[:12]}"
            headers = {"X-Request-Id": request_id, "Content-Type": content_type, **extra}
            if api_key is not None:
                headers["Authorization"] = f"Bearer {api_key}"
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            status, response_headers = send(service.port, method, path, data, headers)
            sent_ids.append(request_id)
            assert response_headers["X-Request-Id"] == request_id
            return status

        assert call("POST", "/bulk_transfer", payload()) == 201
        assert call("POST", "/bulk_transfer", payload()) == 409
        assert call("POST", "/transfers/bulk", payload(), **{"Idempotency-Key": f"{NAME} key"}) == 201
        assert call("POST", "/bulk_transfer", payload(credit_transfers=[transfer(amount="9999999")])) == 422
        assert call("POST", "/bulk_transfer", payload(credit_transfers=[transfer(counterparty_name=NAME * 3)])) == 422
        assert call("POST", "/bulk_transfer", payload(organization_name=f"Not {ORGANIZATION}")) == 422
        assert call("POST", "/bulk_transfer", payload(organization_iban=IBAN)) == 404
        assert call("POST", "/bulk_transfer", payload(**{NAME: IBAN})) == 422
        assert call("POST", "/bulk_transfer", f'{{"{NAME}": "{IBAN}", '.encode()) == 400
        assert call("POST", "/bulk_transfer", f"<{NAME}>{IBAN}</{NAME}>".encode(), content_type="text/plain") == 415
        assert call("POST", "/bulk_transfer", payload(), api_key=revoked) == 401
        assert call("POST", "/bulk_transfer", payload(), api_key=None, Authorization=f"Basic {key}") == 401
        assert call("POST", "/bulk_transfer", payload(), api_key=key[:-1] + ("x" if key[-1] != "x" else "y")) == 401
        assert (
            call("POST", "/bulk_transfer", payload(credit_transfers=[transfer(description=f"{DESCRIPTION} (boom)")]))
            == 500
        )
        assert call("GET", "/bulk_transfers/1") == 200
        assert call("GET", f"/bulk_transfers/{IBAN}") == 404
        assert call("GET", f"/no/such/{NAME.replace(' ', '_')}/{IBAN}") == 404
        # HTTP that aiohttp's parser refuses, quoting the key and an IBAN in its headers.
        send_raw(
            service.port, f"POST /bulk_transfer HTTP/1.1\r\nAuthorization: Bearer {key}\x01{IBAN}\r\n\r\n".encode()
        )
        send_raw(service.port, f"GET /{IBAN} HTTP/9.9\r\nX-Name: {NAME}\r\n\r\n".encode())
        answered_ids = list(sent_ids)
    finally:
        service.stop()
        with psycopg.connect(database, autocommit=True) as owner:
            owner.execute("ALTER TABLE bps.transfers DROP CONSTRAINT IF EXISTS quotes_the_row")

    output = "".join(service.output)
    assert output.count("\n") > len(answered_ids)
    forbidden = {
        "API key": key,
        "API key's secret": key[4:36],
        "revoked API key": revoked,
        "counterparty name": NAME,
        "counterparty IBAN": IBAN,
        "counterparty BIC": BIC,
        "organization name": ORGANIZATION,
        "organization IBAN": ORGANIZATION_IBAN,
        "organization BIC": ORGANIZATION_BIC,
        "description": DESCRIPTION,
        "client reference": REFERENCE,
        "name, JSON-escaped": json.dumps(NAME)[1:-1].split(" ")[0] + " " + NAME.split(" ")[1],
    }
    found = {what: value for what, value in forbidden.items() if value in output}
    assert found == {}, f"the log holds {sorted(found)}"
    missing = [request_id for request_id in answered_ids if request_id not in output]
    assert missing == []
    if log_format == "json":
        lines = [line for line in service.output if line.strip()]
        assert all(isinstance(json.loads(line), dict) for line in lines)
        access = [json.loads(line) for line in lines if '"route"' in line]
        assert {entry["route"] for entry in access} >= {"/bulk_transfer", "/transfers/bulk", "/bulk_transfers/{id}"}
        assert {entry["account_id"] for entry in access if entry["status"] == 201} == {account}


async def test_the_database_session_is_named_after_the_request(client, pool, make_account) -> None:
    """A slow statement in the database's log (with %a in log_line_prefix) or in pg_stat_activity names the
    request it serves: the session is 'bps <X-Request-Id>' from the statement that serves it on."""
    account = await make_account()
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    body = {
        "organization_iban": account.iban,
        "organization_bic": account.bic,
        "credit_transfers": [transfer(client_reference=None, counterparty_bic="CRLYFRPPTOU")],
    }
    body["credit_transfers"][0].pop("client_reference")
    response = await client.post("/bulk_transfer", json=body, headers={"X-Request-Id": request_id})
    assert response.status == 201, await response.text()
    assert response.headers["X-Request-Id"] == request_id
    named = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        f"bps {request_id}",
    )
    assert named == 1
