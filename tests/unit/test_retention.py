"""forget's rules (restic's), one test each, on calendars of backups."""

from __future__ import annotations

import datetime as dt

import pytest

from rbd_restore.errors import UsageError
from rbd_restore.repo import retention
from rbd_restore.repo.manifest import Manifest, Source

START = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC)  # a Monday


def backup(when: dt.datetime, image_id: str = "img1") -> Manifest:
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    return Manifest(backup_id=f"{stamp}-{abs(hash((when, image_id))) % 16**8:08x}",
                    created=when.isoformat(), source=Source("fsid", "volumes", "vm", image_id,
                                                            "s"),
                    image_size=0, chunk_size=4 << 20, chunks=[])


def kept(policy: retention.Policy, backups: list[Manifest]) -> list[str]:
    decision = retention.apply(policy, backups)
    return sorted(m.created[:16] for m in decision.keep)


def every(hours: float, count: int) -> list[Manifest]:
    return [backup(START + dt.timedelta(hours=hours * n)) for n in range(count)]


def test_keep_last_keeps_the_newest_n() -> None:
    backups = every(24, 10)
    assert kept(retention.Policy(last=3), backups) == [
        "2026-11-09T09:00", "2026-11-10T09:00", "2026-11-11T09:00"]


def test_keep_daily_keeps_the_newest_of_each_of_the_last_n_days() -> None:
    backups = every(12, 20)  # two a day, 09:00 and 21:00, ten days
    assert kept(retention.Policy(daily=3), backups) == [
        "2026-11-09T21:00", "2026-11-10T21:00", "2026-11-11T21:00"]


def test_days_without_backups_do_not_count() -> None:
    days = [0, 1, 4, 8]
    backups = [backup(START + dt.timedelta(days=d)) for d in days]
    assert kept(retention.Policy(daily=3), backups) == [
        "2026-11-03T09:00", "2026-11-06T09:00", "2026-11-10T09:00"]


def test_weeks_are_iso_weeks() -> None:
    sunday = START + dt.timedelta(days=6)  # 2026-11-08, the same ISO week as START
    monday = START + dt.timedelta(days=7)
    backups = [backup(START), backup(sunday), backup(monday)]
    assert kept(retention.Policy(weekly=2), backups) == ["2026-11-08T09:00",
                                                          "2026-11-09T09:00"]


def test_hourly_monthly_and_yearly() -> None:
    hourly = every(0.5, 6)  # 09:00 .. 11:30
    assert kept(retention.Policy(hourly=2), hourly) == ["2026-11-02T10:30",
                                                         "2026-11-02T11:30"]
    monthly = [backup(START + dt.timedelta(days=d)) for d in (0, 20, 40, 70, 400)]
    assert kept(retention.Policy(monthly=2), monthly) == ["2027-01-11T09:00",
                                                           "2027-12-07T09:00"]
    assert kept(retention.Policy(yearly=5), monthly) == ["2026-12-12T09:00",
                                                          "2027-12-07T09:00"]


def test_rules_add_up_and_say_why() -> None:
    backups = every(24, 10)
    decision = retention.apply(retention.Policy(last=2, weekly=2), backups)
    assert sorted(m.created[:10] for m in decision.keep) == [
        "2026-11-08", "2026-11-10", "2026-11-11"]
    newest = max(decision.keep, key=lambda m: m.created)
    assert decision.reasons[newest.backup_id] == ["last", "weekly"]
    assert len(decision.remove) == 7


def test_each_volume_is_judged_on_its_own() -> None:
    backups = every(24, 3) + [backup(START + dt.timedelta(days=d), "img2") for d in (0, 1)]
    groups = retention.plan(retention.Policy(last=1), backups)
    assert {key[1]: len(d.keep) for key, d in groups.items()} == {"img1": 1, "img2": 1}


def test_a_policy_keeps_something() -> None:
    with pytest.raises(UsageError, match="at least one"):
        retention.Policy()
    with pytest.raises(UsageError, match="0 or more"):
        retention.Policy(last=-1)
