"""Where the CPU went during a case, from /proc: the service's processes, this run's PostgreSQL backends,
PostgreSQL's shared helpers (WAL writer, checkpointer...), the load generator, and everything else on the
machine (other people's work included, so a noisy case shows as such)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, or None when it is gone."""
    try:
        text = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def process_cpu_seconds(pid: str) -> float | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _cmdline(pid: str) -> str:
    try:
        return (PROC / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle, all cores together, since boot."""
    values = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def snapshot(service_pids: set[int], client_pids: set[int], database: str) -> dict[str, dict[int, float]]:
    """CPU seconds per process, grouped: service, client, pg (this database's backends), pg_shared."""
    groups: dict[str, dict[int, float]] = {"service": {}, "client": {}, "pg": {}, "pg_shared": {}}
    marker = f" {database} "
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in service_pids or pid in client_pids:
            stat = _stat(entry.name)
            if stat is not None:
                groups["service" if pid in service_pids else "client"][pid] = stat[1]
            continue
        cmdline = _cmdline(entry.name)
        if not cmdline.startswith("postgres"):
            continue
        stat = _stat(entry.name)
        if stat is None:
            continue
        if marker in cmdline:
            groups["pg"][pid] = stat[1]
        elif "(" not in cmdline and "[local]" not in cmdline:  # no client address: a shared helper process
            groups["pg_shared"][pid] = stat[1]
    groups["machine"] = {0: machine_busy_seconds()}
    return groups


def cores_used(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Average cores each group used between two snapshots; 'other' is the rest of the machine's busy time."""
    used = {}
    for group, processes in after.items():
        total = 0.0
        for pid, cpu in processes.items():
            total += cpu - before[group].get(pid, 0.0)  # a process born in the window counts whole
        used[group] = total / seconds
    machine = used.pop("machine")
    used["other"] = max(0.0, machine - sum(used.values()))
    return {group: round(value, 3) for group, value in used.items()}


def machine_description() -> dict:
    model = ""
    for line in (PROC / "cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kib = int((PROC / "meminfo").read_text().split()[1])
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
