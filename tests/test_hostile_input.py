"""The fast part of the reliability harness: hostile input against a real service process, and a
kill -9 under load. The long runs are `make reliability` (tests/reliability/).

Properties: the service never answers a 5xx to any client input; a request that is not accepted never
changes the database (an accepted one changes exactly what its 201 says); a service process killed with
SIGKILL in the middle of requests leaves each of them wholly in the database or wholly absent, and
clients retrying with their Idempotency-Key get each request executed exactly once.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from reliability import hostile
from support import random_iban, service_process

from service.processes import Process

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("BPS_HOSTILE_EXAMPLES", "300"))
HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def create_account(db, balance_cents: int, name: str = "Hostile Corp") -> dict:
    iban = random_iban()
    account_id = db.execute(
        "SELECT bps.create_bank_account(%s, %s, %s, %s)", (name, iban, "OIVUSCLQXXX", balance_cents)
    ).fetchone()[0]
    return {"id": account_id, "name": name, "iban": iban, "bic": "OIVUSCLQXXX", "opening": balance_cents}


@pytest.fixture(scope="module")
def server(database_url: str):
    server = service_process(database_url)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def targets(db) -> list[dict]:
    """Accounts the hostile payloads aim at: ample, small (short of funds), and one with an odd name."""
    return [
        create_account(db, 10_000_000),
        create_account(db, 150),
        create_account(db, 5_000, name="Zoë Ünïcødé-Łódź"),
    ]


@pytest.fixture(scope="module")
def db(database_url: str):
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="module")
def keys(db, targets: list[dict]) -> list[hostile.Credential]:
    """The valid key of the targets first, then keys and headers that must not write."""
    return hostile.credentials(db, [t["id"] for t in targets], create_account(db, 1_000)["id"])


def check_one(server: Process, db, request: hostile.Hostile) -> None:
    before = hostile.fingerprint(db)
    status, headers, body = hostile.send(server.port, request, timeout=10)
    problem = hostile.judge(request, status, headers, body, before, hostile.fingerprint(db))
    assert problem is None, problem
    assert server.process.poll() is None, "the service died"


def test_hostile_bodies_never_5xx_and_rejections_change_nothing(server, targets, keys, db) -> None:
    """Hostile bodies sent as plain JSON POSTs without an Idempotency-Key, with good and bad API keys."""

    @HYPOTHESIS
    @given(hostile.hostile_requests(targets, keys, headers=False))
    def prop(request: hostile.Hostile) -> None:
        check_one(server, db, request)

    prop()


def test_hostile_bodies_and_headers_never_5xx_and_rejections_change_nothing(server, targets, keys, db) -> None:
    """Hostile bodies with hostile Content-Type, Idempotency-Key and Content-Encoding headers too."""

    @HYPOTHESIS
    @given(hostile.hostile_requests(targets, keys))
    def prop(request: hostile.Hostile) -> None:
        check_one(server, db, request)

    prop()


def valid_request(
    account: dict, credential: hostile.Credential, n: int = 1, key: bytes | None = None, description: str = "fixed"
) -> hostile.Hostile:
    payload = hostile.valid_payload(account, n)
    for i, transfer in enumerate(payload["credit_transfers"]):
        transfer["description"] = f"{description} #{i}"
    headers = [(b"Content-Type", b"application/json")] + ([(b"Idempotency-Key", key)] if key is not None else [])
    return hostile.Hostile(json.dumps(payload).encode(), headers, "/bulk_transfer", "valid", key, credential)


@pytest.mark.parametrize("key", [b"\xff\xfe", "clé".encode("latin-1"), b"\x80abc"], ids=["ff-fe", "latin-1", "x80"])
def test_idempotency_key_that_is_not_utf8_is_not_a_5xx(server, targets, keys, db, key: bytes) -> None:
    """An Idempotency-Key header whose bytes are not UTF-8 is client input: 4xx (or accepted), never a 5xx."""
    check_one(server, db, valid_request(targets[0], keys[0], key=key, description=f"non-utf8 key {key!r}"))


@pytest.mark.parametrize(
    "encoding, size, expected",
    [(b"gzip", 0, 400), (b"deflate", 0, 415), (b"gzip", 200_000, 400), (b"deflate", 200_000, 415)],
    ids=["gzip", "deflate", "gzip-200KB", "deflate-200KB"],
)
def test_body_that_does_not_match_its_content_encoding_is_answered_not_5xx(
    server, targets, keys, db, encoding: bytes, size: int, expected: int
) -> None:
    """A body that is not what its Content-Encoding says is client input: answered, never a 5xx, and promptly,
    whatever its size (the service must not leave the client waiting on an open connection). gzip is read
    and found broken (400); deflate is not accepted at all (415), as aiohttp could hang on it."""
    request = valid_request(targets[0], keys[0], description=f"not really {encoding!r}")
    if size:
        request.body = b"[" * size + b"]" * size
    request.headers.append((b"Content-Encoding", encoding))
    before = hostile.fingerprint(db)
    try:
        status, headers, body = hostile.send(server.port, request, timeout=5)
    except TimeoutError:
        pytest.fail(f"no answer in 5 s to a {len(request.body)}-byte body sent as Content-Encoding: {encoding!r}")
    assert hostile.judge(request, status, headers, body, before, hostile.fingerprint(db)) is None
    assert status == expected, (status, body)


def test_kill_9_under_load_each_request_once_and_whole(database_url: str, db) -> None:
    """SIGKILL the service while keyed requests are in flight, restart it, retry every request with its key:
    each is executed exactly once, wholly, and the account's money adds up."""
    account = create_account(db, 50_000_000, name="Kill Nine Ltd")
    credential = hostile.credentials(db, [account["id"]], account["id"])[0]
    requests = [
        valid_request(
            account, credential, n=1 + i % 5, key=f"kill9-{account['id']}-{i}".encode(), description=f"k9-{i}"
        )
        for i in range(60)
    ]
    server = service_process(database_url)
    server.start()
    answers: dict[int, tuple[int, dict]] = {}
    enough = threading.Event()

    def send(i: int) -> None:
        try:
            status, headers, body = hostile.send(server.port, requests[i], timeout=10)
        except (OSError, http.client.HTTPException):
            return  # the process died under this request: its client will retry
        answers[i] = (status, json.loads(body))
        if len(answers) >= 10:
            enough.set()

    try:
        with ThreadPoolExecutor(max_workers=30) as pool:
            for i in range(len(requests)):
                pool.submit(send, i)
            assert enough.wait(timeout=30), "the service answered fewer than 10 requests"
            server.kill9()  # while the other requests are in flight or queued
        lost = [i for i in range(len(requests)) if i not in answers]
        assert lost, "every request was answered before the kill: nothing was in flight"
        server.start()
        first = dict(answers)
        for i in range(len(requests)):  # every client retries (the answered ones too: they must be replays)
            status, headers, body = hostile.send(server.port, requests[i], timeout=10)
            assert status == 201, (i, status, body)
            answer = json.loads(body)
            assert headers.get("Idempotent-Replayed") == "true" or i in lost, (i, headers)
            if i in first:
                assert first[i] == (201, answer), (i, first[i], answer)
            answers[i] = (status, answer)
    finally:
        server.stop()

    rows = db.execute(
        """SELECT b.idempotency_key, count(DISTINCT b.id), count(t.id), sum(t.amount_cents), min(b.transfer_count)
             FROM bps.bulk_transfers AS b JOIN bps.transfers AS t ON t.bulk_transfer_id = b.id
            WHERE b.bank_account_id = %s GROUP BY b.idempotency_key""",
        (account["id"],),
    ).fetchall()
    executed = {key: (bulks, transfers, total, count) for key, bulks, transfers, total, count in rows}
    assert len(executed) == len(requests)
    for i, request in enumerate(requests):
        bulks, transfers, total, count = executed[request.key.decode()]
        assert bulks == 1 and transfers == count == 1 + i % 5, (i, executed[request.key.decode()])
        assert total == answers[i][1]["total_cents"]
    balance, consistent = db.execute(
        "SELECT a.balance_cents, au.consistent FROM bps.bank_accounts AS a "
        "JOIN bps.account_audit AS au ON au.bank_account_id = a.id WHERE a.id = %s",
        (account["id"],),
    ).fetchone()
    assert consistent
    assert balance == account["opening"] - sum(a["total_cents"] for _, a in answers.values())
