"""The pure parts of the high-availability run: what the clients saw and when, what each fault cost, whether
the Patroni cluster is whole again, and the figures of the report. No process, no network: unit-tested in
tests/ha/test_timeline.py."""

from __future__ import annotations

import statistics
import string
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"

# The kinds of fault, in the report's order, and what each one does.
FAULT_KINDS = {
    "node": "kill -9 of the primary node (its Patroni and its postgres together)",
    "patroni": "kill -9 of the primary's Patroni alone (its postgres keeps running)",
    "switchover": "planned patronictl switchover to the sync standby",
    "etcd": "kill -9 of one etcd member, restarted",
}


@dataclass(frozen=True)
class Attempt:
    """One HTTP attempt of a client: when it was sent, when its answer (or its failure) came, its status
    (0: no answer: connection refused or reset, timeout)."""

    sent: float
    answered: float
    status: int
    code: str | None = None  # the problem's code ("service_unavailable": BPS's own 503, sent with Retry-After)

    @property
    def retry_after(self) -> bool:
        """A 503 of BPS itself (it always sends Retry-After; Stats counts the header itself, exactly), or
        HAProxy's own (templates/503.http, code no_service_instance, with Retry-After too); any other 503 came
        without it."""
        return self.status == 503 and self.code in ("service_unavailable", "no_service_instance")


@dataclass
class Fault:
    kind: str
    victim: str
    injected: float  # time.monotonic() of the kill (or of the switchover command)
    leader_before: str | None = None
    leader_after: str | None = None
    new_leader_seconds: float | None = None  # from the kill to a new leader in the DCS
    # From the kill to the 201 that ended the longest stall of accepted requests after it: the recovery.
    recovery_seconds: float | None = None
    stall_seconds: float | None = None  # that stall's length (no 201 at all meanwhile)
    first_201_seconds: float | None = None  # from the kill to the first 201 of a request sent after it
    restored_seconds: float | None = None  # from the kill to the whole cluster healthy again
    notes: list[str] = field(default_factory=list)
    window: dict = field(default_factory=dict)  # what the clients got from the kill to the recovery


def first_accepted_after(attempts: list[Attempt], t0: float) -> float | None:
    """Seconds from `t0` to the first 201 answer of an attempt sent at or after `t0` (an answer to a request
    sent before the fault may have been committed before it: it proves nothing about the recovery)."""
    answered = [a.answered for a in attempts if a.status == 201 and a.sent >= t0]
    return min(answered) - t0 if answered else None


def write_stall(attempts: list[Attempt], t0: float, end: float) -> tuple[float, float] | None:
    """The longest stretch without a 201 answer from `t0` (the kill) to `end` (the cluster whole again):
    (seconds from t0 to the 201 that ended it, its length); None when no 201 came at all.

    The recovery of a fault is when accepted requests came back after it. Not simply the first 201 after the
    kill: when Patroni alone dies its primary stays writable until HAProxy closes its sessions (about 1 s),
    then nothing is accepted until a replica is promoted; a switchover first lets commits in flight finish."""
    times = sorted(a.answered for a in attempts if a.status == 201 and t0 <= a.answered <= end)
    if not times:
        return None
    best_start, best_end = t0, times[0]
    for before, after in zip(times, times[1:], strict=False):
        if after - before > best_end - best_start:
            best_start, best_end = before, after
    return best_end - t0, best_end - best_start


def recovery(attempts: list[Attempt], t0: float, end: float, min_stall: float = 1.0) -> tuple[float, float] | None:
    """(recovery seconds, stall seconds) of a fault killed at `t0`, the cluster whole again at `end`: the end of
    the longest stall of 201s (write_stall), or, when no stall reached `min_stall` seconds (the clients never
    noticed: an etcd member lost), the first 201 of a request sent after the kill."""
    stall = write_stall(attempts, t0, end)
    if stall is None:
        return None
    if stall[1] < min_stall:
        first = first_accepted_after(attempts, t0)
        return (first if first is not None else stall[0]), stall[1]
    return stall


def window_counts(attempts: list[Attempt], start: float, end: float) -> dict[str, int]:
    """What the attempts answered within [start, end]: 201s, 503s (with and without Retry-After), no answers,
    other 5xx, everything else."""
    counts = {"attempts": 0, "201": 0, "503": 0, "503 without Retry-After": 0, "no answer": 0, "other 5xx": 0}
    for a in attempts:
        if not start <= a.answered <= end:
            continue
        counts["attempts"] += 1
        if a.status == 201:
            counts["201"] += 1
        elif a.status == 503:
            counts["503"] += 1
            if not a.retry_after:
                counts["503 without Retry-After"] += 1
        elif a.status == 0:
            counts["no answer"] += 1
        elif a.status >= 500:
            counts["other 5xx"] += 1
    return counts


