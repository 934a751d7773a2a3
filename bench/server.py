"""The service under test (`python -m service serve` with its own workers), and py-spy on them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from service.processes import Process

ROOT = Path(__file__).resolve().parent.parent


def service(url: str, host: str, port: int, workers: int, pool_max_size: int, log_path: Path) -> Process:
    """The service under test: every pool connection opened at start (not during the first case), no access log."""
    return Process(
        "serve",
        {
            "DATABASE_URL": url,
            "BPS_HOST": host,
            "BPS_WORKERS": str(workers),
            "BPS_POOL_MAX_SIZE": str(pool_max_size),
            "BPS_POOL_MIN_SIZE": str(pool_max_size),
            "BPS_ACCESS_LOG": "0",
        },
        port=port,
        log=log_path,
    )


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
