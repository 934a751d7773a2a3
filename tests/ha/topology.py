"""The throwaway high-availability cluster, on loopback only, in one temporary directory: 3 etcd members,
3 PostgreSQL 15 nodes managed by Patroni (as the postgres OS user), HAProxy in front of them (TCP, to the
primary) and of the BPS services (HTTP). Every process is started here, in a session of its own, and
destroy() ends them all and removes the directory."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from service.processes import STAT_PPID, processes_with

from .timeline import cluster_health, leader_of, render

PG_BIN = Path(os.environ.get("BPS_HA_PG_BIN", "/usr/lib/postgresql/15/bin"))
AS_POSTGRES = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
POLL_SECONDS = 0.05  # between two looks at processes being reaped


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all bound at once, so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def children_of(pid: int) -> list[int]:
    """The direct children of `pid`."""
    return processes_with(STAT_PPID, pid)


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Processes whose command line holds `text` (what teardown must have left none of)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append((int(entry.name), cmdline.strip()))
    return found


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def get_json(url: str, timeout: float = 1.0) -> tuple[int, dict | None]:
    """(status, JSON body) of a GET; (0, None) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"null")
        except ValueError:
            return error.code, None
    except (OSError, ValueError):
        return 0, None


class Daemon:
    """A child process in a session of its own, its output appended to `log`."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                cwd=self.cwd,
                start_new_session=True,
            )
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> float:
        """SIGKILL to its whole process group; waits (bounded) until it is gone. Returns the time.monotonic()
        of the kill."""
        killed = time.monotonic()
        if self.process is None:
            return killed
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.kills += 1
        return killed

    def stop(self, timeout: float = 10) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
        except ProcessLookupError:
            pass


class EtcdMember(Daemon):
    def __init__(self, root: Path, name: str, client_port: int, peer_port: int) -> None:
        self.client_port = client_port
        self.peer_port = peer_port
        self.config = root / f"{name}.yml"
        self.data_dir = root / name
        super().__init__(name, ["etcd", "--config-file", str(self.config)], root / f"{name}.log")

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def healthy(self) -> bool:
        status, body = get_json(self.client_url + "/health")
        return status == 200 and (body or {}).get("health") == "true"

    def status(self) -> dict | None:
        """This member's id and its view of the etcd leader (v3 maintenance status, over the JSON gateway)."""
        request = urllib.request.Request(self.client_url + "/v3/maintenance/status", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None


class PatroniNode(Daemon):
    """Patroni as the postgres user (setpriv keeps the pid: the Popen is Patroni itself); its postgres runs
    in a session of its own (Patroni's postmaster helper calls setsid), found through postmaster.pid."""

    def __init__(self, root: Path, name: str, pg_port: int, rest_port: int) -> None:
        self.pg_port = pg_port
        self.rest_port = rest_port
        self.home = root / name
        self.data_dir = self.home / "data"
        self.config = self.home / "patroni.yml"
        super().__init__(
            name,
            [*AS_POSTGRES, "patroni", str(self.config)],
            root / f"{name}.log",
            env={"HOME": str(self.home), "PATRONI_LOG_LEVEL": "INFO"},
            cwd=self.home,
        )
        self.patroni_kills = 0
        self.node_kills = 0

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def api(self, path: str) -> tuple[int, dict | None]:
        return get_json(self.rest_url + path)

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def postgres_pids(self) -> list[int]:
        """The postmaster and its children (backends, walsenders, ...)."""
        pid = self.postmaster_pid()
        return [] if pid is None else [pid, *children_of(pid)]

    def kill_patroni(self) -> float:
        """kill -9 of Patroni alone (with its helpers: pg_rewind, pg_basebackup); postgres keeps running."""
        self.patroni_kills += 1
        return self.kill9()

    def kill_node(self) -> float:
        """kill -9 of the whole node at once: Patroni and every postgres process, as when the machine dies.
        Returns the time.monotonic() of the kill."""
        victims = self.postgres_pids()
        killed = time.monotonic()
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill(victims)
        kill(self.postgres_pids())  # a backend forked meanwhile
        if self.process is not None:
            self.process.wait(timeout=30)
        self.node_kills += 1
        return killed

    def destroy(self) -> None:
        self.kill9()
        if self.postmaster_pid() is not None:
            subprocess.run(
                [*AS_POSTGRES, str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "-t", "20",
                 "stop"],
                capture_output=True,
                timeout=30,
                cwd=self.home,
            )  # fmt: skip
        kill(self.postgres_pids())


class Topology:
    """The whole cluster. `up()` starts it and waits until it is whole; `destroy()` ends it."""

    def __init__(self, fsync: bool = True, services: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bps-ha-"))
        os.chmod(self.root, 0o755)
        self.fsync = fsync
        self.superuser_password = secrets.token_hex(16)
        self.replication_password = secrets.token_hex(16)
        ports = free_ports(3 * 2 + 3 * 2 + 2 + services)
        self.etcd = [EtcdMember(self.root, f"etcd{i + 1}", ports[2 * i], ports[2 * i + 1]) for i in range(3)]
        self.nodes = [PatroniNode(self.root, f"pg{i + 1}", ports[6 + 2 * i], ports[7 + 2 * i]) for i in range(3)]
        self.pg_front_port, self.http_front_port = ports[12], ports[13]
        self.service_ports = ports[14:]
        self.haproxy = Daemon(
            "haproxy", ["haproxy", "-db", "-f", str(self.root / "haproxy.cfg")], self.root / "haproxy.log"
        )

    # -- configuration

    def write_configs(self) -> None:
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.etcd)
        token = "bps-ha-" + secrets.token_hex(4)
        for m in self.etcd:
            m.config.write_text(
                render(
                    "etcd.yml",
                    name=m.name,
                    data_dir=m.data_dir,
                    client_port=m.client_port,
                    peer_port=m.peer_port,
                    initial_cluster=initial,
                    token=token,
                )
            )
        hosts = ",".join(f"127.0.0.1:{m.client_port}" for m in self.etcd)
        for n in self.nodes:
            n.home.mkdir()
            n.config.write_text(
                render(
                    "patroni.yml",
                    name=n.name,
                    rest_port=n.rest_port,
                    etcd_hosts=hosts,
                    pg_port=n.pg_port,
                    data_dir=n.data_dir,
                    bin_dir=PG_BIN,
                    home=n.home,
                    superuser_password=self.superuser_password,
                    replication_password=self.replication_password,
                    fsync="on" if self.fsync else "off",
                )
            )
            n.config.chmod(0o600)
            shutil.chown(n.home, user="postgres", group="postgres")
            shutil.chown(n.config, user="postgres", group="postgres")
        pg_servers = "\n".join(
            f"    server {n.name} 127.0.0.1:{n.pg_port} check port {n.rest_port}" for n in self.nodes
        )
        (self.root / "503.http").write_text(render("503.http"))
        http_servers = "\n".join(
            f"    server bps{i + 1} 127.0.0.1:{port} check" for i, port in enumerate(self.service_ports)
        )
        (self.root / "haproxy.cfg").write_text(
            render(
                "haproxy.cfg",
                pg_front_port=self.pg_front_port,
                http_front_port=self.http_front_port,
                pg_servers=pg_servers,
                http_servers=http_servers,
                errorfile=self.root / "503.http",
            )
        )

    # -- URLs

    def owner_url(self, database: str = "bps", port: int | None = None) -> str:
        """The superuser's URL through HAProxy (to the primary, whichever it is), or to one node's `port`."""
        return f"postgresql://postgres:{self.superuser_password}@127.0.0.1:{port or self.pg_front_port}/{database}"

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.http_front_port}"

    def node(self, name: str) -> PatroniNode:
        return next(n for n in self.nodes if n.name == name)

    # -- state

    def cluster(self) -> dict | None:
        """Patroni's GET /cluster from the first node whose Patroni answers."""
        for n in self.nodes:
            if n.alive():
                status, body = n.api("/cluster")
                if status == 200 and body:
                    return body
        return None

    def leader(self) -> str | None:
        return leader_of(self.cluster())

    def health(self) -> tuple[bool, str]:
        ok, why = cluster_health(self.cluster(), len(self.nodes))
        if ok:
            down = [m.name for m in self.etcd if not m.healthy()]
            if down:
                return False, f"etcd members not healthy: {down}"
        return ok, why

    def etcd_leader(self) -> EtcdMember | None:
        for m in self.etcd:
            status = m.status() if m.alive() else None
            if status and "leader" in status:
                leader = str(status["leader"])
                for other in self.etcd:
                    s = other.status() if other.alive() else None
                    if s and str(s.get("header", {}).get("member_id")) == leader:
                        return other
        return None

    # -- lifecycle

    def wait(self, what: str, ready, within: float, every: float = 0.25):
        """Polls `ready()` until it is truthy, at most `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {within:.0f}s")
            time.sleep(every)

    def up(self, within: float = 180) -> None:
        self.write_configs()
        for m in self.etcd:
            m.start()
        self.wait("etcd healthy", lambda: all(m.healthy() for m in self.etcd), 60)
        # The first node bootstraps the cluster alone, then the others clone it.
        self.nodes[0].start()
        self.wait("pg1 leader", lambda: self.nodes[0].api("/primary")[0] == 200, within)
        for n in self.nodes[1:]:
            n.start()
        self.haproxy.start()
        self.wait("the Patroni cluster whole", lambda: self.health()[0], within, every=0.5)

    def leftovers(self) -> list[tuple[int, str]]:
        return processes_mentioning(str(self.root))

    def destroy(self) -> list[tuple[int, str]]:
        """Ends every process of the cluster and removes its directory; returns what was still running after
        (nothing, unless something refused to die)."""
        self.haproxy.kill9()
        for n in self.nodes:
            try:
                n.destroy()
            except (OSError, subprocess.SubprocessError):
                pass
        for m in self.etcd:
            m.kill9()
        left = self.leftovers()
        if left:
            kill([pid for pid, _ in left])
            deadline = time.monotonic() + 5
            while left and time.monotonic() < deadline:  # until the kernel has reaped them (bounded)
                time.sleep(POLL_SECONDS)
                left = self.leftovers()
        return left

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
