"""End to end with real Cinder services (API, scheduler, volume, backup over RabbitMQ, MariaDB,
noauth) and the real openstack CLI: a backup through our backup driver, a volume created
from it through our volume driver, booted in QEMU before its relocation ends."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rbd_restore import devcluster
from tests.support.helpers import Cli, export_digest
from tests.support.vm import Vm, build_guest

pytestmark = pytest.mark.services


def migration_state(cluster: devcluster.ClusterInfo, image: str) -> str:
    done = subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "status",
                           f"volumes/{image}", "--format", "json"],
                          capture_output=True, text=True, check=False)
    if '"migration"' not in done.stdout:
        return "none"
    import json

    state: str = json.loads(done.stdout)["migration"]["state"]
    return state


def head_digest(cluster: devcluster.ClusterInfo, image: str, length: int) -> str:
    """SHA-256 of the first ``length`` bytes of an image (rbd export)."""
    import hashlib

    done = subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "export", f"volumes/{image}",
                           "-"], capture_output=True, check=True)
    assert done.stdout[length:].count(0) == len(done.stdout) - length  # zeros past it
    return hashlib.sha256(done.stdout[:length]).hexdigest()


def relocate(cli: Cli, image: str) -> None:
    """Run the job of ``volumes/IMAGE`` to its end (and no other job)."""
    jobs = [j["id"] for j in cli.json("status")["jobs"] if j["image"] == f"volumes/{image}"]
    assert len(jobs) == 1, jobs
    run = cli.run("jobs", "run", jobs[0], "--once", timeout=300)
    assert run.returncode == 0, run.stderr[-1000:]


@pytest.fixture(scope="module")
def bootable_backup(cinder: Any, cluster: devcluster.ClusterInfo) -> dict[str, Any]:
    """A Cinder volume holding the test guest, bootable, with image metadata, backed up
    by `openstack volume backup create` through rbd-restore's backup driver."""
    guest_dir, info = build_guest()
    source = cinder.openstack("volume", "create", "--size", "1", "guest-src", "-f", "json")
    cinder.wait_status("volume", source["id"], "available")
    subprocess.run(["qemu-img", "convert", "-n", "-O", "raw", str(guest_dir / "root.img"),
                    f"rbd:volumes/volume-{source['id']}:conf={cluster.ceph_conf}"], check=True)
    cinder.openstack("volume", "set", "--bootable", "--image-property", "hw_disk_bus=virtio",
                     source["id"])
    started = time.monotonic()
    shown = cinder.create_backup(source["id"], "guest-backup")
    return {"source": source, "backup": shown, "guest": guest_dir, "info": info,
            "backup_seconds": time.monotonic() - started,
            "digest": export_digest(cluster, f"volumes/volume-{source['id']}")}


def test_volume_create_from_backup_boots_before_relocation_ends_and_commits(
        cinder: Any, cluster: devcluster.ClusterInfo, cli: Cli,
        bootable_backup: dict[str, Any], tmp_path: Path) -> None:
    backup = bootable_backup["backup"]
    stored = [b for b in cli.json("backups", "list")["backups"]
              if b["labels"].get("openstack.cinder_backup_id") == backup["id"]]
    assert len(stored) == 1, "the Cinder backup is an rbd-restore backup"
    labels = stored[0]["labels"]
    assert labels["openstack.volume_id"] == bootable_backup["source"]["id"]
    assert labels["openstack.bootable"] == "true"

    started = time.monotonic()
    created = cinder.openstack("volume", "create", "--backup", backup["id"], "--size", "1",
                               "restored", "-f", "json")
    volume = cinder.wait_status("volume", created["id"], "available", timeout=120)
    ready = time.monotonic() - started
    image = f"volume-{volume['id']}"
    assert migration_state(cluster, image) == "prepared"  # data still in S3
    assert volume["bootable"] == "true"
    assert volume["volume_image_metadata"]["hw_disk_bus"] == "virtio"

    vm = Vm(bootable_backup["guest"], f"rbd:volumes/{image}:conf={cluster.ceph_conf}",
            tmp_path / "console")
    vm.start()
    try:
        vm.wait_for(bootable_backup["info"]["marker"])
        assert vm.sums() == bootable_backup["info"]["sums"]
        vm.wait_exit()
    finally:
        vm.stop()
    assert migration_state(cluster, image) == "prepared"  # booted before any relocation

    relocate(cli, image)
    assert migration_state(cluster, image) == "none"  # an ordinary image now
    assert cinder.wait_status("volume", volume["id"], "available")["bootable"] == "true"
    print(f"\nvolume from backup available after {ready:.1f} s (backup took "
          f"{bootable_backup['backup_seconds']:.1f} s)")


