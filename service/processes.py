"""A BPS command as a child process: what `run` starts beside the service (the simulated rail, an executor),
and what the tests, the benchmark and the reliability harness start, kill with SIGKILL and restart."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .db import ROOT

# The commands that listen, and the variable that names their port.
PORT_VARIABLES = {"serve": "BPS_PORT", "rail-simulator": "BPS_RAIL_PORT"}
POLL_SECONDS = 0.05  # between two looks at a starting process


class Process:
    """`python -m service <command>` in a process group of its own (a service's workers die with it).

    Its output goes to `log` (a file, appended to), or is kept line by line in `output` (`capture`), or
    is the parent's. start() returns once a listening command answers GET /health (and a service with
    BPS_WORKERS > 1 has all its workers); an executor is started and left to run."""

    def __init__(
        self,
        command: str,
        env: dict[str, str] | None = None,
        *,
        port: int | None = None,
        log: Path | None = None,
        capture: bool = False,
    ) -> None:
        self.command = command
        self.env = dict(env or {})
        self.port = port
        if command == "serve":
            self.env.setdefault("BPS_WORKERS", "1")
        if port is not None:
            self.env[PORT_VARIABLES[command]] = str(port)
        self.log = log
        self.capture = capture
        self.process: subprocess.Popen | None = None
        self.output: list[str] = []
        self.starts = 0
        self.kills = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def workers(self) -> int:
        return int(self.env["BPS_WORKERS"]) if self.command == "serve" else 1

    def start(self, wait: bool = True, timeout: float = 60) -> Process:
        env = {**os.environ, **self.env}
        log = self.log.open("ab") if self.log is not None else None
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", self.command],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.capture else log,
                stderr=subprocess.STDOUT if self.capture or log is not None else None,
                text=self.capture,
                start_new_session=True,
            )
        finally:
            if log is not None:
                log.close()
        if self.capture:
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=self._keep_output, args=(self.process, lines), daemon=True).start()
        self.starts += 1
        if wait and self.port is not None:
            self.wait_ready(timeout)
        return self

    def _keep_output(self, process: subprocess.Popen, lines: queue.Queue) -> None:
        for line in process.stdout:
            self.output.append(line)

    def wait_ready(self, timeout: float = 60, healthy: bool = True) -> float:
        """Polls GET /health until it answers 200 (any answer when not `healthy`, as while the database is
        down) and every worker is up; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() < started + timeout:
            if not self.alive():
                raise RuntimeError(f"{self.command} on port {self.port} exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    answered = True
            except urllib.error.HTTPError:
                answered = not healthy
            except OSError:
                answered = False
            if answered and len(self.worker_pids()) >= self.workers:
                return time.monotonic() - started
            time.sleep(POLL_SECONDS)
        raise TimeoutError(f"{self.command} on port {self.port} did not answer /health within {timeout:.0f} s")

    async def ready(self, within: float = 60, healthy: bool = True) -> float:
        """wait_ready() for asyncio code, in a thread so the event loop goes on."""
        return await asyncio.to_thread(self.wait_ready, within, healthy)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        """The process and the rest of its group (a service's workers)."""
        if self.process is None:
            return []
        return [self.process.pid, *(pid for pid in group_of(self.process.pid) if pid != self.process.pid)]

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: a service's workers, or the process itself when it is the one."""
        return self.pids()[1:] if self.workers > 1 else self.pids()[:1]

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def kill9(self) -> None:
        """SIGKILL to the whole group, without warning; waits (bounded) until it is gone."""
        if self.process is None:
            return
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.kills += 1

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (requests in flight finish), then SIGKILL after `timeout`."""
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(timeout=15)


def group_of(pgid: int) -> list[int]:
    """The processes of a process group."""
    return processes_with(STAT_PGRP, pgid)


STAT_PPID, STAT_PGRP = 1, 2  # fields of /proc/<pid>/stat after the command's name


def processes_with(field: int, value: int) -> list[int]:
    """The processes whose /proc/<pid>/stat `field` (STAT_PPID, STAT_PGRP) is `value`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[field]) == value:
                found.append(int(entry.name))
    return found
