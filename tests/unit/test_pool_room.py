"""The room check's rules, on the numbers the monitors give (no cluster)."""

from __future__ import annotations

import re

import pytest

from rbd_restore.pool_room import NoRoomError, PoolRoom, full_reason

MiB = 1 << 20


def room(**changes: object) -> PoolRoom:
    fields: dict[str, object] = {
        "pool": "volumes", "full_reason": "", "stored_bytes": 10 * MiB, "stored_objects": 3,
        "quota_bytes": 0, "quota_objects": 0, "max_avail_bytes": 1000 * MiB}
    return PoolRoom(**{**fields, **changes})  # type: ignore[arg-type]


def test_the_osd_map_flags_name_why_a_pool_takes_no_writes() -> None:
    assert full_reason("hashpspool,full,full_quota,selfmanaged_snaps") == \
        "its quota is used up"
    assert full_reason("hashpspool,full") == "an OSD it uses is past the cluster's full ratio"
    assert full_reason("hashpspool,nearfull,selfmanaged_snaps") == ""
    assert full_reason("") == ""


def test_a_pool_flagged_full_takes_not_even_an_empty_restore() -> None:
    with pytest.raises(NoRoomError, match=re.escape(
            "pool volumes is full (its quota is used up): a restore writes to it, and Ceph "
            "holds every write to a full pool until it has room; raise its quota (ceph osd "
            "pool set-quota volumes max_bytes N) or restore into another pool")):
        room(full_reason="its quota is used up").ensure(0)
    with pytest.raises(NoRoomError, match=r"full ratio\): a restore .*; free space or add OSDs"):
        room(full_reason=full_reason("full")).ensure(0)


def test_the_quota_left_bounds_the_bytes_and_the_objects() -> None:
    room(quota_bytes=30 * MiB).ensure(20 * MiB)  # exactly what is left
    with pytest.raises(NoRoomError, match=re.escape(
            "room for 20.0 MiB under its quota of 30.0 MiB, and the backup holds 20.0 MiB; "
            "raise the quota (ceph osd pool set-quota volumes max_bytes N)")):
        room(quota_bytes=30 * MiB).ensure(20 * MiB + 1)
    with pytest.raises(NoRoomError, match="room for 0 B under its quota"):
        room(quota_bytes=5 * MiB).ensure(1)  # already past it (the flag lags)
    room(quota_objects=8).ensure(20 * MiB)  # five 4 MiB objects, three stored
    with pytest.raises(NoRoomError, match=r"room for 5 objects under its quota of 8, and the "
                                          r"restore writes at least 6; .*set-quota volumes "
                                          r"max_objects N"):
        room(quota_objects=8).ensure(20 * MiB + 1)
    room(quota_objects=8).ensure(5 * MiB, object_bytes=1 * MiB)
    with pytest.raises(NoRoomError, match="at least 6"):
        room(quota_objects=8).ensure(6 * MiB, object_bytes=1 * MiB)


def test_the_cluster_s_max_avail_bounds_a_pool_without_a_quota() -> None:
    room().ensure(1000 * MiB)
    with pytest.raises(NoRoomError, match=re.escape(
            "the cluster can place 1000.0 MiB more in pool volumes (MAX AVAIL)")):
        room().ensure(1000 * MiB + 1)
