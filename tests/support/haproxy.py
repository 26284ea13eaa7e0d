"""The real HAProxy (Debian's) in front of fetcher replicas, run from the project's own
configuration in contrib/haproxy with only its addresses changed, stopped by its pid."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rbd_restore import devcluster
from tests.support.fetcher_proc import FetcherProcess, free_port

CONFIG = Path(__file__).resolve().parents[2] / "contrib" / "haproxy" / "haproxy.cfg"
FRONT = "192.0.2.10"
REPLICAS = ("192.0.2.11", "192.0.2.12")


def render(data_port: int, control_port: int, data: list[str], control: list[str]) -> str:
    """contrib/haproxy/haproxy.cfg for these addresses: the frontend on loopback ports,
    one ``server`` line per replica (data and control listener HOST:PORT)."""
    text = CONFIG.read_text()
    text = text.replace(f"bind {FRONT}:8470", f"bind 127.0.0.1:{data_port}")
    text = text.replace(f"bind {FRONT}:8471", f"bind 127.0.0.1:{control_port}")
    text = text.replace("log /dev/log local0", "log stderr format short local0")
    for port, listeners in ((8470, data), (8471, control)):
        example = re.compile(rf"^( *)server fetcher-a {REPLICAS[0]}:{port}\n"
                             rf" *server fetcher-b {REPLICAS[1]}:{port}\n", re.M)
        found = example.search(text)
        assert found, f"{CONFIG} no longer has the example server lines for port {port}"
        lines = "".join(f"{found.group(1)}server fetcher-{i} {address}\n"
                        for i, address in enumerate(listeners))
        text = text[:found.start()] + lines + text[found.end():]
    settings = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("192.0.2." in line for line in settings), "an example address is left"
    return text


@dataclass
class HAProxy:
    work: Path
    data: list[str]
    control: list[str]
    data_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_url(self) -> str:
        return f"http://127.0.0.1:{self.data_port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def start(self, timeout: float = 20) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "haproxy.cfg"
        config.write_text(render(self.data_port, self.control_port, self.data, self.control))
        subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], check=True)
        log = open(self.work / "haproxy.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self._accepting():
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.logs()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("haproxy did not listen")
            time.sleep(0.05)

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.data_port), timeout=1):
                return True
        except OSError:
            return False

    def logs(self) -> str:
        path = self.work / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def replicas_behind_haproxy(cluster: devcluster.ClusterInfo, prefix: str, work: Path,
                            env: dict[str, str] | None = None,
                            count: int = 2) -> Iterator[tuple[HAProxy, list[FetcherProcess]]]:
    """``count`` fetcher processes with the cluster's secret and bucket, each with its own
    cache and ports, whose session URLs name HAProxy, which is in front of them."""
    proxy = HAProxy(work / "haproxy", [], [])
    overrides = {"RBD_RESTORE_FETCHER_PUBLIC_URL": proxy.data_url, **(env or {})}
    replicas = [FetcherProcess(cluster, work / f"replica-{i}" / "cache", prefix, dict(overrides))
                for i in range(count)]
    try:
        for replica in replicas:
            replica.start()
        proxy.data = [replica.settings.listen for replica in replicas]
        proxy.control = [replica.settings.control_listen for replica in replicas]
        proxy.start()
        yield proxy, replicas
    finally:
        proxy.stop()
        for replica in replicas:
            replica.stop()
