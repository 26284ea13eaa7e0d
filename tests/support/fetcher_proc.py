"""A fetcher daemon run as a real process for tests, stopped by its own pid.

With ``socket_activation`` the harness plays systemd's part: it binds the
three listening sockets itself and hands them to each fetcher process it
starts (``LISTEN_FDS``), so a fetcher killed and started again serves the
same sockets, which stay open in between.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbd_restore import config as config_mod
from rbd_restore import devcluster
from tests.support.helpers import PYTHON

LISTENERS = ("RBD_RESTORE_FETCHER_LISTEN", "RBD_RESTORE_FETCHER_CONTROL_LISTEN",
             "RBD_RESTORE_FETCHER_METRICS_LISTEN")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class FetcherProcess:
    cluster: devcluster.ClusterInfo
    cache_dir: Path
    prefix: str
    env_overrides: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    log_level: str = "debug"
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    socket_activation: bool = False
    held: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Ports of its own, so replicas and parallel tests never collide.
        self.own_ports = [key for key in LISTENERS if key not in self.env_overrides]
        if self.socket_activation:
            self._hold_sockets()
        else:
            self._pick_ports()

    def _pick_ports(self) -> None:
        for key in self.own_ports:
            self.env_overrides[key] = f"127.0.0.1:{free_port()}"

    def _hold_sockets(self) -> None:
        for key in LISTENERS:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            # Far from fds 3-5, which the child's shell moves them to.
            high = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 50)
            self.env_overrides[key] = f"127.0.0.1:{sock.getsockname()[1]}"
            sock.close()
            self.held.append(socket.socket(fileno=high))

    def _command(self) -> list[str]:
        serve = [PYTHON, "-m", "rbd_restore.cli", "fetcher", "serve",
                 "--cache-dir", str(self.cache_dir), "--log-level", self.log_level, *self.args]
        if not self.held:
            return serve
        fds = [str(s.fileno()) for s in self.held]
        # Move the sockets to fds 3, 4, 5 and name this process, as systemd does.
        script = ('exec 3<&"$1" 4<&"$2" 5<&"$3"; exec {a}<&- {b}<&- {c}<&-; shift 3; '
                  'LISTEN_PID=$$ LISTEN_FDS=3 LISTEN_FDNAMES=data:control:metrics exec "$@"')
        script = script.replace("{a}", fds[0]).replace("{b}", fds[1]).replace("{c}", fds[2])
        return ["/bin/bash", "-c", script, "activate", *fds, *serve]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "RBD_RESTORE_CONFIG": str(self.cluster.config),
                "RBD_RESTORE_S3_PREFIX": self.prefix, **self.env_overrides}

    @property
    def settings(self) -> config_mod.FetcherSettings:
        saved = dict(os.environ)
        try:
            os.environ.update(self.env)
            return config_mod.load(str(self.cluster.config)).fetcher
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def start(self, timeout: float = 30) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):
            self.log_path = self.cache_dir.parent / f"fetcher-{time.monotonic_ns()}.log"
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    self._command(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=[s.fileno() for s in self.held])
            deadline = time.monotonic() + timeout
            while b"fetcher ready" not in self.log_path.read_bytes():
                if self.proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("fetcher did not become ready")
                time.sleep(0.05)
            else:
                return
            output = self.log_path.read_text()
            # A port found free can be taken before the fetcher binds it (an outgoing
            # connection's ephemeral port): start again on other ports of our own.
            if "address already in use" not in output or not self.own_ports or self.held:
                raise RuntimeError(f"fetcher exited: {output[-2000:]}")
            self._pick_ports()
        raise RuntimeError(f"fetcher kept finding its ports taken: {output[-500:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the fetcher process (its pid only); held sockets stay open."""
        self.stop(signal.SIGKILL)

    def close(self) -> None:
        """Stop the fetcher and close the sockets the harness holds for it."""
        self.stop()
        for sock in self.held:
            sock.close()
        self.held.clear()

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def control(self, method: str, path: str, body: Any = None,
                token: str | None = None) -> tuple[int, Any]:
        settings = self.settings
        request = urllib.request.Request(
            settings.control_base + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {token or settings.control_token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def create_session(self, backup_id: str) -> dict[str, Any]:
        status, body = self.control("POST", "/v1/sessions", {"backup_id": backup_id})
        assert status == 201, body
        result: dict[str, Any] = body
        return result

    def metrics(self) -> dict[str, float]:
        url = f"http://{self.settings.metrics_listen}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values