def test_a_relocating_volume_is_not_deleted_and_its_backup_is_held(
        cinder: Any, cluster: devcluster.ClusterInfo, cli: Cli,
        bootable_backup: dict[str, Any]) -> None:
    backup = bootable_backup["backup"]
    created = cinder.openstack("volume", "create", "--backup", backup["id"], "--size", "2",
                               "held", "-f", "json")
    volume = cinder.wait_status("volume", created["id"], "available", timeout=120)
    assert volume["size"] == 2  # larger than the backup's volume: the image grew

    # Cinder's delete: librbd refuses while the image relocates; the volume stays.
    cinder.openstack("volume", "delete", volume["id"])
    time.sleep(3)
    assert cinder.wait_status("volume", volume["id"], "available")["id"] == volume["id"]
    assert migration_state(cluster, f"volume-{volume['id']}") == "prepared"

    # The backup it reads cannot be deleted meanwhile: the backup goes to error.
    cinder.openstack("volume", "backup", "delete", backup["id"])
    deadline = time.monotonic() + 60
    while (shown := cinder.request("GET", f"/backups/{backup['id']}")[1]["backup"])[
            "status"] != "error":
        assert time.monotonic() < deadline, shown
        time.sleep(0.5)
    assert "in use" in shown["fail_reason"]

    relocate(cli, f"volume-{volume['id']}")
    assert migration_state(cluster, f"volume-{volume['id']}") == "none"
    digest = export_digest(cluster, f"volumes/volume-{volume['id']}")
    assert digest != "" and cinder.request("POST", f"/volumes/{volume['id']}/action",
                                           {"os-extend": {"new_size": 3}})[0] == 202
    # Committed: now both go.
    cinder.openstack("volume", "delete", volume["id"])
    deadline = time.monotonic() + 60
    while cinder.request("GET", f"/volumes/{volume['id']}")[0] != 404:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    cinder.request("POST", f"/backups/{backup['id']}/action",
                   {"os-reset_status": {"status": "available"}})
    cinder.openstack("volume", "backup", "delete", backup["id"])
    deadline = time.monotonic() + 60
    while cinder.request("GET", f"/backups/{backup['id']}")[0] != 404:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_what_cinder_can_do_with_a_volume_still_relocating(
        cinder: Any, cluster: devcluster.ClusterInfo, cli: Cli,
        bootable_backup: dict[str, Any]) -> None:
    """Each operation tried on a volume whose image still migrates from its backup; what
    happened is printed and docs/openstack.md reports it."""
    backup = cinder.create_backup(bootable_backup["source"]["id"], "for-relocating")
    created = cinder.openstack("volume", "create", "--backup", backup["id"], "--size", "1",
                               "relocating", "-f", "json")
    volume = cinder.wait_status("volume", created["id"], "available", timeout=120)
    image = f"volume-{volume['id']}"
    outcomes: dict[str, str] = {}

    cinder.openstack("volume", "set", "--size", "2", volume["id"])  # extend
    extended = cinder.wait_status("volume", volume["id"], "available")
    outcomes["extend"] = f"size {extended['size']} GiB"

    snap = cinder.openstack("volume", "snapshot", "create", "--volume", volume["id"],
                            "snap-while-relocating", "-f", "json")
    deadline = time.monotonic() + 60
    while (snapshot := cinder.request("GET", f"/snapshots/{snap['id']}")[1]["snapshot"])[
            "status"] not in ("available", "error"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    outcomes["snapshot"] = snapshot["status"]
    clone_image = None
    if snapshot["status"] == "available":
        clone = cinder.openstack("volume", "create", "--snapshot", snap["id"],
                                 "clone-of-relocating", "-f", "json")
        try:
            cloned = cinder.wait_status("volume", clone["id"], "available", timeout=120)
            outcomes["clone from snapshot"] = cloned["status"]
            clone_image = f"volume-{clone['id']}"
        except AssertionError as exc:
            outcomes["clone from snapshot"] = f"error ({exc})"[:200]
    assert migration_state(cluster, image) == "prepared"
    relocate(cli, image)
    assert migration_state(cluster, image) == "none"
    outcomes["commit afterwards"] = "committed"
    final = cinder.wait_status("volume", volume["id"], "available")
    print("\nrelocating volume:", outcomes)
    assert final["size"] == 2 and outcomes["snapshot"] == "available"
    # The bytes: the backup's gigabyte, then zeros, in the volume and in the clone.
    want = bootable_backup["digest"]
    assert head_digest(cluster, image, 1 << 30) == want
    assert clone_image is not None and head_digest(cluster, clone_image, 1 << 30) == want


def test_cinders_own_restore_into_a_volume_streams_the_backup(
        cinder: Any, cluster: devcluster.ClusterInfo, bootable_backup: dict[str, Any]) -> None:
    """`openstack volume backup restore B V`: Cinder attaches V and our backup driver
    writes the backup into it (backups export), then re-applies the metadata."""
    backup = cinder.create_backup(bootable_backup["source"]["id"], "for-generic-restore")
    target = cinder.openstack("volume", "create", "--size", "1", "generic-target", "-f",
                              "json")
    cinder.wait_status("volume", target["id"], "available")
    cinder.openstack("volume", "backup", "restore", "--force", backup["id"], target["id"],
                     "-f", "json")
    restored = cinder.wait_status("volume", target["id"], "available", timeout=300)
    assert cinder.wait_status("backup", backup["id"], "available")["id"] == backup["id"]
    assert export_digest(cluster, f"volumes/volume-{target['id']}") == \
        bootable_backup["digest"]
    assert restored["bootable"] == "true"
