"""The pure parts of the high-availability run (tests/ha/timeline.py): no cluster needed."""

from __future__ import annotations

import random

import pytest

from .timeline import (
    TEMPLATES,
    Attempt,
    Fault,
    cluster_health,
    fault_table,
    first_accepted_after,
    leader_of,
    plan,
    recovery,
    render,
    server_errors,
    summary_table,
    sync_standby_of,
    window_counts,
    write_stall,
)


def a(sent: float, status: int, answered: float | None = None, code: str | None = None) -> Attempt:
    return Attempt(sent, sent + 0.01 if answered is None else answered, status, code)


def member(name: str, role: str, state: str = "running", lag: int | str | None = 0) -> dict:
    m = {"name": name, "role": role, "state": state}
    if role != "leader":
        m["lag"] = lag
    return m


def test_first_accepted_after_ignores_requests_sent_before_the_kill():
    attempts = [a(9.0, 201, answered=10.5), a(10.2, 503), a(10.3, 0), a(12.0, 201), a(13.0, 201)]
    assert first_accepted_after(attempts, 10.0) == pytest.approx(2.01)
    assert first_accepted_after([a(9.0, 201, answered=11)], 10.0) is None


def test_write_stall_is_the_longest_gap_between_201s_after_the_kill():
    # Writable for 1 s after the kill (Patroni alone died), then 9 s of nothing, then accepted again.
    attempts = [a(t, 201) for t in (10.2, 10.5, 11.0)] + [a(t, 503) for t in (11.5, 15, 19)]
    attempts += [a(t, 201) for t in (20.0, 20.1, 20.2)]
    assert write_stall(attempts, 10.0, 30.0) == pytest.approx((10.01, 9.0))
    # A node killed: nothing from the kill on.
    assert write_stall([a(14.0, 201)], 10.0, 30.0) == pytest.approx((4.01, 4.01))
    assert write_stall([a(5.0, 201)], 10.0, 30.0) is None


def test_recovery_without_a_stall_is_the_first_201():
    steady = [a(10.0 + i * 0.05, 201) for i in range(200)]
    rec, stall = recovery(steady, 10.0, 20.0)
    assert rec == pytest.approx(0.01) and stall < 1.0
    rec, stall = recovery([*steady[:20], *(a(t, 201) for t in (15.0, 15.1))], 10.0, 20.0)
    assert rec == pytest.approx(5.01) and stall == pytest.approx(15.01 - 10.96)


def test_window_counts_and_server_errors_place_each_5xx_after_its_fault():
    fault = Fault("node", "pg1", 10.0, recovery_seconds=5.0)
    attempts = [
        a(10.1, 503, code="service_unavailable"),
        a(10.2, 503, code="<not json>"),
        a(10.3, 0),
        a(11.0, 500, code="internal_error"),
        a(14.0, 201),
        a(40.0, 500, code="internal_error"),
    ]
    counts = window_counts(attempts, 10.0, 15.0)
    assert counts == {"attempts": 5, "201": 1, "503": 2, "503 without Retry-After": 1, "no answer": 1, "other 5xx": 1}
    errors = server_errors(attempts, [fault])
    assert len(errors) == 3
    assert "without Retry-After" in errors[0] and "node fault on pg1" in errors[0]
    assert errors[1].startswith("HTTP 500 internal_error") and "(after its recovery)" not in errors[1]
    assert "(after its recovery)" in errors[2]
    assert server_errors([a(1.0, 500)], [fault]) == ["HTTP 500  (without Retry-After), before any fault"]


def test_cluster_health():
    whole = {"members": [member("pg1", "leader"), member("pg2", "sync_standby"), member("pg3", "replica", lag=5)]}
    assert cluster_health(whole, 3) == (True, "")
    assert leader_of(whole) == "pg1" and sync_standby_of(whole) == "pg2"
    assert cluster_health(None, 3)[0] is False
    assert cluster_health({"members": whole["members"][:2]}, 3) == (False, "2 of 3 members")
    no_sync = {"members": [member("pg1", "leader"), member("pg2", "replica"), member("pg3", "replica")]}
    assert cluster_health(no_sync, 3) == (False, "no sync standby")
    starting = {
        "members": [member("pg1", "leader"), member("pg2", "sync_standby"), member("pg3", "replica", "starting")]
    }
    assert cluster_health(starting, 3) == (False, "not running: ['pg3']")
    lagging = {
        "members": [member("pg1", "leader"), member("pg2", "sync_standby"), member("pg3", "replica", lag="unknown")]
    }
    assert cluster_health(lagging, 3)[0] is False
    two_leaders = {"members": [member("pg1", "leader"), member("pg2", "leader"), member("pg3", "sync_standby")]}
    assert cluster_health(two_leaders, 3)[0] is False
    assert leader_of({"members": [member("pg1", "leader", state="stopped")]}) is None


def test_plan_has_every_fault_and_spreads_the_kinds():
    counts = {"node": 5, "patroni": 3, "switchover": 2, "etcd": 1}
    for seed in range(50):
        order = plan(random.Random(seed), counts)
        assert sorted(order) == sorted(k for k, n in counts.items() for _ in range(n))
        repeats = sum(x == y for x, y in zip(order, order[1:], strict=False))
        assert repeats == 0
    assert plan(random.Random(1), {"node": 3, "etcd": 1}) == ["node", "etcd", "node", "node"]


def test_templates_render_completely():
    values = dict(
        name="pg1", rest_port=1, etcd_hosts="127.0.0.1:2", pg_port=3, data_dir="/d", bin_dir="/b", home="/h",
        superuser_password="s", replication_password="r", fsync="on",
    )  # fmt: skip
    patroni = render("patroni.yml", **values)
    assert "synchronous_mode_strict: true" in patroni and "$" not in patroni
    etcd = render("etcd.yml", name="e", data_dir="/d", client_port=1, peer_port=2, initial_cluster="e=x", token="t")
    assert "enable-grpc-gateway: true" in etcd and "$" not in etcd
    haproxy = render("haproxy.cfg", pg_front_port=1, http_front_port=2, pg_servers="", http_servers="", errorfile="/e")
    assert "http-check expect rstatus ^(200|503)$\n" in haproxy and "on-marked-down shutdown-sessions" in haproxy
    assert "GET /primary" in haproxy
    with pytest.raises(KeyError):
        render("haproxy.cfg", pg_front_port=1)
    # HAProxy's own 503 is an HTTP response with Retry-After, CRLF-separated.
    raw = (TEMPLATES / "503.http").read_bytes()
    assert raw.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in raw and b"\r\n\r\n{" in raw


def test_tables():
    faults = [
        Fault("node", "pg1", 0.0, "pg1", "pg2", 9.0, 13.0, 12.9, 0.5, 30.0),
        Fault("node", "pg2", 0.0, "pg2", "pg3", 10.0, 15.0, 14.9, 0.4, 31.0),
        Fault("etcd", "etcd1", 0.0, "pg3", "pg3", None, 0.1, 0.05, 0.1, 6.0),
    ]
    rows = fault_table(faults)
    assert len(rows) == 4 and rows[1][1] == "node" and rows[3][4] == "-"
    summary = {r[0]: r for r in summary_table(faults)}
    assert summary["node"][1:4] == ["2", "2", "14.0 / 15.0"]
    assert summary["all"][1] == "3" and "switchover" not in summary
