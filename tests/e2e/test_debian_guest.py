"""A real distribution on an instant restore: Debian 12 with systemd (udev, journald,
D-Bus, its getty) from scripts/build-debian-guest.py boots in QEMU on the staged image,
writing to it as any server does, then the relocation commits and the file system is
clean."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.e2e import job, runner
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli
from tests.support.vm import REPO, Vm

# Files systemd and the shell run at every boot: read through the fetcher, and then
# copied by the relocation; compared with the disk the backup was taken of.
CHECKED = ["/usr/lib/systemd/systemd", "/usr/bin/bash", "/usr/lib/x86_64-linux-gnu/libc.so.6"]


@pytest.fixture(scope="module")
def debian() -> tuple[Path, dict[str, Any]]:
    subprocess.run([sys.executable, str(REPO / "scripts" / "build-debian-guest.py")],
                   check=True, capture_output=True)
    guest = REPO / ".cache" / "debian-guest"
    return guest, json.loads((guest / "guest.json").read_text())


def file_sums(disk: Path) -> dict[str, str]:
    sums = {}
    for path in CHECKED:
        data = subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)],
                              capture_output=True, check=True).stdout
        assert data, path
        sums[path] = hashlib.sha256(data).hexdigest()
    return sums


@pytest.fixture
def restored(cluster: devcluster.ClusterInfo, rados_cluster: Any,
             debian: tuple[Path, dict[str, Any]],
             tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The Debian disk backed up (and the original deleted), a fetcher serving it, and an
    instant restore of it."""
    guest, _ = debian
    prefix = f"debian-{uuid.uuid4().hex[:8]}/"
    fetcher = FetcherProcess(cluster, tmp_path / "cache", prefix)
    fetcher.start()
    cli = Cli(cluster, prefix, fetcher.env_overrides)
    source, target = f"debian-src-{uuid.uuid4().hex[:6]}", f"debian-{uuid.uuid4().hex[:6]}"
    try:
        with rados_cluster.open_ioctx("volumes") as ioctx:
            subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "import", "--no-progress",
                            str(guest / "root.img"), f"volumes/{source}"], check=True)
            backup = cli.json("backup", f"volumes/{source}")["backup_id"]
            remove_image(ioctx, source)
            started = cli.json("restore", backup, f"volumes/{target}", "--mode", "instant")
            yield {"cli": cli, "job": started["job_id"], "target": target, "work": tmp_path}
    finally:
        fetcher.stop()
        with rados_cluster.open_ioctx("volumes") as ioctx:
            deadline = time.monotonic() + 90
            while True:  # a killed QEMU's watch lingers until the OSD times it out
                try:
                    remove_image(ioctx, target)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            remove_image(ioctx, source)


def test_debian_with_systemd_boots_on_an_instant_restore_and_commits_a_clean_disk(
        cluster: devcluster.ClusterInfo, debian: tuple[Path, dict[str, Any]],
        restored: dict[str, Any]) -> None:
    guest, info = debian
    vm = Vm(guest, f"rbd:volumes/{restored['target']}:conf={cluster.ceph_conf}",
            restored["work"] / "console.txt")
    vm.start()
    try:
        vm.wait_for(info["marker"], timeout=600)
        vm.wait_exit(timeout=300)
    finally:
        vm.stop()
    console = vm.output()
    assert f"{info['marker']} failed-units=0" in console, console[-3000:]
    assert "I/O error" not in console and "EXT4-fs error" not in console
    site = {"cli": restored["cli"], "work": restored["work"]}
    assert runner(site, restored["job"], "--once").wait(timeout=300) == 0
    assert job(site, restored["job"])["state"] == "committed"
    exported = restored["work"] / "committed.img"
    subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "export", "--no-progress",
                    f"volumes/{restored['target']}", str(exported)], check=True)
    try:
        # Shut down cleanly on the staged image, then relocated: no repair needed.
        fsck = subprocess.run(["e2fsck", "-fn", str(exported)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert file_sums(exported) == file_sums(guest / "root.img")
        # The guest wrote (its journal, machine id, logs): the image is its own now.
        assert subprocess.run(["cmp", "-s", str(exported), str(guest / "root.img")]
                              ).returncode == 1
    finally:
        exported.unlink()
