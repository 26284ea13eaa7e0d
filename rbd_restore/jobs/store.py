"""Job records in RADOS: one omap object per pool, one key per job.

The image header's migration state is the source of truth for how far a
restore got; the record adds what the header cannot hold (backup, session,
progress, errors), where every job runner replica with access to the pool can
read it. Keys are job ids, which sort by creation time, so omap order is queue
order. A runner claims a job with a RADOS lock on the object that expires when
the runner dies, so a restarted or other runner resumes it.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rbd_restore.ceph import IMAGE_NAME, Cluster
from rbd_restore.errors import NotFoundError, UnavailableError, UsageError, UserError
from rbd_restore.repo.layout import BACKUP_ID, JOB_ID, SESSION_ID

log = logging.getLogger(__name__)

JOBS_OBJECT = "rbd_restore.jobs"
STATES = ("preparing", "staged", "relocating", "committed", "failed", "aborted")
ACTIVE = ("preparing", "staged", "relocating")


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
    boot_set_objects: int = 0  # objects of the boot profile copied in before ready
    committed_seconds: float = 0.0
    relocate_after: str = ""  # ISO time before which no runner relocates; "": at once
    attempts: int = 0  # relocation attempts in a row that failed without progress
    replaces: str = ""  # the image this restore replaced, kept aside until the commit
    image_id: str = ""  # the RBD image id: the job follows the image if it is renamed
    # Manifest.allocation_marks of the backup: librbd reports the relocation's position
    # among the image's objects; these make it the share of the data copied.
    allocation_marks: tuple[float, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.pool}/{self.image}"

    def data_progress(self, position: float) -> float:
        """The share of the allocated bytes below ``position``, a fraction of the image
        (as librbd reports a relocation's progress); ``position`` itself without marks."""
        marks = self.allocation_marks
        if len(marks) < 2:
            return position
        if position <= marks[0]:
            return 0.0
        if position >= marks[-1]:
            return 1.0
        step = bisect.bisect_right(marks, position) - 1
        low, high = marks[step], marks[step + 1]
        within = (position - low) / (high - low) if high > low else 1.0
        return (step + within) / (len(marks) - 1)

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
                "relocate_after": self.relocate_after or None,
                "boot_set_objects": self.boot_set_objects}

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, pool: str, key: str) -> JobRecord:
        """A record read from ``pool`` under ``key``; ``ValueError`` when it is malformed
        or claims another pool or id: a record is only trusted about its own pool."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("not JSON") from None
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            if spec.name not in raw:
                if spec.default is dataclasses.MISSING:
                    raise ValueError(f"field {spec.name} is missing")
                continue
            value = raw[spec.name]
            wanted = _FIELD_TYPES[spec.name]
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise ValueError(f"field {spec.name} has the wrong type")
            if wanted is list:
                if not all(isinstance(v, int | float) and not isinstance(v, bool)
                           and 0 <= v <= 1 for v in value) or value != sorted(value):
                    raise ValueError(f"field {spec.name} is not rising fractions")
                value = tuple(float(v) for v in value)
            values[spec.name] = float(value) if wanted == (int, float) else value
        record = cls(**values)
        if record.id != key:
            raise ValueError(f"record names job {record.id!r:.40}")
        if record.pool != pool:
            raise ValueError(f"record names pool {record.pool!r:.40}, not its own")
        for name in (record.image, record.replaces or "-"):
            if not IMAGE_NAME.match(name):
                raise ValueError(f"image {name!r:.80} is not an image name")
        if record.state not in STATES:
            raise ValueError(f"unknown state {record.state!r:.20}")
        if record.session_id and not SESSION_ID.match(record.session_id):
            raise ValueError("session id is malformed")
        if not BACKUP_ID.match(record.backup_id):
            raise ValueError("backup id is malformed")
        if record.relocate_after:
            try:
                dt.datetime.fromisoformat(record.relocate_after)
            except ValueError:
                raise ValueError("relocate_after is not a time") from None
        return record


_FIELD_TYPES: dict[str, type[Any] | tuple[type[Any], ...]] = {
    f.name: (int, float) if f.type in ("float", float) else
    int if f.type in ("int", int) else
    list if str(f.type).startswith("tuple") else str
    for f in dataclasses.fields(JobRecord)}


@dataclass(frozen=True)
class JobScan:
    records: list[JobRecord]
    problems: list[str]  # pools that could not be read, records that did not parse


class JobStore:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def save(self, record: JobRecord) -> None:
        import rados

        with self.cluster.ioctx(record.pool) as ioctx, rados.WriteOpCtx() as op:
            ioctx.set_omap(op, (record.id,), (record.encode(),))
            ioctx.operate_write_op(op, JOBS_OBJECT)

    def remove(self, record: JobRecord) -> None:
        """Forget a job that never created anything (its restore failed cleanly)."""
        import rados

        with self.cluster.ioctx(record.pool) as ioctx, rados.WriteOpCtx() as op:
            ioctx.remove_omap_keys(op, (record.id,))
            ioctx.operate_write_op(op, JOBS_OBJECT)

    def load(self, pool: str, job_id: str) -> JobRecord | None:
        """One record as stored now; None when it is gone or does not parse."""
        import rados

        with self.cluster.ioctx(pool) as ioctx, rados.ReadOpCtx() as op:
            values, _ = ioctx.get_omap_vals_by_keys(op, (job_id,))
            try:
                ioctx.operate_read_op(op, JOBS_OBJECT)
            except rados.ObjectNotFound:
                return None
            found = dict(values)
        if job_id not in found:
            return None
        try:
            return JobRecord.decode(found[job_id], pool, job_id)
        except ValueError:
            return None

    def _pool_records(self, pool: str, problems: list[str]) -> Iterator[JobRecord]:
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
                    if not JOB_ID.match(key):
                        continue
                    try:
                        yield JobRecord.decode(value, pool, key)
                    except ValueError as exc:
                        problems.append(f"pool {pool}: job record {key} skipped: {exc}")
                if len(batch) < 500:
                    return
                start = batch[-1][0]

    def scan(self) -> JobScan:
        """Every job record in every pool this Ceph user can read; a pool it may not read
        or a record that does not parse is reported, never fatal for the others."""
        import rados

        records: list[JobRecord] = []
        problems: list[str] = []
        try:
            pools = self.cluster.rados.list_pools()
        except rados.Error as exc:
            raise UnavailableError(f"cannot list pools: {type(exc).__name__}") from None
        for pool in pools:
            try:
                records.extend(self._pool_records(pool, problems))
            except (rados.Error, UserError) as exc:
                reason = exc.message if isinstance(exc, UserError) else type(exc).__name__
                problems.append(f"pool {pool}: job records not readable ({reason})")
        for problem in problems:
            log.info("%s", problem)
        return JobScan(sorted(records, key=lambda r: r.id), problems)

    def list(self) -> list[JobRecord]:
        return self.scan().records

    def in_pool(self, pool: str) -> tuple[JobRecord, ...]:
        """The job records of one pool (those that parse)."""
        return tuple(self._pool_records(pool, []))

    def get(self, job_id: str) -> JobRecord:
        if not JOB_ID.match(job_id):
            raise UsageError(f"{job_id!r:.40} is not a job id (they look like "
                             "r20261125T173000Z-1a2b3c)")
        for record in self.list():
            if record.id == job_id:
                return record
        raise NotFoundError(f"job {job_id} does not exist")
