"""Real Cinder services for the end-to-end tests: RabbitMQ from Debian, cinder-api,
-scheduler, -volume and -backup from the Cinder package of this interpreter, MariaDB
from Debian and ``noauth``, in a directory and on ports of their own. Every process is
stopped by its own pid (and RabbitMQ's epmd by its own port)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbd_restore import devcluster

PROJECT = "admin"  # noauth: the token "admin:admin" is an admin of project "admin"
RABBIT_SBIN = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
MARIADBD = Path("/usr/sbin/mariadbd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait(what: str, check: Any, timeout: float, procs: list[subprocess.Popen[bytes]],
          logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a process exited ({proc.args!r}); logs in {logs}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; logs in {logs}")
        time.sleep(0.2)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RabbitMQ:
    root: Path
    port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rabbit://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        home = self.root / "home"
        return {**os.environ, "HOME": str(home), "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_NODENAME": f"rr{self.port}@localhost",
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.root / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
                "RABBITMQ_PID_FILE": str(self.root / "rabbit.pid")}

    def start(self) -> None:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq.conf").write_text("loopback_users = none\n")
        log = open(self.root / "server.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([str(RABBIT_SBIN)], env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait("RabbitMQ", lambda: _port_open(self.port), 120, [self.proc], self.root)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], capture_output=True,
                       check=False, env=self.env())


@dataclass
class MariaDB:
    """Cinder's database, as in a deployment. Not sqlite: oslo.db opens every sqlite
    transaction with a deferred BEGIN, so when two of the four services read and then
    write at once, sqlite answers one of them "database is locked" at once, whatever
    the busy timeout (cinder-api then fails a request with HTTP 500)."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mysql+pymysql://cinder:cinder@127.0.0.1:{self.port}/cinder?charset=utf8mb4"

    def _client(self, sql: str) -> None:
        subprocess.run(["mariadb", "--no-defaults", f"--socket={self.root / 'socket'}",
                        "--user=root", "--execute", sql], check=True, capture_output=True)

    def start(self) -> None:
        data = self.root / "data"
        user = ["--user=root"] if os.geteuid() == 0 else []
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}",
                        "--auth-root-authentication-method=socket", "--skip-test-db", *user],
                       check=True, capture_output=True)
        log = open(self.root / "server.out", "wb")  # noqa: SIM115
        # A test bed: small buffers, no binary log, no fsync per commit.
        self.proc = subprocess.Popen(
            [str(MARIADBD), "--no-defaults", f"--datadir={data}", *user,
             f"--socket={self.root / 'socket'}", f"--pid-file={self.root / 'mariadbd.pid'}",
             "--bind-address=127.0.0.1", f"--port={self.port}", "--skip-log-bin",
             "--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=2",
             "--max-connections=200", f"--log-error={self.root / 'error.log'}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait("MariaDB", lambda: _port_open(self.port), 120, [self.proc], self.root)
            self._client("CREATE DATABASE cinder CHARACTER SET utf8mb4; "
                         "CREATE USER 'cinder'@'127.0.0.1' IDENTIFIED BY 'cinder'; "
                         "GRANT ALL ON cinder.* TO 'cinder'@'127.0.0.1';")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


SERVICES = ("cinder-api", "cinder-scheduler", "cinder-volume", "cinder-backup")


@dataclass
class Cinder:
    """The four services with one cinder.conf; ``rbd_restore_config`` is the
    configuration the drivers hand to the rbd-restore command."""

    root: Path
    cluster: devcluster.ClusterInfo
    rabbit: RabbitMQ
    database: MariaDB
    rbd_restore_config: Path
    rbd_restore_command: str
    api_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    keyring_link: Path | None = None
    clouds: Path | None = None

    @property
    def conf(self) -> Path:
        return self.root / "cinder.conf"

    @property
    def endpoint(self) -> str:
        # Project ids in URLs are optional since API 3.67: the project is the token's.
        return f"http://127.0.0.1:{self.api_port}/v3"

    @property
    def cluster_name(self) -> str:
        """A Ceph cluster name of this test bed's own: cinder-backup attaches volumes
        through os-brick, which finds keyrings only where librados looks by default,
        /etc/ceph/<cluster>.client.<user>.keyring, as on a real cinder-backup host."""
        return f"rr{self.api_port}"

    def install_keyring(self) -> None:
        link = Path("/etc/ceph") / f"{self.cluster_name}.client.admin.keyring"
        link.parent.mkdir(exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(self.cluster.keyring)
        self.keyring_link = link

    def write_conf(self) -> None:
        bin_dir = Path(sys.executable).parent
        privsep = f"{bin_dir / 'privsep-helper'} --config-file {self.conf}"
        shipped = bin_dir.parent / "etc" / "cinder" / "api-paste.ini"
        if not shipped.exists():
            shipped = Path("/etc/cinder/api-paste.ini")
        paste = self.root / "api-paste.ini"  # with noauth.DefaultToken in front
        paste.write_text(shipped.read_text().replace(
            "noauth = request_id ", "noauth = default_token request_id ", 1)
            + "\n[filter:default_token]\n"
              "paste.filter_factory = cinder_tests.noauth:DefaultToken.factory\n")
        state = self.root / "state"
        (state / "locks").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""[DEFAULT]
auth_strategy = noauth
transport_url = {self.rabbit.url}
enabled_backends = ceph
default_volume_type = __DEFAULT__
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {self.api_port}
osapi_volume_workers = 1
api_paste_config = {paste}
state_path = {state}
host = rbd-restore-test
backup_driver = rbd_restore_cinder.backup.RBDRestoreBackupDriver
rbd_restore_command = {self.rbd_restore_command}
rbd_restore_config = {self.rbd_restore_config}
rbd_restore_timeout = 600
debug = false
log_dir = {self.root / "log"}
report_interval = 2
service_down_time = 30
# The scheduler places a backup only on a backup service that has sent it its
# capabilities; the default is once a minute.
backup_driver_stats_polling_interval = 10
periodic_interval = 3

[database]
connection = {self.database.url}

# As root, privsep runs its helper itself (the default, sudo privsep-helper, does not
# find the helper in this virtualenv).
[privsep]
helper_command = {privsep}

[privsep_osbrick]
helper_command = {privsep}

[oslo_concurrency]
lock_path = {state / "locks"}

[coordination]
backend_url = file://{state / "coordination"}

[ceph]
volume_driver = rbd_restore_cinder.volume.RBDRestoreDriver
volume_backend_name = ceph
rbd_pool = volumes
rbd_ceph_conf = {self.cluster.ceph_conf}
rbd_cluster_name = {self.cluster_name}
rbd_user = admin
rbd_restore_command = {self.rbd_restore_command}
rbd_restore_config = {self.rbd_restore_config}
rados_connection_retries = 1
rados_connection_interval = 1
""")

    def start(self) -> None:
        (self.root / "log").mkdir(parents=True, exist_ok=True)
        self.write_conf()
        self.install_keyring()
        bin_dir = Path(sys.executable).parent
        subprocess.run([str(bin_dir / "cinder-manage"), "--config-file", str(self.conf),
                        "db", "sync"], check=True, capture_output=True)
        for name in SERVICES:
            out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115
            self.procs[name] = subprocess.Popen(
                [str(bin_dir / name), "--config-file", str(self.conf)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        procs = list(self.procs.values())
        try:
            _wait("cinder-api", self._api_answers, 120, procs, self.root / "log")
            _wait("cinder-volume and cinder-backup to report", self._services_up, 120, procs,
                  self.root / "log")
        except BaseException:
            self.stop()
            raise

    def request(self, method: str, path: str, body: Any = None,
                microversion: str = "3.47") -> tuple[int, Any]:
        request = urllib.request.Request(
            self.endpoint + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"X-Auth-Token": f"{PROJECT}:{PROJECT}", "Content-Type": "application/json",
                     "OpenStack-API-Version": f"volume {microversion}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                text = reply.read()
                return reply.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            text = exc.read()
            return exc.code, json.loads(text) if text else None

    def _api_answers(self) -> bool:
        try:
            return self.request("GET", "/types")[0] == 200
        except (urllib.error.URLError, OSError):
            return False

    def _services_up(self) -> bool:
        status, body = self.request("GET", "/os-services")
        if status != 200:
            return False
        up = {s["binary"] for s in body["services"] if s["state"] == "up"
              and s["status"] == "enabled"}
        return {"cinder-volume", "cinder-backup", "cinder-scheduler"} <= up

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.keyring_link is not None:
            self.keyring_link.unlink(missing_ok=True)

    def clouds_yaml(self, path: Path) -> Path:
        """A clouds.yaml for openstacksdk and the openstack CLI: cloud ``rbd-restore-test``,
        Cinder's noauth through the admin_token plugin. The endpoint is the API's root,
        where version discovery finds v3."""
        root = f"http://127.0.0.1:{self.api_port}/"
        path.write_text(f"""clouds:
  rbd-restore-test:
    auth_type: admin_token
    auth:
      endpoint: {root}
      token: "{PROJECT}:{PROJECT}"
    block_storage_endpoint_override: {root}
    block_storage_api_version: "3"
    region_name: RegionOne
""")
        self.clouds = path
        return path

    def openstack(self, *args: str, version: str = "3.47") -> Any:
        """The real openstack CLI, its output as JSON when it prints any."""
        done = subprocess.run(
            [str(Path(sys.executable).parent / "openstack"), "--os-cloud", "rbd-restore-test",
             "--os-volume-api-version", version, *args],
            env={**os.environ, "OS_CLIENT_CONFIG_FILE": str(self.clouds)},
            capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"openstack {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout) if done.stdout.strip() else None

    def create_backup(self, volume_id: str, name: str, timeout: float = 120) -> Any:
        """``openstack volume backup create``, once the scheduler can place backups: it
        learns of a backup service from its first capability report, ~10 s after start."""
        deadline = time.monotonic() + timeout
        while True:
            created = self.openstack("volume", "backup", "create", "--name", name, volume_id,
                                     "-f", "json")
            try:
                return self.wait_status("backup", created["id"], "available", timeout)
            except AssertionError as exc:
                if "Service not found" not in str(exc) or time.monotonic() > deadline:
                    raise
            self.request("DELETE", f"/backups/{created['id']}")
            self.wait_status("volume", volume_id, "available")
            time.sleep(1)

    def wait_status(self, kind: str, ident: str, wanted: str, timeout: float = 180) -> Any:
        """Poll ``/volumes/ID`` or ``/backups/ID`` until its status is ``wanted``."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.request("GET", f"/{kind}s/{ident}")
            current = body[kind]["status"] if status == 200 else f"HTTP {status}"
            if current == wanted:
                return body[kind]
            if current in ("error", "error_restoring", "error_deleting") or \
                    time.monotonic() > deadline:
                raise AssertionError(f"{kind} {ident} is {current}, not {wanted}: "
                                     f"{body.get(kind, {}).get('fail_reason', '')}")
            time.sleep(0.5)
