"""Job records in RADOS: one omap object per pool, one key per job.

The image header's migration state is the source of truth for how far a
restore got; the record adds what the header cannot hold (backup, session,
progress, errors), where every job runner replica with access to the pool can
read it. Keys are job ids, which sort by creation time, so omap order is queue
order. A runner claims a job with a RADOS lock on the object that expires when
the runner dies, so a restarted or other runner resumes it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rbd_restore.ceph import Cluster
from rbd_restore.errors import NotFoundError, UsageError

JOBS_OBJECT = "rbd_restore.jobs"
JOB_ID = re.compile(r"^r[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
STATES = ("staged", "relocating", "committed", "failed", "aborted")
ACTIVE = ("staged", "relocating")


def new_job_id() -> str:
    return f"r{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def now_iso(later_seconds: float = 0.0) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=later_seconds)).isoformat()


@dataclass(frozen=True)
class JobRecord:
    id: str
    backup_id: str
    pool: str
    image: str
    session_id: str
    state: str = "staged"
    created: str = ""
    updated: str = ""
    bytes_total: int = 0
    progress: float = 0.0
    rate_bytes_per_s: float = 0.0
    error: str = ""
    ready_seconds: float = 0.0
    committed_seconds: float = 0.0
    relocate_after: str = ""  # ISO time before which no runner relocates; "": at once

    @property
    def spec(self) -> str:
        return f"{self.pool}/{self.image}"

    @property
    def bytes_relocated(self) -> int:
        return int(self.bytes_total * self.progress)

    @property
    def eta_seconds(self) -> float | None:
        if self.state not in ACTIVE or self.rate_bytes_per_s <= 0:
            return None
        return (self.bytes_total - self.bytes_relocated) / self.rate_bytes_per_s

    def due_in(self, now: dt.datetime | None = None) -> float:
        """Seconds until a runner may start relocating; 0 when it may now."""
        if not self.relocate_after:
            return 0.0
        now = now or dt.datetime.now(dt.UTC)
        return max(0.0, (dt.datetime.fromisoformat(self.relocate_after) - now).total_seconds())

    def with_(self, **changes: Any) -> JobRecord:
        return dataclasses.replace(self, updated=now_iso(), **changes)

    def as_status(self) -> dict[str, Any]:
        return {"id": self.id, "backup_id": self.backup_id, "image": self.spec,
                "state": self.state, "percent": round(self.progress * 100, 1),
                "bytes_relocated": self.bytes_relocated,
                "rate_bytes_per_s": round(self.rate_bytes_per_s),
                "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
                "error": self.error or None, "session_id": self.session_id,
                "created": self.created, "updated": self.updated,
                "relocate_after": self.relocate_after or None}

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> JobRecord:
        raw = json.loads(data)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


class JobStore:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def save(self, record: JobRecord) -> None:
        import rados

        with self.cluster.ioctx(record.pool) as ioctx, rados.WriteOpCtx() as op:
            ioctx.set_omap(op, (record.id,), (record.encode(),))
            ioctx.operate_write_op(op, JOBS_OBJECT)

    def _pool_records(self, pool: str) -> Iterator[JobRecord]:
        import rados

        with self.cluster.ioctx(pool) as ioctx:
            start = ""
            while True:
                with rados.ReadOpCtx() as op:
                    values, _ = ioctx.get_omap_vals(op, start, "", 500)
                    try:
                        ioctx.operate_read_op(op, JOBS_OBJECT)
                    except rados.ObjectNotFound:
                        return
                    batch = list(values)
                for key, value in batch:
                    if JOB_ID.match(key):
                        yield JobRecord.decode(value)
                if len(batch) < 500:
                    return
                start = batch[-1][0]

    def list(self) -> list[JobRecord]:
        records: list[JobRecord] = []
        for pool in self.cluster.rados.list_pools():
            records.extend(self._pool_records(pool))
        return sorted(records, key=lambda r: r.id)

    def get(self, job_id: str) -> JobRecord:
        if not JOB_ID.match(job_id):
            raise UsageError(f"{job_id!r:.40} is not a job id (they look like "
                             "r20261125T173000Z-1a2b3c)")
        for record in self.list():
            if record.id == job_id:
                return record
        raise NotFoundError(f"job {job_id} does not exist")
