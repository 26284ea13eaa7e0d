"""S3 misbehaving between the tools and RGW, and clocks that disagree (issue: trust).

A proxy (tests/support/faultproxy.py) injects 503 SlowDown, 500, connection
resets and stalls in the middle of bodies, truncated bodies and flipped bytes
in both directions. Backups, deep verifies and full restores come through
bit-exact; a full restore cut off by an outage resumes where it stopped; a
host whose clock runs minutes fast frees nothing early; a bucket under
SSE-KMS, whose ETags are no MD5s, works like any other.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import rbd

from rbd_restore import devcluster
from rbd_restore.repo.layout import KeyLayout
from tests.support.faultproxy import FaultPlan, FaultProxy, through
from tests.support.helpers import Cli, export_digest, new_image

MiB = 1 << 20


@pytest.fixture
def proxy(cluster: devcluster.ClusterInfo) -> Iterator[FaultProxy]:
    host, port = cluster.s3_endpoint.removeprefix("http://").split(":")
    with FaultProxy(host, int(port), FaultPlan(stall_seconds=3)).running() as running:
        yield running


def data_image(ioctx: Any, images: list[str], seed: int, size: int = 48 * MiB) -> str:
    name = new_image(ioctx, images, size + 4096)
    with rbd.Image(ioctx, name) as image:
        rng = random.Random(seed)
        image.write(rng.randbytes(size - 4 * MiB), 0)
        # Compressible, so chunks of both stored forms (compressed, raw blocks) are in play.
        image.write((b"rbd-restore %d " % seed * (1 << 20))[:4 * MiB], size - 4 * MiB)
    return name


def test_backup_verify_and_restore_come_through_every_kind_of_fault_bit_exact(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        proxy: FaultProxy) -> None:
    name = data_image(ioctx, images, 1)
    want = export_digest(cluster, f"volumes/{name}")
    faulty = Cli(cluster, cli.prefix, through(proxy))
    proxy.plan.rate = 0.35
    backup_id = faulty.json("backup", f"volumes/{name}", "--workers", "4")["backup_id"]
    deep = faulty.run("backups", "verify", backup_id, "--deep")
    assert deep.returncode == 0, deep.stderr
    images.append(f"{name}-r")
    restored = faulty.json("restore", backup_id, f"volumes/{name}-r", "--workers", "4")
    assert restored["resumed_chunks"] == 0
    proxy.plan.rate = 0.0
    assert export_digest(cluster, f"volumes/{name}-r") == want
    assert cli.run("backups", "verify", backup_id, "--deep").returncode == 0  # no proxy
    kinds = {kind for kind, count in proxy.injected.items() if count}
    assert proxy.total_injected >= 8 and len(kinds) >= 4, proxy.injected


def test_uploads_damaged_on_the_way_are_refused_by_rgw_and_sent_again(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        proxy: FaultProxy) -> None:
    name = data_image(ioctx, images, 2, 24 * MiB)
    # Three uploads damaged at fixed points: a count drawn at random was sometimes two.
    proxy.plan.faults, proxy.plan.at = ("corrupt_request",), (1, 3, 5)
    backup_id = Cli(cluster, cli.prefix, through(proxy)).json(
        "backup", f"volumes/{name}")["backup_id"]
    assert proxy.injected["corrupt_request"] == 3
    deep = cli.run("backups", "verify", backup_id, "--deep")
    assert deep.returncode == 0, deep.stdout  # every stored chunk is the one sent


def test_a_full_restore_cut_off_by_an_outage_resumes_where_it_stopped(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        proxy: FaultProxy) -> None:
    name = data_image(ioctx, images, 3)
    want = export_digest(cluster, f"volumes/{name}")
    backup_id = cli.json("backup", f"volumes/{name}")["backup_id"]
    target = f"{name}-r"
    images.extend([target, f"{target}.partial-{backup_id}"])
    faulty = Cli(cluster, cli.prefix, through(proxy, max_attempts=3))
    # A few chunks in, S3 goes away (the first three exchanges read the repository's
    # config and key).
    proxy.down_after = proxy.exchanges + 11
    line = faulty.fails("restore", backup_id, f"volumes/{target}", "--workers", "1")
    assert "unreachable" in line and "run the same command again to resume" in line
    assert f"{target}.partial-{backup_id}" in rbd.RBD().list(ioctx)
    proxy.down_after = None
    proxy.restore()
    resumed = faulty.json("restore", backup_id, f"volumes/{target}")
    assert resumed["resumed_chunks"] >= 2, resumed
    assert resumed["chunks_fetched"] < 11  # not from zero
    assert export_digest(cluster, f"volumes/{target}") == want
    assert f"{target}.partial-{backup_id}" not in rbd.RBD().list(ioctx)


def test_a_host_whose_clock_runs_fast_frees_nothing_early(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        s3_client: Any) -> None:
    name = data_image(ioctx, images, 4, 8 * MiB)
    backup_id = cli.json("backup", f"volumes/{name}")["backup_id"]
    assert cli.run("backups", "delete", backup_id).returncode == 0  # its chunks: unreferenced

    def gc_at(offset: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["faketime", "-f", offset, *cli.command("gc", *args)],
                              capture_output=True, text=True, env=cli.env(), check=False)

    # Uploaded a moment ago by S3's clock: 8 minutes fast, this host must not see them as
    # older than a 5-minute grace.
    fast = gc_at("+8m", "--grace", "300", "--json")
    assert fast.returncode == 0, fast.stderr
    result = json.loads(fast.stdout)
    assert result["chunks_deleted"] == 0 and result["chunks_too_young"] >= 2

    # A backup's lock written just now is live, though 11 minutes (past the lock TTL)
    # old by this host's clock.
    lock = KeyLayout(cli.prefix).lock("backup-20990101T000000Z-00000000")
    s3_client.put_object(Bucket=cluster.bucket, Key=lock, Body=b"{}")
    try:
        refused = gc_at("+11m", "--grace", "0")
        assert refused.returncode != 0 and "is running" in refused.stderr, refused.stderr
    finally:
        s3_client.delete_object(Bucket=cluster.bucket, Key=lock)
    assert cli.json("gc", "--grace", "0")["chunks_deleted"] >= 2  # the right time came


def test_a_bucket_under_sse_kms_backs_up_verifies_and_restores(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        proxy: FaultProxy) -> None:
    """AWS S3 gives an object under SSE-KMS (or SSE-C) an ETag that is not its MD5,
    32 hex digits all the same: a bucket whose default encryption is SSE-KMS must
    not look like a store that damages every body."""
    name = data_image(ioctx, images, 3, size=12 * MiB)
    want = export_digest(cluster, f"volumes/{name}")
    proxy.etags_as_sse_kms = True
    kms = Cli(cluster, cli.prefix, through(proxy, max_attempts=2))
    backup_id = kms.json("backup", f"volumes/{name}")["backup_id"]
    deep = kms.run("backups", "verify", backup_id, "--deep")
    assert deep.returncode == 0, deep.stderr
    images.append(f"{name}-r")
    kms.json("restore", backup_id, f"volumes/{name}-r")
    assert export_digest(cluster, f"volumes/{name}-r") == want


def test_an_etag_that_is_not_the_md5_of_the_body_sent_is_still_refused(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        proxy: FaultProxy) -> None:
    name = data_image(ioctx, images, 4, size=8 * MiB)
    proxy.etags_not_md5 = True  # no SSE header: a store that did not keep what was sent
    refused = Cli(cluster, cli.prefix, through(proxy, max_attempts=2)).run(
        "backup", f"volumes/{name}")
    assert refused.returncode != 0
    assert "ETag differs from the body sent" in refused.stderr
    assert "Traceback" not in refused.stderr
