"""The fetcher meeting bad input and a bad disk: hostile Range headers, a full cache disk
(issue: trust). Nothing but a clean status, never a 500, never a wrong byte."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbd_restore import devcluster
from tests.integration.fetcher_fixtures import backup, fetcher, reference, request, split
from tests.support.fetcher_proc import FetcherProcess

__all__ = ["backup", "fetcher", "reference"]  # the fixtures these tests use


def raw_exchange(url: str, header_value: bytes) -> tuple[int, bytes]:
    """One GET with a Range header sent as raw bytes (http.client refuses non-Latin-1)."""
    host, port, path = split(url)
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nRange: " +
                     header_value + b"\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(1 << 16):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_range_numbers_only_ascii_and_never_too_long(fetcher: FetcherProcess,
                                                     reference: tuple[str, bytes]) -> None:
    url, whole = reference
    huge = b"9" * 5000  # over the 4,300 digits int() accepts: was a 500
    assert raw_exchange(url, b"bytes=" + huge + b"-")[0] == 416
    status, body = raw_exchange(url, b"bytes=" + b"0" * 5000 + b"7-9")
    assert status == 206 and body == whole[7:10]
    # Arabic-Indic digits are digits to Python, not to RFC 9110: the header is ignored.
    status, body = raw_exchange(url, "bytes=\u0661-\u0662".encode())
    assert status == 200 and body == whole
    assert "Traceback" not in fetcher.logs()


@pytest.fixture
def tiny_cache_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system: every chunk write into it fails (ENOSPC)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.fail(f"this test mounts a tmpfs (as root, as CI runs): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_cache_disk_costs_hits_never_a_read(
        cluster: devcluster.ClusterInfo, backup: dict[str, Any],
        tiny_cache_disk: Path) -> None:
    # No priming, no memory staging: every chunk goes the way of the disk cache.
    full = FetcherProcess(cluster, tiny_cache_disk / "cache", backup["prefix"],
                          {"RBD_RESTORE_FETCHER_PRIME_SESSIONS": "0",
                           "RBD_RESTORE_FETCHER_MEMORY_CACHE": "0"})
    full.start()
    try:
        url = full.create_session(backup["backup_id"])["url"]
        assert request(url)[0] == 200
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", url,
             f"rbd:{backup['snap']}:conf={cluster.ceph_conf}"],
            capture_output=True, text=True, check=False)
        assert compare.returncode == 0, compare.stdout + compare.stderr
        metrics = full.metrics()
        assert metrics["rbd_restore_fetcher_cache_write_errors_total"] >= 2
        assert metrics.get('rbd_restore_fetcher_requests_total{method="GET",status="500"}',
                           0) == 0
    finally:
        full.stop()
    leftovers = [p.name for p in (tiny_cache_disk / "cache").iterdir()
                 if p.name.endswith(".tmp")]
    assert leftovers == []
