"""Fixtures and helpers of the fetcher tests: one backed-up image, a fetcher serving it,
the whole virtual file, raw HTTP requests."""

from __future__ import annotations

import http.client
import random
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rbd

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from rbd_restore.repo.repository import snapshot_name
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli

MiB = 1 << 20


@pytest.fixture(scope="module")
def backup(cluster: devcluster.ClusterInfo, rados_cluster: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One backed-up image with data, holes and a repeated chunk, in a prefix of its own."""
    prefix = f"fetcher-{uuid.uuid4().hex[:8]}/"
    name = f"fetch-{uuid.uuid4().hex[:8]}"
    rng = random.Random(9)
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, name, 40 * MiB + 4096, old_format=False)
        with rbd.Image(ioctx, name) as image:
            same = rng.randbytes(4 * MiB)
            image.write(same, 0)
            image.write(same, 12 * MiB)
            image.write(rng.randbytes(5 * MiB), 20 * MiB + 100)
            image.write(rng.randbytes(4096), 40 * MiB)
        cli = Cli(cluster, prefix, {})
        result = cli.json("backup", f"volumes/{name}")
        yield {"backup_id": result["backup_id"], "image": name, "prefix": prefix, "cli": cli,
               "snap": f"volumes/{name}@{snapshot_name(result['backup_id'])}",
               "tmp": tmp_path_factory.mktemp("fetcher")}
        remove_image(ioctx, name)


@pytest.fixture
def fetcher(cluster: devcluster.ClusterInfo, backup: dict[str, Any],
            tmp_path: Path) -> Iterator[FetcherProcess]:
    proc = FetcherProcess(cluster, tmp_path / "cache", backup["prefix"])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def split(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port, parts.path


def request(url: str, method: str = "GET", headers: dict[str, str] | None = None,
            path: str | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port, default_path = split(url)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path if path is not None else default_path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


class Reference(tuple[str, bytes]):
    """A session URL and the whole virtual file; a short repr keeps reports readable."""

    def __repr__(self) -> str:
        return f"Reference({self[0][:40]}..., {len(self[1])} bytes)"


@pytest.fixture
def reference(fetcher: FetcherProcess, backup: dict[str, Any]) -> Reference:
    """A session URL and the whole virtual file, downloaded once."""
    url = fetcher.create_session(backup["backup_id"])["url"]
    status, headers, body = request(url)
    assert status == 200 and int(headers["content-length"]) == len(body)
    return Reference((url, body))
