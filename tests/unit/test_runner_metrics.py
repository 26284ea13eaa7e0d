"""The job runner's metrics: a job's series while it is held, its last-progress time,
and the cluster's job records by state."""

from __future__ import annotations

import dataclasses

from rbd_restore.jobs.metrics import RunnerMetrics
from rbd_restore.jobs.store import JobRecord

RECORD = JobRecord(id="r-1", backup_id="b", pool="volumes", image="vm1", session_id="s",
                   state="relocating", created="", updated="", bytes_total=1 << 30,
                   progress=0.25, rate_bytes_per_s=1 << 20, error="", ready_seconds=1.0,
                   committed_seconds=0.0, relocate_after="", attempts=0, replaces="",
                   image_id="")


def value(metrics: RunnerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_held_job_is_exported_until_it_ends() -> None:
    metrics = RunnerMetrics()
    metrics.saved(RECORD)
    labels = {"job_id": "r-1", "image": "volumes/vm1", "state": "relocating"}
    assert value(metrics, "rbd_restore_job_progress_ratio", **labels) == 0.25
    assert value(metrics, "rbd_restore_job_relocated_bytes", **labels) == (1 << 30) / 4
    assert value(metrics, "rbd_restore_job_eta_seconds", **labels) == 768.0
    metrics.saved(dataclasses.replace(RECORD, state="committed", progress=1.0))
    assert value(metrics, "rbd_restore_job_progress_ratio", **labels) is None
    assert value(metrics, "rbd_restore_jobs_finished_total", state="committed") == 1


def test_last_progress_moves_only_when_progress_grows() -> None:
    metrics = RunnerMetrics()
    labels = {"job_id": "r-1", "image": "volumes/vm1", "state": "relocating"}
    metrics.saved(RECORD)
    metrics.held.moved["r-1"] = 1000.0  # as if taken long ago
    metrics.saved(dataclasses.replace(RECORD, attempts=2))  # a retry, no progress
    assert value(metrics, "rbd_restore_job_last_progress_timestamp_seconds", **labels) == 1000
    metrics.saved(dataclasses.replace(RECORD, progress=0.3))
    assert (value(metrics, "rbd_restore_job_last_progress_timestamp_seconds", **labels) or 0) > 1000
    metrics.held.moved["r-1"] = 1000.0
    metrics.held.touch("r-1")  # waiting for --relocate-after is not being stuck
    assert (value(metrics, "rbd_restore_job_last_progress_timestamp_seconds", **labels) or 0) > 1000


def test_job_records_counted_by_state() -> None:
    metrics = RunnerMetrics()
    metrics.count([RECORD, dataclasses.replace(RECORD, id="r-2", state="failed"),
                   dataclasses.replace(RECORD, id="r-3", state="failed")])
    assert value(metrics, "rbd_restore_jobs", state="failed") == 2
    assert value(metrics, "rbd_restore_jobs", state="relocating") == 1
    assert value(metrics, "rbd_restore_jobs", state="committed") == 0
    metrics.count([])
    assert value(metrics, "rbd_restore_jobs", state="failed") == 0
