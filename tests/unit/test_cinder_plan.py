"""The rules of a Cinder restore plan (rbd_restore/openstack/volumes.py), without a cloud."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from rbd_restore.ceph import ImageRef
from rbd_restore.errors import UsageError
from rbd_restore.openstack.cloud import CinderVolume
from rbd_restore.openstack.conf import CinderBackend
from rbd_restore.openstack.volumes import Placement, plan_restore
from rbd_restore.repo.manifest import Manifest, Source

GiB = 1 << 30
VOLUME = CinderVolume(id="1f0c", name="web-01", status="available", size_gb=20,
                      host="ctl@ceph#ceph", name_id="", project_id="p", volume_type="ssd",
                      availability_zone="nova", bootable=True, encrypted=False,
                      multiattach=False, attached=False)
BACKEND = CinderBackend("ceph", "cinder.volume.drivers.rbd.RBDDriver", "ceph", "volumes", "",
                        "cinder", "", "ceph", 4)


def backup(size: int = 10 * GiB, **labels: str) -> Manifest:
    return Manifest(backup_id="20261204T120000Z-0a1b2c3d", created="2026-12-04T12:00:00+00:00",
                    source=Source("f", "volumes", "volume-1f0c", "i", "s"), image_size=size,
                    chunk_size=4 << 20, chunks=[None] * (size // (4 << 20)),
                    labels={"openstack.name": "web-01", "openstack.size_gb": "10",
                            "openstack.volume_type": "ssd", **labels})


def placed(**changes: Any) -> Placement:
    return Placement(dataclasses.replace(VOLUME, **changes), BACKEND,
                     ImageRef("volumes", "volume-1f0c"))


def test_a_new_volume_takes_the_backups_name_size_and_type_unless_told() -> None:
    plan = plan_restore(backup(), "instant", None, None, None, None, None)
    assert (plan.volume_name, plan.size_gb, plan.volume_type) == ("web-01", 10, "ssd")
    plan = plan_restore(backup(), "full", None, "other", 50, "hdd", "az2")
    assert (plan.volume_name, plan.size_gb, plan.volume_type, plan.availability_zone) == (
        "other", 50, "hdd", "az2")


@pytest.mark.parametrize(("changes", "message"), [
    ({"encrypted": True}, "encrypted"),
    ({"multiattach": True}, "multiattach"),
    ({"status": "in-use", "attached": True}, "available and detached"),
    ({"status": "error"}, "available and detached"),
    ({"size_gb": 5}, "needs 10"),
])
def test_in_place_refusals(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan_restore(backup(), "instant", placed(**changes), None, None, None, None)


def test_in_place_refuses_a_volume_with_snapshots_and_small_sizes_and_bad_modes() -> None:
    with pytest.raises(UsageError, match="snapshot"):
        plan_restore(backup(), "instant", placed(), None, None, None, None, snapshots=2)
    with pytest.raises(UsageError, match="smaller than the backup"):
        plan_restore(backup(), "instant", None, None, 5, None, None)
    with pytest.raises(UsageError, match="instant or full"):
        plan_restore(backup(), "lazy", None, None, None, None, None)
    assert plan_restore(backup(), "instant", placed(), None, None, None, None).target == \
        "in-place"
