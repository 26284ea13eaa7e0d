"""Which backups a retention policy keeps (``rbd-restore forget``), restic's rules.

Backups are grouped by volume (the ``source`` fsid and image id: every backup of
one RBD image, whatever its name now) and each group is judged on its own,
newest first. A rule with a count N keeps the newest backup of each of the N
most recent periods (hours, days, ISO weeks, months, years; for ``last``, each
backup is its own period) that hold any backup; periods without a backup do
not count. A backup that any rule keeps is kept; the rest may go. Times are
the manifests' ``created``, in UTC.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rbd_restore.errors import UsageError
from rbd_restore.repo.manifest import Manifest

Bucket = Callable[[dt.datetime, int], object]

RULES: dict[str, Bucket] = {
    "last": lambda _t, index: index,
    "hourly": lambda t, _i: (t.year, t.month, t.day, t.hour),
    "daily": lambda t, _i: (t.year, t.month, t.day),
    "weekly": lambda t, _i: t.isocalendar()[:2],
    "monthly": lambda t, _i: (t.year, t.month),
    "yearly": lambda t, _i: t.year,
}


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        if any(getattr(self, name) < 0 for name in RULES):
            raise UsageError("keep counts must be 0 or more")
        if not any(getattr(self, name) for name in RULES):
            raise UsageError("give at least one --keep-... rule: forgetting every backup is "
                             "not a policy")


@dataclass
class Decision:
    keep: list[Manifest] = field(default_factory=list)
    remove: list[Manifest] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # backup id -> kept by


def group_key(manifest: Manifest) -> tuple[str, str]:
    return manifest.source.fsid, manifest.source.image_id


def apply(policy: Policy, backups: Iterable[Manifest]) -> Decision:
    """Keep or remove each backup of one group."""
    ordered = sorted(backups, key=lambda m: (m.created_at, m.backup_id), reverse=True)
    remaining = {name: getattr(policy, name) for name in RULES}
    last_bucket: dict[str, object] = {}
    decision = Decision()
    for index, manifest in enumerate(ordered):
        when = manifest.created_at.astimezone(dt.UTC)
        kept_by = []
        for name, bucket in RULES.items():
            if remaining[name] <= 0:
                continue
            value = bucket(when, index)
            if last_bucket.get(name, object()) != value:
                last_bucket[name] = value
                remaining[name] -= 1
                kept_by.append(name)
        if kept_by:
            decision.keep.append(manifest)
            decision.reasons[manifest.backup_id] = kept_by
        else:
            decision.remove.append(manifest)
    return decision


def plan(policy: Policy, manifests: Iterable[Manifest]) -> dict[tuple[str, str], Decision]:
    groups: dict[tuple[str, str], list[Manifest]] = {}
    for manifest in manifests:
        groups.setdefault(group_key(manifest), []).append(manifest)
    return {key: apply(policy, members) for key, members in groups.items()}
