"""forget and scheduled scrubs on the real cluster and RGW (issue: the operator's view)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import rbd

from rbd_restore import devcluster
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, manifest_body, new_image, put_chunk_content

MiB = 1 << 20


def backups_of(cli: Cli, ioctx: Any, images: list[str], count: int) -> tuple[str, list[str]]:
    name = new_image(ioctx, images, 16 * MiB)
    ids = []
    for n in range(count):
        with rbd.Image(ioctx, name) as image:
            image.write(random.Random(n).randbytes(MiB), n * MiB)
        ids.append(cli.json("backup", f"volumes/{name}")["backup_id"])
    return name, ids


def test_forget_keeps_by_policy_per_volume_and_never_what_a_restore_reads(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path) -> None:
    first, first_ids = backups_of(cli, ioctx, images, 4)
    _second, second_ids = backups_of(cli, ioctx, images, 2)
    dry = cli.json("forget", "--keep-last", "1", "--dry-run")
    assert {r["backup_id"] for r in dry["removed"]} == set(first_ids[:3] + second_ids[:1])
    assert len(cli.json("backups", "list")["backups"]) == 6  # nothing gone

    fetcher = FetcherProcess(cluster, tmp_path / "cache", cli.prefix)
    fetcher.start()
    try:
        session = fetcher.create_session(first_ids[0])  # a restore still reads the oldest
        done = cli.json("forget", "--keep-last", "1", "--image", f"volumes/{first}")
    finally:
        fetcher.stop()
    assert [r["backup_id"] for r in done["held"]] == [first_ids[0]]
    assert session["session_id"] in done["held"][0]["held_by"][0]
    assert {r["backup_id"] for r in done["removed"]} == set(first_ids[1:3])
    assert [k["backup_id"] for k in done["kept"]] == [first_ids[3]]
    assert done["kept"][0]["rules"] == ["last"]
    left = {b["backup_id"] for b in cli.json("backups", "list")["backups"]}
    assert left == {first_ids[0], first_ids[3], *second_ids}  # the other volume untouched
    assert "at least one" in cli.fails("forget")


def test_a_sampled_scrub_finds_a_damaged_chunk(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        s3_client: Any) -> None:
    _name, ids = backups_of(cli, ioctx, images, 2)
    first = cli.json("backups", "verify", "--sample", "50")
    assert first["ok"] and first["chunks_checked"] >= 1
    assert "no backup id" in cli.fails("backups", "verify", ids[0], "--sample", "5")
    victim = next(c for c in manifest_body(cli, ids[0])["chunks"] if isinstance(c, str))
    put_chunk_content(cli, victim, b"rot" * 4000)
    scrub = cli.run("backups", "verify", "--sample", "100", "--json")
    assert scrub.returncode == 7
    assert victim in scrub.stdout and "failed verification" in scrub.stdout
