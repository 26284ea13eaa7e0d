"""Backups in RGW and full restores into the real cluster (docs/format.md)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import rbd

from rbd_restore import devcluster
from rbd_restore.repo.layout import KeyLayout
from rbd_restore.repo.repository import snapshot_name
from tests.support.helpers import (
    Cli,
    du_used,
    export_digest,
    manifest_body,
    new_image,
    put_chunk_content,
    scatter_random_data,
)

MiB = 1 << 20


@pytest.mark.parametrize("chunk_size", ["4M", "64K"])
def test_round_trip_is_bit_identical_and_thin(cluster: devcluster.ClusterInfo, cli: Cli,
                                              ioctx: Any, images: list[str],
                                              chunk_size: str) -> None:
    rng = random.Random(chunk_size)
    size = 37 * MiB + 12345  # not a multiple of any chunk size
    name = new_image(ioctx, images, size)
    with rbd.Image(ioctx, name) as image:
        scatter_random_data(image, rng, writes=12)
    result = cli.json("backup", f"volumes/{name}", "--chunk-size", chunk_size)
    backup_id = result["backup_id"]
    assert result["chunks_new"] > 0 and result["bytes_uploaded"] > 0
    restored = f"{name}-r"
    images.append(restored)
    cli.json("restore", backup_id, f"volumes/{restored}", "--mode", "full")

    source_snap = f"volumes/{name}@{snapshot_name(backup_id)}"
    assert export_digest(cluster, f"volumes/{restored}") == export_digest(cluster, source_snap)
    with rbd.Image(ioctx, restored) as image:
        assert image.size() == size
    assert du_used(cluster, f"volumes/{restored}") <= du_used(cluster, f"volumes/{name}") + 4 * MiB


def test_three_generations_upload_only_changes(cluster: devcluster.ClusterInfo, cli: Cli,
                                               ioctx: Any, images: list[str]) -> None:
    rng = random.Random(3)
    name = new_image(ioctx, images, 64 * MiB)
    spec = f"volumes/{name}"
    digests: list[str] = []
    backups: list[dict[str, Any]] = []
    with rbd.Image(ioctx, name) as image:
        image.write(rng.randbytes(20 * MiB), 0)
        backups.append(cli.json("backup", spec))
        digests.append(export_digest(cluster, spec))

        image.write(rng.randbytes(MiB), 5 * MiB)          # changes chunk 1
        image.write(rng.randbytes(4096), 40 * MiB + 7)    # allocates chunk 10
        backups.append(cli.json("backup", spec))
        digests.append(export_digest(cluster, spec))

        image.discard(0, 4 * MiB)                          # chunk 0 becomes a hole
        image.write(rng.randbytes(100), 17 * MiB)         # changes chunk 4
        backups.append(cli.json("backup", spec))
        digests.append(export_digest(cluster, spec))

    first, second, third = backups
    assert first["parent"] is None and first["chunks_new"] == 5
    assert second["parent"] == first["backup_id"]
    assert (second["chunks_new"], second["bytes_read"]) == (2, 8 * MiB)
    assert third["parent"] == second["backup_id"]
    assert (third["chunks_new"], third["bytes_read"]) == (1, 8 * MiB)
    # Only the newest snapshot stays for the next incremental.
    with rbd.Image(ioctx, name) as image:
        assert [s["name"] for s in image.list_snaps()] == [snapshot_name(third["backup_id"])]

    for generation, (backup, digest) in enumerate(zip(backups, digests, strict=True)):
        target = f"{name}-g{generation}"
        images.append(target)
        cli.json("restore", backup["backup_id"], f"volumes/{target}")
        assert export_digest(cluster, f"volumes/{target}") == digest, generation

    # The restored image carries its backup's snapshot, so its next backup is incremental.
    again = cli.json("backup", f"volumes/{name}-g2")
    assert again["parent"] == third["backup_id"]
    assert again["bytes_read"] == 0 and again["chunks_new"] == 0


def test_full_flag_reads_everything_but_uploads_nothing_new(cli: Cli, ioctx: Any,
                                                            images: list[str]) -> None:
    name = new_image(ioctx, images, 16 * MiB)
    with rbd.Image(ioctx, name) as image:
        image.write(random.Random(1).randbytes(8 * MiB), 0)
    cli.json("backup", f"volumes/{name}")
    full = cli.json("backup", f"volumes/{name}", "--full")
    assert full["parent"] is None
    assert full["bytes_read"] == 8 * MiB
    assert full["chunks_new"] == 0 and full["chunks_reused"] == 2


def test_same_content_in_two_images_is_stored_once(cli: Cli, ioctx: Any,
                                                   images: list[str]) -> None:
    data = random.Random(2).randbytes(12 * MiB)
    first, second = new_image(ioctx, images, 32 * MiB), new_image(ioctx, images, 32 * MiB)
    for name in (first, second):
        with rbd.Image(ioctx, name) as image:
            image.write(data, 8 * MiB)
    assert cli.json("backup", f"volumes/{first}")["chunks_new"] == 3
    again = cli.json("backup", f"volumes/{second}")
    assert (again["chunks_new"], again["bytes_uploaded"], again["chunks_reused"]) == (0, 0, 3)


def test_corrupted_chunk_is_reported_and_stops_restore(cluster: devcluster.ClusterInfo,
                                                       cli: Cli, ioctx: Any, images: list[str],
                                                       s3_client: Any) -> None:
    name = new_image(ioctx, images, 16 * MiB)
    with rbd.Image(ioctx, name) as image:
        image.write(random.Random(4).randbytes(9 * MiB), 0)
    backup_id = cli.json("backup", f"volumes/{name}")["backup_id"]
    shown = cli.json("backups", "show", backup_id)
    assert shown["chunks_allocated"] == 3
    victim = next(c for c in manifest_body(cli, backup_id)["chunks"] if isinstance(c, str))
    # A valid, sealed frame with the wrong content: only the check against the id can
    # catch it.
    put_chunk_content(cli, victim, b"evil" * 1000)

    assert cli.run("backups", "verify", backup_id).returncode == 0  # present, not checked
    deep = cli.run("backups", "verify", backup_id, "--deep")
    assert deep.returncode != 0
    assert victim in deep.stdout and "failed verification" in deep.stdout

    target = f"{name}-r"
    images.append(target)
    line = cli.fails("restore", backup_id, f"volumes/{target}")
    assert victim in line and "failed verification" in line
    names = set(rbd.RBD().list(ioctx))
    assert target not in names and not any(n.startswith(f"{target}.partial") for n in names)


def test_delete_then_gc_frees_only_unshared_chunks(cluster: devcluster.ClusterInfo, cli: Cli,
                                                   ioctx: Any, images: list[str],
                                                   s3_client: Any) -> None:
    rng = random.Random(5)
    keep, drop = new_image(ioctx, images, 8 * MiB), new_image(ioctx, images, 8 * MiB)
    shared = rng.randbytes(4 * MiB)
    for name in (keep, drop):
        with rbd.Image(ioctx, name) as image:
            image.write(shared, 0)
    with rbd.Image(ioctx, drop) as image:
        image.write(rng.randbytes(4 * MiB), 4 * MiB)
    kept = cli.json("backup", f"volumes/{keep}")["backup_id"]
    dropped = cli.json("backup", f"volumes/{drop}")["backup_id"]

    young = cli.json("gc", "--grace", "3600")
    assert young["chunks_deleted"] == 0
    assert cli.run("backups", "delete", dropped).returncode == 0
    assert cli.json("gc", "--grace", "3600")["chunks_too_young"] == 1
    result = cli.json("gc", "--grace", "0")
    assert (result["chunks_seen"], result["chunks_deleted"]) == (2, 1)
    assert cli.run("backups", "verify", kept, "--deep").returncode == 0
    assert "does not exist" in cli.fails("backups", "show", dropped)

    # A running backup's lock keeps gc away.
    lock = KeyLayout(cli.prefix).lock("backup-20990101T000000Z-00000000")
    s3_client.put_object(Bucket=cluster.bucket, Key=lock, Body=b"{}")
    try:
        assert "is running" in cli.fails("gc", "--grace", "0")
    finally:
        s3_client.delete_object(Bucket=cluster.bucket, Key=lock)


def test_backups_list_filters_by_image(cli: Cli, ioctx: Any, images: list[str]) -> None:
    first, second = new_image(ioctx, images, 4 * MiB), new_image(ioctx, images, 4 * MiB)
    a = cli.json("backup", f"volumes/{first}")["backup_id"]
    b = cli.json("backup", f"volumes/{second}")["backup_id"]
    listed = cli.json("backups", "list")["backups"]
    assert [x["backup_id"] for x in listed] == [a, b]  # oldest first, by creation time
    only = cli.json("backups", "list", "--image", f"volumes/{second}")["backups"]
    assert [x["backup_id"] for x in only] == [b]


def test_a_clone_is_backed_up_with_its_parents_data(cluster: devcluster.ClusterInfo, cli: Cli,
                                                    ioctx: Any, images: list[str]) -> None:
    """A Cinder volume made from a Glance image is a clone of the image's snapshot: most
    of its bytes live in the parent. A backup of the clone alone would restore a disk of
    holes; and after a flatten the next, incremental, backup must still be whole."""
    rng = random.Random(11)
    parent = new_image(ioctx, images, 24 * MiB)
    with rbd.Image(ioctx, parent) as image:
        image.write(rng.randbytes(20 * MiB), 0)
        image.create_snap("base")
        image.protect_snap("base")
    child = f"{parent}-clone"
    images.insert(0, child)  # removed before the parent's snapshot
    rbd.RBD().clone(ioctx, parent, "base", ioctx, child, features=rbd.RBD_FEATURE_LAYERING)
    spec = f"volumes/{child}"
    with rbd.Image(ioctx, child) as image:
        image.write(rng.randbytes(MiB), 5 * MiB + 4096)  # over the parent's data
        image.resize(32 * MiB)
        image.write(rng.randbytes(MiB), 28 * MiB)  # past the parent's end
    generations = [(cli.json("backup", spec)["backup_id"], export_digest(cluster, spec))]
    with rbd.Image(ioctx, child) as image:
        image.write(rng.randbytes(MiB), 12 * MiB)
        image.flatten()
    second = cli.json("backup", spec)
    assert second["parent"] == generations[0][0]  # incremental across the flatten
    generations.append((second["backup_id"], export_digest(cluster, spec)))
    for number, (backup_id, digest) in enumerate(generations):
        restored = f"{child}-r{number}"
        images.insert(0, restored)
        cli.json("restore", backup_id, f"volumes/{restored}", "--mode", "full")
        assert export_digest(cluster, f"volumes/{restored}") == digest, number
