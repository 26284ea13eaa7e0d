"""`restore --relocate-after`: the VM boots first, the relocation starts when it is due."""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import rbd

from rbd_restore import devcluster, lazy_clone
from rbd_restore.ceph import remove_image
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, export_digest

MiB = 1 << 20
DELAY = 4.0


def test_relocation_waits_until_due_then_commits(cluster: devcluster.ClusterInfo,
                                                  rados_cluster: Any, tmp_path: Path) -> None:
    prefix = f"reloc-after-{uuid.uuid4().hex[:8]}/"
    name = f"ra-src-{uuid.uuid4().hex[:8]}"
    target = f"ra-dst-{uuid.uuid4().hex[:8]}"
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, name, 32 * MiB, old_format=False)
        fetcher = FetcherProcess(cluster, tmp_path / "cache", prefix, {})
        fetcher.start()
        try:
            with rbd.Image(ioctx, name) as image:
                image.write(random.Random(3).randbytes(8 * MiB), 4 * MiB)
            cli = Cli(cluster, prefix, fetcher.env_overrides)
            backup = cli.json("backup", f"volumes/{name}")["backup_id"]
            assert "--mode instant" in cli.fails("restore", backup, f"volumes/{target}",
                                                 "--relocate-after", "5")
            job = cli.json("restore", backup, f"volumes/{target}", "--mode", "instant",
                           "--relocate-after", str(DELAY))["job_id"]
            status = cli.json("status", job)["jobs"][0]
            due = dt.datetime.fromisoformat(status["relocate_after"])
            assert status["state"] == "staged"
            assert "relocation starts in" in cli.run("status", job).stdout

            runner = subprocess.Popen(
                [sys.executable, "-m", "rbd_restore.cli", "jobs", "run", job, "--once",
                 "--log-level", "warning"], env=cli.env(), stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True)
            try:
                # The runner holds the job but copies nothing until the job is due.
                left_prepared = None
                deadline = time.monotonic() + 60
                while left_prepared is None and time.monotonic() < deadline:
                    current = lazy_clone.state(ioctx, target)
                    if current is None or current.state != "prepared":
                        left_prepared = dt.datetime.now(dt.UTC)
                    elif runner.poll() is not None:
                        break
                    else:
                        time.sleep(0.05)
                assert left_prepared is not None, runner.communicate()[1]
                assert left_prepared >= due - dt.timedelta(seconds=0.2)
                assert runner.wait(timeout=120) == 0, runner.communicate()[1]
            finally:
                if runner.poll() is None:
                    runner.kill()
                    runner.wait()
            assert cli.json("status", job)["jobs"][0]["state"] == "committed"
            assert lazy_clone.state(ioctx, target) is None
            assert export_digest(cluster, f"volumes/{target}") == export_digest(
                cluster, f"volumes/{name}")
        finally:
            if lazy_clone.state(ioctx, target) is not None:  # failed before the commit
                rbd.RBD().migration_abort(ioctx, target)
            fetcher.stop()
            remove_image(ioctx, target)
            remove_image(ioctx, name)
