"""A Cinder volume driver: Cinder's RBDDriver, with volumes created from rbd-restore
backups by an instant restore.

``openstack volume create --backup B`` (API 3.47) reaches
``create_volume_from_backup``; for a backup written by
``rbd_restore_cinder.backup.RBDRestoreBackupDriver`` the new volume's image is
staged from the backup (librbd import-only migration from the fetcher) and the
volume is available in seconds, whatever its size; a job runner relocates and
commits it. Any other backup, and encrypted or multiattach volumes, take
Cinder's generic path (NotImplementedError). Everything else is RBDDriver's.

While a volume relocates, librbd refuses to remove its image and to move it to
the trash; RBDDriver then answers Cinder's busy error and the volume stays
available; the log says it is relocating.
"""

from __future__ import annotations

import json
from typing import Any

from cinder import context as cinder_context
from cinder import exception
from cinder.backup import driver as backup_driver
from cinder.volume.drivers import rbd as rbd_driver
from oslo_log import log as logging
from oslo_utils import units

from rbd_restore_cinder import cli

LOG = logging.getLogger(__name__)
SERVICE_KEY = "rbd_restore_backup_id"
MIGRATING = ("prepared", "executing", "executed")


def rbd_restore_backup_id(backup: Any) -> str | None:
    """The rbd-restore backup behind a Cinder backup written by our backup driver."""
    if not str(backup.service or "").startswith("rbd_restore_cinder."):
        return None
    try:
        metadata = json.loads(backup.service_metadata or "{}")
    except (TypeError, ValueError):
        return None
    value = metadata.get(SERVICE_KEY) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


class RBDRestoreDriver(rbd_driver.RBDDriver):  # type: ignore[misc]  # cinder: no types
    """RBDDriver with instant restores from rbd-restore backups."""

    VERSION = "1.0.0"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(cli.OPTS)

    def create_volume_from_backup(self, volume: Any, backup: Any) -> dict[str, Any]:
        backup_id = rbd_restore_backup_id(backup)
        if backup_id is None or volume.encryption_key_id or volume.multiattach:
            # Cinder's generic restore handles those (keys, multiattach features).
            raise NotImplementedError()
        spec = f"{self.configuration.rbd_pool}/{volume.name}"
        try:
            started = cli.run(self.configuration, "restore", backup_id, spec, "--mode",
                              "instant")
        except cli.RbdRestoreError as exc:
            raise exception.VolumeBackendAPIException(
                data=f"instant restore of backup {backup.id} failed: {exc.message}") from None
        try:
            return self._finish_restore(volume, backup_id, started)
        except Exception:
            # Nothing may stay staged behind a failed create: Cinder reschedules it or
            # the user tries again, and both need the name free.
            try:
                cli.run(self.configuration, "abort", started["job_id"])
            except cli.RbdRestoreError as exc:
                LOG.error("volume %s: could not abort job %s: %s", volume.id,
                          started["job_id"], exc.message)
            raise

    def _finish_restore(self, volume: Any, backup_id: str, started: dict[str, Any]
                        ) -> dict[str, Any]:
        shown = cli.run(self.configuration, "backups", "show", backup_id)
        wanted = int(volume.size) * units.Gi
        if wanted > int(shown["image_size"]):  # a larger volume than the backup's
            with rbd_driver.RBDVolumeProxy(self, volume.name) as image:
                image.resize(wanted)
        LOG.info("volume %(volume)s staged from rbd-restore backup %(backup)s in %(ready).2f s "
                 "(job %(job)s)", {"volume": volume.id, "backup": backup_id,
                                    "ready": started["ready_seconds"], "job": started["job_id"]})
        labels = shown.get("labels") or {}
        meta = labels.get("openstack.volume_meta")
        if meta:  # what the generic restore re-applies: volume and image metadata
            backup_driver.BackupMetadataAPI(cinder_context.get_admin_context()).put(
                volume.id, meta)
        update: dict[str, Any] = {}
        if labels.get("openstack.bootable") == "true":
            update["bootable"] = True
        return update

    def delete_volume(self, volume: Any) -> None:
        try:
            super().delete_volume(volume)
        except exception.VolumeIsBusy:
            # librbd refuses to remove (or trash) an image that is still migrating;
            # RBDDriver then reports the volume busy and Cinder keeps it. Say why.
            state = self._migration_state(volume.name)
            if state in MIGRATING:
                LOG.warning("volume %s is still relocating from its rbd-restore backup "
                            "(migration %s): it can be deleted once committed "
                            "(rbd-restore cinder status)", volume.id, state)
            raise

    def _migration_state(self, name: str) -> str | None:
        with rbd_driver.RADOSClient(self) as client:
            try:
                status = self.RBDProxy().migration_status(client.ioctx, name)
            except (self.rbd.InvalidArgument, self.rbd.ImageNotFound):
                return None  # not migrating, or gone
        names = {getattr(self.rbd, f"RBD_IMAGE_MIGRATION_STATE_{s.upper()}", None): s
                 for s in ("prepared", "executing", "executed", "preparing", "aborting")}
        return names.get(status.get("state"), "unknown")
