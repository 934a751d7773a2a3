"""Request bodies, encoded once per batch size: a request is made unique by overwriting two fixed-width
fields in place (the debited IBAN and a counter in the first transfer's description), so the load
generator spends no CPU on uniqueness and every request is a new payload to the duplicate check."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

ORGANIZATION_NAME = "BPS Bench"
ORGANIZATION_BIC = "BENCFRPPXXX"
IBAN_LENGTH = 27
COUNTER_DIGITS = 20
# Each transfer is worth one of these; the function totals them exactly.
AMOUNTS = ("14.50", "13.20", "612.38", "8024.99", "19.99", "0.29", "1.13", "700")
IBAN_PLACEHOLDER = "FR76" + "#" * (IBAN_LENGTH - 4)
COUNTER_PLACEHOLDER = "~" * COUNTER_DIGITS
KEY_LENGTH = 42  # an API key: 'bps_', 32 random characters, 6 of checksum
KEY_PLACEHOLDER = "bps_" + "~" * (KEY_LENGTH - 4)


def account_iban(run_tag: int, index: int) -> str:
    """A 27-character French-shaped IBAN unique to this run and account (basic check: shape only)."""
    return f"FR76{run_tag:06d}{index:017d}"


def transfers_cents(batch: int) -> int:
    """What one request of `batch` transfers debits."""
    return sum(int(Decimal(AMOUNTS[i % len(AMOUNTS)]) * 100) for i in range(batch))


def _transfer(position: int) -> dict:
    return {
        "amount": AMOUNTS[position % len(AMOUNTS)],
        "currency": "EUR",
        "counterparty_name": f"Supplier {position % 997:05d}",
        # A real IBAN, so that the rail executes the transfer; every twentieth is the demo request's placeholder, which
        # the rail refuses (AC01) and BPS refunds.
        "counterparty_iban": "f" if position % 20 == 19 else "EE382200221020145685",
        "counterparty_bic": "CRLYFRPPTOU",
        "description": f"Invoice {position:05d} " + (COUNTER_PLACEHOLDER if position == 0 else "of the month"),
        "client_reference": f"bench-{position:07d}",
    }


def pain001(message_id: str, name: str, blocks: list[tuple[str, str, str, list[dict]]]) -> str:
    """A pain.001.001.09 file of one PmtInf per block (PmtInfId, debtor IBAN, debtor BIC, and its transfers as a
    JSON request has them), with the counts and sums a bank checks."""

    def rows(transfers: list[dict]) -> str:
        return "".join(
            f"<CdtTrfTxInf><PmtId><EndToEndId>{t['client_reference']}</EndToEndId></PmtId>"
            f'<Amt><InstdAmt Ccy="EUR">{t["amount"]}</InstdAmt></Amt>'
            f"<CdtrAgt><FinInstnId><BICFI>{t['counterparty_bic']}</BICFI></FinInstnId></CdtrAgt>"
            f"<Cdtr><Nm>{t['counterparty_name']}</Nm></Cdtr><CdtrAcct><Id><IBAN>{t['counterparty_iban']}</IBAN></Id></CdtrAcct>"
            f"<RmtInf><Ustrd>{t['description']}</Ustrd></RmtInf></CdtTrfTxInf>"
            for t in transfers
        )

    def total(transfers: list[dict]) -> Decimal:
        return sum((Decimal(t["amount"]) for t in transfers), Decimal(0))

    payment_information = "".join(
        f"<PmtInf><PmtInfId>{block_id}</PmtInfId><PmtMtd>TRF</PmtMtd><NbOfTxs>{len(transfers)}</NbOfTxs>"
        f"<CtrlSum>{total(transfers)}</CtrlSum><ReqdExctnDt><Dt>2026-01-01</Dt></ReqdExctnDt>"
        f"<Dbtr><Nm>{name}</Nm></Dbtr><DbtrAcct><Id><IBAN>{iban}</IBAN></Id></DbtrAcct>"
        f"<DbtrAgt><FinInstnId><BICFI>{bic}</BICFI></FinInstnId></DbtrAgt><ChrgBr>SLEV</ChrgBr>"
        f"{rows(transfers)}</PmtInf>"
        for block_id, iban, bic, transfers in blocks
    )
    everything = [t for *_, transfers in blocks for t in transfers]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pain.001.001.09"><CstmrCdtTrfInitn>'
        f"<GrpHdr><MsgId>{message_id}</MsgId><CreDtTm>2026-01-01T00:00:00</CreDtTm>"
        f"<NbOfTxs>{len(everything)}</NbOfTxs><CtrlSum>{total(everything)}</CtrlSum>"
        f"<InitgPty><Nm>{name}</Nm></InitgPty></GrpHdr>{payment_information}</CstmrCdtTrfInitn></Document>"
    )


def _pain001(batch: int) -> str:
    """The same request as a pain.001.001.09 file: one PmtInf, the counter in its GrpHdr/MsgId (what makes two
    files different to the duplicate check)."""
    transfers = [_transfer(i) for i in range(batch)]
    return pain001(
        f"bench-{COUNTER_PLACEHOLDER}", ORGANIZATION_NAME, [("bench", IBAN_PLACEHOLDER, ORGANIZATION_BIC, transfers)]
    )


@dataclass(frozen=True)
class Template:
    """One encoded body of `batch` transfers (JSON, or a pain.001 file) and where its variable fields sit."""

    batch: int
    body: bytes
    iban_at: int
    counter_at: int
    content_type: str = "application/json"

    @classmethod
    def build(cls, batch: int) -> Template:
        document = {
            "organization_name": ORGANIZATION_NAME,
            "organization_iban": IBAN_PLACEHOLDER,
            "organization_bic": ORGANIZATION_BIC,
            "credit_transfers": [_transfer(i) for i in range(batch)],
        }
        body = json.dumps(document, separators=(",", ":")).encode()
        return cls(batch, body, body.index(IBAN_PLACEHOLDER.encode()), body.index(COUNTER_PLACEHOLDER.encode()))

    @classmethod
    def build_xml(cls, batch: int) -> Template:
        body = _pain001(batch).encode()
        iban_at, counter_at = body.index(IBAN_PLACEHOLDER.encode()), body.index(COUNTER_PLACEHOLDER.encode())
        return cls(batch, body, iban_at, counter_at, "application/xml")

    def http_request(self, host: str, port: int, path: str = "/bulk_transfer") -> tuple[bytearray, int, int]:
        """The whole HTTP/1.1 request as one mutable buffer, where the body starts in it, and where the API
        key of its Authorization header sits."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {self.content_type}\r\n"
            f"Authorization: Bearer {KEY_PLACEHOLDER}\r\nContent-Length: {len(self.body)}\r\n\r\n"
        ).encode()
        return bytearray(head + self.body), len(head), head.index(KEY_PLACEHOLDER.encode())


class Stamp:
    """Writes an account's IBAN, a counter and (in an HTTP request) the account's API key into one request
    buffer in place; the length never changes."""

    def __init__(self, template: Template, buffer: bytearray, body_at: int, key_at: int | None = None) -> None:
        self.buffer = buffer
        self.iban_at = body_at + template.iban_at
        self.counter_at = body_at + template.counter_at
        self.key_at = key_at

    def __call__(self, iban: bytes, counter: int, key: bytes) -> None:
        self.buffer[self.iban_at : self.iban_at + IBAN_LENGTH] = iban
        self.buffer[self.counter_at : self.counter_at + COUNTER_DIGITS] = b"%020d" % counter
        if self.key_at is not None:
            self.buffer[self.key_at : self.key_at + KEY_LENGTH] = key


def health_request(host: str, port: int) -> bytes:
    return f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
