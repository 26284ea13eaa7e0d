"""Whether a pool can take a restore's data, asked of the monitors before anything is
written to it.

A write to a pool Ceph has flagged full (its quota used up, or an OSD past the
full ratio) waits in librados until there is room again, with no error and no
timeout. So a full restore into such a pool hangs without a word, and an
instant restore stages an image, lets a VM boot on it, and then the relocation
and the VM's own writes hang together. A restore is refused when the pool is
flagged full, or when the data the backup holds exceeds what the pool's quota
leaves or what the cluster can still place in it (``MAX AVAIL`` of ``ceph df``).

The monitors' numbers are a few seconds old (the OSDs report usage
periodically), so this is a guard against a restore that certainly cannot fit,
not a reservation: another client filling the pool meanwhile is reported by
``status`` (:func:`full_pools`), and Ceph's own behaviour (writes wait for
room) still holds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from rbd_restore.ceph import Cluster
from rbd_restore.errors import UserError
from rbd_restore.image_layout import default_object_size
from rbd_restore.units import format_size

log = logging.getLogger(__name__)



class NoRoomError(UserError):
    """The pool cannot take the restore's data: the restore would wait forever."""


@dataclass(frozen=True)
class PoolRoom:
    pool: str
    full_reason: str  # why Ceph takes no writes into the pool now; "" when it does
    stored_bytes: int
    stored_objects: int
    quota_bytes: int  # 0: no quota
    quota_objects: int
    max_avail_bytes: int

    def ensure(self, need_bytes: int, object_bytes: int = 4 << 20) -> None:
        """Raise :class:`NoRoomError` when ``need_bytes`` of a restore, written into
        objects of ``object_bytes``, cannot fit."""
        need_objects = -(-need_bytes // object_bytes)  # at least: a chunk may span two
        elsewhere = "or restore into another pool"
        if self.full_reason:
            raise NoRoomError(f"{full_message(self.pool, self.full_reason, 'a restore')} "
                              f"{elsewhere}")
        quota = f"raise the quota ({SET_QUOTA.format(pool=self.pool)}) {elsewhere}"
        if self.quota_bytes and need_bytes > self.quota_bytes - self.stored_bytes:
            left = max(0, self.quota_bytes - self.stored_bytes)
            raise NoRoomError(
                f"pool {self.pool} has room for {format_size(left)} under its quota of "
                f"{format_size(self.quota_bytes)}, and the backup holds "
                f"{format_size(need_bytes)}; {quota}")
        if self.quota_objects and need_objects > self.quota_objects - self.stored_objects:
            left = max(0, self.quota_objects - self.stored_objects)
            raise NoRoomError(
                f"pool {self.pool} has room for {left} objects under its quota of "
                f"{self.quota_objects}, and the restore writes at least {need_objects}; "
                f"{quota.replace('max_bytes', 'max_objects')}")
        if need_bytes > self.max_avail_bytes:
            raise NoRoomError(
                f"the cluster can place {format_size(self.max_avail_bytes)} more in pool "
                f"{self.pool} (MAX AVAIL), and the backup holds {format_size(need_bytes)}; "
                f"add capacity {elsewhere}")


SET_QUOTA = "ceph osd pool set-quota {pool} max_bytes N"
_QUOTA_USED_UP = "its quota is used up"


def full_message(pool: str, reason: str, what: str) -> str:
    """One line: ``pool`` is full for ``reason``, and ``what`` writes to it."""
    remedy = (f"raise its quota ({SET_QUOTA.format(pool=pool)})" if reason == _QUOTA_USED_UP
              else "free space or add OSDs")
    return (f"pool {pool} is full ({reason}): {what} writes to it, and Ceph holds every "
            f"write to a full pool until it has room; {remedy}")


def refuse_if_full(cluster: Cluster, pool: str, what: str) -> None:
    """Raise :class:`NoRoomError` when Ceph takes no writes into ``pool``: ``what`` (a
    backup, an abort) would wait there for room without a word."""
    if reason := full_pools(cluster, {pool}).get(pool):
        raise NoRoomError(full_message(pool, reason, what))


def full_reason(flags: str) -> str:
    """Why a pool with these OSD-map flags (``flags_names``) takes no writes; ""."""
    names = set(flags.split(","))
    if "full_quota" in names:
        return _QUOTA_USED_UP
    if "full" in names:
        return "an OSD it uses is past the cluster's full ratio"
    return ""


def _command(cluster: Cluster, prefix: str, **args: Any) -> Any:
    ret, out, err = cluster.rados.mon_command(
        json.dumps({"prefix": prefix, "format": "json", **args}), b"", timeout=30)
    if ret != 0:
        raise OSError(-ret if ret < 0 else ret, f"ceph {prefix}: {err.strip()}")
    return json.loads(out)


def _pool_details(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {str(p["pool_name"]): p for p in _command(cluster, "osd pool ls", detail="detail")}


def pool_room(cluster: Cluster, pool: str) -> PoolRoom | None:
    """What the monitors say of ``pool``; None when they cannot be asked (a Ceph user
    without ``mon 'allow r'``), and the restore goes on unchecked."""
    try:
        details = _pool_details(cluster).get(pool)
        usage = next((p["stats"] for p in _command(cluster, "df")["pools"]
                      if p["name"] == pool), None)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("the room in pool %s was not checked: %s", pool, exc)
        return None
    if details is None or usage is None:
        return None  # the pool itself is looked up (and reported) when it is opened
    return PoolRoom(pool, full_reason(str(details.get("flags_names", ""))),
                    int(usage.get("stored", 0)), int(usage.get("objects", 0)),
                    int(details.get("quota_max_bytes", 0)),
                    int(details.get("quota_max_objects", 0)),
                    int(usage.get("max_avail", 0)))


def ensure_room(cluster: Cluster, pool: str, need_bytes: int, data_pool: str = "",
                object_bytes: int = 0) -> None:
    """Refuse a restore of ``need_bytes`` into ``pool`` that cannot fit (see the module).
    With a ``data_pool`` the data goes there, and ``pool`` takes only the image's header
    and metadata: it must not be full. ``object_bytes``: 0 for librbd's default."""
    if data_pool and data_pool != pool:
        if reason := full_pools(cluster, {pool}).get(pool):
            raise NoRoomError(f"{full_message(pool, reason, 'a restore')} or restore into "
                              "another pool")
        pool = data_pool
    room = pool_room(cluster, pool)
    if room is not None:
        room.ensure(need_bytes, object_bytes or default_object_size(cluster))


def full_pools(cluster: Cluster, pools: set[str]) -> dict[str, str]:
    """Those of ``pools`` Ceph takes no writes into, with the reason; {} when unknown."""
    try:
        details = _pool_details(cluster)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    reasons = {pool: full_reason(str(details[pool].get("flags_names", "")))
               for pool in pools if pool in details}
    return {pool: reason for pool, reason in reasons.items() if reason}
