"""A backup an unfinished restore reads can be neither deleted nor collected (issue: trust).

The staged image of an instant restore reads its backup from S3 until it is
committed: deleting the backup and running gc would leave it, and any VM on
it, without data as soon as the fetcher's cache no longer holds the chunks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import rbd

from rbd_restore import devcluster
from rbd_restore.repo.layout import KeyLayout
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, export_digest, new_image

MiB = 1 << 20


def backed_up(cli: Cli, ioctx: Any, images: list[str], seed: int) -> tuple[str, str]:
    name = new_image(ioctx, images, 12 * MiB)
    with rbd.Image(ioctx, name) as image:
        image.write(random.Random(seed).randbytes(10 * MiB), MiB)
    return name, cli.json("backup", f"volumes/{name}")["backup_id"]


def test_delete_and_gc_keep_a_backup_an_instant_restore_still_reads(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path) -> None:
    name, backup_id = backed_up(cli, ioctx, images, 1)
    want = export_digest(cluster, f"volumes/{name}")
    fetcher = FetcherProcess(cluster, tmp_path / "first", cli.prefix)
    fetcher.start()
    target = f"{name}-staged"
    images.append(target)
    try:
        restorer = Cli(cluster, cli.prefix, fetcher.env_overrides)
        job_id = restorer.json("restore", backup_id, f"volumes/{target}", "--mode",
                               "instant")["job_id"]
        line = restorer.fails("backups", "delete", backup_id)
        assert "in use" in line and job_id in line and f"volumes/{target}" in line
        assert cli.json("gc", "--grace", "0")["chunks_deleted"] == 0
    finally:
        fetcher.stop()
    # A new replica with an empty cache still serves every byte of the staged image.
    replica = FetcherProcess(cluster, tmp_path / "replica", cli.prefix,
                             {"RBD_RESTORE_FETCHER_LISTEN":
                              fetcher.env_overrides["RBD_RESTORE_FETCHER_LISTEN"]})
    replica.start()
    try:
        assert export_digest(cluster, f"volumes/{target}") == want
        restorer = Cli(cluster, cli.prefix, replica.env_overrides)
        run = restorer.run("jobs", "run", job_id, "--once")
        assert run.returncode == 0, run.stderr
        assert restorer.json("status", job_id)["jobs"][0]["state"] == "committed"
        # Committed: the session is closed and the backup is the operator's to delete.
        assert restorer.run("backups", "delete", backup_id).returncode == 0
    finally:
        replica.stop()
    assert export_digest(cluster, f"volumes/{target}") == want


def test_force_deletes_anyway_and_says_whom_it_hurts(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path) -> None:
    _name, backup_id = backed_up(cli, ioctx, images, 2)
    fetcher = FetcherProcess(cluster, tmp_path / "cache", cli.prefix)
    fetcher.start()
    try:
        session = fetcher.create_session(backup_id)
        forced = cli.run("backups", "delete", backup_id, "--force")
        assert forced.returncode == 0, forced.stderr
        assert f"session {session['session_id']}" in forced.stderr
        assert "does not exist" in cli.fails("backups", "show", backup_id)
    finally:
        fetcher.stop()


def test_a_session_opening_while_its_backup_is_deleted_gives_way(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path, s3_client: Any) -> None:
    """The other half of the protocol: a deletion announced before the session's record
    was written wins, and no session is left open on a backup about to vanish."""
    _name, backup_id = backed_up(cli, ioctx, images, 3)
    intent = KeyLayout(cli.prefix).lock(f"delete-{backup_id}")
    s3_client.put_object(Bucket=cluster.bucket, Key=intent, Body=b"{}")
    fetcher = FetcherProcess(cluster, tmp_path / "cache", cli.prefix)
    fetcher.start()
    try:
        status, body = fetcher.control("POST", "/v1/sessions", {"backup_id": backup_id})
        assert status == 409 and "being deleted" in body["error"], body
        assert fetcher.control("GET", "/v1/sessions")[1]["sessions"] == []
    finally:
        fetcher.stop()
        s3_client.delete_object(Bucket=cluster.bucket, Key=intent)


def test_a_full_restore_in_progress_holds_its_backup(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        s3_client: Any) -> None:
    _name, backup_id = backed_up(cli, ioctx, images, 4)
    reader = KeyLayout(cli.prefix).lock(f"read-{backup_id}.otherhost-4242")
    s3_client.put_object(Bucket=cluster.bucket, Key=reader, Body=json.dumps({}).encode())
    try:
        line = cli.fails("backups", "delete", backup_id)
        assert "full restore or deep verify on otherhost-4242" in line
    finally:
        s3_client.delete_object(Bucket=cluster.bucket, Key=reader)
    assert cli.run("backups", "delete", backup_id).returncode == 0
