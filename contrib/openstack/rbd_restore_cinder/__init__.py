"""rbd-restore inside Cinder: a volume driver (RBDRestoreDriver) restoring volumes from
rbd-restore backups instantly, and a backup driver (RBDRestoreBackupDriver) writing them.
See docs/openstack.md."""
