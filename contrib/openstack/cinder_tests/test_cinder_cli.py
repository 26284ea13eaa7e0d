"""``rbd-restore cinder`` against real Cinder services: backups by volume name, restores
into a new volume (instantly, ready in under 2 s) and in place, status joined with
Cinder, abort, the doctor."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from typing import Any

import pytest
import rbd

from rbd_restore import devcluster
from tests.support.helpers import Cli, export_digest

pytestmark = pytest.mark.services
MiB = 1 << 20


@pytest.fixture(scope="module")
def cinder_cli(cinder: Any, cli: Cli) -> Any:
    """Runs ``rbd-restore cinder ...`` with the test bed's cinder.conf and cloud."""
    env = {"OS_CLIENT_CONFIG_FILE": str(cinder.clouds), "OS_CLOUD": "rbd-restore-test"}

    def run(*args: str, ok: bool = True) -> Any:
        done = cli.run("cinder", "--cinder-config", str(cinder.conf), *args, env=env)
        if not ok:
            assert done.returncode != 0, done.stdout
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
            return lines[0]
        assert done.returncode == 0, done.stderr[-1500:]
        return json.loads(done.stdout) if "--json" in args else done.stdout

    return run


def volume_with_data(cinder: Any, rados_cluster: Any, name: str, seed: int) -> dict[str, Any]:
    created = cinder.openstack("volume", "create", "--size", "1", name, "-f", "json")
    cinder.wait_status("volume", created["id"], "available")
    with rados_cluster.open_ioctx("volumes") as ioctx, \
            rbd.Image(ioctx, f"volume-{created['id']}") as image:
        rng = random.Random(seed)
        for offset in (0, 100 * MiB, 700 * MiB):
            image.write(rng.randbytes(3 * MiB), offset)
    return created  # type: ignore[no-any-return]


def job_done(cli: Cli, job_id: str) -> None:
    run = cli.run("jobs", "run", job_id, "--once", timeout=300)
    assert run.returncode == 0, run.stderr[-1000:]


def test_check_sees_backend_fetcher_and_api(cinder_cli: Any) -> None:
    result = cinder_cli("check", "--json")
    assert result["ok"] and {c["check"] for c in result["checks"]} >= {
        "backend ceph", "librbd", "fetcher control plane", "Cinder API (admin)"}


