"""rbd-restore: instant restore of Ceph RBD volumes from backups kept in S3."""

__version__ = "0.1.0"
