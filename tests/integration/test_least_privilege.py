"""The cephx capabilities docs/security.md gives each role are enough, and no more is
needed: backup, instant restore, relocation and commit by users holding only
``profile rbd`` on the one pool (the fetcher holds no Ceph key at all)."""

from __future__ import annotations

import random
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import rbd

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, export_digest

MiB = 1 << 20
CAPS = ["mon", "profile rbd", "osd", "profile rbd pool=volumes",
        "mgr", "profile rbd pool=volumes"]


def ceph(cluster: devcluster.ClusterInfo, *args: str) -> str:
    return subprocess.run(["ceph", "-c", str(cluster.ceph_conf), *args], capture_output=True,
                          text=True, check=True, timeout=60).stdout


def user_with_pool_caps(cluster: devcluster.ClusterInfo, tmp_path: Path,
                        role: str) -> dict[str, str]:
    name = f"client.rr-{role}-{uuid.uuid4().hex[:6]}"
    keyring = tmp_path / f"{name}.keyring"
    keyring.write_text(ceph(cluster, "auth", "get-or-create", name, *CAPS))
    keyring.chmod(0o600)
    return {"RBD_RESTORE_CEPH_CLIENT_NAME": name, "RBD_RESTORE_CEPH_KEYRING": str(keyring)}


def test_backup_restore_and_runner_need_only_profile_rbd_on_the_pool(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, tmp_path: Path) -> None:
    prefix = f"caps-{uuid.uuid4().hex[:8]}/"
    name = f"caps-src-{uuid.uuid4().hex[:8]}"
    target = f"caps-dst-{uuid.uuid4().hex[:8]}"
    backup_user = user_with_pool_caps(cluster, tmp_path, "backup")
    runner_user = user_with_pool_caps(cluster, tmp_path, "runner")
    fetcher = FetcherProcess(cluster, tmp_path / "cache", prefix, {
        # The fetcher has no Ceph key: a keyring that does not exist proves it reads none.
        "RBD_RESTORE_CEPH_KEYRING": str(tmp_path / "absent.keyring"),
        "RBD_RESTORE_CEPH_CLIENT_NAME": "client.nobody"})
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, name, 16 * MiB, old_format=False)
        with rbd.Image(ioctx, name) as image:
            image.write(random.Random(11).randbytes(6 * MiB), 2 * MiB)
        fetcher.start()
        try:
            cli = Cli(cluster, prefix, fetcher.env_overrides)
            backup = cli.json("backup", f"volumes/{name}", env=backup_user)["backup_id"]
            job = cli.json("restore", backup, f"volumes/{target}", "--mode", "instant",
                           env=runner_user)["job_id"]
            run = subprocess.run(
                [sys.executable, "-m", "rbd_restore.cli", "jobs", "run", job, "--once",
                 "--log-level", "warning"], env=cli.env(runner_user), capture_output=True,
                text=True, timeout=300, check=False)
            assert run.returncode == 0, run.stderr
            assert cli.json("status", job, env=runner_user)["jobs"][0]["state"] == "committed"
            assert export_digest(cluster, f"volumes/{target}") == export_digest(
                cluster, f"volumes/{name}")
            # The same users are refused the dev cluster's other pool, in one line.
            with rados_cluster.open_ioctx("rbd") as other:
                rbd.RBD().create(other, name, MiB, old_format=False)
                try:
                    line = cli.fails("backup", f"rbd/{name}", env=backup_user)
                    assert f"image rbd/{name}" in line and "profile rbd pool=" in line
                    line = cli.fails("restore", backup, f"rbd/{target}", "--mode", "instant",
                                     env=runner_user)
                    assert "on pool rbd" in line and "profile rbd pool=" in line
                    assert target not in rbd.RBD().list(other)
                finally:
                    remove_image(other, name)
        finally:
            fetcher.stop()
            remove_image(ioctx, target)
            remove_image(ioctx, name)
            for user in (backup_user, runner_user):
                ceph(cluster, "auth", "del", user["RBD_RESTORE_CEPH_CLIENT_NAME"])
