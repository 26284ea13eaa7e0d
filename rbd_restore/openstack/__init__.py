"""OpenStack integration: Cinder configuration, API and backups (rbd-restore cinder)."""
