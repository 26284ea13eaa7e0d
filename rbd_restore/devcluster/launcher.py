"""Start and stop a single-node Ceph cluster with RGW in one directory.

One monitor, one mgr, one OSD (memstore by default), RGW on beast; all bound to
127.0.0.1 on ports picked at the first start, so several clusters can run side
by side. Readiness is waited for by condition: OSD up and in, pools usable,
RGW answering an authenticated S3 request.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbd_restore import config as config_mod
from rbd_restore.devcluster.layout import (
    MGR_ID,
    MON_ID,
    OSD_ID,
    RGW_NAME,
    S3_USER,
    ClusterState,
    Layout,
    ceph_conf_text,
    cephx_key,
    keyring_text,
    write_private,
)
from rbd_restore.devcluster.processes import DaemonSpec, is_running, stop_all
from rbd_restore.errors import DevClusterError

RBD_POOLS = ("rbd", "volumes")
STARTUP_TIMEOUT = 120.0


@dataclass(frozen=True)
class ClusterInfo:
    dir: Path
    ceph_conf: Path
    keyring: Path
    config: Path
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    bucket: str
    fsid: str
    pools: tuple[str, ...] = RBD_POOLS

    def as_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "ceph_conf": str(self.ceph_conf),
            "keyring": str(self.keyring),
            "config": str(self.config),
            "s3_endpoint": self.s3_endpoint,
            "s3_access_key": self.s3_access_key,
            "s3_secret_key": self.s3_secret_key,
            "bucket": self.bucket,
            "fsid": self.fsid,
            "pools": list(self.pools),
            "client_name": "client.admin",
        }


@dataclass(frozen=True)
class UpResult:
    info: ClusterInfo
    already_running: bool
    seconds: float
    restarted: tuple[str, ...] = ()


def daemon_specs(layout: Layout) -> list[DaemonSpec]:
    conf = str(layout.ceph_conf)

    def spec(name: str, argv: list[str]) -> DaemonSpec:
        return DaemonSpec(name, argv, layout.pidfile(name), layout.log_dir / f"{name}.out")

    return [
        spec("mon", ["ceph-mon", "-f", "-c", conf, "-i", MON_ID]),
        spec("mgr", ["ceph-mgr", "-f", "-c", conf, "-i", MGR_ID]),
        spec("osd", ["ceph-osd", "-f", "-c", conf, "-i", str(OSD_ID)]),
        spec("rgw", ["radosgw", "-f", "-c", conf, "-n", RGW_NAME]),
    ]


def cluster_info(layout: Layout, state: ClusterState) -> ClusterInfo:
    return ClusterInfo(
        dir=layout.root,
        ceph_conf=layout.ceph_conf,
        keyring=layout.admin_keyring,
        config=layout.config_file,
        s3_endpoint=f"http://127.0.0.1:{state.rgw_port}",
        s3_access_key=state.s3_access_key,
        s3_secret_key=state.s3_secret_key,
        bucket=state.bucket,
        fsid=state.fsid,
    )


def _run(argv: list[str], layout: Layout) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DevClusterError(f"{argv[0]} failed in {layout.root}: {tail[0]}")


def _wait_for(what: str, check: Callable[[], bool], deadline: float, specs: list[DaemonSpec],
              layout: Layout) -> None:
    while True:
        for spec in specs:
            if spec.exited_early():
                raise DevClusterError(
                    f"{spec.name} exited during start-up; see {layout.log_dir / spec.name}.out"
                    f" and {layout.log_dir}"
                )
        if check():
            return
        if time.monotonic() > deadline:
            raise DevClusterError(f"timed out waiting for {what}; logs are in {layout.log_dir}")
        time.sleep(0.1)


class _Admin:
    """A client.admin librados handle for the bootstrap's monitor commands."""

    def __init__(self, layout: Layout) -> None:
        import rados

        self.cluster = rados.Rados(
            conffile=str(layout.ceph_conf), rados_id="admin",
            conf={"client_mount_timeout": "60", "keyring": str(layout.admin_keyring),
                  # Bootstrap must fail with a message, never hang on an inactive PG.
                  "rados_osd_op_timeout": "60", "rados_mon_op_timeout": "60"},
        )
        self.cluster.connect(timeout=60)

    def command(self, prefix: str, **args: Any) -> Any:
        ret, out, err = self.cluster.mon_command(
            json.dumps({"prefix": prefix, "format": "json", **args}), b"", timeout=30
        )
        if ret != 0:
            raise DevClusterError(f"ceph {prefix} failed: {err.strip() or ret}")
        return json.loads(out) if out.strip() else None

    def osd_up_and_in(self) -> bool:
        dump = self.command("osd dump")
        osds = dump.get("osds", [])
        return bool(osds) and all(o["up"] == 1 and o["in"] == 1 for o in osds)

    def mgr_available(self) -> bool:
        return bool(self.command("mgr stat").get("available"))

    def close(self) -> None:
        self.cluster.shutdown()


