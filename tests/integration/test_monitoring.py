"""Every metric the shipped dashboard and alert rules query is exported by a real fetcher
hosting the job runner during a real instant restore, and a standalone runner serves
its metrics on --metrics-listen."""

from __future__ import annotations

import random
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import rbd

from rbd_restore import devcluster
from tests.support.fetcher_proc import FetcherProcess, free_port
from tests.support.helpers import Cli, wait_for
from tests.support.monitoring import exported_name, queried_metrics

MiB = 1 << 20


def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


def names(samples: dict[str, float]) -> set[str]:
    return {exported_name(re.split(r"[{ ]", series)[0]) for series in samples}


def test_dashboard_and_alert_metrics_are_exported_during_a_restore(
        cluster: devcluster.ClusterInfo, ioctx: Any, images: list[str], tmp_path: Path,
        unique_name: str) -> None:
    name, target = f"mon-src-{uuid.uuid4().hex[:8]}", f"mon-dst-{uuid.uuid4().hex[:8]}"
    images += [target, name]
    rbd.RBD().create(ioctx, name, 32 * MiB, old_format=False)
    with rbd.Image(ioctx, name) as image:
        image.write(random.Random(9).randbytes(12 * MiB), 4 * MiB)
    fetcher = FetcherProcess(cluster, tmp_path / "cache", f"{unique_name}/", {},
                             args=("--run-jobs",), log_level="info")
    fetcher.start()
    try:
        address = fetcher.settings.metrics_listen
        cli = Cli(cluster, f"{unique_name}/", fetcher.env_overrides)
        backup = cli.json("backup", f"volumes/{name}")["backup_id"]
        job = cli.json("restore", backup, f"volumes/{target}", "--mode", "instant",
                       "--relocate-after", "3")["job_id"]
        offsets = list(range(4 * MiB, 16 * MiB, MiB))
        random.Random(1).shuffle(offsets)
        with rbd.Image(ioctx, target) as image:  # the guest's reads
            for offset in offsets:
                image.read(offset, 4096)
        # While the runner holds the job, its series are there, labelled by job id.
        during = wait_for(lambda: (s := scrape(address)) and any(
            f'job_id="{job}"' in series for series in s) and s, timeout=120, every=0.1)
        held = [s for s in during if s.startswith("rbd_restore_job_progress_ratio{")]
        assert any(f'image="volumes/{target}"' in s for s in held), held
        wait_for(lambda: cli.json("status", job)["jobs"][0]["state"] == "committed",
                 timeout=120, every=0.1)
        after = wait_for(lambda: (s := scrape(address)) and s.get(
            'rbd_restore_jobs_finished_total{state="committed"}', 0) >= 1 and s,
                         timeout=120, every=0.1)

        exported = names(during) | names(after)
        assert sorted(queried_metrics() - exported) == []
        assert after['rbd_restore_fetcher_cache_disk_size_bytes'] > 0
        assert 0 < after['rbd_restore_fetcher_cache_disk_free_bytes'] <= \
            after['rbd_restore_fetcher_cache_disk_size_bytes']
        assert after['rbd_restore_jobs{state="committed"}'] >= 1
        # The finished job's own series went with it.
        assert not any(f'job_id="{job}"' in series for series in after)
        guest = sum(v for s, v in after.items()
                    if s.startswith('rbd_restore_fetcher_chunk_reads_total{reader="guest"'))
        assert guest > 0
    finally:
        fetcher.stop()


def test_standalone_runner_serves_metrics(cluster: devcluster.ClusterInfo, cli: Cli) -> None:
    port = free_port()
    runner = subprocess.Popen(
        cli.command("jobs", "run", "--metrics-listen", f"127.0.0.1:{port}", "--log-level",
                    "warning"), env=cli.env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        def polled() -> dict[str, float] | None:
            assert runner.poll() is None, runner.communicate()[1]
            try:
                samples = scrape(f"127.0.0.1:{port}")
            except OSError:
                return None
            return samples if samples.get("rbd_restore_jobs_last_poll_timestamp_seconds") \
                else None

        samples = wait_for(polled, timeout=60)
        assert abs(samples["rbd_restore_jobs_last_poll_timestamp_seconds"] - time.time()) < 60
        assert {f'rbd_restore_jobs{{state="{s}"}}' for s in ("staged", "failed")} <= set(samples)
    finally:
        runner.terminate()
        runner.wait(timeout=30)
    assert "is not HOST:PORT" in cli.fails("jobs", "run", "--metrics-listen", "nowhere")
