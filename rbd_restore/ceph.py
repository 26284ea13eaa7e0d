"""Connections to the Ceph cluster and the RBD images rbd-restore works on.

librados and librbd errors become one-line :class:`UserError` messages here, so
no layer above needs to know their exception classes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rbd_restore.config import CephSettings
from rbd_restore.errors import (
    NotFoundError,
    UnavailableError,
    UsageError,
    ceph_permission_error,
)

IMAGE_NAME = re.compile(r"^[^/@\s]{1,256}$")  # also what a pool name may be here


@dataclass(frozen=True)
class ImageRef:
    pool: str
    name: str

    @classmethod
    def parse(cls, text: str, default_pool: str = "") -> ImageRef:
        """``POOL/IMAGE``, or ``IMAGE`` in ``default_pool``."""
        pool, _, name = text.rpartition("/") if "/" in text else (default_pool, "", text)
        if not pool or not IMAGE_NAME.match(pool) or not IMAGE_NAME.match(name or "/"):
            raise UsageError(f"image {text!r} is not of the form POOL/IMAGE")
        return cls(pool, name)

    def __str__(self) -> str:
        return f"{self.pool}/{self.name}"


class Cluster:
    """One librados connection, opened from the [ceph] settings."""

    def __init__(self, settings: CephSettings, timeout: int = 30) -> None:
        import rados

        self.settings = settings
        conf = {"client_mount_timeout": str(timeout)}
        if settings.keyring:
            conf["keyring"] = settings.keyring
        try:
            self.rados = rados.Rados(conffile=settings.conf, rados_id=settings.rados_id,
                                     clustername=settings.cluster_name or "ceph", conf=conf)
            self.rados.connect(timeout=timeout)
        except rados.ObjectNotFound:
            raise UnavailableError(f"cannot read Ceph config {settings.conf}") from None
        except rados.Error as exc:
            raise UnavailableError(
                f"cannot connect to the Ceph cluster of {settings.conf} as "
                f"{settings.client_name}: {type(exc).__name__}") from None

    @property
    def fsid(self) -> str:
        return str(self.rados.get_fsid())

    @contextmanager
    def ioctx(self, pool: str) -> Iterator[Any]:
        import rados

        try:
            ioctx = self.rados.open_ioctx(pool)
        except rados.ObjectNotFound:
            raise NotFoundError(f"pool {pool} does not exist") from None
        try:
            yield ioctx
        except Exception as exc:  # capabilities are checked per operation, not at open
            denied = ceph_permission_error(exc, f"pool {pool}")
            if denied is None:
                raise
            raise denied from None
        finally:
            ioctx.close()

    def close(self) -> None:
        self.rados.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def open_image(ioctx: Any, ref: ImageRef, snapshot: str | None = None,
               read_only: bool = False) -> Iterator[Any]:
    import rbd

    what = f"{ref}@{snapshot}" if snapshot else str(ref)
    try:
        image = rbd.Image(ioctx, ref.name, snapshot=snapshot, read_only=read_only)
    except rbd.ImageNotFound:
        raise NotFoundError(f"image {what} does not exist") from None
    except rbd.PermissionError as exc:
        raise ceph_permission_error(exc, f"image {what}") or exc from None
    try:
        yield image
    finally:
        image.close()


def image_exists(ioctx: Any, name: str) -> bool:
    import rbd

    try:
        rbd.Image(ioctx, name, read_only=True).close()
    except rbd.ImageNotFound:
        return False
    return True


def remove_image(ioctx: Any, name: str) -> bool:
    """Remove an image and its snapshots; False when it did not exist."""
    import rbd

    try:
        with rbd.Image(ioctx, name) as image:
            for snap in list(image.list_snaps()):
                if image.is_protected_snap(snap["name"]):
                    image.unprotect_snap(snap["name"])
                image.remove_snap(snap["name"])
        rbd.RBD().remove(ioctx, name)
    except rbd.ImageNotFound:
        return False
    return True