def _bootstrap_files(layout: Layout, state: ClusterState) -> None:
    """Write ceph.conf and keyrings and make the monitor's and OSD's stores."""
    for sub in ("run", "log", "crash", "mon", "mgr", "osd", "rgw"):
        (layout.root / sub).mkdir(parents=True, exist_ok=True)
    for daemon in ("mgr", "osd", "rgw"):
        layout.data_dir(daemon).mkdir(parents=True, exist_ok=True)
    layout.ceph_conf.write_text(ceph_conf_text(layout, state))
    admin, mon, mgr, osd, rgw = (cephx_key() for _ in range(5))
    admin_caps = {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"}
    entries = {
        "mon.": (mon, {"mon": "allow *"}),
        "client.admin": (admin, admin_caps),
        f"mgr.{MGR_ID}": (mgr, {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"}),
        f"osd.{OSD_ID}": (osd, {"mon": "allow profile osd", "mgr": "allow profile osd",
                                "osd": "allow *"}),
        RGW_NAME: (rgw, {"mon": "allow rw", "osd": "allow rwx", "mgr": "allow rw"}),
    }
    # The monitor imports every key of its mkfs keyring, so no `ceph auth` round
    # trips are needed once it runs.
    mkfs_keyring = layout.root / "mon" / "mkfs.keyring"
    write_private(mkfs_keyring, keyring_text(entries))
    write_private(layout.admin_keyring, keyring_text({"client.admin": entries["client.admin"]}))
    write_private(layout.keyring("mgr"), keyring_text({f"mgr.{MGR_ID}": entries[f"mgr.{MGR_ID}"]}))
    write_private(layout.keyring("osd"), keyring_text({f"osd.{OSD_ID}": entries[f"osd.{OSD_ID}"]}))
    write_private(layout.keyring("rgw"), keyring_text({RGW_NAME: entries[RGW_NAME]}))
    monmap = layout.root / "mon" / "monmap"
    _run(["monmaptool", "--create", "--clobber", "--fsid", state.fsid,
          "--addv", MON_ID, f"[v2:127.0.0.1:{state.mon_port}]", str(monmap)], layout)
    _run(["ceph-mon", "-c", str(layout.ceph_conf), "--mkfs", "-i", MON_ID,
          "--monmap", str(monmap), "--keyring", str(mkfs_keyring)], layout)
    mkfs_keyring.unlink()
    monmap.unlink()


def _create_osd(layout: Layout, state: ClusterState, admin: _Admin) -> None:
    admin.command("osd new", uuid=state.osd_uuid, id=OSD_ID)
    _run(["ceph-osd", "-c", str(layout.ceph_conf), "-i", str(OSD_ID), "--mkfs",
          "--osd-uuid", state.osd_uuid], layout)


def _create_pools(admin: _Admin) -> None:
    import rbd

    existing = {p["pool_name"] for p in admin.command("osd pool ls", detail="detail")}
    for pool in RBD_POOLS:
        if pool not in existing:
            admin.command("osd pool create", pool=pool, pg_num=8, pgp_num=8)
        with admin.cluster.open_ioctx(pool) as ioctx:
            # Blocks until the pool's PGs are active: the pools are usable after.
            rbd.RBD().pool_init(ioctx, False)


def _rgw_answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2) as reply:
            return int(reply.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _s3_ready(info: ClusterInfo, create_bucket: bool) -> bool:
    import boto3
    import botocore.config
    import botocore.exceptions

    s3 = boto3.client(
        "s3", endpoint_url=info.s3_endpoint, aws_access_key_id=info.s3_access_key,
        aws_secret_access_key=info.s3_secret_key, region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}, connect_timeout=2,
                                      read_timeout=10),
    )
    try:
        if create_bucket:
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket=info.bucket)
        s3.head_bucket(Bucket=info.bucket)
        return True
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        return False


def _write_config(layout: Layout, info: ClusterInfo, state: ClusterState) -> None:
    # The repository key the embedded cluster's backups are encrypted under: made once,
    # kept across restarts (a new one would open none of the bucket's keys).
    repository_key = layout.root / "repository.key"
    if not repository_key.exists():
        write_private(repository_key, secrets.token_hex(32))
    text = config_mod.render_toml({
        "ceph": {"conf": str(layout.ceph_conf), "keyring": str(layout.admin_keyring),
                 "client_name": "client.admin"},
        "s3": {"endpoint": info.s3_endpoint, "access_key": info.s3_access_key,
               "secret_key": info.s3_secret_key, "bucket": info.bucket, "prefix": "",
               "region": "us-east-1"},
        "pools": {"backup_default": "volumes", "restore_default": "volumes"},
        "repository": {"key_file": str(repository_key)},
        "fetcher": {"listen": f"127.0.0.1:{state.fetcher_port}",
                    "control_listen": f"127.0.0.1:{state.fetcher_control_port}",
                    "metrics_listen": f"127.0.0.1:{state.fetcher_metrics_port}",
                    "control_token": state.fetcher_control_token,
                    "secret": state.fetcher_secret,
                    "cache_dir": str(layout.root / "fetcher" / "cache"),
                    "cache_size": "2G"},
    })
    write_private(layout.config_file, "# written by `rbd-restore dev up`\n" + text)


