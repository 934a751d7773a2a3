"""The load: many concurrent clients sending a mix of bulk transfer requests, with what each one got back.

Every logical request has a request id (rid) written into each of its transfers' client_reference
("<rid>.<position>"), so the database can be checked request by request afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

# The kinds of request the clients send, and what the contract allows as their final answer.
ACCEPT_OR_SHORT = {(201, None), (422, "insufficient_funds")}


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    iban: str
    bic: str
    opening_cents: int
    hot: bool = False
    api_key: str = ""  # a key of this account alone, with both scopes


@dataclass
class Request:
    rid: str
    kind: str
    account_id: int | None
    body: bytes
    key: str | None
    transfer_count: int
    total_cents: int
    expect: set  # allowed final (status, code); code None = any
    content_type: str = "application/json"
    attempts_allowed: int = 1_000  # 1 = a client that crashes (forgets) on its first failure
    api_key: str | None = None  # sent as Authorization: Bearer; None: no Authorization header
    # Filled in by the clients.
    statuses: list = field(default_factory=list)  # per attempt; 0 = no answer (connection lost, timeout)
    codes: list = field(default_factory=list)
    bulk_ids: list = field(default_factory=list)  # from 201 bodies, and 409 duplicate_request bodies
    replayed: list = field(default_factory=list)
    final_status: int | None = None
    final_code: str | None = None
    gave_up: bool = False

    def answer_ids(self) -> set[int]:
        return {b for b in self.bulk_ids if b is not None}


@dataclass
class Mix:
    """Weights of each kind of request (normalised)."""

    valid: float = 0.38
    keyed: float = 0.12
    key_retry: float = 0.06
    key_race: float = 0.04
    dup: float = 0.15
    key_reuse: float = 0.03
    short: float = 0.07
    invalid: float = 0.15
    forgetful: float = 0.0

    def choose(self, rng: random.Random) -> str:
        kinds = list(vars(self))
        return rng.choices(kinds, weights=[getattr(self, k) for k in kinds])[0]


CRASH_MIX = Mix(
    valid=0.2,
    keyed=0.5,
    key_retry=0.05,
    key_race=0.05,
    dup=0.05,
    key_reuse=0.0,
    short=0.04,
    invalid=0.03,
    forgetful=0.08,
)


def format_cents(cents: int, rng: random.Random) -> str:
    """The wire amount for `cents`, in one of the spellings the contract accepts."""
    whole, frac = divmod(cents, 100)
    style = rng.random()
    if frac == 0 and style < 0.4:
        return str(whole)
    if frac % 10 == 0 and style < 0.7:
        return f"{whole}.{frac // 10}"
    if style > 0.97:
        return f"00{whole}.{frac:02d}"
    return f"{whole}.{frac:02d}"


COUNTERPARTIES = [
    ("Bip Bip", "EE383680981021245685", "CRLYFRPPTOU"),
    ("Wile E Coyote", "DE89370400440532013000", "COBADEFFXXX"),
    ("Zoë Ünïcødé-Łódź 株式会社", "FR1420041010050500013M02606", "BNPAFRPP"),
    ("O'Brien & Sons, Ltd.", "GB29NWBK60161331926819", "NWBKGB2L"),
    ("Placeholder Ltd", "f", "e"),  # accepted (basic checks), then refused by the rail (AC01) and refunded
]


class Generator:
    """Makes the requests of one phase; keeps what a later duplicate or key reuse needs."""

    def __init__(
        self,
        rng: random.Random,
        tag: str,
        accounts: list[Account],
        mix: Mix,
        hot_share: float,
        mean_transfers: int = 3,
        max_cents: int = 20_000,
    ) -> None:
        self.rng = rng
        self.tag = tag
        self.accounts = [a for a in accounts if not a.hot]
        self.api_keys = {a.id: a.api_key for a in accounts}
        self.hot = next((a for a in accounts if a.hot), None)
        self.mix = mix
        self.hot_share = hot_share
        self.mean_transfers = mean_transfers
        self.max_cents = max_cents
        self.seq = 0
        self.requests: dict[str, Request] = {}  # rid -> the original request (what the database may hold)
        self.recent_unkeyed: list[Request] = []
        self.finished_keyed: list[Request] = []
        self.kinds = Counter()
        # More answers allowed for the requests of an account (its key may be revoked during the run).
        self.also_allowed: dict[int, set] = {}

    def _rid(self) -> str:
        self.seq += 1
        return f"{self.tag}{self.seq}"

    def _account(self) -> Account:
        if self.hot is not None and self.rng.random() < self.hot_share:
            return self.hot
        return self.rng.choice(self.accounts)

    def _key(self, rid: str) -> str:
        return f"key-{rid}-{self.rng.getrandbits(32):08x}"

    def _payload(self, rid: str, account: Account, amounts: list[int]) -> dict:
        rng = self.rng
        transfers = []
        for i, cents in enumerate(amounts):
            name, iban, bic = rng.choice(COUNTERPARTIES)
            t = {
                "amount": format_cents(cents, rng),
                "counterparty_name": name,
                "counterparty_iban": iban,
                "counterparty_bic": bic,
                "description": f"reliability {rid} #{i}",
                "client_reference": f"{rid}.{i}",
            }
            if rng.random() < 0.2:
                t["currency"] = "EUR"
            transfers.append(t)
        payload = {"organization_iban": account.iban, "organization_bic": account.bic, "credit_transfers": transfers}
        if rng.random() < 0.5:
            payload["organization_name"] = rng.choice([account.name, account.name.upper(), f"  {account.name} "])
        return payload

    def _amounts(self) -> list[int]:
        rng = self.rng
        n = 1 + min(int(rng.expovariate(1 / max(self.mean_transfers - 1, 0.01))), 200)
        if rng.random() < 0.01:
            n = rng.randint(100, 400)
        return [rng.randint(1, self.max_cents) for _ in range(n)]

    def _new(self, kind: str, keyed: bool, expect: set, attempts_allowed: int = 1_000) -> Request:
        rid = self._rid()
        account = self._account()
        amounts = self._amounts()
        payload = self._payload(rid, account, amounts)
        request = Request(
            rid,
            kind,
            account.id,
            json.dumps(payload).encode(),
            self._key(rid) if keyed else None,
            len(amounts),
            sum(amounts),
            expect,
            attempts_allowed=attempts_allowed,
        )
        return self._register(request)

    def next(self) -> list[Request]:
        """The next thing one client does: one request, or several sent at once (a race)."""
        kind = self.mix.choose(self.rng)
        self.kinds[kind] += 1
        rng = self.rng
        if kind == "valid":
            # 409 too: a duplicate of it (sent by another client) may get there first.
            request = self._new(kind, False, {(409, "duplicate_request"), *ACCEPT_OR_SHORT})
            self.recent_unkeyed.append(request)
            if len(self.recent_unkeyed) > 2_000:
                del self.recent_unkeyed[:1_000]
            return [request]
        if kind in ("keyed", "forgetful"):
            return [self._new(kind, True, ACCEPT_OR_SHORT, attempts_allowed=1 if kind == "forgetful" else 1_000)]
        if kind == "key_retry":
            first = self._new(kind, True, ACCEPT_OR_SHORT)
            return [first, *[self._copy(first, "key_retry_again") for _ in range(rng.randint(1, 2))]]
        if kind == "key_race":
            first = self._new(kind, True, ACCEPT_OR_SHORT)
            return [first, self._copy(first, "key_race_twin")]
        if kind == "dup" and self.recent_unkeyed:
            original = rng.choice(self.recent_unkeyed[-500:])
            body = original.body
            if rng.random() < 0.3:  # the same JSON value, written differently: still a duplicate
                body = json.dumps(json.loads(body), sort_keys=True, indent=rng.choice([None, 1, 2])).encode()
            dup = self._copy(original, "dup", body=body)
            dup.expect = {(409, "duplicate_request"), *ACCEPT_OR_SHORT} | self.also_allowed.get(dup.account_id, set())
            return [dup]
        if kind == "key_reuse" and self.finished_keyed:
            original = rng.choice(self.finished_keyed[-500:])
            request = self._new(kind, True, {(422, "idempotency_key_reused")})
            request.key = original.key
            payload = json.loads(request.body)
            account = next(a for a in [*self.accounts, self.hot] if a and a.id == original.account_id)
            payload["organization_iban"], payload["organization_bic"] = account.iban, account.bic
            payload.pop("organization_name", None)
            request.account_id = account.id
            request.api_key = account.api_key
            request.expect = request.expect | self.also_allowed.get(account.id, set())
            request.body = json.dumps(payload).encode()
            return [request]
        if kind == "short":
            rid = self._rid()
            account = self._account()
            amounts = [99_999_999_999] * rng.randint(1, 3)
            amounts[0] = account.opening_cents + 1 if account.opening_cents < 99_999_999_999 else amounts[0]
            request = Request(
                rid,
                kind,
                account.id,
                json.dumps(self._payload(rid, account, amounts)).encode(),
                self._key(rid) if rng.random() < 0.3 else None,
                len(amounts),
                sum(amounts),
                {(422, "insufficient_funds")},
            )
            return [self._register(request)]
        return [self._invalid()]

    def _copy(self, original: Request, kind: str, body: bytes | None = None) -> Request:
        copy = Request(
            original.rid,
            kind,
            original.account_id,
            body or original.body,
            original.key,
            original.transfer_count,
            original.total_cents,
            original.expect,
            api_key=original.api_key,
        )
        return copy

    def _invalid(self) -> Request:
        """A request the contract rejects as a whole, whatever the balance."""
        rng = self.rng
        rid = self._rid()
        account = self._account()
        amounts = self._amounts()
        payload = self._payload(rid, account, amounts)
        transfers = payload["credit_transfers"]
        victim = rng.choice(transfers)
        content_type = "application/json"
        key = None
        expect = {(422, "validation_failed")}
        case = rng.randrange(14)
        if case == 0:
            victim["amount"] = rng.choice(["0", "0.00", "-5", "1.234", "1e2", "NaN", " 1", "1,5", "5.", ".5", ""])
        elif case == 1:
            victim["amount"] = rng.choice([14.5, 1, None, [], {}, True])
        elif case == 2:
            del victim[
                rng.choice(["amount", "counterparty_name", "counterparty_iban", "counterparty_bic", "description"])
            ]
        elif case == 3:
            victim[rng.choice(["amout", "extra", "Amount"])] = "1.00"
        elif case == 4:
            payload["unexpected"] = True
        elif case == 5:
            victim["currency"] = rng.choice(["USD", "eur", "GBP", 1])
        elif case == 6:
            payload["organization_name"] = "Somebody Else Entirely"
        elif case == 7:
            payload["credit_transfers"] = []
        elif case == 8:
            victim["description"] = "x" * 141
        elif case == 9:
            payload["organization_iban"] = "FR7600000000000000000000000"
            expect = {(404, "account_not_found")}
        elif case == 10:
            body = rng.choice([b"", b"{", b"not json", b"[1,2]", b'"text"', b"null", b"\xff\xfe{}"])
            return self._register(
                Request(rid, "invalid", account.id, body, None, len(amounts), sum(amounts), {(400, "invalid_json")})
            )
        elif case == 11:
            content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded", "application/xml"])
            # JSON sent as XML is read as a pain.001 file, and is not one.
            expect = {(400, "invalid_xml")} if content_type == "application/xml" else {(415, "unsupported_media_type")}
        elif case == 12:
            key = "k" * 256
        else:
            victim["amount"] = "1000000000.00"
        body = json.dumps(payload).encode()
        return self._register(
            Request(
                rid, "invalid", account.id, body, key, len(amounts), sum(amounts), expect, content_type=content_type
            )
        )

    def _register(self, request: Request) -> Request:
        self.requests[request.rid] = request
        request.api_key = self.key_of(request.account_id)
        request.expect = request.expect | self.also_allowed.get(request.account_id, set())
        return request

    def key_of(self, account_id: int | None) -> str | None:
        """The API key a client of this account sends."""
        return self.api_keys.get(account_id)


@dataclass
class Stats:
    http_requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    no_answer: int = 0  # attempts that got no HTTP answer (connection refused/reset, timeout)
    missing_retry_after: int = 0
    latencies: list = field(default_factory=list)

    def p(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(q * len(values)))]


class Clients:
    """`clients` concurrent clients over the given services (picked at random, like a load balancer)."""

    def __init__(
        self,
        generator: Generator,
        base_urls: list[str],
        stats: Stats,
        *,
        retry: bool,
        attempt_timeout: float = 30.0,
        give_up_after: float = 90.0,
        cancel_share: float = 0.0,
    ) -> None:
        self.generator = generator
        self.base_urls = base_urls
        self.stats = stats
        self.retry = retry
        self.attempt_timeout = attempt_timeout
        self.give_up_after = give_up_after
        # The share of accepted bulk transfers their client then tries to cancel (POST .../cancel).
        self.cancel_share = cancel_share
        self.cancels: Counter = Counter()  # status of each cancel's final answer
        self.sent: list[Request] = []  # every logical send, in order of issue
        self.rng = random.Random(generator.rng.random())

    async def run(
        self,
        clients: int,
        max_requests: int,
        max_seconds: float,
        stop: asyncio.Event | None = None,
        min_requests: int = 0,
    ) -> None:
        """Until `max_requests` HTTP requests are sent or `max_seconds` pass (or `stop` is set once
        `min_requests` are sent)."""
        deadline = time.monotonic() + max_seconds
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
        async with aiohttp.ClientSession(connector=connector) as session:

            def more() -> bool:
                if self.stats.http_requests >= max_requests or time.monotonic() >= deadline:
                    return False
                return not (stop is not None and stop.is_set() and self.stats.http_requests >= min_requests)

            async def client() -> None:
                while more():
                    batch = self.generator.next()
                    if len(batch) > 1 and batch[1].kind == "key_race_twin":
                        await asyncio.gather(*(self.send(session, r) for r in batch))
                    else:
                        for request in batch:
                            await self.send(session, request)
                    for request in batch:
                        if request.key and request.final_status is not None and request.kind in ("keyed",):
                            self.generator.finished_keyed.append(request)

            await asyncio.gather(*(client() for _ in range(clients)))

    async def send(self, session: aiohttp.ClientSession, request: Request) -> None:
        """One logical request: retried (same body, same key) until it gets an answer, within bounds."""
        self.sent.append(request)
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            status, code, bulk_id, replayed = await self.attempt(session, request)
            request.statuses.append(status)
            request.codes.append(code)
            request.bulk_ids.append(bulk_id)
            request.replayed.append(replayed)
            retryable = status == 0 or status == 503 or (status == 409 and code == "request_in_progress")
            if not retryable:
                request.final_status, request.final_code = status, code
                if status == 201 and bulk_id is not None and self.rng.random() < self.cancel_share:
                    await self.cancel(session, request, bulk_id)
                return
            out_of_time = time.monotonic() - started > self.give_up_after
            if not self.retry or attempt >= request.attempts_allowed or out_of_time or attempt >= 500:
                request.gave_up = True
                return
            await asyncio.sleep(min(0.02 * attempt, 0.25) + self.rng.random() * 0.05)

    async def cancel(self, session: aiohttp.ClientSession, request: Request, bulk_id: int) -> None:
        """Cancels what is still pending of a bulk transfer its client was just told was accepted: 200 when
        something was, 409 when the executors were faster; retried like a request while the service is away."""
        url = f"{self.rng.choice(self.base_urls)}/bulk_transfers/{bulk_id}/cancel"
        headers = {"Authorization": f"Bearer {request.api_key}"}
        for attempt in range(50):
            self.stats.http_requests += 1
            try:
                async with session.post(
                    url, headers=headers, timeout=aiohttp.ClientTimeout(total=self.attempt_timeout)
                ) as response:
                    await response.read()
                    status = response.status
            except (TimeoutError, aiohttp.ClientError, OSError):
                status = 0
            self.stats.statuses[status] += 1
            if status not in (0, 503):
                break
            await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
        self.cancels[status] += 1

    async def attempt(self, session: aiohttp.ClientSession, request: Request):
        headers = {"Content-Type": request.content_type}
        if request.key is not None:
            headers["Idempotency-Key"] = request.key
        if request.api_key is not None:
            headers["Authorization"] = f"Bearer {request.api_key}"
        url = self.rng.choice(self.base_urls) + self.rng.choice(["/bulk_transfer", "/transfers/bulk"])
        self.stats.http_requests += 1
        started = time.monotonic()
        try:
            async with session.post(
                url, data=request.body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.attempt_timeout)
            ) as response:
                raw = await response.read()
                status = response.status
                replayed = response.headers.get("Idempotent-Replayed") == "true"
                retry_after = response.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientError, OSError):
            self.stats.no_answer += 1
            return 0, None, None, False
        self.stats.latencies.append(time.monotonic() - started)
        self.stats.statuses[status] += 1
        if status == 503 and not (retry_after and retry_after.strip().isdigit()):
            self.stats.missing_retry_after += 1
        code = bulk_id = None
        try:
            body = json.loads(raw)
            if isinstance(body, dict):
                code = body.get("code")
                if status in (201, 409):
                    bulk_id = body.get("bulk_transfer_id")
        except ValueError:
            code = "<not json>"
        return status, code, bulk_id, replayed
