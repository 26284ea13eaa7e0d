"""The embedded development cluster: single-node Ceph with RGW, in one directory."""

from rbd_restore.devcluster.launcher import ClusterInfo, UpResult, down, kill, status, up

__all__ = ["ClusterInfo", "UpResult", "down", "kill", "status", "up"]
