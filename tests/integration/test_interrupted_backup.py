"""A backup killed mid-way leaves no snapshot behind for good (issue: trust).

Before its snapshot a backup marks the image; the next backup of the image
finds the mark of a backup that is neither running nor finished and removes
that backup's snapshot. Snapshots without a mark (restored history) stay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import rbd

from rbd_restore import devcluster
from rbd_restore.backup import IN_PROGRESS_KEY
from tests.support.helpers import Cli, export_digest, new_image

MiB = 1 << 20


def snapshots(ioctx: Any, name: str) -> list[str]:
    with rbd.Image(ioctx, name, read_only=True) as image:
        return [s["name"] for s in image.list_snaps()]


def test_the_snapshot_of_a_killed_backup_is_removed_by_the_next_backup(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str]) -> None:
    name = new_image(ioctx, images, 128 * MiB)
    with rbd.Image(ioctx, name) as image:
        for offset in range(0, 128 * MiB, 4 * MiB):
            image.write(os.urandom(4 * MiB), offset)
    with rbd.Image(ioctx, name) as image:  # a snapshot a restore brought: never ours
        image.create_snap("rbd-restore.20200101T000000Z-00000000")
    killed = subprocess.Popen(cli.command("backup", f"volumes/{name}", "--workers", "1"),
                              env=cli.env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(snapshots(ioctx, name)) < 2:  # its snapshot is taken: it is reading now
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    abandoned = [s for s in snapshots(ioctx, name) if not s.endswith("-00000000")]
    assert len(abandoned) == 1
    with rbd.Image(ioctx, name, read_only=True) as image:
        marks = [k for k, _ in image.metadata_list() if k.startswith(IN_PROGRESS_KEY)]
    assert marks == [IN_PROGRESS_KEY + abandoned[0].removeprefix("rbd-restore.")]

    backup = cli.json("backup", f"volumes/{name}")
    assert backup["parent"] is None  # the killed one left nothing to build on
    assert snapshots(ioctx, name) == ["rbd-restore.20200101T000000Z-00000000",
                                      f"rbd-restore.{backup['backup_id']}"]
    with rbd.Image(ioctx, name, read_only=True) as image:
        assert not [k for k, _ in image.metadata_list() if k.startswith(IN_PROGRESS_KEY)]
    images.append(f"{name}-r")
    cli.json("restore", backup["backup_id"], f"volumes/{name}-r")
    assert export_digest(cluster, f"volumes/{name}-r") == export_digest(cluster,
                                                                        f"volumes/{name}")
