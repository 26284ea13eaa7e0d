"""Restores into, and backups from, a pool without room (issue: trust).

A write to a pool Ceph flags full waits in librados for room, without an error or
a timeout: before the check, a full restore into such a pool hung without a word,
and an instant restore staged an image whose relocation (and the VM's writes) hung
later. The pool here is a real one with a real quota, filled by real writes.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rbd

from rbd_restore import devcluster
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, export_digest, mon_command, wait_for

MiB = 1 << 20


def set_quota(rados_cluster: Any, pool: str, max_bytes: int) -> None:
    mon_command(rados_cluster, "osd pool set-quota", pool=pool, field="max_bytes",
                val=str(max_bytes))


def flagged_full(rados_cluster: Any, pool: str) -> bool:
    details = {p["pool_name"]: p
               for p in mon_command(rados_cluster, "osd pool ls", detail="detail")}
    return "full_quota" in details[pool]["flags_names"].split(",")


@pytest.fixture
def pool(scratch_pool: str, rados_cluster: Any) -> Iterator[str]:
    yield scratch_pool
    set_quota(rados_cluster, scratch_pool, 0)  # a full pool is deleted all the same


def test_a_restore_into_a_pool_without_room_is_refused_and_a_full_pool_is_reported(
        cluster: devcluster.ClusterInfo, cli: Cli, rados_cluster: Any, pool: str,
        source: dict[str, str], tmp_path: Path) -> None:
    fetcher = FetcherProcess(cluster, tmp_path / "cache", cli.prefix)
    fetcher.start()
    try:
        via = Cli(cluster, cli.prefix, fetcher.env_overrides)
        backup_id = source["backup_id"]
        # A quota under the 24 MiB the backup holds (six 4 MiB chunks): refused before
        # anything is written. Before, the data went in past the quota (Ceph flags the
        # pool only when the OSDs next report its usage); once flagged, it hung.
        set_quota(rados_cluster, pool, 8 * MiB)
        for mode in ("full", "instant"):
            result = via.run("restore", backup_id, f"{pool}/{mode}-1", "--mode", mode,
                             timeout=60)  # hung for good before
            line = result.stderr.strip()
            assert result.returncode == 1 and "\n" not in line, result.stderr
            assert (f"pool {pool} has room for 8.0 MiB under its quota of 8.0 MiB, "
                    "and the backup holds 24.0 MiB") in line, line
        with rados_cluster.open_ioctx(pool) as ioctx:
            assert rbd.RBD().list(ioctx) == []
        assert not [j for j in via.json("status")["jobs"] if j["image"].startswith(pool)]
        assert fetcher.control("GET", "/v1/sessions")[1]["sessions"] == []

        # With room, both go ahead: an instant restore staged, a full one bit-exact.
        set_quota(rados_cluster, pool, 64 * MiB)
        job_id = via.json("restore", backup_id, f"{pool}/instant-2", "--mode",
                          "instant")["job_id"]
        via.json("restore", backup_id, f"{pool}/full-2", "--mode", "full")
        assert export_digest(cluster, f"{pool}/full-2") == source["digest"]

        # The pool fills (its quota lowered under what it holds) and Ceph flags it full:
        # a restore and an abort are refused at once, status names the job whose
        # relocation and VM writes now wait (it hung on librbd's read-write open of the
        # image before), and a runner leaves the job alone instead of hanging on it.
        set_quota(rados_cluster, pool, 8 * MiB)
        wait_for(lambda: flagged_full(rados_cluster, pool), timeout=90, every=0.5)
        line = via.fails("restore", backup_id, f"{pool}/full-3", "--mode", "full", timeout=60)
        assert f"pool {pool} is full (its quota is used up): a restore writes to it" in line
        # A backup snapshots its image: that waited for room too, without a word.
        line = via.fails("backup", f"{pool}/full-2", timeout=60)
        assert (f"pool {pool} is full (its quota is used up): a backup of {pool}/full-2 "
                "(its snapshot) writes to it") in line, line
        line = via.fails("abort", job_id, timeout=60)
        assert f"pool {pool} is full (its quota is used up): aborting job {job_id}" in line
        note = (f"pool {pool} is full (its quota is used up); the relocation of "
                f"{pool}/instant-2 and the writes of a VM using it wait until the pool "
                "has room")
        assert via.json("status", job_id)["jobs"][0]["error"] == note
        assert note in via.run("status", job_id, timeout=60).stdout
        log = tmp_path / "runner.log"
        with log.open("wb") as sink:
            runner = subprocess.Popen(via.command("jobs", "run"), env=via.env(),
                                      stdout=sink, stderr=sink)
        try:
            wait_for(lambda: f"pool {pool} is full" in log.read_text(), timeout=60)
            assert via.json("status", job_id)["jobs"][0]["state"] == "staged"

            # Room again: the runner relocates and commits it, bit-exact.
            set_quota(rados_cluster, pool, 0)
            wait_for(lambda: via.json("status", job_id)["jobs"][0]["state"] == "committed",
                     timeout=120)
            assert export_digest(cluster, f"{pool}/instant-2") == source["digest"]
        finally:
            runner.send_signal(signal.SIGTERM)
            assert runner.wait(timeout=60) == 0, log.read_text()[-2000:]
    finally:
        fetcher.stop()