def server_errors(attempts: list[Attempt], faults: list[Fault], settle: float = 5.0) -> list[str]:
    """Every 5xx other than a 503 with Retry-After, each placed relative to the fault before it (a defect of
    BPS under failover shows here with its time and code)."""
    found = []
    ordered = sorted(faults, key=lambda f: f.injected)
    for a in attempts:
        if a.status < 500 or (a.status == 503 and a.retry_after):
            continue
        before = [f for f in ordered if f.injected <= a.answered]
        where = "before any fault"
        if before:
            f = before[-1]
            end = f.injected + (f.recovery_seconds or 0) + settle
            where = f"{a.answered - f.injected:.2f}s after the {f.kind} fault on {f.victim}" + (
                "" if a.answered <= end else " (after its recovery)"
            )
        found.append(f"HTTP {a.status} {a.code or ''} ({'with' if a.retry_after else 'without'} Retry-After), {where}")
    return found


def cluster_health(cluster: dict | None, members: int, max_lag: int = 1 << 20) -> tuple[bool, str]:
    """Whether Patroni's GET /cluster shows the whole cluster: `members` members, all running, one leader, a
    sync standby, every replica within `max_lag` bytes. Returns (healthy, why not)."""
    if not cluster:
        return False, "no Patroni answered GET /cluster"
    listed = cluster.get("members", [])
    if len(listed) != members:
        return False, f"{len(listed)} of {members} members"
    leaders = [m["name"] for m in listed if m.get("role") == "leader"]
    if len(leaders) != 1:
        return False, f"leaders {leaders}"
    not_running = [m["name"] for m in listed if m.get("state") != "running"]
    if not_running:
        return False, f"not running: {not_running}"
    if not any(m.get("role") == "sync_standby" for m in listed):
        return False, "no sync standby"
    for m in listed:
        if m.get("role") == "leader":
            continue
        lag = m.get("lag")
        if not isinstance(lag, int) or lag > max_lag:
            return False, f"{m['name']} lag {lag}"
    return True, ""


def leader_of(cluster: dict | None) -> str | None:
    for m in (cluster or {}).get("members", []):
        if m.get("role") == "leader" and m.get("state") == "running":
            return m["name"]
    return None


def sync_standby_of(cluster: dict | None) -> str | None:
    for m in (cluster or {}).get("members", []):
        if m.get("role") == "sync_standby" and m.get("state") == "running":
            return m["name"]
    return None


def render(template: str, **values) -> str:
    """A config template of templates/ with its $names filled in; a name left unfilled is an error."""
    return string.Template((TEMPLATES / template).read_text()).substitute(values)


def spread(values: list[float]) -> str:
    """'median m / max x' of some seconds ('-' when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {max(values):.1f}"


def fault_table(faults: list[Fault]) -> list[list[str]]:
    """The per-fault rows of the report."""
    rows = [["#", "fault", "victim", "leader before -> after", "new leader s", "recovered s", "stall s",
             "first 201 s", "whole again s", "503", "no answer", "other 5xx"]]  # fmt: skip
    for i, f in enumerate(faults, 1):

        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        rows.append(
            [
                str(i),
                f.kind,
                f.victim,
                f"{f.leader_before} -> {f.leader_after}",
                seconds(f.new_leader_seconds),
                seconds(f.recovery_seconds),
                seconds(f.stall_seconds),
                seconds(f.first_201_seconds),
                seconds(f.restored_seconds),
                str(f.window.get("503", 0)),
                str(f.window.get("no answer", 0)),
                str(f.window.get("other 5xx", 0)),
            ]
        )
    return rows


def summary_table(faults: list[Fault]) -> list[list[str]]:
    """Per kind of fault: how many, and the recovery seconds (kill to the next accepted request)."""
    rows = [["fault kind", "injected", "recovered", "recovery s median / max", "stall s median / max",
             "new leader s median / max"]]  # fmt: skip
    for kind in [*FAULT_KINDS, "all"]:
        mine = [f for f in faults if kind in ("all", f.kind)]
        if not mine:
            continue
        rows.append(
            [
                kind,
                str(len(mine)),
                str(sum(f.recovery_seconds is not None for f in mine)),
                spread([f.recovery_seconds for f in mine]),
                spread([f.stall_seconds for f in mine]),
                spread([f.new_leader_seconds for f in mine]),
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(rows[0], widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows[1:]:
        lines.append(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def plan(rng, counts: dict[str, int]) -> list[str]:
    """The order of the faults: every kind `counts` times, never the same kind twice in a row when that can be
    avoided (each fault then starts from another situation): the kind with the most left goes next, ties
    broken at random."""
    left = {k: n for k, n in counts.items() if n > 0}
    ordered: list[str] = []
    while left:
        choices = [k for k in left if not ordered or k != ordered[-1]] or list(left)
        most = max(left[k] for k in choices)
        pick = rng.choice(sorted(k for k in choices if left[k] == most))
        ordered.append(pick)
        left[pick] -= 1
        if not left[pick]:
            del left[pick]
    return ordered
