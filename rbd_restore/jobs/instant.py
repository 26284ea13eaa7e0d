"""Start an instant restore: a fetcher session, the staging image, a job record."""

from __future__ import annotations

import contextlib
import time

from rbd_restore import lazy_clone
from rbd_restore.ceph import Cluster, ImageRef, image_exists
from rbd_restore.errors import AlreadyExistsError, UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs.store import JobRecord, JobStore, new_job_id, now_iso


def start(cluster: Cluster, control: ControlClient, backup_id: str, ref: ImageRef,
          rate_limit_bytes_per_s: int = 0, history: int = 0,
          relocate_after_seconds: float = 0.0) -> JobRecord:
    """Prepare ``ref`` so a VM can boot on it; the relocation is left to a job runner,
    which starts it no sooner than ``relocate_after_seconds`` from now."""
    started = time.monotonic()
    with cluster.ioctx(ref.pool) as ioctx:
        if image_exists(ioctx, ref.name):
            raise AlreadyExistsError(f"image {ref} already exists; restore never overwrites")
        session = control.create(backup_id, rate_limit_bytes_per_s, history)
        try:
            lazy_clone.prepare(ioctx, ref.name, session["url"])
        except BaseException:
            with contextlib.suppress(UserError):
                control.close(session["session_id"])
            raise
    record = JobRecord(id=new_job_id(), backup_id=backup_id, pool=ref.pool, image=ref.name,
                       session_id=session["session_id"], state="staged", created=now_iso(),
                       updated=now_iso(), bytes_total=int(session.get("allocated_bytes", 0)),
                       ready_seconds=time.monotonic() - started,
                       relocate_after=now_iso(relocate_after_seconds)
                       if relocate_after_seconds > 0 else "")
    JobStore(cluster).save(record)
    return record
