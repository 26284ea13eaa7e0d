"""Volumes resized between backups, and a damaged manifest in the bucket (issue: trust).

A volume extended (``openstack volume extend``) or shrunk between two backups
is backed up incrementally at its new size and restores bit-exact, in full and
instantly. A manifest that does not validate is reported and skipped by every
command that lists backups; it never takes the repository down with it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import rbd

from rbd_restore import devcluster
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, export_digest, manifest_body, new_image, put_manifest_body

MiB = 1 << 20


def resize(ioctx: Any, name: str, size: int) -> None:
    with rbd.Image(ioctx, name) as image:
        image.resize(size, allow_shrink=True)


def write(ioctx: Any, name: str, data: bytes, offset: int) -> None:
    with rbd.Image(ioctx, name) as image:
        image.write(data, offset)


def restore_instantly(cluster: devcluster.ClusterInfo, cli: Cli, backup_id: str,
                      target: str, tmp_path: Path) -> str:
    fetcher = FetcherProcess(cluster, tmp_path / f"cache-{target}", cli.prefix)
    fetcher.start()
    try:
        runner_cli = Cli(cluster, cli.prefix, fetcher.env_overrides)
        result = runner_cli.json("restore", backup_id, f"volumes/{target}", "--mode",
                                 "instant", "--wait")
        assert result["committed_seconds"] > 0
    finally:
        fetcher.stop()
    return export_digest(cluster, f"volumes/{target}")


@pytest.mark.parametrize("grown_size", [32 * MiB + 3 * 4096 + 512, 32 * MiB])
def test_a_grown_volume_backs_up_incrementally_and_restores_bit_exact(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path, grown_size: int) -> None:
    rng = random.Random(grown_size)
    name = new_image(ioctx, images, 16 * MiB + 1536)  # a partial last chunk, to be extended
    write(ioctx, name, rng.randbytes(5 * MiB), 1 * MiB)
    write(ioctx, name, rng.randbytes(700), 16 * MiB)
    first = cli.json("backup", f"volumes/{name}")

    resize(ioctx, name, grown_size)
    write(ioctx, name, rng.randbytes(4096), 20 * MiB)  # the guest uses the new space
    write(ioctx, name, rng.randbytes(100), grown_size - 100)
    second = cli.json("backup", f"volumes/{name}")
    assert second["parent"] == first["backup_id"]
    # Only the old last chunk (now longer) and the chunks written past the old end.
    assert second["bytes_read"] <= 3 * 4 * MiB
    shown = cli.json("backups", "show", second["backup_id"])
    assert shown["image_size"] == grown_size
    want = export_digest(cluster, f"volumes/{name}")

    images.extend([f"{name}-full", f"{name}-instant"])
    cli.json("restore", second["backup_id"], f"volumes/{name}-full")
    assert export_digest(cluster, f"volumes/{name}-full") == want
    assert restore_instantly(cluster, cli, second["backup_id"], f"{name}-instant",
                             tmp_path) == want
    assert cli.run("backups", "list").returncode == 0
    assert cli.run("gc", "--grace", "0").returncode == 0


def test_a_shrunk_volume_restores_bit_exact_at_its_new_size(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path) -> None:
    rng = random.Random(3)
    name = new_image(ioctx, images, 32 * MiB)
    write(ioctx, name, rng.randbytes(30 * MiB), 1 * MiB)
    cli.json("backup", f"volumes/{name}")
    resize(ioctx, name, 9 * MiB + 5)
    second = cli.json("backup", f"volumes/{name}")
    assert cli.json("backups", "show", second["backup_id"])["image_size"] == 9 * MiB + 5
    want = export_digest(cluster, f"volumes/{name}")
    # Shrunk, then grown again before the next backup: the area past the cut is zeros.
    resize(ioctx, name, 20 * MiB)
    third = cli.json("backup", f"volumes/{name}")
    want_third = export_digest(cluster, f"volumes/{name}")

    images.extend([f"{name}-2", f"{name}-3", f"{name}-3i"])
    cli.json("restore", second["backup_id"], f"volumes/{name}-2")
    assert export_digest(cluster, f"volumes/{name}-2") == want
    cli.json("restore", third["backup_id"], f"volumes/{name}-3")
    assert export_digest(cluster, f"volumes/{name}-3") == want_third
    assert restore_instantly(cluster, cli, third["backup_id"], f"{name}-3i",
                             tmp_path) == want_third


def test_a_size_librbd_cannot_stage_is_refused_cleanly_and_restores_in_full(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path) -> None:
    name = new_image(ioctx, images, 16 * MiB)
    write(ioctx, name, random.Random(4).randbytes(MiB), 0)
    cli.json("backup", f"volumes/{name}")
    resize(ioctx, name, 20 * MiB + 12345)  # rbd resize --size ...B: any byte count
    odd = cli.json("backup", f"volumes/{name}")["backup_id"]
    want = export_digest(cluster, f"volumes/{name}")
    fetcher = FetcherProcess(cluster, tmp_path / "cache", cli.prefix)
    fetcher.start()
    try:
        line = Cli(cluster, cli.prefix, fetcher.env_overrides).fails(
            "restore", odd, f"volumes/{name}-i", "--mode", "instant")
    finally:
        fetcher.stop()
    assert "not a multiple of 512" in line and "--mode full" in line
    assert f"{name}-i" not in rbd.RBD().list(ioctx)
    images.append(f"{name}-f")
    cli.json("restore", odd, f"volumes/{name}-f")
    assert export_digest(cluster, f"volumes/{name}-f") == want


def test_a_damaged_manifest_is_reported_and_skipped_never_fatal(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        s3_client: Any) -> None:
    rng = random.Random(8)
    good, bad = new_image(ioctx, images, 8 * MiB), new_image(ioctx, images, 8 * MiB)
    for name in (good, bad):
        write(ioctx, name, rng.randbytes(6 * MiB), 0)
    kept = cli.json("backup", f"volumes/{good}")["backup_id"]
    damaged = cli.json("backup", f"volumes/{bad}")["backup_id"]
    body = manifest_body(cli, damaged)
    body["image_size"] += 1  # an edit the MAC catches
    put_manifest_body(cli, damaged, body)

    listed = cli.run("backups", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    payload = json.loads(listed.stdout)
    assert [b["backup_id"] for b in payload["backups"]] == [kept]
    assert payload["unreadable"][0]["backup_id"] == damaged
    assert f"backup {damaged} skipped" in listed.stderr and "MAC" in listed.stderr

    gc = cli.run("gc", "--grace", "0", "--json")
    assert gc.returncode == 0, gc.stderr
    result = json.loads(gc.stdout)
    assert result["unreadable_manifests"] == [damaged]
    assert result["chunks_deleted"] == 0  # the damaged one's chunks are kept too

    assert cli.run("profile", "show", f"volumes/{good}").returncode == 4  # none yet: not 7
    assert "MAC" in cli.fails("backups", "show", damaged)
    assert cli.run("backups", "verify", kept, "--deep").returncode == 0
