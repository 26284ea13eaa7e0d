"""The benchmarks wait for commits beside the guests they time: they read job states
in their own process, never by starting an ``rbd-restore status`` per poll."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from bench.common import JobStates
from rbd_restore import devcluster
from rbd_restore.jobs.store import JobRecord, new_job_id, now_iso


def test_job_states_are_read_without_a_process_per_poll(
        cluster: devcluster.ClusterInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    record = JobRecord(id=new_job_id(), backup_id="20261206T000000Z-0123abcd", pool="volumes",
                       image="bench-states",
                       session_id="", state="relocating", created=now_iso())
    states = JobStates(cluster)
    try:
        states.store.save(record)

        def no_process(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a process started to read a job's state")

        monkeypatch.setattr(subprocess, "Popen", no_process)
        assert states.state(record.id) == "relocating"
        states.store.save(record.with_(state="committed"))
        assert states.state(record.id) == "committed"
        states.store.remove(record)
        with pytest.raises(RuntimeError, match="not in pool volumes"):
            states.state(record.id)
    finally:
        states.store.remove(record)
        states.close()