def test_backup_by_name_then_instant_restore_into_a_new_volume(
        cinder: Any, cinder_cli: Any, cli: Cli, cluster: devcluster.ClusterInfo,
        rados_cluster: Any) -> None:
    source = volume_with_data(cinder, rados_cluster, "cli-src", 1)
    cinder.openstack("volume", "set", "--bootable", "--image-property", "hw_qemu_guest_agent=yes",
                     source["id"])
    want = export_digest(cluster, f"volumes/volume-{source['id']}")
    backup = cinder_cli("backup", "cli-src", "--json")  # by name
    assert backup["volume_id"] == source["id"]
    listed = cinder_cli("backups", "list", "--volume", "cli-src", "--json")["backups"]
    assert [b["backup_id"] for b in listed] == [backup["backup_id"]]
    assert listed[0]["bootable"] and listed[0]["size_gb"] == 1

    plan = cinder_cli("restore", backup["backup_id"], "--new-volume", "--dry-run", "--json")
    assert plan["dry_run"] and plan["target"] == "new" and plan["volume_name"] == "cli-src"
    result = cinder_cli("restore", backup["backup_id"], "--new-volume", "--name", "cli-new",
                        "--mode", "instant", "--size", "100", "--json")
    # 100 GiB could not be copied this soon (nor held by the test cluster's 6 GiB OSD):
    # nothing was. How soon it is ready is bench/'s to measure, not a test's to time.
    assert result["ready_seconds"] < 30, result
    print(f"\ncinder restore --new-volume --mode instant: ready in {result['ready_seconds']} s")
    volume = cinder.wait_status("volume", result["volume_id"], "available")
    assert volume["bootable"] == "true" and volume["name"] == "cli-new"
    assert volume["size"] == 100
    assert volume["volume_image_metadata"]["hw_qemu_guest_agent"] == "yes"
    assert volume["metadata"]["rbd_restore_backup_id"] == backup["backup_id"]

    rows = [r for r in cinder_cli("status", "--json")["jobs"] if r["id"] == result["job_id"]]
    assert rows[0]["volume_id"] == result["volume_id"]
    assert rows[0]["volume_status"] == "available" and rows[0]["state"] == "staged"
    job_done(cli, result["job_id"])
    # The backup's gigabyte, and nothing allocated in the 99 GiB the volume grew by.
    with rados_cluster.open_ioctx("volumes") as ioctx, \
            rbd.Image(ioctx, f"volume-{result['volume_id']}", read_only=True) as image:
        assert image.size() == 100 << 30
        digest = hashlib.sha256()
        for offset in range(0, 1 << 30, 64 * MiB):
            digest.update(image.read(offset, 64 * MiB))
        extents: list[int] = []

        def allocated(offset: int, _length: int, _exists: bool) -> int:
            extents.append(offset)
            return 0

        image.diff_iterate(1 << 30, 99 << 30, None, allocated)
    assert digest.hexdigest() == want and extents == []
    # Gone again: Cinder counts its 100 GiB against the 6 GiB test cluster's thin
    # capacity (20x), and a 1 GiB volume made later in the run was refused (a CI run).
    cinder.openstack("volume", "delete", result["volume_id"])
    deadline = time.monotonic() + 60
    while cinder.request("GET", f"/volumes/{result['volume_id']}")[0] != 404:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_in_place_restore_fences_the_volume_keeps_the_old_image_until_commit_or_abort(
        cinder: Any, cinder_cli: Any, cli: Cli, cluster: devcluster.ClusterInfo,
        rados_cluster: Any) -> None:
    volume = volume_with_data(cinder, rados_cluster, "cli-inplace", 2)
    image = f"volumes/volume-{volume['id']}"
    backed_up = export_digest(cluster, image)
    backup_id = cinder_cli("backup", volume["id"], "--json")["backup_id"]
    with rados_cluster.open_ioctx("volumes") as ioctx, \
            rbd.Image(ioctx, f"volume-{volume['id']}") as handle:
        handle.write(os.urandom(MiB), 50 * MiB)  # the data the restore must undo
    changed = export_digest(cluster, image)

    assert "add --yes" in cinder_cli("restore", backup_id, "--volume", volume["id"], ok=False)
    assert cinder.request("POST", f"/volumes/{volume['id']}/action",
                          {"os-reset_status": {"status": "error"}})[0] == 202
    assert "available and detached" in cinder_cli("restore", backup_id, "--volume",
                                                  volume["id"], "--yes", ok=False)
    cinder.request("POST", f"/volumes/{volume['id']}/action",
                   {"os-reset_status": {"status": "available"}})

    # Abort: the previous image (with the newer data) comes back.
    first = cinder_cli("restore", backup_id, "--volume", volume["id"], "--yes", "--json")
    assert cinder.wait_status("volume", volume["id"], "available")["id"] == volume["id"]
    aborted = cinder_cli("abort", first["job_id"], "--json")
    assert aborted["put_back"] and not aborted["volume_deleted"]
    assert export_digest(cluster, image) == changed

    # Commit: the backup's data, the old image gone.
    second = cinder_cli("restore", backup_id, "--volume", volume["id"], "--yes", "--json")
    job_done(cli, second["job_id"])
    assert export_digest(cluster, image) == backed_up
    with rados_cluster.open_ioctx("volumes") as ioctx:
        leftovers = [n for n in rbd.RBD().list(ioctx) if n.startswith(f"volume-{volume['id']}.")]
    assert leftovers == []
    assert cinder.wait_status("volume", volume["id"], "available")["status"] == "available"

    # In full mode, the same swap with the data copied first.
    full = cinder_cli("restore", backup_id, "--volume", volume["id"], "--yes", "--mode",
                      "full", "--json")
    assert full["job_id"] is None and export_digest(cluster, image) == backed_up


def test_aborting_a_restore_into_a_new_volume_deletes_that_volume_only(
        cinder: Any, cinder_cli: Any, rados_cluster: Any) -> None:
    source = volume_with_data(cinder, rados_cluster, "cli-abort-src", 3)
    backup_id = cinder_cli("backup", source["id"], "--json")["backup_id"]
    result = cinder_cli("restore", backup_id, "--new-volume", "--name", "cli-abort-new",
                        "--json")
    aborted = cinder_cli("abort", result["job_id"], "--json")
    assert aborted["volume_deleted"] and not aborted["put_back"]
    deadline = time.monotonic() + 60
    while cinder.request("GET", f"/volumes/{result['volume_id']}")[0] != 404:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert cinder.wait_status("volume", source["id"], "available")["id"] == source["id"]
