"""A backup of a volume still being restored (issue: trust).

The nightly backup of a restored VM's volume can run while its relocation is
still under way. librbd 16.2.15 cannot diff such an image with its migration
source: the backup died (SIGFPE; a librbd assertion in ``diff_iterate`` with
``include_parent``), and left its snapshot. Now its own data is diffed alone and
the rest is taken from the backup it is being restored from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import rbd

from rbd_restore import devcluster
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, export_digest, new_image

MiB = 1 << 20


def backup_and_restore(cli: Cli, cluster: devcluster.ClusterInfo, staged: str,
                       images: list[str]) -> dict[str, Any]:
    """Back up the staged image, restore that backup in full, and check it holds what
    the image held (nothing writes to it meanwhile). Not read from the backup's
    snapshot: librbd 16.2.15 fails (EINVAL, "failed to read parent extents") to read
    a staged image's snapshot where the image was extended and has no data of its
    own, while the image itself reads there as zeros."""
    held = export_digest(cluster, f"volumes/{staged}")
    result = cli.run("backup", f"volumes/{staged}", "--json", timeout=120)
    assert result.returncode == 0, result.stderr  # died of SIGFPE before
    backup: dict[str, Any] = json.loads(result.stdout)
    restored = f"{staged}-r{len(images)}"
    images.append(restored)
    cli.json("restore", backup["backup_id"], f"volumes/{restored}", "--mode", "full")
    backup["digest"] = held
    assert export_digest(cluster, f"volumes/{restored}") == held
    return backup


def test_a_volume_still_being_restored_is_backed_up_whole(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path) -> None:
    name = new_image(ioctx, images, 24 * MiB)
    with rbd.Image(ioctx, name) as image:
        image.write(random.Random(name).randbytes(20 * MiB), 2 * MiB)
    source_backup = cli.json("backup", f"volumes/{name}")["backup_id"]
    staged = f"{name}-staged"
    images.append(staged)
    fetcher = FetcherProcess(cluster, tmp_path / "cache", cli.prefix)
    fetcher.start()
    try:
        via = Cli(cluster, cli.prefix, fetcher.env_overrides)
        job = via.json("restore", source_backup, f"volumes/{staged}", "--mode",
                       "instant")["job_id"]
        # The guest writes, trims a region not relocated yet, and the volume is
        # extended (as Cinder extends one) and written past its old end.
        with rbd.Image(ioctx, staged) as image:
            image.write(b"guest" * 13107, 5 * MiB)
            image.discard(10 * MiB, 1 * MiB)
            image.resize(32 * MiB)
            image.write(random.Random(1).randbytes(1 * MiB), 28 * MiB)

        first = backup_and_restore(via, cluster, staged, images)
        # Only the image's own objects were read; the rest is the source backup's.
        assert first["bytes_read"] <= 12 * MiB, first

        with rbd.Image(ioctx, staged) as image:  # an incremental, still migrating
            image.write(b"later" * 800, 15 * MiB)
        second = backup_and_restore(via, cluster, staged, images)
        assert second["parent"] == first["backup_id"]

        run = via.run("jobs", "run", job, "--once", timeout=300)
        assert run.returncode == 0, run.stderr[-1000:]
        assert via.json("status", job)["jobs"][0]["state"] == "committed"
    finally:
        fetcher.stop()
    # Relocated and committed: the snapshots still hold what they held.
    assert export_digest(cluster, f"volumes/{staged}@rbd-restore.{second['backup_id']}") \
        == second["digest"]
    third = backup_and_restore(cli, cluster, staged, images)
    assert third["parent"] == second["backup_id"]
    assert export_digest(cluster, f"volumes/{staged}") == third["digest"]
