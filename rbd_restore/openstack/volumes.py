"""Backups and restores of Cinder volumes, by volume id or name (``rbd-restore cinder``).

A volume's image is found the way Cinder finds it: the backend from its host
(``host@backend#pool``), the pool and Ceph user from that backend's section of
cinder.conf, the name from ``volume_name_template % (name_id or id)``.

Restores keep Cinder's database in step. Into a new volume: Cinder creates it
(quota, type, zone, project stay Cinder's), then its empty image is replaced
by the restore. In place: the volume must be available and detached; it is in
``maintenance`` while its image is swapped and put back to ``available``
whatever happens; its previous image is kept aside until the restore commits
(and put back by an abort). Bootable and image metadata come from the backup.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rbd_restore.ceph import Cluster, ImageRef, image_exists, remove_image
from rbd_restore.config import Config
from rbd_restore.errors import UsageError, UserError
from rbd_restore.openstack.cloud import CinderApi, CinderVolume
from rbd_restore.openstack.conf import CinderBackend, CinderConf
from rbd_restore.repo.manifest import Manifest

MODES = ("instant", "full")
METADATA_KEY = "rbd_restore_backup_id"
# On a volume Cinder created for a restore: abort may delete it, and nothing else.
NEW_VOLUME_KEY = "rbd_restore_new_volume"


@dataclass(frozen=True)
class Placement:
    volume: CinderVolume
    backend: CinderBackend
    image: ImageRef

    def as_json(self) -> dict[str, Any]:
        return {"volume_id": self.volume.id, "volume_name": self.volume.name,
                "backend": self.backend.name, "image": str(self.image),
                "status": self.volume.status}


def placement(conf: CinderConf, volume: CinderVolume) -> Placement:
    if not volume.host:
        raise UserError(f"volume {volume.id} has no host (not scheduled yet, or the API "
                        "hides it: admin rights are needed)")
    backend = conf.backend_of_host(volume.host)
    if not backend.is_rbd:
        raise UsageError(f"volume {volume.id} is on backend {backend.name} "
                         f"({backend.volume_driver}), not RBD")
    return Placement(volume, backend, ImageRef(backend.pool,
                                               conf.image_name(volume.id, volume.name_id)))


def ceph_config(cfg: Config, backend: CinderBackend, keyring: str | None) -> Config:
    """rbd-restore's configuration with the backend's Ceph connection."""
    settings = backend.ceph_settings()
    if keyring:
        settings = dataclasses.replace(settings, keyring=keyring)
    return dataclasses.replace(cfg, ceph=settings)


def refuse_unsupported(volume: CinderVolume) -> None:
    if volume.encrypted:
        raise UsageError(f"volume {volume.id} is encrypted: rbd-restore does not back up or "
                         "restore encrypted Cinder volumes yet")
    if volume.multiattach:
        raise UsageError(f"volume {volume.id} is multiattach: not supported yet")


def backup_labels(volume: CinderVolume) -> dict[str, str]:
    return volume.labels()


@dataclass(frozen=True)
class RestorePlan:
    backup: Manifest
    mode: str
    target: str  # "new" or "in-place"
    volume_name: str
    size_gb: int
    volume_type: str | None
    availability_zone: str | None
    existing: Placement | None = None

    def as_json(self) -> dict[str, Any]:
        return {"backup_id": self.backup.backup_id, "mode": self.mode, "target": self.target,
                "volume_name": self.volume_name, "size_gb": self.size_gb,
                "volume_type": self.volume_type, "availability_zone": self.availability_zone,
                "volume_id": self.existing.volume.id if self.existing else None,
                "image": str(self.existing.image) if self.existing else None,
                "bootable": self.backup.labels.get("openstack.bootable") == "true",
                "source_volume_id": self.backup.labels.get("openstack.volume_id")}


def backup_size_gb(manifest: Manifest) -> int:
    return max(1, -(-manifest.image_size // (1 << 30)))


def plan_restore(manifest: Manifest, mode: str, existing: Placement | None, name: str | None,
                 size_gb: int | None, volume_type: str | None, az: str | None,
                 snapshots: int = 0) -> RestorePlan:
    if mode not in MODES:
        raise UsageError(f"--mode must be instant or full, not {mode!r}")
    needed = backup_size_gb(manifest)
    labels = manifest.labels
    if existing is not None:
        volume = existing.volume
        refuse_unsupported(volume)
        if volume.status != "available" or volume.attached:
            raise UsageError(f"volume {volume.id} is {volume.status}"
                             f"{' and attached' if volume.attached else ''}: an in-place "
                             "restore needs it available and detached")
        if snapshots:
            raise UsageError(f"volume {volume.id} has {snapshots} snapshot(s): replacing its "
                             "image would orphan them; restore into a new volume instead")
        if volume.size_gb < needed:
            raise UsageError(f"volume {volume.id} has {volume.size_gb} GiB, the backup needs "
                             f"{needed}")
        return RestorePlan(manifest, mode, "in-place", volume.name, volume.size_gb,
                           volume.volume_type, volume.availability_zone, existing)
    size = size_gb or int(labels.get("openstack.size_gb", needed))
    if size < needed:
        raise UsageError(f"--size {size} is smaller than the backup ({needed} GiB)")
    return RestorePlan(manifest, mode, "new", name or labels.get("openstack.name") or
                       f"restored-{manifest.backup_id}", size,
                       volume_type or labels.get("openstack.volume_type") or None,
                       az or labels.get("openstack.availability_zone") or None)


@contextmanager
def fenced(api: CinderApi, volume_id: str) -> Iterator[None]:
    """``maintenance`` while the image is swapped: Cinder then accepts no attach, delete,
    snapshot, backup or extend; always set back to ``available``."""
    api.reset_status(volume_id, "maintenance")
    try:
        yield
    finally:
        api.reset_status(volume_id, "available")


@contextmanager
def image_set_aside(cluster: Cluster, image: ImageRef, keep: bool) -> Iterator[str]:
    """Move ``image`` to a name of its own for the block; put it back when the block
    fails, remove it when it succeeds unless ``keep`` (an instant restore's job removes
    it at the commit)."""
    import rbd

    aside = f"{image.name}.rbd-restore-replaced-{secrets.token_hex(3)}"
    with cluster.ioctx(image.pool) as ioctx:
        rbd.RBD().rename(ioctx, image.name, aside)
        try:
            yield aside
        except BaseException:
            if not image_exists(ioctx, image.name):
                rbd.RBD().rename(ioctx, aside, image.name)
            raise
        if not keep:
            remove_image(ioctx, aside)


def grow_to(cluster: Cluster, image: ImageRef, size_gb: int) -> None:
    """The volume's size for its new image (a backup of a smaller volume); librbd grows
    a staged image too, its source's end reads as zeros."""
    import rbd

    with cluster.ioctx(image.pool) as ioctx, rbd.Image(ioctx, image.name) as handle:
        if handle.size() < size_gb << 30:
            handle.resize(size_gb << 30)


def apply_volume_metadata(api: CinderApi, volume_id: str, manifest: Manifest) -> None:
    labels = manifest.labels
    api.set_bootable(volume_id, labels.get("openstack.bootable") == "true")
    raw = labels.get("openstack.volume_image_metadata")
    if raw:
        api.set_image_metadata(volume_id, {str(k): str(v) for k, v in json.loads(raw).items()})
    api.set_metadata(volume_id, {METADATA_KEY: manifest.backup_id})


def elapsed_since(started: float) -> float:
    return round(time.monotonic() - started, 3)
