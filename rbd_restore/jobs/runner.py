"""Run instant-restore jobs to the end: relocate, commit, close the session.

Each step is chosen from the image header's migration state, not from the
record, so a job resumes wherever a runner died: ``prepared`` or ``executing``
relocate (``migration_execute`` skips what is copied), ``executed`` commits,
no migration any more means committed; an image gone means aborted; a restore
that died while preparing is cleaned up. Failures are retried with a capped
backoff; after ``max_attempts`` in a row without progress the job is marked
``failed`` with the reason (``jobs retry`` puts it back).

A job is claimed with an expiring RADOS lock (rbd_restore.jobs.lease). A runner
that loses it stops relocating and never commits. Several jobs run at once,
each on its own thread, taken from the pools in turn; one stuck or failing job
never holds up the others.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from rbd_restore import lazy_clone
from rbd_restore.ceph import Cluster, remove_image
from rbd_restore.errors import NotFoundError, UnavailableError, UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs import isolated
from rbd_restore.jobs.lease import JobBusy, Lease, LeaseLost, lease, runner_cookie
from rbd_restore.jobs.metrics import RunnerMetrics
from rbd_restore.jobs.store import ACTIVE, JobRecord, JobStore
from rbd_restore.pool_room import full_pools

log = logging.getLogger(__name__)
LEARNING_POLL_SECONDS = 0.5

SAVE_EVERY = 1.0
RETRY_DELAYS = (1, 2, 5, 10, 20, 30, 60)
MAX_ATTEMPTS = 10
PARALLEL_JOBS = 4

Progress = Callable[[float, JobRecord], None]


@dataclass
class _Live:
    """Progress reported by librbd's callback thread, persisted by another thread."""

    fraction: float = 0.0
    started: float = field(default_factory=time.monotonic)
    start_fraction: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def fair_order(records: Iterable[JobRecord]) -> list[JobRecord]:
    """Oldest first within a pool, the pools taking turns: a pool with many restores
    does not hold back the others'."""
    by_pool: dict[str, list[JobRecord]] = {}
    for record in sorted(records, key=lambda r: r.id):
        by_pool.setdefault(record.pool, []).append(record)
    ordered: list[JobRecord] = []
    queues = list(by_pool.values())
    while queues:
        ordered.extend(q.pop(0) for q in queues)
        queues = [q for q in queues if q]
    return ordered


