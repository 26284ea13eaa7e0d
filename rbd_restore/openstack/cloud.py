"""The Cinder API, through openstacksdk: volumes by id or name, their backend and image,
and the status changes that keep Cinder's database in step with an image rbd-restore
replaced.

Credentials come from ``--os-cloud`` / ``$OS_CLOUD`` (clouds.yaml, searched where
openstacksdk searches it) or the ``OS_*`` variables. The calls that read a
volume's host and ``name_id`` and reset its status need an admin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rbd_restore.errors import (
    AlreadyExistsError,
    ConfigError,
    NotFoundError,
    UnavailableError,
    UserError,
)


@dataclass(frozen=True)
class CinderVolume:
    id: str
    name: str
    status: str
    size_gb: int
    host: str  # os-vol-host-attr:host, host@backend#pool (admin only)
    name_id: str  # os-vol-mig-status-attr:name_id: the image's id part after a migration
    project_id: str
    volume_type: str
    availability_zone: str
    bootable: bool
    encrypted: bool
    multiattach: bool
    attached: bool
    image_metadata: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, raw: Any) -> CinderVolume:
        return cls(id=str(raw.id), name=str(raw.name or ""), status=str(raw.status),
                   size_gb=int(raw.size or 0), host=str(raw.host or ""),
                   name_id=str(raw.migration_id or ""), project_id=str(raw.project_id or ""),
                   volume_type=str(raw.volume_type or ""),
                   availability_zone=str(raw.availability_zone or ""),
                   bootable=str(raw.is_bootable).lower() == "true",
                   encrypted=bool(raw.is_encrypted), multiattach=bool(raw.is_multiattach),
                   attached=bool(raw.attachments),
                   image_metadata={str(k): str(v) for k, v in
                                   (raw.volume_image_metadata or {}).items()},
                   metadata={str(k): str(v) for k, v in (raw.metadata or {}).items()})

    def labels(self) -> dict[str, str]:
        """What an rbd-restore backup records of the volume (docs/openstack.md)."""
        import json

        labels = {"openstack.volume_id": self.id, "openstack.project_id": self.project_id,
                  "openstack.name": self.name, "openstack.volume_type": self.volume_type,
                  "openstack.availability_zone": self.availability_zone,
                  "openstack.size_gb": str(self.size_gb),
                  "openstack.bootable": "true" if self.bootable else "false"}
        if self.image_metadata:
            labels["openstack.volume_image_metadata"] = json.dumps(self.image_metadata,
                                                                   sort_keys=True)
        return labels


def _sdk_error(exc: Exception, what: str) -> UserError:
    from openstack import exceptions as sdk

    text = " ".join(str(getattr(exc, "details", "") or exc).split())[:200]
    if isinstance(exc, sdk.NotFoundException | sdk.ResourceNotFound):
        return NotFoundError(f"{what}: not found in Cinder")
    if isinstance(exc, sdk.ConflictException):
        return AlreadyExistsError(f"{what}: {text}")
    if isinstance(exc, sdk.ForbiddenException):
        return UserError(f"{what}: Cinder refused it (admin rights needed): {text}")
    if isinstance(exc, sdk.ConfigException):
        return ConfigError(f"OpenStack credentials: {text}")
    return UnavailableError(f"{what}: the Cinder API failed: {text}")


class CinderApi:
    def __init__(self, cloud: str | None = None) -> None:
        try:
            import openstack
        except ImportError:
            raise ConfigError("the Cinder API needs openstacksdk: install "
                              "rbd-restore[openstack]") from None
        try:
            self.conn = openstack.connect(cloud=cloud) if cloud else openstack.connect()
            self.volumes = self.conn.block_storage
        except Exception as exc:
            raise _sdk_error(exc, "connecting to OpenStack") from None

    def _call(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            raise _sdk_error(exc, what) from None

    def volume(self, name_or_id: str) -> CinderVolume:
        raw = self._call(f"volume {name_or_id}", self.volumes.find_volume, name_or_id,
                         ignore_missing=False, all_projects=True)
        raw = self._call(f"volume {name_or_id}", self.volumes.get_volume, raw.id)
        return CinderVolume.of(raw)

    def volumes_by_id(self) -> dict[str, CinderVolume]:
        found = self._call("listing volumes", self.volumes.volumes, details=True,
                           all_projects=True)
        return {str(v.id): CinderVolume.of(v) for v in found}

    def snapshot_count(self, volume_id: str) -> int:
        return sum(1 for _ in self._call("listing snapshots", self.volumes.snapshots,
                                         details=False, all_projects=True,
                                         volume_id=volume_id))

    def create_volume(self, name: str, size_gb: int, volume_type: str | None,
                      availability_zone: str | None) -> CinderVolume:
        args: dict[str, Any] = {"name": name, "size": size_gb}
        if volume_type:
            args["volume_type"] = volume_type
        if availability_zone:
            args["availability_zone"] = availability_zone
        raw = self._call(f"creating volume {name}", self.volumes.create_volume, **args)
        return self.wait_status(str(raw.id), ("available",))

    def delete_volume(self, volume_id: str) -> None:
        self._call(f"deleting volume {volume_id}", self.volumes.delete_volume, volume_id,
                   force=True)

    def wait_status(self, volume_id: str, wanted: tuple[str, ...],
                    timeout: float = 300) -> CinderVolume:
        deadline = time.monotonic() + timeout
        while True:
            volume = self.volume(volume_id)
            if volume.status in wanted:
                return volume
            if volume.status.startswith("error") or time.monotonic() > deadline:
                raise UserError(f"volume {volume_id} is {volume.status}, not "
                                f"{' or '.join(wanted)}")
            time.sleep(0.3)

    def reset_status(self, volume_id: str, status: str) -> None:
        self._call(f"setting volume {volume_id} {status}", self.volumes.reset_volume_status,
                   volume_id, status, None, None)

    def set_bootable(self, volume_id: str, bootable: bool) -> None:
        self._call(f"setting volume {volume_id} bootable", self.volumes.set_volume_bootable_status,
                   volume_id, bootable)

    def set_image_metadata(self, volume_id: str, metadata: dict[str, str]) -> None:
        if metadata:
            self._call(f"setting volume {volume_id} image metadata",
                       self.volumes.set_volume_image_metadata, volume_id, **metadata)

    def set_metadata(self, volume_id: str, metadata: dict[str, str]) -> None:
        self._call(f"setting volume {volume_id} metadata", self.volumes.set_volume_metadata,
                   volume_id, **metadata)

    def backup_location(self, backup_id: str) -> tuple[str, str]:
        """A Cinder backup's volume id and bucket (container)."""
        raw = self._call(f"Cinder backup {backup_id}", self.volumes.get_backup, backup_id)
        return str(raw.volume_id), str(raw.container or "")

    def check_admin(self) -> int:
        """Services Cinder reports (an admin-only call): the API answers and we are admin."""
        services = self._call("listing Cinder services (admin only)",
                              lambda: list(self.conn.block_storage.services()))
        return len(services)
