"""What ``status`` shows of each job: its record as the image header corrects it, and
what the fetcher saw of its guest (reads served, cache hits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rbd_restore.ceph import Cluster
from rbd_restore.errors import UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs.abort import reconcile
from rbd_restore.jobs.store import ACTIVE, JobRecord, JobStore
from rbd_restore.pool_room import full_pools


@dataclass(frozen=True)
class JobView:
    record: JobRecord
    migration: str  # the header's state when it says more than the record
    guest_reads: int | None  # served by the fetcher asked; None when it was not asked
    guest_read_hits: int | None

    @property
    def phase(self) -> str:
        r = self.record
        if r.state in ACTIVE and r.due_in() > 0:
            return "waiting"
        return {"executed": "committing", "preparing": "preparing"}.get(self.migration,
                                                                      r.state)

    @property
    def cache_hit_ratio(self) -> float | None:
        if not self.guest_reads or self.guest_read_hits is None:
            return None
        return self.guest_read_hits / self.guest_reads

    def as_json(self) -> dict[str, Any]:
        ratio = self.cache_hit_ratio
        return {**self.record.as_status(), "migration": self.migration or None,
                "phase": self.phase, "bytes_total": self.record.bytes_total,
                "guest_reads": self.guest_reads, "guest_read_hits": self.guest_read_hits,
                "cache_hit_ratio": None if ratio is None else round(ratio, 4)}


def job_views(cluster: Cluster, control: ControlClient | None,
              job: str | None = None) -> tuple[list[JobView], list[str]]:
    """Every job (or one), and the problems met reading them."""
    store = JobStore(cluster)
    if job:
        records, problems = [store.get(job)], []
    else:
        scan = store.scan()
        records, problems = scan.records, list(scan.problems)
    full = full_pools(cluster, {r.pool for r in records if r.state in ACTIVE})
    views = []
    for stored in records:
        record, migration = reconcile(cluster, stored, full)
        reads = hits = None
        if control is not None and record.state in ACTIVE and record.session_id:
            try:
                seen = control.prefetch(record.session_id)
                reads, hits = int(seen["guest_reads"]), int(seen["guest_read_hits"])
            except (UserError, KeyError, TypeError, ValueError):
                pass  # that fetcher has no state for it (another replica, a restart)
        views.append(JobView(record, migration, reads, hits))
    return views, problems