class JobRunner:
    def __init__(self, cluster: Cluster, control: ControlClient | None,
                 relocation_concurrency: int | None = None, max_attempts: int = MAX_ATTEMPTS,
                 parallel_jobs: int = PARALLEL_JOBS,
                 metrics: RunnerMetrics | None = None) -> None:
        self.cluster = cluster
        self.metrics = metrics or RunnerMetrics()
        self.store = JobStore(cluster)
        self.control = control
        self.concurrency = relocation_concurrency
        self.max_attempts = max_attempts
        self.parallel_jobs = parallel_jobs
        self.stopping = threading.Event()
        self.pools_full: set[str] = set()

    def _save(self, record: JobRecord) -> None:
        self.store.save(record)
        self.metrics.saved(record)

    def _close_session(self, record: JobRecord) -> None:
        if self.control is None or not record.session_id:
            return
        with contextlib.suppress(NotFoundError):  # closed already
            self.control.close(record.session_id)

    def _finish(self, record: JobRecord) -> JobRecord:
        """Save a job's last state. Its session closes only when nothing can read through
        it any more: a failed job's image is still staged, and a VM may run on it. At the
        commit, the image this restore replaced goes."""
        if record.state == "committed" and record.replaces:
            with self.cluster.ioctx(record.pool) as ioctx:
                remove_image(ioctx, record.replaces)
            log.info("job %s: removed the image it replaced, %s", record.id, record.replaces)
            record = record.with_(replaces="")
        self._save(record)
        if record.state in ("committed", "aborted"):
            self._close_session(record)
        return record

    def _librbd(self, op: str, record: JobRecord, progress: Any = None,
                cancelled: Any = None) -> Any:
        return isolated.call(self.cluster.settings, op, record.pool, record.image, progress,
                             cancelled, self.concurrency)

    # One job

    def run(self, record: JobRecord, progress: Progress | None = None) -> JobRecord:
        """Take the job's lease and work on it until it is committed, failed or aborted.
        A job whose relocation must wait (``relocate_after``) is waited for here."""
        with self.cluster.ioctx(record.pool) as ioctx, \
                lease(ioctx, record.id, runner_cookie(), "rbd-restore job runner") as held:
            return self._run_held(ioctx, record, held, progress)

    def _run_held(self, ioctx: Any, record: JobRecord, held: Lease,
                  progress: Progress | None) -> JobRecord:
        started = time.monotonic()
        self.metrics.held.observe(record)
        while (due_in := record.due_in()) > 0:
            held.check()
            self.metrics.held.touch(record.id)  # waiting as asked is not being stuck
            self.stopping.wait(min(due_in, 1.0))
        self._await_learning(record, held)
        while not self.stopping.is_set():
            held.check()
            before = record.progress
            try:
                record, done = self._step(ioctx, record, held, progress, started)
                if done:
                    return record
                continue
            except LeaseLost:
                raise
            except Exception as exc:  # librbd: lock hand-over, VM stopped, fetcher away
                message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
                if isinstance(exc, UserError):
                    message = exc.message[:300]
                else:
                    log.debug("job %s: attempt failed", record.id, exc_info=True)
                record = self.store.load(record.pool, record.id) or record
                if self.stopping.is_set():
                    break
                attempts = 1 if record.progress > before else record.attempts + 1
            if attempts >= self.max_attempts:
                log.error("job %s: failed after %d attempts: %s", record.id, attempts, message)
                return self._finish(record.with_(
                    state="failed", attempts=attempts,
                    error=f"gave up after {attempts} attempts: {message}"))
            self.metrics.failed_attempts.inc()
            delay = RETRY_DELAYS[min(attempts - 1, len(RETRY_DELAYS) - 1)]
            log.warning("job %s: attempt %d failed (%s); retrying in %d s", record.id,
                        attempts, message, delay)
            record = record.with_(attempts=attempts, error=f"retrying after: {message}")
            self._save(record)
            self.stopping.wait(delay)
        return record  # the runner is stopping; the job stays active for the next one

    def _await_learning(self, record: JobRecord, held: Lease) -> None:
        """A restore whose volume has no boot profile: the relocation starts once the
        fetcher has seen the guest's boot (its session's ``learning``, see
        prefetch/session.py), so that the next restore of the volume can copy the
        boot set into the image first. A fetcher that cannot say (another replica
        without the session's state, an older fetcher, unreachable) does not hold it."""
        if self.control is None or not record.session_id or record.progress > 0:
            return
        said = False
        while not self.stopping.is_set():
            held.check()
            try:
                if not self.control.prefetch(record.session_id).get("learning"):
                    return
            except UserError:
                return
            if not said:
                log.info("job %s: relocation waits while the fetcher learns the guest's boot",
                         record.id)
                said = True
            self.metrics.held.touch(record.id)
            self.stopping.wait(LEARNING_POLL_SECONDS)

    def _step(self, ioctx: Any, record: JobRecord, held: Lease, progress: Progress | None,
              started: float) -> tuple[JobRecord, bool]:
        """One move from the image's current migration state: the record it leaves, and
        whether the job is over."""
        try:
            found = self._librbd("state", record)
            migration = None if found is None else lazy_clone.MigrationState(**found)
        except NotFoundError:
            renamed = lazy_clone.current_name(ioctx, record.image_id) if record.image_id \
                else None
            if renamed is not None:  # Cinder renames images (migrate, manage): follow it
                log.warning("job %s: image %s is now %s", record.id, record.image, renamed)
                record = record.with_(image=renamed)
                self._save(record)
                return record, False
            why = ("the restore stopped before its image was created"
                   if record.state == "preparing" else "the image was removed")
            return self._finish(record.with_(state="aborted", error=why)), True
        if migration is None:  # committed, by us earlier or by hand
            return self._finish(record.with_(state="committed", progress=1.0, error="",
                                             attempts=0)), True
        if migration.state == "preparing":
            # The restore died inside migration_prepare_import: nothing could boot on
            # it yet. abort refuses if anything has it open.
            lazy_clone.abort(ioctx, record.image)
            return self._finish(record.with_(
                state="aborted", error="the restore stopped while preparing its image; "
                "the half-made image was removed")), True
        if migration.state == "aborting":
            return self._finish(record.with_(
                state="failed", error="an abort of this image was interrupted: run "
                f"`rbd-restore abort {record.id}` again")), True
        if migration.state in ("prepared", "executing"):
            return self._relocate(ioctx, record, held, progress), False
        if migration.state == "executed":
            held.check()
            self._librbd("commit", record)
            log.info("job committed", extra={"job": record.id})
            return self._finish(record.with_(
                state="committed", progress=1.0, error="", attempts=0,
                committed_seconds=record.committed_seconds
                or record.ready_seconds + time.monotonic() - started)), True
        raise UnavailableError(f"image {record.spec} is in migration state "
                               f"{migration.state} ({migration.description or 'no detail'})")

    def _relocate(self, ioctx: Any, record: JobRecord, held: Lease,
                  progress: Progress | None) -> JobRecord:
        record = record.with_(state="relocating")
        self._save(record)
        live = _Live(fraction=record.progress, start_fraction=record.progress)
        done = threading.Event()

        def on_progress(offset: int, total: int) -> None:
            with live.lock:
                position = offset / total if total else 1.0
                live.fraction = max(live.fraction, record.data_progress(position))

        def persist() -> None:
            nonlocal record
            while not done.wait(SAVE_EVERY):
                if held.lost.is_set():
                    return  # the job's record is another runner's to write now
                record = self._snapshot(record, live)
                self._save(record)
                if progress:
                    progress(record.progress, record)

        saver = threading.Thread(target=persist, daemon=True)
        saver.start()
        try:
            self._librbd("execute", record, on_progress,
                         lambda: held.lost.is_set() or self.stopping.is_set())
        finally:
            done.set()
            saver.join()
        held.check()
        live.fraction = 1.0
        record = self._snapshot(record, live)
        self._save(record)
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

    # Every job

    def _run_one(self, record: JobRecord) -> None:
        """A job on a worker thread: whatever goes wrong stays with this job."""
        try:
            final = self.run(record)
            log.info("job finished", extra={"job": record.id, "state": final.state})
        except JobBusy:
            pass
        except LeaseLost as exc:
            log.error("%s", exc.message)
        except UserError as exc:
            log.error("job %s: %s", record.id, exc.message)
        except Exception:
            log.exception("job %s: unexpected failure", record.id)
        finally:
            self.metrics.held.release(record.id)  # another runner's, or nobody's, now

    def _pools_without_room(self, active: list[JobRecord]) -> set[str]:
        """The pools of ``active`` jobs that Ceph takes no writes into. Their jobs are
        not started: each would hold a worker thread in librados until the pool has
        room, and the jobs of other pools would wait for a free one."""
        full = full_pools(self.cluster, {r.pool for r in active}) if active else {}
        for pool in full.keys() - self.pools_full:
            log.warning("pool %s is full (%s): its jobs wait until it has room", pool,
                        full[pool])
        for pool in self.pools_full - full.keys():
            log.info("pool %s takes writes again: its jobs go on", pool)
        self.pools_full = set(full)
        return self.pools_full

    def serve(self, poll_seconds: float = 2.0, once: bool = False,
              only: str | None = None) -> None:
        """Run every active job (or only job ``only``), up to ``parallel_jobs`` at once,
        until stopped; with ``once``, until no such job is active.

        A job whose runner died stays locked until its lock expires; it is then
        taken over here, so waiting for it is part of "once".
        """
        running: dict[str, Future[None]] = {}
        with ThreadPoolExecutor(self.parallel_jobs, thread_name_prefix="job") as pool:
            try:
                while not self.stopping.is_set():
                    for job_id in [j for j, f in running.items() if f.done()]:
                        del running[job_id]
                    try:
                        records = self.store.list()
                        self.metrics.count(records)
                        active = [r for r in records
                                  if r.state in ACTIVE and only in (None, r.id)]
                    except UserError as exc:  # Ceph away: try again, keep what runs
                        log.error("job runner: %s", exc.message)
                        active = []
                    if once and not active and not running:
                        return
                    waiting = poll_seconds
                    full = self._pools_without_room(active)
                    for record in fair_order(r for r in active
                                             if r.id not in running and r.pool not in full):
                        if (due_in := record.due_in()) > 0:
                            waiting = min(waiting, due_in)
                        elif len(running) < self.parallel_jobs:
                            running[record.id] = pool.submit(self._run_one, record)
                    if running:
                        wait(list(running.values()), timeout=waiting,
                             return_when=FIRST_COMPLETED)
                    else:
                        self.stopping.wait(waiting)
            finally:
                self.stopping.set()  # running jobs stop at their next object
