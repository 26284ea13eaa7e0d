"""Start an instant restore: a job record, a fetcher session, the staging image.

The record comes first, in state ``preparing`` and under the job's lease, so
a restore killed at any point leaves something a job runner finishes: an
image that was prepared is relocated and committed like any other, a half-made
one is removed, and the session is closed. A restore that fails cleanly
(unknown backup, fetcher unreachable) removes its record again: nothing was
created.
"""

from __future__ import annotations

import contextlib
import time

from rbd_restore import lazy_clone
from rbd_restore.ceph import Cluster, ImageRef, image_exists
from rbd_restore.errors import AlreadyExistsError, UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs.lease import lease, runner_cookie
from rbd_restore.jobs.store import JobRecord, JobStore, new_job_id, now_iso
from rbd_restore.pool_room import object_size, pool_room


def start(cluster: Cluster, control: ControlClient, backup_id: str, ref: ImageRef,
          rate_limit_bytes_per_s: int = 0, history: int = 0,
          relocate_after_seconds: float = 0.0, replaces: str = "",
          boot_set_seconds: float = 0.0) -> JobRecord:
    """Prepare ``ref`` so a VM can boot on it; the relocation is left to a job runner,
    which starts it no sooner than ``relocate_after_seconds`` from now. ``replaces``:
    an image the caller moved aside for this one, removed by the runner at the commit
    (and put back by an abort). The volume's boot profile, when the fetcher has one,
    is copied into the image first, for at most ``boot_set_seconds``."""
    started = time.monotonic()
    store = JobStore(cluster)
    with cluster.ioctx(ref.pool) as ioctx:
        if image_exists(ioctx, ref.name):
            raise AlreadyExistsError(f"image {ref} already exists; restore never overwrites")
        # The job record is the first write into the pool: a full one would hang it.
        room = pool_room(cluster, ref.pool)
        if room is not None:
            room.ensure(0)
        record = JobRecord(id=new_job_id(), backup_id=backup_id, pool=ref.pool,
                           image=ref.name, session_id="", state="preparing",
                           replaces=replaces, created=now_iso(), updated=now_iso(),
                           relocate_after=now_iso(relocate_after_seconds)
                           if relocate_after_seconds > 0 else "")
        with lease(ioctx, record.id, runner_cookie(), "rbd-restore restore"):
            store.save(record)
            session_id = ""
            try:
                session = control.create(backup_id, rate_limit_bytes_per_s, history,
                                         job_id=record.id, image=str(ref))
                session_id = session["session_id"]
                marks = session.get("allocation_marks") or []
                record = record.with_(session_id=session_id,
                                      bytes_total=int(session.get("allocated_bytes", 0)),
                                      allocation_marks=tuple(float(m) for m in marks))
                store.save(record)
                if room is not None:  # a VM must not boot on an image that cannot be filled
                    room.ensure(record.bytes_total, object_size(cluster))
                lazy_clone.prepare(ioctx, ref.name, session["url"])
                boot_set = [int(o) for o in session.get("boot_offsets") or []]
                hydrated = lazy_clone.hydrate(ioctx, ref.name, boot_set, boot_set_seconds)
            except BaseException as exc:
                if isinstance(exc, AlreadyExistsError) or (
                        isinstance(exc, Exception) and not image_exists(ioctx, ref.name)):
                    # Nothing was made (or the image is someone else's, made meanwhile):
                    # no session, no job.
                    if session_id:
                        with contextlib.suppress(UserError):
                            control.close(session_id)
                    store.remove(record)
                raise  # else (interrupted, or an image exists) a runner finishes it
            record = record.with_(state="staged", ready_seconds=time.monotonic() - started,
                                  boot_set_objects=hydrated,
                                  image_id=lazy_clone.image_id(ioctx, ref.name))
            store.save(record)
    return record
