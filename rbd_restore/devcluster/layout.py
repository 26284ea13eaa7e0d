"""Where everything of an embedded cluster lives inside its directory.

The layout is a pure function of the directory; the choices made at the first
``up`` (fsid, ports, keys) are kept in ``cluster.json`` so a restart reuses them.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import struct
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

MON_ID = "a"
MGR_ID = "x"
OSD_ID = 0
RGW_NAME = "client.rgw.gw"
S3_USER = "rbd-restore"
BUCKET = "rbd-restore"
DEFAULT_OSD_BYTES = 8 << 30
MESSENGER_PORTS = 24  # enough for an OSD (public, cluster, 2 heartbeats) and the mgr


def cephx_key() -> str:
    """A fresh cephx secret in Ceph's encoding: type, creation time, length, 16 bytes."""
    header = struct.pack("<HIIH", 1, int(time.time()), 0, 16)
    return base64.b64encode(header + secrets.token_bytes(16)).decode()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_range(count: int) -> int:
    """First port of ``count`` consecutive free ports, away from the ephemeral range."""
    for _ in range(200):
        base = 20000 + secrets.randbelow(12000)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise OSError("no range of free ports found on 127.0.0.1")


@dataclass(frozen=True)
class ClusterState:
    fsid: str
    mon_port: int
    rgw_port: int
    messenger_port_min: int
    messenger_port_max: int
    osd_bytes: int
    objectstore: str
    s3_access_key: str
    s3_secret_key: str
    bucket: str
    osd_uuid: str
    fetcher_port: int = 0
    fetcher_control_port: int = 0
    fetcher_metrics_port: int = 0
    fetcher_secret: str = ""
    fetcher_control_token: str = ""

    @classmethod
    def fresh(cls, osd_bytes: int, objectstore: str) -> ClusterState:
        base = free_port_range(MESSENGER_PORTS)
        # The monitor's and RGW's ports must sit outside the daemons' bind range,
        # or an OSD can take the monitor's port.
        outside = set(range(base, base + MESSENGER_PORTS))
        mon_port = free_port()
        while mon_port in outside:
            mon_port = free_port()
        taken = {mon_port}
        others = []
        for _ in range(4):  # RGW, then the fetcher's data, control and metrics listeners
            port = free_port()
            while port in outside or port in taken:
                port = free_port()
            taken.add(port)
            others.append(port)
        rgw_port, fetcher_port, control_port, metrics_port = others
        return cls(
            fsid=str(uuid.uuid4()),
            mon_port=mon_port,
            rgw_port=rgw_port,
            messenger_port_min=base,
            messenger_port_max=base + MESSENGER_PORTS - 1,
            osd_bytes=osd_bytes,
            objectstore=objectstore,
            s3_access_key=secrets.token_hex(10).upper(),
            s3_secret_key=secrets.token_urlsafe(30),
            bucket=BUCKET,
            osd_uuid=str(uuid.uuid4()),
            fetcher_port=fetcher_port,
            fetcher_control_port=control_port,
            fetcher_metrics_port=metrics_port,
            fetcher_secret=secrets.token_urlsafe(32),
            fetcher_control_token=secrets.token_urlsafe(24),
        )


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "cluster.json"

    @property
    def ceph_conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def admin_keyring(self) -> Path:
        return self.root / "ceph.client.admin.keyring"

    @property
    def config_file(self) -> Path:
        return self.root / "rbd-restore.toml"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def data_dir(self, daemon: str) -> Path:
        return self.root / daemon / "data"

    def keyring(self, daemon: str) -> Path:
        return self.root / daemon / "keyring"

    @property
    def bluestore_block(self) -> Path:
        return self.root / "osd" / "block.img"

    def pidfile(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.pid"

    def read_state(self) -> ClusterState | None:
        try:
            return ClusterState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None

    def write_state(self, state: ClusterState) -> None:
        write_private(self.state_file, json.dumps(asdict(state), indent=2) + "\n")


def write_private(path: Path, text: str) -> None:
    """Write a file that holds secrets, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def keyring_text(entries: dict[str, tuple[str, dict[str, str]]]) -> str:
    lines: list[str] = []
    for entity, (key, caps) in entries.items():
        lines.append(f"[{entity}]")
        lines.append(f"\tkey = {key}")
        for service, cap in caps.items():
            lines.append(f'\tcaps {service} = "{cap}"')
    return "\n".join(lines) + "\n"


def ceph_conf_text(layout: Layout, state: ClusterState) -> str:
    r = layout.root
    osd_store = {
        "memstore": [f"memstore device bytes = {state.osd_bytes}"],
        "bluestore": [
            f"bluestore block path = {layout.bluestore_block}",
            f"bluestore block size = {state.osd_bytes}",
            "bluestore block create = true",
            "bluestore block db create = false",
            "bluestore block wal create = false",
            "bluestore fsck on mkfs = false",
        ],
    }[state.objectstore]
    lines = [
        "[global]",
        f"fsid = {state.fsid}",
        f"mon host = v2:127.0.0.1:{state.mon_port}",
        "public addr = 127.0.0.1",
        "ms bind msgr1 = false",
        f"ms bind port min = {state.messenger_port_min}",
        f"ms bind port max = {state.messenger_port_max}",
        "auth cluster required = cephx",
        "auth service required = cephx",
        "auth client required = cephx",
        "auth allow insecure global id reclaim = false",
        f"run dir = {r / 'run'}",
        f"crash dir = {r / 'crash'}",
        f"log file = {r / 'log'}/$name.log",
        f"admin socket = {r / 'run'}/$name.asok",
        "pid file =",
        "osd pool default size = 1",
        "osd pool default min size = 1",
        "osd pool default pg num = 8",
        "osd pool default pgp num = 8",
        "osd pool default pg autoscale mode = off",
        "osd crush chooseleaf type = 0",
        "mon allow pool size one = true",
        "mon allow pool delete = true",
        "mon warn on pool no redundancy = false",
        "mon data avail warn = 2",
        "mon data avail crit = 1",
        "mon max pg per osd = 1000",
        "paxos propose interval = 0.05",
        "mgr initial modules = iostat",
        "",
        "[mon]",
        f"mon data = {layout.data_dir('mon')}",
        "",
        "[mgr]",
        f"mgr data = {layout.data_dir('mgr')}",
        f"keyring = {layout.keyring('mgr')}",
        "",
        "[osd]",
        f"osd data = {layout.data_dir('osd')}",
        f"keyring = {layout.keyring('osd')}",
        f"osd objectstore = {state.objectstore}",
        *osd_store,
        "",
        "[client]",
        f"keyring = {layout.admin_keyring}",
        # Many clients (QEMU, rbd, tests) run at once: one socket each.
        f"admin socket = {r / 'run'}/$name.$pid.$cctid.asok",
        "",
        f"[{RGW_NAME}]",
        f"keyring = {layout.keyring('rgw')}",
        f"rgw frontends = beast endpoint=127.0.0.1:{state.rgw_port}",
        f"rgw data = {layout.data_dir('rgw')}",
        "rgw enable usage log = false",
        # Clients keep connections open; do not wait two minutes for them on shutdown.
        "rgw exit timeout secs = 2",
        "",
    ]
    return "\n".join(lines)
