"""A Cinder backup driver that writes rbd-restore backups.

``openstack volume backup create V`` snapshots the volume's RBD image and
stores it as an rbd-restore backup: incremental by RBD snapshot diff against
the volume's previous backup, deduplicated by content across every volume,
with the volume's description (id, project, name, type, zone, size, bootable,
image and volume metadata) as labels. Every backup is complete on its own, so
Cinder is told nothing about parents and any backup can be deleted, except one
that an unfinished restore still reads: that delete fails, and the backup is
left in ``error`` until it can go.

Restores into a volume (``openstack volume backup restore``) stream the backup
into it; ``openstack volume create --backup`` with
``rbd_restore_cinder.volume.RBDRestoreDriver`` restores instantly instead.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from typing import Any

from cinder import exception, objects
from cinder.backup import driver
from oslo_config import cfg
from oslo_log import log as logging

from rbd_restore_cinder import cli
from rbd_restore_cinder.volume import SERVICE_KEY, rbd_restore_backup_id

LOG = logging.getLogger(__name__)
CONF = cfg.CONF
CONF.register_opts(cli.OPTS)
BLOCK = 4 << 20


def volume_labels(volume: Any) -> dict[str, str]:
    """What the backup records of a Cinder volume (docs/openstack.md)."""
    labels = {"openstack.volume_id": volume.id, "openstack.project_id": volume.project_id,
              "openstack.name": volume.display_name or "",
              "openstack.volume_type": volume.volume_type.name if volume.volume_type else "",
              "openstack.availability_zone": volume.availability_zone or "",
              "openstack.size_gb": str(volume.size),
              "openstack.bootable": "true" if volume.bootable else "false"}
    image_meta = volume.glance_metadata if "glance_metadata" in volume else None
    if image_meta:
        labels["openstack.volume_image_metadata"] = json.dumps(
            {m.key: m.value for m in image_meta} if not isinstance(image_meta, dict)
            else image_meta, sort_keys=True)
    return labels


class RBDRestoreBackupDriver(driver.BackupDriver):  # type: ignore[misc]  # cinder: no types
    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.configuration = CONF

    def check_for_setup_error(self) -> None:
        try:
            done = subprocess.run(cli.command(self.configuration, "--version"),
                                  capture_output=True, text=True, timeout=60, check=False)
        except OSError as exc:
            raise exception.ConfigNotFound(path=self.configuration.rbd_restore_command) \
                from exc
        if done.returncode != 0:
            raise exception.BackupDriverException(
                reason=f"rbd-restore does not run: {done.stderr.strip()[-200:]}")

    def backup(self, backup: Any, volume_file: Any, backup_metadata: bool = False
               ) -> dict[str, Any]:
        pool = getattr(volume_file, "rbd_pool", None)
        if not pool:
            raise exception.BackupDriverException(
                reason="rbd-restore backs up RBD volumes only (the volume is not RBD)")
        volume = objects.Volume.get_by_id(self.context, backup.volume_id)
        labels = volume_labels(volume)
        labels["openstack.cinder_backup_id"] = backup.id
        labels["openstack.volume_meta"] = self.get_metadata(volume.id)
        # The volume's own image, even when Cinder attached a temporary copy of an
        # in-use volume: the snapshot is consistent, and the diff against the last
        # backup's snapshot of this image makes it incremental.
        args = ["backup", f"{pool}/{volume.name}"]
        args += [f"--label={key}={value}" for key, value in labels.items()]
        try:
            result = cli.run(self.configuration, *args)
        except cli.RbdRestoreError as exc:
            raise exception.BackupDriverException(reason=exc.message) from None
        LOG.info("backup %(backup)s of volume %(volume)s is rbd-restore backup %(id)s "
                 "(read %(read)d bytes, uploaded %(up)d)",
                 {"backup": backup.id, "volume": volume.id, "id": result["backup_id"],
                  "read": result["bytes_read"], "up": result["bytes_uploaded"]})
        return {"service_metadata": json.dumps({SERVICE_KEY: result["backup_id"]})}

    def restore(self, backup: Any, volume_id: str, volume_file: Any,
                volume_is_new: bool) -> None:
        backup_id = rbd_restore_backup_id(backup)
        if backup_id is None:
            raise exception.InvalidBackup(reason="not an rbd-restore backup")
        # Its stderr goes to a file: a pipe nobody reads while the data is copied
        # stops the export once it fills (64 KiB), and this loop with it.
        with tempfile.TemporaryFile() as errors:
            stream = subprocess.Popen(cli.command(self.configuration, "backups", "export",
                                                  backup_id, "-"),
                                      stdout=subprocess.PIPE, stderr=errors)
            assert stream.stdout is not None
            try:
                _copy(stream.stdout, volume_file, volume_is_new)
            finally:
                stream.stdout.close()  # after a write that failed here, the export ends
                returncode = stream.wait()
            if returncode != 0:
                errors.seek(0)
                reason = errors.read().decode(errors="replace").strip()[-300:]
                raise exception.BackupDriverException(reason=reason or "export failed")
        volume_file.flush()
        labels = (cli.run(self.configuration, "backups", "show", backup_id).get("labels")
                  or {})
        if labels.get("openstack.volume_meta"):
            self.put_metadata(volume_id, labels["openstack.volume_meta"])

    def delete_backup(self, backup: Any) -> None:
        backup_id = rbd_restore_backup_id(backup)
        if backup_id is None:
            LOG.warning("backup %s has no rbd-restore backup: nothing to delete", backup.id)
            return
        try:
            cli.run(self.configuration, "backups", "delete", backup_id)
        except cli.RbdRestoreError as exc:
            if exc.code == 4:  # gone already
                return
            raise exception.BackupOperationError(exc.message) from None

    def export_record(self, backup: Any) -> dict[str, Any]:
        return {}

    def import_record(self, backup: Any, driver_info: Any) -> None:
        return None


def _copy(source: Any, volume_file: Any, volume_is_new: bool) -> None:
    zero = bytes(BLOCK)
    while block := source.read(BLOCK):
        if volume_is_new and block == zero[:len(block)]:
            volume_file.seek(len(block), 1)  # a new volume reads zeros there already
        else:
            volume_file.write(block)


def get_backup_driver(context: Any) -> RBDRestoreBackupDriver:
    return RBDRestoreBackupDriver(context)
