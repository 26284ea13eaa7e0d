"""Fetcher replicas behind the real HAProxy, configured by contrib/haproxy/haproxy.cfg.

Sessions are signed by the shared secret and recorded in the bucket, so any replica
serves any session; HAProxy hashes a session's URL to one replica so that only one
replica fetches and caches its chunks, and sends a request a dead replica did not
answer to another one."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

from rbd_restore import devcluster
from rbd_restore.fetcher.headers import BEAST_HEADER_LIMIT, BUFFER_DOUBLES_PAST
from tests.integration.fetcher_fixtures import backup, request, split
from tests.support.fetcher_proc import FetcherProcess
from tests.support.haproxy import HAProxy, replicas_behind_haproxy

__all__ = ["backup"]  # the module-scoped fixture, used by name

MiB = 1 << 20
SESSIONS = 16


def session_through(proxy: HAProxy, replica: FetcherProcess, backup_id: str) -> dict[str, Any]:
    """A session created through HAProxy's control-plane frontend."""
    call = urllib.request.Request(
        proxy.control_url + "/v1/sessions", method="POST",
        data=json.dumps({"backup_id": backup_id}).encode(),
        headers={"Authorization": f"Bearer {replica.settings.control_token}"})
    with urllib.request.urlopen(call, timeout=30) as reply:
        assert reply.status == 201
        created: dict[str, Any] = json.loads(reply.read())
    return created


def holders(replicas: list[FetcherProcess], session_id: str) -> list[int]:
    """Which replicas served reads of the session (they keep prefetch state for it)."""
    return [i for i, replica in enumerate(replicas)
            if replica.control("GET", f"/v1/sessions/{session_id}/prefetch")[0] == 200]


def read_and_compare(conn: http.client.HTTPConnection, path: str, whole: bytes,
                     starts: list[int]) -> None:
    """1 MiB range reads at ``starts`` on one keep-alive connection, each compared."""
    for start in starts:
        conn.request("GET", path, headers={"Range": f"bytes={start}-{start + MiB - 1}"})
        reply = conn.getresponse()
        assert reply.status == 206
        assert reply.read() == whole[start:start + MiB]


def header_block(url: str) -> int:
    """Bytes of a HEAD reply's header block, read off a socket of its own."""
    host, port, path = split(url)
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        received = b""
        while b"\r\n\r\n" not in received:
            more = sock.recv(65536)
            assert more, received[:200]
            received += more
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return received.index(b"\r\n\r\n") + 4


def test_each_session_stays_on_one_replica_and_every_byte_comes_through(
        cluster: devcluster.ClusterInfo, backup: dict[str, Any], tmp_path: Path) -> None:
    with replicas_behind_haproxy(cluster, backup["prefix"], tmp_path) as (proxy, replicas):
        sessions = [session_through(proxy, replicas[0], backup["backup_id"])
                    for _ in range(SESSIONS)]
        assert all(s["url"].startswith(proxy.data_url + "/v1/s/") for s in sessions)
        direct = sessions[0]["url"].replace(proxy.data_url, f"http://{replicas[1].settings.listen}")
        status, _, whole = request(direct)
        assert status == 200
        placed = []
        for session in sessions:
            host, port, path = split(session["url"])
            conn = http.client.HTTPConnection(host, port, timeout=60)  # keep-alive, like librbd
            try:
                read_and_compare(conn, path, whole, [0, 4 * MiB + 512, len(whole) - 3 * MiB])
            finally:
                conn.close()
            placed.append(holders(replicas, session["session_id"]))
        # The first session was also read directly from replica 1 above.
        assert all(len(where) == 1 for where in placed[1:]), placed
        assert {where[0] for where in placed[1:]} == {0, 1}, placed  # both replicas used
        assert "<NOSRV>" not in proxy.logs()


def test_a_replica_killed_between_reads_loses_no_read_on_the_same_connection(
        cluster: devcluster.ClusterInfo, backup: dict[str, Any], tmp_path: Path) -> None:
    with replicas_behind_haproxy(cluster, backup["prefix"], tmp_path) as (proxy, replicas):
        session = session_through(proxy, replicas[1], backup["backup_id"])
        status, _, whole = request(session["url"])
        assert status == 200
        host, port, path = split(session["url"])
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            conn.request("GET", path, headers={"Range": "bytes=0-65535"})
            assert conn.getresponse().read() == whole[:65536]
            [serving] = holders(replicas, session["session_id"])
            replicas[serving].kill()
            # The same client connection:
            read_and_compare(conn, path, whole, list(range(MiB, len(whole), 3 * MiB)))
        finally:
            conn.close()
        assert holders([replicas[1 - serving]], session["session_id"]) == [0]


def test_librbd_gets_its_padded_first_reply_through_haproxy(
        cluster: devcluster.ClusterInfo, backup: dict[str, Any], tmp_path: Path) -> None:
    with replicas_behind_haproxy(cluster, backup["prefix"], tmp_path, count=1) as (proxy,
                                                                                   replicas):
        url = session_through(proxy, replicas[0], backup["backup_id"])["url"]
        # Each HEAD on a new client connection, as each librbd client opening the image,
        # while HAProxy keeps idle connections to the replica that it could reuse.
        blocks = [header_block(url) for _ in range(4)]
        assert all(BUFFER_DOUBLES_PAST < block < BEAST_HEADER_LIMIT for block in blocks), blocks
        direct = url.replace(proxy.data_url, f"http://{replicas[0].settings.listen}")
        status, _, body = request(direct.rsplit("/v1/", 1)[0] + "/v1/health")
        assert (status, body) == (200, b"ok\n")
