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


# Progress as the share of the data: librbd reports a relocation's position among the
# image's objects, and a 20 GiB image holding 3 GiB near its start is 15 % through its
# objects when all its data is copied.


def manifest_with(chunks: list[str | None], chunk_size: int = 4 << 20) -> Any:
    from rbd_restore.repo.manifest import Manifest, Source

    return Manifest(backup_id="20261204T120000Z-0a1b2c3d", created="now",
                    source=Source("f", "p", "i", "id", "s"), image_size=len(chunks) * chunk_size,
                    chunk_size=chunk_size, chunks=chunks)


def test_allocation_marks_follow_the_data() -> None:
    # 100 chunks, the data in chunks 10-19 only
    marks = manifest_with([None] * 10 + ["c"] * 10 + [None] * 80).allocation_marks(10)
    assert marks == pytest.approx([0.10 + 0.01 * k for k in range(11)])
    assert manifest_with([None] * 4).allocation_marks() == []
    even = manifest_with(["c"] * 8).allocation_marks(4)
    assert even == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_data_progress_maps_a_position_to_the_share_of_data() -> None:
    marks = manifest_with([None] * 10 + ["c"] * 10 + [None] * 80).allocation_marks(100)
    job = record(allocation_marks=tuple(marks))
    assert job.data_progress(0.05) == 0.0  # the holes before the data
    assert job.data_progress(0.15) == pytest.approx(0.5)
    assert job.data_progress(0.20) == 1.0  # all data copied; the rest is holes
    assert job.data_progress(0.90) == 1.0
    assert record().data_progress(0.3) == 0.3  # records from before the marks


def test_allocation_marks_survive_encoding_and_are_checked() -> None:
    job = record(allocation_marks=(0.1, 0.5, 0.9))
    assert JobRecord.decode(job.encode(), "volumes", JOB).allocation_marks == (0.1, 0.5, 0.9)
    for bad in ([0.5, 0.1], [0.1, 2.0], ["x"], "0.1"):
        raw = json.loads(job.encode())
        raw["allocation_marks"] = bad
        with pytest.raises(ValueError):
            JobRecord.decode(json.dumps(raw).encode(), "volumes", JOB)