def up(root: Path, osd_bytes: int, objectstore: str = "memstore",
       timeout: float = STARTUP_TIMEOUT) -> UpResult:
    started = time.monotonic()
    layout = Layout(root.resolve())
    state = layout.read_state()
    fresh = state is None
    if state is None:
        if layout.root.exists() and any(layout.root.iterdir()):
            raise DevClusterError(f"{layout.root} is not empty and holds no embedded cluster")
        state = ClusterState.fresh(osd_bytes, objectstore)
    specs = daemon_specs(layout)
    info = cluster_info(layout, state)
    dead = [spec for spec in specs if not spec.running()]
    if not dead:
        return UpResult(info, True, time.monotonic() - started)
    if not fresh and state.objectstore == "memstore" and "osd" in {s.name for s in dead}:
        # memstore keeps every object in the OSD's memory: the data died with it.
        raise DevClusterError(
            f"the embedded cluster in {layout.root} is stopped and its memstore OSD lost its"
            f" data; run `rbd-restore dev down --dir {layout.root} --purge` and `dev up` again"
        )
    deadline = time.monotonic() + timeout
    try:
        if fresh:
            layout.root.mkdir(parents=True, exist_ok=True)
            layout.write_state(state)
            _bootstrap_files(layout, state)
        by_name = {spec.name: spec for spec in specs}
        for name in ("mon", "mgr"):
            if by_name[name] in dead:
                by_name[name].start()
        admin = _Admin(layout)
        try:
            if fresh:
                _create_osd(layout, state, admin)
            for name in ("osd", "rgw"):
                if by_name[name] in dead:
                    by_name[name].start()
            _wait_for("the OSD to be up and in", admin.osd_up_and_in, deadline, specs, layout)
            _create_pools(admin)
            _wait_for("RGW to listen", lambda: _rgw_answers(info.s3_endpoint), deadline, specs,
                      layout)
            if fresh:
                _run(["radosgw-admin", "-c", str(layout.ceph_conf), "-n", "client.admin",
                      "user", "create", f"--uid={S3_USER}", f"--display-name={S3_USER}",
                      f"--access-key={state.s3_access_key}",
                      f"--secret={state.s3_secret_key}"], layout)
            _wait_for("RGW to answer an authenticated request",
                      lambda: _s3_ready(info, create_bucket=True), deadline, specs, layout)
            _wait_for("the mgr to be available", admin.mgr_available, deadline, specs, layout)
        finally:
            admin.close()
        _write_config(layout, info, state)
    except BaseException:
        stop_all(specs)
        raise
    return UpResult(info, False, time.monotonic() - started,
                    tuple(spec.name for spec in dead) if not fresh else ())


def down(root: Path, purge: bool = False) -> list[str]:
    """Stop the daemons that `up` started in ``root``; return those that needed SIGKILL."""
    layout = Layout(root.resolve())
    if layout.read_state() is None:
        if purge and not layout.root.exists():
            return []
        raise DevClusterError(f"{layout.root} holds no embedded cluster")
    killed = stop_all(daemon_specs(layout))
    if purge:
        shutil.rmtree(layout.root)
    return killed


def status(root: Path) -> dict[str, bool]:
    layout = Layout(root.resolve())
    if layout.read_state() is None:
        raise DevClusterError(f"{layout.root} holds no embedded cluster")
    return {spec.name: spec.running() for spec in daemon_specs(layout)}


def kill(root: Path, name: str, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
    """Signal one daemon (``mon``, ``mgr``, ``osd`` or ``rgw``) by its recorded pid and wait
    for it to exit; `up` starts it again. For fault injection."""
    layout = Layout(root.resolve())
    specs = {spec.name: spec for spec in daemon_specs(layout)}
    if name not in specs:
        raise DevClusterError(f"no daemon {name!r}: use one of {', '.join(specs)}")
    record = specs[name].record()
    if record is None or not is_running(record):
        return
    os.kill(record.pid, sig)
    deadline = time.monotonic() + timeout
    while is_running(record):
        if time.monotonic() > deadline:
            raise DevClusterError(f"{name} did not exit after signal {sig}")
        time.sleep(0.05)
