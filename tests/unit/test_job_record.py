"""Job records: when a delayed relocation is due, and records written before the field."""

from __future__ import annotations

import datetime as dt
import json

from rbd_restore.jobs.store import JobRecord

NOW = dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC)


def record(relocate_after: str = "") -> JobRecord:
    return JobRecord(id="r20261202T080000Z-abcdef", backup_id="b", pool="volumes",
                     image="vm1", session_id="s", relocate_after=relocate_after)


def test_due_in_counts_down_to_zero() -> None:
    assert record().due_in(NOW) == 0.0
    later = record(relocate_after=(NOW + dt.timedelta(seconds=90)).isoformat())
    assert later.due_in(NOW) == 90.0
    assert later.due_in(NOW + dt.timedelta(seconds=120)) == 0.0


def test_a_record_from_before_the_field_is_due_at_once() -> None:
    old = json.loads(record().encode())
    del old["relocate_after"]
    decoded = JobRecord.decode(json.dumps(old).encode())
    assert decoded.relocate_after == "" and decoded.due_in() == 0.0
    assert decoded.as_status()["relocate_after"] is None
