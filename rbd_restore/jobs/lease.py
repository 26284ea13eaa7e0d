"""A job's lease: an exclusive RADOS lock on the jobs object, renewed while held.

The lock expires ``LOCK_SECONDS`` after its last renewal, so a runner that dies
leaves the job to the next one. A runner that cannot renew in time may already
have lost the job to another, so it stops working on it: :attr:`Lease.lost`
is set and whatever it was doing (a relocation) is cancelled and never
committed by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rbd_restore.errors import UserError
from rbd_restore.jobs.store import JOBS_OBJECT
from rbd_restore.periodic import every

log = logging.getLogger(__name__)

LOCK_SECONDS = 30
RENEW_EVERY = LOCK_SECONDS / 3
LOCK_FLAG_MAY_RENEW = 1


class JobBusy(UserError):
    """Another runner (or the restore command preparing it) holds the job."""


class LeaseLost(UserError):
    """The lease could not be renewed in time: another runner may hold the job now."""


def runner_cookie() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"


class Lease:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.lost = threading.Event()
        self.renewed = time.monotonic()

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lost its lock; another runner may hold it now")


@contextmanager
def lease(ioctx: Any, job_id: str, cookie: str, holder: str) -> Iterator[Lease]:
    """Hold job ``job_id`` until the block ends, or raise :class:`JobBusy`."""
    import rados

    name = f"job.{job_id}"
    try:
        ioctx.lock_exclusive(JOBS_OBJECT, name, cookie, holder, duration=LOCK_SECONDS)
    except (rados.ObjectBusy, rados.ObjectExists):
        raise JobBusy(f"job {job_id} is held by another job runner") from None
    held = Lease(job_id)

    def renew() -> None:
        if held.lost.is_set():
            return
        if time.monotonic() - held.renewed >= LOCK_SECONDS:
            log.error("job %s: the lock lapsed before it was renewed; stopping", job_id)
            held.lost.set()
            return
        try:
            ioctx.lock_exclusive(JOBS_OBJECT, name, cookie, holder, duration=LOCK_SECONDS,
                                 flags=LOCK_FLAG_MAY_RENEW)
            held.renewed = time.monotonic()
        except (rados.ObjectBusy, rados.ObjectExists):
            log.error("job %s: another runner took the lock", job_id)
            held.lost.set()
        except rados.Error as exc:
            # The lock outlives this failure unless the next renewal may come too late.
            if time.monotonic() - held.renewed + RENEW_EVERY >= LOCK_SECONDS:
                log.error("job %s: lock renewal failed (%s); stopping", job_id,
                          type(exc).__name__)
                held.lost.set()
            else:
                log.warning("job %s: lock renewal failed (%s); trying again", job_id,
                            type(exc).__name__)

    try:
        with every(RENEW_EVERY, renew, f"job-lock {job_id}"):
            yield held
    finally:
        if not held.lost.is_set():
            with contextlib.suppress(rados.Error):
                ioctx.unlock(JOBS_OBJECT, name, cookie)
