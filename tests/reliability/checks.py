"""The invariants, checked from the database after a phase, and against what the clients were told."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import asyncpg

from .workload import Account, Request


@dataclass
class Check:
    phase: str
    name: str
    violations: int
    examined: int
    examples: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.violations == 0


class Checks:
    """Collects checks of one phase: `checks.add(name, examined, bad_examples)`."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.items: list[Check] = []

    def add(self, name: str, examined: int, bad: list) -> Check:
        check = Check(self.phase, name, len(bad), examined, bad[:8])
        self.items.append(check)
        return check

    def expect(self, name: str, ok: bool, detail: str) -> Check:
        return self.add(name, 1, [] if ok else [detail])


async def check_database(
    checks: Checks,
    url: str,
    accounts: list[Account],
    requests: dict[str, Request],
    sent: list[Request],
    *,
    everyone_answered: bool,
) -> None:
    """Every database invariant (balances, journal, no partial request, each key once), plus: what the
    clients were told agrees with the database.

    `requests` maps each rid to its original request, `sent` lists every logical send (duplicates and
    retries of a rid included). With `everyone_answered` (no faults), the set of requests in the database
    must be exactly the set of requests a client was told were accepted.
    """
    connection = await asyncpg.connect(url)
    try:
        audit = await connection.fetch(
            """SELECT a.id, a.balance_cents, au.consistent,
                      (SELECT e.amount_cents FROM bps.account_entries AS e
                        WHERE e.bank_account_id = a.id AND e.kind = 'opening') AS opening_cents,
                      (SELECT coalesce(sum(b.total_cents), 0) FROM bps.bulk_transfers AS b
                        WHERE b.bank_account_id = a.id) AS accepted_cents,
                      (SELECT coalesce(sum(e.amount_cents), 0) FROM bps.account_entries AS e
                        WHERE e.bank_account_id = a.id AND e.kind = 'credit') AS credited_cents,
                      -- What came back, from the transfers' own statuses (the journal's refunds must agree).
                      (SELECT coalesce(sum(t.amount_cents), 0) FROM bps.transfers AS t
                        WHERE t.bank_account_id = a.id AND t.status IN ('failed', 'cancelled')) AS refunded_cents
                 FROM bps.bank_accounts AS a JOIN bps.account_audit AS au ON au.bank_account_id = a.id"""
        )
        bulks = await connection.fetch(
            """SELECT b.id, b.bank_account_id, b.idempotency_key, b.payload_hash, b.transfer_count, b.total_cents,
                      count(t.id) AS n, coalesce(sum(t.amount_cents), 0) AS sum_cents,
                      count(t.id) FILTER (WHERE t.bank_account_id <> b.bank_account_id) AS foreign_account,
                      min(split_part(t.client_reference, '.', 1)) AS rid,
                      count(DISTINCT split_part(t.client_reference, '.', 1)) AS rids
                 FROM bps.bulk_transfers AS b LEFT JOIN bps.transfers AS t ON t.bulk_transfer_id = b.id
                GROUP BY b.id"""
        )
        orphans = await connection.fetchval(
            """SELECT count(*) FROM bps.transfers AS t
                WHERE NOT EXISTS (SELECT 1 FROM bps.bulk_transfers AS b
                                   WHERE b.id = t.bulk_transfer_id AND b.bank_account_id = t.bank_account_id)"""
        )
        transfers_by_rid = {
            r["rid"]: (r["n"], r["bulks"])
            for r in await connection.fetch(
                """SELECT split_part(client_reference, '.', 1) AS rid, count(*) AS n,
                          count(DISTINCT bulk_transfer_id) AS bulks
                     FROM bps.transfers GROUP BY 1"""
            )
        }
        keys = await connection.fetch(
            """SELECT k.bank_account_id, k.idempotency_key, k.status, k.bulk_transfer_id,
                      b.idempotency_key AS bulk_key, b.bank_account_id AS bulk_account
                 FROM bps.idempotency_keys AS k LEFT JOIN bps.bulk_transfers AS b ON b.id = k.bulk_transfer_id"""
        )
    finally:
        await connection.close()

    by_id = {a.id: a for a in accounts}
    checks.add(
        "journal agrees with balance (account_audit.consistent)",
        len(audit),
        [f"account {r['id']}" for r in audit if not r["consistent"]],
    )
    checks.add(
        "no negative balance",
        len(audit),
        [f"account {r['id']}: {r['balance_cents']}" for r in audit if r["balance_cents"] < 0],
    )
    bad = []
    for r in audit:
        opening = by_id[r["id"]].opening_cents if r["id"] in by_id else r["opening_cents"]
        expected = opening + r["credited_cents"] - r["accepted_cents"] + r["refunded_cents"]
        if opening != r["opening_cents"] or expected != r["balance_cents"]:
            bad.append(
                f"account {r['id']}: opening {opening} (journal {r['opening_cents']}) + credits {r['credited_cents']}"
                f" - accepted {r['accepted_cents']} + refunds {r['refunded_cents']} != balance {r['balance_cents']}"
            )
    checks.add("balance = opening + credits - accepted totals + refunds", len(audit), bad)

    bad = []
    for b in bulks:
        rid = b["rid"]
        original = requests.get(rid)
        if (
            b["n"] != b["transfer_count"]
            or b["sum_cents"] != b["total_cents"]
            or b["foreign_account"]
            or b["rids"] != 1
        ):
            bad.append(f"bulk {b['id']}: {b['n']}/{b['transfer_count']} transfers, {b['sum_cents']}/{b['total_cents']}")
        elif original is None or (original.account_id, original.transfer_count, original.total_cents) != (
            b["bank_account_id"],
            b["transfer_count"],
            b["total_cents"],
        ):
            bad.append(f"bulk {b['id']} (request {rid}) is not what the client sent")
    checks.add("every bulk transfer complete, as sent (no partial request)", len(bulks), bad)
    checks.add("no transfer without its bulk transfer", 1, [f"{orphans} orphan transfers"] if orphans else [])

    per_payload = defaultdict(list)
    per_key = defaultdict(list)
    per_rid = defaultdict(list)
    for b in bulks:
        per_rid[b["rid"]].append(b["id"])
        if b["idempotency_key"] is None:
            per_payload[(b["bank_account_id"], bytes(b["payload_hash"]))].append(b["id"])
        else:
            per_key[(b["bank_account_id"], b["idempotency_key"])].append(b["id"])
    checks.add(
        "each payload without a key accepted at most once",
        len(per_payload),
        [f"bulks {ids}" for ids in per_payload.values() if len(ids) > 1],
    )
    checks.add(
        "each Idempotency-Key executed at most once",
        len(per_key),
        [f"key {k}: bulks {ids}" for k, ids in per_key.items() if len(ids) > 1],
    )
    checks.add(
        "each request executed at most once (by its rid)",
        len(per_rid),
        [f"request {rid}: bulks {ids}" for rid, ids in per_rid.items() if len(ids) > 1],
    )
    bad = []
    for k in keys:
        if k["status"] is None:
            bad.append(f"key {k['idempotency_key']}: claimed but no outcome stored")
        elif k["status"] == 201 and (
            k["bulk_key"] != k["idempotency_key"] or k["bulk_account"] != k["bank_account_id"]
        ):
            bad.append(f"key {k['idempotency_key']}: stored 201 does not point at its own bulk transfer")
        elif k["status"] != 201 and k["bulk_transfer_id"] is not None:
            bad.append(f"key {k['idempotency_key']}: stored {k['status']} but names a bulk transfer")
    checks.add("idempotency records complete and pointing at their own bulk", len(keys), bad)

    bulk_by_id = {b["id"]: b for b in bulks}
    told_accepted: dict[str, set[int]] = defaultdict(set)
    bad = []
    received = 0
    for request in sent:
        for status, bulk_id in zip(request.statuses, request.bulk_ids, strict=True):
            if status in (201, 409) and bulk_id is not None:
                told_accepted[request.rid].add(bulk_id)
            if status not in (201, 409) or bulk_id is None:
                continue
            received += 1
            original = requests[request.rid]
            b = bulk_by_id.get(bulk_id)
            if b is None:
                bad.append(f"request {request.rid}: {status} naming bulk {bulk_id}, not in the database")
            elif (b["bank_account_id"], b["transfer_count"], b["total_cents"], b["rid"]) != (
                original.account_id,
                original.transfer_count,
                original.total_cents,
                original.rid,
            ) or b["n"] != b["transfer_count"]:
                bad.append(f"request {request.rid}: {status} naming bulk {bulk_id}, which holds something else")
    checks.add(
        "every 201 (and 409 duplicate) a client received names its request, whole in the database", received, bad
    )
    checks.add(
        "clients were told one bulk transfer id per request",
        len(told_accepted),
        [f"{rid}: {ids}" for rid, ids in told_accepted.items() if len(ids) > 1],
    )

    # What the database holds versus what the clients know.
    in_db = set(per_rid)
    unknown = {r.rid for r in sent if r.gave_up}
    rejected = {r.rid for r in sent if r.final_status is not None and r.final_status not in (201, 409)}
    bad = [
        f"request {rid} is in the database but a client was told no"
        for rid in sorted(in_db - set(told_accepted))
        if rid in rejected and rid not in unknown
    ]
    if everyone_answered:
        bad += [
            f"request {rid} is in the database, no client was told"
            for rid in sorted(in_db - set(told_accepted))
            if rid not in rejected and rid not in unknown
        ]
    checks.add("nothing in the database that a client was refused", len(in_db), bad)
    never = {rid for rid, r in requests.items() if r.kind in ("invalid", "short", "key_reuse")}
    checks.add(
        "rejected requests (invalid, short of funds, key reused) wrote nothing",
        len(never),
        sorted(never & set(transfers_by_rid)),
    )
    if not everyone_answered:
        bad = []
        for rid in sorted(unknown - set(told_accepted)):
            n, nbulks = transfers_by_rid.get(rid, (0, 0))
            if n not in (0, requests[rid].transfer_count) or nbulks > 1:
                bad.append(f"request {rid}: {n} of {requests[rid].transfer_count} transfers in {nbulks} bulks")
        checks.add("every request a client gave up on is fully in or fully absent", len(unknown), bad)


