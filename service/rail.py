"""The payment rail as the executor sees it: a bank's API that executes payments, each at most once per id.

A real bank's API fits behind `Rail` with two calls: submit payments (idempotent by payment id: a payment
submitted again is answered with its first outcome, never executed twice) and look payments up by id.
`HttpRail` speaks the simulated rail's HTTP API (service/rail_simulator.py).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import aiohttp
import orjson


class Payment(NamedTuple):
    """One credit transfer to execute; its id (the transfer's) is the rail's idempotency key. (A named tuple:
    executors make a thousand of them per batch, and a frozen dataclass cost five times as much.)"""

    id: int
    amount_cents: int
    currency: str
    creditor_name: str
    creditor_iban: str
    creditor_bic: str
    remittance: str
    end_to_end_id: str | None = None


class Outcome(NamedTuple):
    """What the rail did with a payment: executed, or failed with an ISO 20022 status reason code."""

    status: str  # 'executed' | 'failed'
    reason: str | None = None


class RailError(Exception):
    """The rail did not answer (a timeout, a refused connection, an error status): the payments' outcome is
    unknown; they may or may not have been executed."""


class Rail(Protocol):
    async def submit(self, payments: list[Payment]) -> dict[int, Outcome]:
        """Executes the payments not seen before; returns the outcome of each payment it answers for."""

    async def lookup(self, ids: list[int]) -> dict[int, Outcome]:
        """The outcomes of the payments with these ids that the rail has seen; the others are absent."""

    async def close(self) -> None: ...


def document_of(payment: Payment) -> dict:
    """A payment as the rail's JSON takes it (dataclasses.asdict cost ten times as much: it deep-copies)."""
    return {
        "id": str(payment.id),
        "amount_cents": payment.amount_cents,
        "currency": payment.currency,
        "creditor_name": payment.creditor_name,
        "creditor_iban": payment.creditor_iban,
        "creditor_bic": payment.creditor_bic,
        "remittance": payment.remittance,
        "end_to_end_id": payment.end_to_end_id,
    }


def outcomes_of(answer: dict) -> dict[int, Outcome]:
    results = answer.get("results")
    if not isinstance(results, list):
        raise RailError("the rail's answer has no results list")
    found = {}
    for result in results:
        try:
            status, reason = result["status"], result.get("reason")
            if status not in ("executed", "failed") or (status == "failed") != isinstance(reason, str):
                raise ValueError(status)
            found[int(result["id"])] = Outcome(status, reason)
        except (KeyError, TypeError, ValueError) as error:
            raise RailError(f"the rail's answer holds an unreadable result ({type(error).__name__})") from None
    return found


class HttpRail:
    """The rail over HTTP: POST /payments to submit, POST /payments/lookup to ask."""

    def __init__(self, base_url: str, timeout_seconds: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.session: aiohttp.ClientSession | None = None

    async def _post(self, path: str, document: dict) -> dict:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self.session.post(
                self.base_url + path, data=orjson.dumps(document), headers={"Content-Type": "application/json"}
            ) as response:
                if response.status != 200:
                    raise RailError(f"the rail answered HTTP {response.status}")
                return orjson.loads(await response.read())
        except (TimeoutError, aiohttp.ClientError, ValueError) as error:
            raise RailError(f"the rail did not answer ({type(error).__name__})") from None

    async def submit(self, payments: list[Payment]) -> dict[int, Outcome]:
        return outcomes_of(await self._post("/payments", {"payments": [document_of(p) for p in payments]}))

    async def lookup(self, ids: list[int]) -> dict[int, Outcome]:
        return outcomes_of(await self._post("/payments/lookup", {"ids": [str(i) for i in ids]}))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
