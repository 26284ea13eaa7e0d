"""Restores of volumes made from one image, from one fetcher: the chunks they share
are fetched from S3 once, however far apart their relocations run."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import rbd

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, export_digest, repository

MiB = 1 << 20
BASE = 32 * MiB


def test_chunks_two_restores_share_are_fetched_once_though_relocated_one_after_the_other(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, tmp_path: Path) -> None:
    prefix = f"shared-{uuid.uuid4().hex[:8]}/"
    rng = random.Random(18)
    base = rng.randbytes(BASE)
    names = [f"shared-src-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    targets = [f"shared-dst-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    # Memory for two chunks: what the first relocation copies must leave memory
    # before the second one reads it.
    fetcher = FetcherProcess(cluster, tmp_path / "cache", prefix,
                             {"RBD_RESTORE_FETCHER_MEMORY_CACHE": "8M"})
    fetcher.start()
    cli = Cli(cluster, prefix, fetcher.env_overrides)
    with rados_cluster.open_ioctx("volumes") as ioctx:
        try:
            backups = []
            for name in names:
                rbd.RBD().create(ioctx, name, 64 * MiB, old_format=False)
                with rbd.Image(ioctx, name) as image:
                    image.write(base, 0)
                    image.write(rng.randbytes(4 * MiB), 48 * MiB)  # its own chunk
                backups.append(cli.json("backup", f"volumes/{name}")["backup_id"])
            repo = repository(cli)
            chunks = {c for b in backups for c in repo.load_manifest(b).chunks if c}
            assert len(chunks) == BASE // (4 * MiB) + 2
            jobs = [cli.json("restore", backup, f"volumes/{target}", "--mode", "instant")
                    ["job_id"] for backup, target in zip(backups, targets, strict=True)]
            ran = cli.run("jobs", "run", "--once", "--jobs", "1")  # one after the other
            assert ran.returncode == 0, ran.stderr
            assert all(cli.json("status", job)["jobs"][0]["state"] == "committed"
                       for job in jobs)
            for name, target in zip(names, targets, strict=True):
                assert export_digest(cluster, f"volumes/{target}") == export_digest(
                    cluster, f"volumes/{name}")
            assert fetcher.metrics()["rbd_restore_fetcher_s3_gets_total"] == len(chunks)
        finally:
            fetcher.stop()
            for name in names + targets:
                remove_image(ioctx, name)
