"""The job runner's Prometheus metrics.

Two views. The jobs this runner holds, one series per job (progress, bytes,
rate, time left, failed attempts, when it last moved): a stuck relocation shows
as a job whose progress stopped. And every job record in the cluster counted by
state, as the runner's poll reads them: any runner reports a failed job, so
alert rules take the ``max`` over runners. Counters say what this runner
finished and how many attempts failed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rbd_restore.jobs.store import STATES, JobRecord

PER_JOB: tuple[tuple[str, str, Callable[[JobRecord], float]], ...] = (
    ("rbd_restore_job_progress_ratio", "Share of the image relocated, 0 to 1",
     lambda r: r.progress),
    ("rbd_restore_job_relocated_bytes", "Bytes of the image relocated",
     lambda r: r.bytes_relocated),
    ("rbd_restore_job_size_bytes", "Bytes of the image to relocate", lambda r: r.bytes_total),
    ("rbd_restore_job_rate_bytes_per_second", "Relocation rate over this attempt",
     lambda r: r.rate_bytes_per_s),
    ("rbd_restore_job_eta_seconds", "Time left at the current rate (-1: not known)",
     lambda r: -1.0 if r.eta_seconds is None else r.eta_seconds),
    ("rbd_restore_job_attempts_failed", "Failed attempts in a row without progress",
     lambda r: r.attempts),
)


class _HeldJobs(Collector):
    """One series per job this runner holds, read at scrape time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, JobRecord] = {}
        self.moved: dict[str, float] = {}  # job -> wall time its progress last grew

    def observe(self, record: JobRecord) -> None:
        with self.lock:
            before = self.records.get(record.id)
            if before is None or record.progress > before.progress:
                self.moved[record.id] = time.time()
            self.records[record.id] = record

    def touch(self, job_id: str) -> None:
        with self.lock:
            if job_id in self.records:
                self.moved[job_id] = time.time()

    def release(self, job_id: str) -> None:
        with self.lock:
            self.records.pop(job_id, None)
            self.moved.pop(job_id, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.lock:
            records = list(self.records.values())
            moved = dict(self.moved)
        labels = ["job_id", "image", "state"]  # "job" is the scrape job's label
        for name, help_text, value in PER_JOB:
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for record in records:
                family.add_metric([record.id, record.spec, record.state], float(value(record)))
            yield family
        family = GaugeMetricFamily("rbd_restore_job_last_progress_timestamp_seconds",
                                   "When the job's progress last grew, the runner took it "
                                   "or it waited for its relocate-after time, Unix time",
                                   labels=labels)
        for record in records:
            family.add_metric([record.id, record.spec, record.state], moved[record.id])
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # the series come and go with the jobs: nothing to check at registration


class RunnerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.held = _HeldJobs()
        r.register(self.held)
        self.jobs = Gauge("rbd_restore_jobs", "Job records in the cluster by state, as this "
                          "runner last read them", ["state"], registry=r)
        self.finished = Counter("rbd_restore_jobs_finished", "Jobs this runner ended, by "
                                "state (committed, failed, aborted)", ["state"], registry=r)
        self.failed_attempts = Counter("rbd_restore_job_failed_attempts",
                                       "Relocation or commit attempts that failed and "
                                       "were retried", registry=r)
        self.polled = Gauge("rbd_restore_jobs_last_poll_timestamp_seconds",
                            "When this runner last read the job records, Unix time",
                            registry=r)
        for state in STATES:
            self.jobs.labels(state)
        for state in ("committed", "failed", "aborted"):
            self.finished.labels(state)

    def count(self, records: Iterable[JobRecord]) -> None:
        counts = dict.fromkeys(STATES, 0)
        for record in records:
            counts[record.state] += 1
        for state, number in counts.items():
            self.jobs.labels(state).set(number)
        self.polled.set_to_current_time()

    def saved(self, record: JobRecord) -> None:
        if record.state in ("committed", "failed", "aborted"):
            self.finished.labels(record.state).inc()
            self.held.release(record.id)
        else:
            self.held.observe(record)


def serve_metrics(registry: CollectorRegistry, listen: str) -> None:
    """``/metrics`` on HOST:PORT from a daemon thread, for a runner outside the fetcher."""
    from prometheus_client import start_http_server

    from rbd_restore.errors import UsageError
    from rbd_restore.units import split_hostport

    host, port = split_hostport(listen, "--metrics-listen")
    try:
        start_http_server(port, host, registry)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {listen}: {exc.strerror}") from None
