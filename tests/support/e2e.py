"""Helpers of the QEMU tests: a VM on a restored image, job runners, job states."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rbd_restore import devcluster
from tests.support.helpers import Cli
from tests.support.vm import Vm


def vm_on(site: dict[str, Any], cluster: devcluster.ClusterInfo, image: str,
          hold: int) -> Vm:
    return Vm(site["guest"], f"rbd:volumes/{image}:conf={cluster.ceph_conf}",
              site["work"] / f"{image}-{time.monotonic_ns()}.console", hold)


def runner(site: dict[str, Any], *args: str) -> subprocess.Popen[bytes]:
    cli: Cli = site["cli"]
    log = open(site["work"] / f"runner-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "rbd_restore.cli", "jobs", "run", *args],
                            env=cli.env(), stdout=log, stderr=subprocess.STDOUT)


def job(site: dict[str, Any], job_id: str) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = site["cli"].json("status", job_id)["jobs"]
    return jobs[0]


def wait_job(site: dict[str, Any], job_id: str, done: Any, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        current = job(site, job_id)
        if done(current):
            return current
        assert time.monotonic() < deadline, current
        time.sleep(0.2)


OBJECT = 4 << 20


def objects_differing(cluster: devcluster.ClusterInfo, image: str, original: Path) -> int:
    exported = original.parent.parent / f"{image}.export"
    subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "export", "--no-progress",
                    f"volumes/{image}", str(exported)], check=True)
    differing = 0
    with open(exported, "rb") as got, open(original, "rb") as want:
        while True:
            a, b = got.read(OBJECT), want.read(OBJECT)
            if not a and not b:
                break
            differing += a != b
    written = subprocess.run(["debugfs", "-R", "cat /written-by-guest", str(exported)],
                             capture_output=True, text=True, check=True).stdout
    exported.unlink()
    assert "written by the guest" in written
    return differing


def guest_files(cluster: devcluster.ClusterInfo, image: str, work: Path,
                paths: list[str]) -> dict[str, str]:
    """SHA-256 of files in the guest's file system, read from an export of the image."""
    exported = work / f"{image}.files.export"
    subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "export", "--no-progress",
                    f"volumes/{image}", str(exported)], check=True)
    try:
        found = {}
        for path in paths:
            data = subprocess.run(["debugfs", "-R", f"cat {path}", str(exported)],
                                  capture_output=True, check=True).stdout
            found[path] = hashlib.sha256(data).hexdigest()
        return found
    finally:
        exported.unlink()
