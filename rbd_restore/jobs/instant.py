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
from typing import Any

from rbd_restore import lazy_clone
from rbd_restore.ceph import Cluster, ImageRef, image_exists, open_image
from rbd_restore.errors import AlreadyExistsError, UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.image_layout import apply_metadata, create_options
from rbd_restore.jobs.lease import lease, runner_cookie
from rbd_restore.jobs.store import JobRecord, JobStore, new_job_id, now_iso
from rbd_restore.pool_room import ensure_room
from rbd_restore.repo.image_layout import Layout, parse_layout


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
        ensure_room(cluster, ref.pool, 0)
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
                layout = _layout(session)
                options = create_options(cluster, layout, staging=True)
                # A VM must not boot on an image that cannot be filled.
                ensure_room(cluster, ref.pool, record.bytes_total,
                            options.get("data_pool", ""), layout.object_size if layout else 0)
                lazy_clone.prepare(ioctx, ref.name, session["url"], options)
                boot_set = [int(o) for o in session.get("boot_offsets") or []]
                hydrated = lazy_clone.hydrate(ioctx, ref.name, boot_set, boot_set_seconds)
                if layout is not None and layout.metadata:
                    # After the boot set: hydrate switches copy-on-read on and off for
                    # itself, which must not undo a setting the source had.
                    with open_image(ioctx, ref) as image:
                        apply_metadata(image, layout)
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


def _layout(session: dict[str, Any]) -> Layout | None:
    """The backup's layout, as the fetcher read it from the manifest; None for a backup
    written before layouts were kept (the image gets the client's defaults)."""
    if session.get("layout") is None:
        return None
    try:
        return parse_layout(session["layout"])
    except ValueError as exc:
        raise UserError(f"the fetcher's session answer has a bad layout: {exc}") from None
