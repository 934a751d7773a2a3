"""The service under test, started as `python -m service serve` with its own workers, and py-spy on them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from .http import Connection
from .payloads import health_request
from .system import children_of

ROOT = Path(__file__).resolve().parent.parent


class Server:
    def __init__(self, url: str, host: str, port: int, workers: int, pool_max_size: int, log_path: Path) -> None:
        self.url = url
        self.host = host
        self.port = port
        self.workers = workers
        self.pool_max_size = pool_max_size
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": self.url,
            "BPS_HOST": self.host,
            "BPS_PORT": str(self.port),
            "BPS_WORKERS": str(self.workers),
            "BPS_POOL_MAX_SIZE": str(self.pool_max_size),
            # Every connection is opened at start, not during the first case.
            "BPS_POOL_MIN_SIZE": str(self.pool_max_size),
            "BPS_ACCESS_LOG": "0",
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    async def wait_ready(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        request = health_request(self.host, self.port)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}; see {self.log_path}")
            connection = Connection(self.host, self.port)
            try:
                status, _ = await connection.request(request)
                if status == 200 and len(self.worker_pids()) >= self.workers:
                    return
            except OSError:
                pass
            finally:
                connection.close()
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the service did not answer /health within {within}s; see {self.log_path}")

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the workers, or the parent itself when it is the only one."""
        if self.workers <= 1:
            return [self.process.pid]
        return children_of(self.process.pid)

    def all_pids(self) -> set[int]:
        return {self.process.pid, *children_of(self.process.pid)}

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            for pid in children_of(self.process.pid):
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy record on each worker for one case window: raw collapsed stacks with native frames (so time
    inside uvloop, asyncpg's and aiohttp's C code and the kernel's socket calls is named), busy samples only."""

    RATE = 100

    def __init__(self, out_dir: Path) -> None:
        self.binary = py_spy()
        self.out_dir = out_dir
        self.running: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, pids: list[int], seconds: float) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for pid in pids:
            path = self.out_dir / f"{name}.{pid}.txt"
            command = [self.binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
            command += ["--rate", str(self.RATE), "--native", "--format", "raw", "-o", str(path)]
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.running.append((process, path))

    def finish(self, top: int = 15) -> dict:
        """Waits for the recorders; returns the busiest functions (self and inclusive) and packages."""
        stacks: Counter = Counter()
        for process, path in self.running:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            if path.exists():
                for line in path.read_text().splitlines():
                    stack, _, count = line.rpartition(" ")
                    if stack:
                        stacks[stack] += int(count)
        self.running = []
        return summarize(stacks, top)


def _frame_name(frame: str) -> str:
    """'handler (/x/service/app.py:12)' -> 'handler (service/app.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", f"{ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def _package(frame: str) -> str:
    path = _frame_name(frame).rsplit(" (", 1)[1].rstrip(")")
    return path.split("/", 1)[0].removesuffix(".py")


# Native leaf frames where a thread waits rather than works: py-spy --native counts them as active.
IDLE_LEAVES = ("epoll_wait ", "epoll_pwait ", "poll ", "select ", "pthread_cond_wait", "pthread_cond_timedwait")


def summarize(stacks: Counter, top: int) -> dict:
    """Shares of the busy samples: by function (self, and inclusive below the process's own scaffolding)
    and by package or C file of the leaf frame."""
    stacks = Counter({s: n for s, n in stacks.items() if not s.rsplit(";", 1)[-1].startswith(IDLE_LEAVES)})
    total = sum(stacks.values())
    own: Counter = Counter()
    inclusive: Counter = Counter()
    packages: Counter = Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        own[_frame_name(frames[-1])] += count
        packages[_package(frames[-1])] += count
        for name in {_frame_name(frame) for frame in frames}:
            inclusive[name] += count

    def shares(counter: Counter) -> list[list]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    inclusive = Counter({name: n for name, n in inclusive.items() if n < 0.9 * total})

    return {
        "samples": total,
        "busy_seconds": round(total / Profiler.RATE, 2),
        "self_percent": shares(own),
        "inclusive_percent": shares(inclusive),
        "self_by_package_percent": shares(packages),
    }