def check_answers(checks: Checks, sent: list[Request], stats, *, everyone_answered: bool) -> None:
    """What the clients got back: never a 5xx but 503 (with Retry-After), and the answers the contract gives."""
    server_errors = [s for s in stats.statuses if s >= 500 and s != 503]
    checks.add(
        "no 5xx answer other than 503", stats.http_requests, [f"{stats.statuses[s]} x HTTP {s}" for s in server_errors]
    )
    checks.add(
        "every 503 carries Retry-After",
        stats.statuses[503],
        [f"{stats.missing_retry_after} without"] if stats.missing_retry_after else [],
    )
    bad = []
    first_by_rid: dict[str, Request] = {}
    for request in sent:
        if request.kind in ("key_retry", "key_race", "keyed", "forgetful", "valid", "short", "invalid", "key_reuse"):
            first_by_rid.setdefault(request.rid, request)
    for request in sent:
        if request.final_status is None:
            continue
        final = (request.final_status, request.final_code)
        if request.kind in ("key_retry_again", "key_race_twin"):
            first = first_by_rid.get(request.rid)
            if first is None or first.final_status is None:
                continue
            if final == (401, "unauthorized") and final in request.expect:
                continue  # its API key was revoked between the two sends: refused before the key is looked at
            same = (first.final_status, first.answer_ids()) == (request.final_status, request.answer_ids())
            if not same:
                bad.append(
                    f"{request.rid} ({request.kind}): {final} {request.answer_ids()} but the first got "
                    f"{first.final_status} {first.answer_ids()}"
                )
            elif request.final_status not in (201, 422):
                pass  # an answer given before the key is claimed (a revoked API key's 401) is not stored
            elif request.kind == "key_retry_again" and not request.replayed[-1]:
                bad.append(f"{request.rid}: a retry with the same key was not marked Idempotent-Replayed")
            elif request.kind == "key_race_twin" and not (request.replayed[-1] or first.replayed[-1]):
                bad.append(f"{request.rid}: two concurrent sends of one key, neither marked replayed")
            continue
        allowed = set(request.expect)
        if request.key is None and len(request.statuses) > 1:
            allowed.add((409, "duplicate_request"))  # an earlier attempt went through, its answer was lost
        if final not in allowed and (request.final_status, None) not in allowed:
            bad.append(
                f"{request.rid} ({request.kind}): got {final}, expected one of {sorted(request.expect, key=str)}"
            )
    answered = [r for r in sent if r.final_status is not None]
    checks.add("answers as the contract says (status, code, replays)", len(answered), bad)
    if everyone_answered:
        checks.add("every request got an answer", len(sent), [r.rid for r in sent if r.gave_up])
