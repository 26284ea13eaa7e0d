"""``backups export`` to a file: the image's bytes, or no file at all (issue: trust).

An export that stops half-way (a chunk gone from the bucket, a full disk)
used to leave its partial file under the name asked for. A script that checks
for the file, or an operator who misses the error, then takes a truncated
image for the backup; and the next export refuses, since export never
overwrites. ``rbd export`` removes its file when it fails; so does this one.
"""

from __future__ import annotations

import hashlib
import random
import resource
import signal
import subprocess
from pathlib import Path
from typing import Any

import rbd

from rbd_restore import devcluster
from tests.support.helpers import Cli, export_digest, new_image, repository

MiB = 1 << 20
CHUNK = 4 * MiB


def backed_up(cli: Cli, ioctx: Any, images: list[str]) -> tuple[str, str]:
    """An image of 8 chunks, the third and fourth never written (holes), backed up."""
    name = new_image(ioctx, images, 8 * CHUNK)
    data = random.Random(7).randbytes(8 * CHUNK)
    with rbd.Image(ioctx, name) as image:
        image.write(data[:2 * CHUNK], 0)
        image.write(data[4 * CHUNK:], 4 * CHUNK)
    return name, cli.json("backup", f"volumes/{name}")["backup_id"]


def test_an_export_is_the_image_with_holes_where_it_has_none(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path) -> None:
    name, backup_id = backed_up(cli, ioctx, images)
    target = tmp_path / "disk.raw"
    result = cli.run("backups", "export", backup_id, str(target))
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(target.read_bytes()).hexdigest() == export_digest(
        cluster, f"volumes/{name}")
    assert target.stat().st_blocks * 512 <= 6 * CHUNK  # the two zero chunks are holes
    assert "never overwrites" in cli.fails("backups", "export", backup_id, str(target))


def test_an_export_that_fails_half_way_leaves_no_file(
        cli: Cli, ioctx: Any, images: list[str], tmp_path: Path) -> None:
    _, backup_id = backed_up(cli, ioctx, images)
    repo = repository(cli)
    manifest = repo.load_manifest(backup_id)

    # The disk fills (a file-size limit, EFBIG, stands in for ENOSPC) after two chunks.
    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * CHUNK + MiB, 2 * CHUNK + MiB))

    full = tmp_path / "full.raw"
    result = subprocess.run(cli.command("backups", "export", backup_id, str(full)),
                            capture_output=True, text=True, env=cli.env(), timeout=300,
                            check=False, preexec_fn=small_files)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"rbd-restore: error: cannot write {full}: File too large"]
    assert list(tmp_path.iterdir()) == []

    # A chunk in the middle is gone from the bucket.
    repo.store.delete(repo.keys.chunk(manifest.chunks[5]))
    missing = tmp_path / "missing.raw"
    line = cli.fails("backups", "export", backup_id, str(missing))
    assert manifest.chunks[5] in line
    assert list(tmp_path.iterdir()) == []
