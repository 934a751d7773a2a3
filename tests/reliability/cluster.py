"""A throwaway PostgreSQL cluster in a temporary directory, on a port of its own, that may be killed freely."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path(os.environ.get("BPS_REL_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its binaries as the `postgres` OS user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError as error:
        raise RuntimeError("running as root needs a `postgres` OS user to run PostgreSQL as") from error
    return ["runuser", "-u", "postgres", "--"]


class Cluster:
    """initdb in a temporary directory; start, stop (immediate or fast), and URLs of its databases."""

    def __init__(
        self, port: int | None = None, fsync: bool = True, host_auth: str = "trust", settings: dict | None = None
    ) -> None:
        """`host_auth`: how roles other than postgres log in over loopback (postgres is always trusted);
        `settings`: more postgresql.conf lines."""
        self.port = port or free_port()
        self.fsync = fsync
        self.host_auth = host_auth
        self.extra_settings = settings or {}
        self.root = Path(tempfile.mkdtemp(prefix="bps-reliability-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.prefix = _run_as()
        if self.prefix:
            shutil.chown(self.root, user="postgres")
        self.stops = 0

    def _pg(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=timeout, check=True, cwd=self.root
        )

    def init(self) -> None:
        self._pg(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "300",
            "shared_buffers": "'256MB'",
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on",
            "log_min_messages": "warning",
            "log_connections": "off",
            **self.extra_settings,
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# bps reliability harness\n")
            for name, value in settings.items():
                conf.write(f"{name} = {value}\n")
        (self.data / "pg_hba.conf").write_text(
            f"local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 {self.host_auth}\n"
        )

    def start(self) -> None:
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.stops += 1

    def is_running(self) -> bool:
        result = subprocess.run(
            [*self.prefix, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.root,
        )
        return result.returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def wait_accepting(self) -> None:
        """Checks the server accepts connections. `pg_ctl start -w` has already waited for exactly that, so
        one pg_isready is the check, not a polling loop."""
        result = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q", "-t", "10"], timeout=15
        )
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL on port {self.port} does not accept connections after pg_ctl start -w")

    def destroy(self) -> None:
        try:
            if self.data.exists() and self.is_running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        self.init()
        self.start()
        self.wait_accepting()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()
