"""Run instant-restore jobs to the end: relocate, commit, close the session.

A job is claimed with an expiring RADOS lock, renewed while it runs, so a
runner that dies leaves the job to the next runner (or itself, restarted).
Relocation is resumable: ``migration_execute`` skips objects already copied.
When a VM holds the image's exclusive lock, librbd forwards the relocation to
it; if the VM stops or the lock moves mid-way, the call fails and is retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rbd_restore import lazy_clone
from rbd_restore.ceph import Cluster
from rbd_restore.errors import NotFoundError, UnavailableError, UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs.store import ACTIVE, JOBS_OBJECT, JobRecord, JobStore
from rbd_restore.periodic import every

log = logging.getLogger(__name__)

LOCK_SECONDS = 30
SAVE_EVERY = 1.0
RETRY_DELAYS = (1, 2, 5, 10, 20, 30)

Progress = Callable[[float, JobRecord], None]


class JobBusy(UserError):
    """Another runner holds the job."""


@dataclass
class _Live:
    """Progress reported by librbd's callback thread, persisted by another thread."""

    fraction: float = 0.0
    started: float = field(default_factory=time.monotonic)
    start_fraction: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class JobRunner:
    def __init__(self, cluster: Cluster, control: ControlClient | None,
                 relocation_concurrency: int | None = None) -> None:
        self.cluster = cluster
        self.store = JobStore(cluster)
        self.control = control
        self.concurrency = relocation_concurrency
        self.cookie = f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"

    @contextmanager
    def claim(self, ioctx: Any, job_id: str) -> Iterator[None]:
        import rados

        name = f"job.{job_id}"
        try:
            ioctx.lock_exclusive(JOBS_OBJECT, name, self.cookie, "rbd-restore job runner",
                                 duration=LOCK_SECONDS)
        except (rados.ObjectBusy, rados.ObjectExists):
            raise JobBusy(f"job {job_id} is being run by another job runner") from None

        def renew() -> None:
            try:
                ioctx.lock_exclusive(JOBS_OBJECT, name, self.cookie, "rbd-restore job runner",
                                     duration=LOCK_SECONDS, flags=1)  # LOCK_FLAG_MAY_RENEW
            except rados.Error as exc:
                log.warning("job %s: lock renewal failed: %s", job_id, exc)

        try:
            with every(LOCK_SECONDS / 3, renew, f"job-lock {job_id}"):
                yield
        finally:
            with contextlib.suppress(rados.Error):
                ioctx.unlock(JOBS_OBJECT, name, self.cookie)

    def _close_session(self, record: JobRecord) -> None:
        if self.control is None:
            return
        with contextlib.suppress(NotFoundError):  # closed already
            self.control.close(record.session_id)

    def run(self, record: JobRecord, progress: Progress | None = None) -> JobRecord:
        """Finish one job; returns its final record (committed, failed or aborted).
        A job whose relocation must wait (``relocate_after``) is waited for here."""
        started = time.monotonic()
        with self.cluster.ioctx(record.pool) as ioctx, self.claim(ioctx, record.id):
            if (due_in := record.due_in()) > 0:
                log.info("job %s: relocation starts at %s", record.id, record.relocate_after)
                time.sleep(due_in)
            if self.concurrency:
                import rbd

                with rbd.Image(ioctx, record.image) as image:
                    image.metadata_set("conf_rbd_concurrent_management_ops",
                                       str(self.concurrency))
            attempt = 0
            while True:
                try:
                    migration = lazy_clone.state(ioctx, record.image)
                except NotFoundError:
                    record = record.with_(state="aborted", error="the image was removed")
                    self.store.save(record)
                    self._close_session(record)
                    return record
                except UnavailableError:
                    migration = lazy_clone.MigrationState("unknown", "")  # retried below
                if migration is None:  # committed, by us earlier or by hand
                    record = record.with_(state="committed", progress=1.0, error="")
                    break
                try:
                    record = self._relocate(ioctx, record, progress)
                    lazy_clone.commit(ioctx, record.image)
                    record = record.with_(state="committed", progress=1.0, error="",
                                          committed_seconds=record.committed_seconds or
                                          record.ready_seconds + time.monotonic() - started)
                    break
                except Exception as exc:  # librbd errors: lock hand-over, VM stopped, network
                    delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                    attempt += 1
                    message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
                    log.warning("job %s: relocation attempt %d failed (%s); retrying in %d s",
                                record.id, attempt, message, delay)
                    record = record.with_(error=f"retrying after: {message}")
                    self.store.save(record)
                    time.sleep(delay)
            self.store.save(record)
        self._close_session(record)
        return record

    def _relocate(self, ioctx: Any, record: JobRecord, progress: Progress | None) -> JobRecord:
        record = record.with_(state="relocating")
        self.store.save(record)
        live = _Live(fraction=record.progress, start_fraction=record.progress)
        done = threading.Event()

        def on_progress(offset: int, total: int) -> None:
            with live.lock:
                live.fraction = max(live.fraction, offset / total if total else 1.0)

        def persist() -> None:
            nonlocal record
            while not done.wait(SAVE_EVERY):
                record = self._snapshot(record, live)
                self.store.save(record)
                if progress:
                    progress(record.progress, record)

        saver = threading.Thread(target=persist, daemon=True)
        saver.start()
        try:
            lazy_clone.execute(ioctx, record.image, on_progress)
        finally:
            done.set()
            saver.join()
        live.fraction = 1.0
        record = self._snapshot(record, live)
        if progress:
            progress(1.0, record)
        return record

    @staticmethod
    def _snapshot(record: JobRecord, live: _Live) -> JobRecord:
        with live.lock:
            fraction = live.fraction
        elapsed = time.monotonic() - live.started
        rate = (fraction - live.start_fraction) * record.bytes_total / elapsed if elapsed else 0
        return record.with_(progress=fraction, rate_bytes_per_s=rate)

    def serve(self, poll_seconds: float = 2.0, once: bool = False,
              only: str | None = None) -> None:
        """Run every active job (or only job ``only``) until stopped; with ``once``,
        until no such job is active.

        A job whose runner died stays locked until its lock expires; it is then
        taken over here, so waiting for it is part of "once".
        """
        while True:
            active = ran = 0
            wait = poll_seconds
            for record in self.store.list():
                if record.state not in ACTIVE or only not in (None, record.id):
                    continue
                active += 1
                if (due_in := record.due_in()) > 0:  # the VM boots first; others go on
                    wait = min(wait, due_in)
                    continue
                try:
                    final = self.run(record)
                    ran += 1
                    log.info("job finished", extra={"job": record.id, "state": final.state})
                except JobBusy:
                    continue
                except UserError as exc:
                    log.error("job %s: %s", record.id, exc.message)
            if once and not active:
                return
            if not ran:
                time.sleep(wait)
