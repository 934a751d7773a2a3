"""BPS processes the harness starts, kills with SIGKILL and restarts: the HTTP service (`python -m service
serve`), executors (`... execute`) and the simulated rail (`... rail-simulator`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


class Service:
    """One `serve` command on its own port (itself BPS_WORKERS processes sharing that port), or with `command`
    another of the CLI's: an executor (no port) or the simulated rail (BPS_RAIL_PORT = port)."""

    def __init__(
        self, database_url: str, port: int, workers: int, log_path: Path, command: str = "serve", **env: str
    ) -> None:
        self.database_url = database_url
        self.port = port
        self.workers = workers
        self.log_path = log_path
        self.command = command
        self.extra_env = env
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "BPS_HOST": "127.0.0.1",
            "BPS_PORT": str(self.port),
            "BPS_WORKERS": str(self.workers),
            "BPS_SHUTDOWN_TIMEOUT": "2",
            "BPS_RAIL_PORT": str(self.port),
            **self.extra_env,
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", self.command],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the workers are killed with it
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        """The serve process and, with BPS_WORKERS > 1, its worker processes."""
        if self.process is None:
            return []
        pids = [self.process.pid]
        try:
            out = subprocess.run(
                ["pgrep", "-g", str(self.process.pid)], capture_output=True, text=True, timeout=5
            ).stdout
            pids += [int(p) for p in out.split() if int(p) != self.process.pid]
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        return pids

    def kill9(self) -> None:
        """SIGKILL to the whole process group, without warning; waits (bounded) until it is gone."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.kills += 1

    def stop(self) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        except ProcessLookupError:
            pass

    async def wait_listening(self, session: aiohttp.ClientSession, within: float = 30, healthy: bool = True) -> float:
        """Polls GET /health until it answers (200 when `healthy`, any answer otherwise); returns seconds waited."""
        start = time.monotonic()
        deadline = start + within
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"service on port {self.port} exited with {self.process.returncode}")
            try:
                async with session.get(self.base_url + "/health", timeout=aiohttp.ClientTimeout(total=3)) as response:
                    await response.read()
                    if response.status == 200 or not healthy:
                        return time.monotonic() - start
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.05)
        raise TimeoutError(f"service on port {self.port} not {'healthy' if healthy else 'listening'} in {within}s")
