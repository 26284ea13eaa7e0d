"""Job records: when a delayed relocation is due, and which stored records are trusted."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from rbd_restore.jobs.runner import fair_order
from rbd_restore.jobs.store import JobRecord

NOW = dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC)
JOB = "r20261202T080000Z-abcdef"


def record(relocate_after: str = "", **changes: Any) -> JobRecord:
    fields: dict[str, Any] = {"id": JOB, "backup_id": "20261202T075900Z-0a1b2c3d",
                              "pool": "volumes", "image": "vm1",
                              "session_id": "0123456789abcdef",
                              "relocate_after": relocate_after, **changes}
    return JobRecord(**fields)


def test_due_in_counts_down_to_zero() -> None:
    assert record().due_in(NOW) == 0.0
    later = record(relocate_after=(NOW + dt.timedelta(seconds=90)).isoformat())
    assert later.due_in(NOW) == 90.0
    assert later.due_in(NOW + dt.timedelta(seconds=120)) == 0.0


def test_a_record_from_before_the_field_is_due_at_once() -> None:
    old = json.loads(record().encode())
    del old["relocate_after"], old["attempts"]
    decoded = JobRecord.decode(json.dumps(old).encode(), "volumes", JOB)
    assert decoded.relocate_after == "" and decoded.due_in() == 0.0
    assert decoded.as_status()["relocate_after"] is None and decoded.attempts == 0


@pytest.mark.parametrize(("change", "reason"), [
    ({"pool": "other"}, "names pool"),
    ({"id": "r20261202T080000Z-ffffff"}, "names job"),
    ({"image": "a/b"}, "not an image name"),
    ({"state": "exploded"}, "unknown state"),
    ({"progress": "half"}, "wrong type"),
    ({"bytes_total": True}, "wrong type"),
    ({"session_id": "../../etc"}, "session id"),
    ({"relocate_after": "tomorrow"}, "not a time"),
])
def test_a_record_is_trusted_only_about_its_own_pool_and_id(change: dict[str, Any],
                                                             reason: str) -> None:
    raw = {**json.loads(record().encode()), **change}
    with pytest.raises(ValueError, match=reason):
        JobRecord.decode(json.dumps(raw).encode(), "volumes", JOB)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"\xff\xfe", b'{"id": 1}'])
def test_garbage_is_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(ValueError):
        JobRecord.decode(data, "volumes", JOB)


def test_pools_take_turns() -> None:
    jobs = [record(id=f"r20261202T0800{n:02d}Z-abcdef", pool=pool)
            for n, pool in enumerate(["a", "a", "a", "b", "c", "c"])]
    assert [r.pool for r in fair_order(jobs)] == ["a", "b", "c", "a", "c", "a"]
