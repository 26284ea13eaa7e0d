"""Connection limits of a real fetcher: hundreds of idle or hostile connections do not
deny service to librbd reading a restored image, and are closed; librbd's stays."""

from __future__ import annotations

import hashlib
import random
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import rbd

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli

MiB = 1 << 20
UNTRUSTED_SECONDS = 3
IDLE = 300  # connections that send nothing
PROBES = 100  # connections that send one request with a made-up token
HALF = 50  # connections that send half a request line and stop


def digest_of(image: Any, size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, 4 * MiB):
        digest.update(image.read(offset, min(4 * MiB, size - offset)))
    return digest.hexdigest()


def closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """Read until the fetcher closes the connection (True) or the deadline passes."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def head_on(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: fetcher\r\n\r\n".encode())
    sock.settimeout(30)
    reply = b""
    while b"\r\n\r\n" not in reply:
        block = sock.recv(65536)
        assert block, "the fetcher closed a connection that carried a valid session"
        reply += block
    return reply.split(b"\r\n", 1)[0]


def test_idle_and_hostile_connections_cost_a_restored_image_nothing(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, tmp_path: Path) -> None:
    prefix = f"limits-{uuid.uuid4().hex[:8]}/"
    name = f"lim-src-{uuid.uuid4().hex[:8]}"
    target = f"lim-dst-{uuid.uuid4().hex[:8]}"
    size = 24 * MiB
    fetcher = FetcherProcess(cluster, tmp_path / "cache", prefix, {
        "RBD_RESTORE_FETCHER_UNTRUSTED_SECONDS": str(UNTRUSTED_SECONDS),
        "RBD_RESTORE_FETCHER_MAX_UNTRUSTED_CONNECTIONS": "200"})
    hostile: list[socket.socket] = []
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, name, size, old_format=False)
        fetcher.start()
        job = None
        try:
            with rbd.Image(ioctx, name) as image:
                image.write(random.Random(5).randbytes(size), 0)
                expected = digest_of(image, size)
            cli = Cli(cluster, prefix, fetcher.env_overrides)
            backup = cli.json("backup", f"volumes/{name}")["backup_id"]
            job = cli.json("restore", backup, f"volumes/{target}", "--mode", "instant")
            session_url = fetcher.create_session(backup)["url"]
            host, port = fetcher.env_overrides["RBD_RESTORE_FETCHER_LISTEN"].split(":")
            address = (host, int(port))
            trusted = socket.create_connection(address)
            path = "/" + session_url.split("/", 3)[3]
            assert head_on(trusted, path).startswith(b"HTTP/1.1 200")

            for index in range(IDLE + PROBES + HALF):
                sock = socket.create_connection(address)
                if index >= IDLE + PROBES:
                    sock.sendall(b"GET /v1/s/")
                elif index >= IDLE:
                    sock.sendall(b"GET /v1/s/made.up/disk.qcow2 HTTP/1.1\r\nHost: x\r\n\r\n")
                hostile.append(sock)
            opened = time.monotonic()

            # librbd reads the whole restored image through the fetcher meanwhile.
            with rbd.Image(ioctx, target) as image:
                assert digest_of(image, size) == expected
            read_seconds = time.monotonic() - opened

            deadline = opened + UNTRUSTED_SECONDS + 10
            still_open = [s for s in hostile if not closed_by_peer(s, deadline)]
            assert not still_open, f"{len(still_open)} of {len(hostile)} left open"
            # Past the untrusted time, the connection that carried a session is kept.
            assert time.monotonic() - opened > UNTRUSTED_SECONDS
            assert head_on(trusted, path).startswith(b"HTTP/1.1 200")
            trusted.close()
            assert read_seconds < 60
        finally:
            for sock in hostile:
                sock.close()
            if job is not None:
                cli.run("abort", job["job_id"])
            fetcher.stop()
            remove_image(ioctx, target)
            remove_image(ioctx, name)
