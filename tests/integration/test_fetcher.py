"""The fetcher against the real cluster and RGW, checked with qemu-img and raw HTTP."""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import rbd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbd_restore import devcluster, lazy_clone
from rbd_restore.ceph import remove_image
from rbd_restore.fetcher import tokens
from rbd_restore.fetcher.headers import BEAST_HEADER_LIMIT, BUFFER_DOUBLES_PAST
from tests.integration.fetcher_fixtures import backup, fetcher, reference, request, split
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, export_digest, manifest_body, put_chunk_content

__all__ = ["backup", "fetcher", "reference"]  # the fixtures these tests use

MiB = 1 << 20


def test_qemu_img_sees_a_clean_qcow2_identical_to_the_snapshot(
        cluster: devcluster.ClusterInfo, fetcher: FetcherProcess,
        backup: dict[str, Any]) -> None:
    url = fetcher.create_session(backup["backup_id"])["url"]
    info = subprocess.run(["qemu-img", "info", "--output=json", url], capture_output=True,
                          text=True, check=True).stdout
    assert '"format": "qcow2"' in info and f'"virtual-size": {40 * MiB + 4096}' in info
    check = subprocess.run(["qemu-img", "check", url], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0 and "No errors were found" in check.stdout
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", url,
         f"rbd:{backup['snap']}:conf={cluster.ceph_conf}"],
        capture_output=True, text=True, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "Images are identical" in compare.stdout


def test_head_and_range_semantics(reference: tuple[str, bytes]) -> None:
    url, whole = reference
    status, headers, body = request(url, "HEAD")
    assert status == 200 and body == b""
    assert headers["content-length"] == str(len(whole))
    assert headers["accept-ranges"] == "bytes"
    status, headers, body = request(url, headers={"Range": "bytes=100-199"})
    assert status == 206 and body == whole[100:200]
    assert headers["content-range"] == f"bytes 100-199/{len(whole)}"
    status, _, body = request(url, headers={"Range": f"bytes={len(whole) - 10}-"})
    assert status == 206 and body == whole[-10:]
    status, headers, _ = request(url, headers={"Range": f"bytes={len(whole)}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(whole)}"
    assert request(url, "DELETE")[0] == 405
    assert request(url, path="/metrics")[0] == 404


def test_other_methods_cost_the_metrics_no_series(fetcher: FetcherProcess,
                                                  reference: tuple[str, bytes]) -> None:
    """Each method labelled as sent would be a series of its own, in the fetcher's
    memory and in Prometheus for good; aiohttp's C parser knows some thirty methods, its
    pure-Python one (AIOHTTP_NO_EXTENSIONS) takes any token."""
    url, _ = reference
    for method in ("PROPFIND", "MKCOL", "PURGE", "LOCK", "SEARCH", "REPORT", "OPTIONS"):
        assert request(url, method)[0] == 405
    assert request(url, f"X{uuid.uuid4().hex[:8].upper()}")[0] in (400, 405)
    assert request(url, "HEAD")[0] == 200
    methods = {key.split('method="')[1].split('"')[0] for key in fetcher.metrics()
               if key.startswith("rbd_restore_fetcher_requests_total{")}
    assert methods <= {"GET", "HEAD", "other"} and "other" in methods


def test_pipelined_requests_are_answered_in_order(reference: tuple[str, bytes]) -> None:
    url, whole = reference
    host, port, path = split(url)
    ranges = [(0, 511), (3 * MiB, 7 * MiB - 1), (100, 100), (len(whole) - 4096, len(whole) - 1)]
    raw = b"".join(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={a}-{b}\r\n\r\n".encode()
                   for a, b in ranges)
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(raw)  # all at once, before reading any reply
        stream = sock.makefile("rb")
        for a, b in ranges:
            assert stream.readline().startswith(b"HTTP/1.1 206")
            length = 0
            while (line := stream.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert stream.read(length) == whole[a:b + 1]


def test_first_successful_reply_on_a_connection_is_sized_for_librbds_buffer(
        reference: tuple[str, bytes]) -> None:
    """The first HEAD/200/206 reply on each connection has a header block that ends
    between the size at which Beast's buffer doubles and Beast's header limit
    (rbd_restore/fetcher/headers.py); the buffer keeps that size, so later replies
    on the connection carry ordinary headers."""
    url, whole = reference
    host, port, path = split(url)
    asks = [("GET", "bytes=999999999999-"), ("HEAD", None), ("GET", "bytes=0-7"),
            ("GET", f"bytes={len(whole) - 1}-"), ("GET", None)]
    raw = b"".join(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n".encode()
                   + (f"Range: {spec}\r\n".encode() if spec else b"") + b"\r\n"
                   for method, spec in asks)
    for _connection in range(2):
        with socket.create_connection((host, port), timeout=60) as sock:
            sock.sendall(raw)
            stream = sock.makefile("rb")
            sizes = []
            for method, _ in asks:
                block = [stream.readline()]
                while block[-1] not in (b"\r\n", b""):
                    block.append(stream.readline())
                sizes.append((block[0].split()[1], len(b"".join(block))))
                length = next(int(line.split(b":")[1]) for line in block
                              if line.lower().startswith(b"content-length:"))
                if method == "GET":
                    assert len(stream.read(length)) == length
        assert sizes[0][0] == b"416" and sizes[0][1] < 1024  # errors are not padded
        assert sizes[1][0] == b"200"
        assert BUFFER_DOUBLES_PAST < sizes[1][1] < BEAST_HEADER_LIMIT
        assert [status for status, _ in sizes[2:]] == [b"206", b"206", b"200"]
        assert all(size < 1024 for _, size in sizes[2:])


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS", "get"]),
       range_header=st.one_of(
           st.none(), st.text(max_size=30),
           st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(-5, 2 << 30),
                     st.one_of(st.just(""), st.integers(-5, 2 << 30))),
           st.builds(lambda n: f"bytes=-{n}", st.integers(0, 2 << 30))),
       mangle=st.sampled_from(["none", "token", "path", "prefix", "suffix"]))
def test_bad_requests_never_500_nor_bytes_outside_the_file(
        reference: tuple[str, bytes], method: str, range_header: str | None,
        mangle: str) -> None:
    url, whole = reference
    host, port, path = split(url)
    token = path.split("/")[3]
    path = {"none": path, "token": path.replace(token, token[::-1]),
            "path": path.replace("disk.qcow2", "disk.raw"), "prefix": "/v1/" + path,
            "suffix": path + "/x"}[mangle]
    headers = {}
    if range_header is not None and range_header.isprintable() and range_header.isascii():
        headers["Range"] = range_header
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, headers=headers)
        reply = conn.getresponse()
        status, body = reply.status, reply.read()
    finally:
        conn.close()
    assert status < 500
    if mangle != "none":
        assert status in (400, 404, 405) and whole[:64] not in body
    if status == 206:
        first, last = reply.getheader("Content-Range", "").split(" ")[1].split("/")[0].split("-")
        assert body == whole[int(first):int(last) + 1]
    if status == 200 and method == "GET":
        assert body == whole


def test_corrupted_chunk_is_never_served(cluster: devcluster.ClusterInfo,
                                         fetcher: FetcherProcess, backup: dict[str, Any],
                                         s3_client: Any, rados_cluster: Any) -> None:
    name = f"corrupt-{uuid.uuid4().hex[:8]}"
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, name, 8 * MiB, old_format=False)
        try:
            with rbd.Image(ioctx, name) as image:
                image.write(random.Random(1).randbytes(8 * MiB), 0)
            cli = backup["cli"]
            backup_id = cli.json("backup", f"volumes/{name}")["backup_id"]
            second = cli.json("backups", "show", backup_id)
            assert second["chunks_allocated"] == 2
        finally:
            remove_image(ioctx, name)
    victim = manifest_body(cli, backup_id)["chunks"][1]
    put_chunk_content(cli, victim, b"\x00evil" * 1000)
    url = fetcher.create_session(backup_id)["url"]
    status, headers, _ = request(url, "HEAD")
    size = int(headers["content-length"])
    # The last 4 MiB of the file are the second chunk's data clusters.
    status, _, body = request(url, headers={"Range": f"bytes={size - 4 * MiB}-{size - 1}"})
    assert status == 500 and b"evil" not in body
    status, _, body = request(url, headers={"Range": f"bytes={size - 8 * MiB}-"
                                                     f"{size - 4 * MiB - 1}"})
    assert status == 206 and len(body) == 4 * MiB  # the intact chunk still serves
    assert fetcher.metrics()["rbd_restore_fetcher_checksum_failures_total"] >= 1
    assert victim in fetcher.logs()


def test_closed_session_is_404_everywhere_and_for_good(
        cluster: devcluster.ClusterInfo, fetcher: FetcherProcess, backup: dict[str, Any],
        tmp_path: Path) -> None:
    session = fetcher.create_session(backup["backup_id"])
    other = fetcher.create_session(backup["backup_id"])
    replica = FetcherProcess(cluster, tmp_path / "replica-cache", backup["prefix"])
    replica.start()
    try:
        replica_url = session["url"].replace(fetcher.settings.listen, replica.settings.listen)
        assert request(replica_url, "HEAD")[0] == 200  # no shared state needed
        listed = {s["session_id"] for s in replica.control("GET", "/v1/sessions")[1]["sessions"]}
        assert {session["session_id"], other["session_id"]} <= listed

        status, _ = fetcher.control("DELETE", f"/v1/sessions/{session['session_id']}")
        assert status == 200
        assert request(session["url"], "HEAD")[0] == 404
        assert request(session["url"], headers={"Range": "bytes=0-9"})[0] == 404
        assert request(replica_url, "HEAD")[0] == 404  # HEAD asks the bucket
        assert request(other["url"], "HEAD")[0] == 200
        fetcher.stop()
        fetcher.start()
        assert request(session["url"], headers={"Range": "bytes=0-9"})[0] == 404
        assert request(other["url"], headers={"Range": "bytes=0-9"})[0] == 206
        assert fetcher.control("DELETE", f"/v1/sessions/{session['session_id']}")[0] == 404
    finally:
        replica.stop()


def test_a_restore_outliving_the_token_age_still_reads_until_it_ends(
        cluster: devcluster.ClusterInfo, fetcher: FetcherProcess, ioctx: Any,
        images: list[str], reference: tuple[str, bytes], backup: dict[str, Any]) -> None:
    """librbd keeps the URL it was staged with in the image for the restore's life, and
    a slow relocation (a rate limit, a 10 TiB volume) or a failed job left for a while
    outlives ``session_max_age_days``: past it every read of data not yet relocated
    failed, and the job could never finish (only an abort, losing the VM's writes)."""
    _, whole = reference
    status, session = fetcher.control("POST", "/v1/sessions", {
        "backup_id": backup["backup_id"], "job_id": "r20261206T120000Z-0a1b2c",
        "image": "volumes/outlived"})
    assert status == 201, session
    secret = fetcher.settings.secret.encode()
    month_ago = int(time.time()) - 31 * 86400
    token = tokens.sign(secret, tokens.SessionClaim(session["session_id"],
                                                    backup["backup_id"], month_ago))
    url = session["url"].replace(session["url"].split("/")[-2], token)
    assert request(url, "HEAD")[0] == 200
    status, _, body = request(url, headers={"Range": "bytes=0-65535"})
    assert status == 206 and body == whole[:65536]
    # Staged by librbd with that URL, relocated and committed bit-exact.
    target = f"outlived-{uuid.uuid4().hex[:8]}"
    images.append(target)
    lazy_clone.prepare(ioctx, target, url)
    rbd.RBD().migration_execute(ioctx, target)
    rbd.RBD().migration_commit(ioctx, target)
    assert export_digest(cluster, f"volumes/{target}") == export_digest(cluster, backup["snap"])
    # An ad-hoc session (no restore holds it), or one no longer open, ages out as before.
    adhoc = fetcher.create_session(backup["backup_id"])
    for session_id in (adhoc["session_id"], tokens.new_session_id()):
        old = tokens.sign(secret, tokens.SessionClaim(session_id, backup["backup_id"],
                                                      month_ago))
        assert request(url.replace(token, old), "HEAD")[0] == 404
    assert fetcher.control("DELETE", f"/v1/sessions/{session['session_id']}")[0] == 200
    assert request(url, "HEAD")[0] == 404
    assert request(url, headers={"Range": "bytes=0-65535"})[0] == 404


def test_control_plane_needs_the_bearer_token(fetcher: FetcherProcess,
                                              backup: dict[str, Any]) -> None:
    status, body = fetcher.control("GET", "/v1/sessions", token="wrong")
    assert status == 401 and "bearer" in body["error"]
    status, body = fetcher.control("POST", "/v1/sessions",
                                   {"backup_id": "20200101T000000Z-00000000"})
    assert status == 404
    status, body = fetcher.control("POST", "/v1/sessions", {"backup_id": "x"})
    assert status == 400


def test_runner_and_monitor_tokens_have_narrower_roles(
        cluster: devcluster.ClusterInfo, backup: dict[str, Any], tmp_path: Path) -> None:
    tokens = {"RBD_RESTORE_FETCHER_RUNNER_TOKEN": "runner-" + uuid.uuid4().hex,
              "RBD_RESTORE_FETCHER_MONITOR_TOKEN": "monitor-" + uuid.uuid4().hex}
    scoped = FetcherProcess(cluster, tmp_path / "cache", backup["prefix"], dict(tokens))
    scoped.start()
    try:
        runner, monitor = tokens.values()
        new = {"backup_id": backup["backup_id"]}
        for token in (runner, monitor):
            status, body = scoped.control("POST", "/v1/sessions", new, token=token)
            assert status == 403 and "may not create" in body["error"]
        session = scoped.create_session(backup["backup_id"])
        sid = session["session_id"]
        for token in (runner, monitor):
            status, body = scoped.control("GET", "/v1/sessions", token=token)
            assert status == 200 and sid in {s["session_id"] for s in body["sessions"]}
            assert session["url"] not in json.dumps(body)  # a URL opens the backup
            assert scoped.control("GET", f"/v1/sessions/{sid}/prefetch", token=token)[0] == 200
        # Other tests' sessions share the prefix, so find ours by id.
        listed = scoped.control("GET", "/v1/sessions")[1]["sessions"]
        assert {s["session_id"]: s.get("url") for s in listed}[sid] == session["url"]
        assert scoped.control("DELETE", f"/v1/sessions/{sid}", token=monitor)[0] == 403
        assert request(session["url"], headers={"Range": "bytes=0-9"})[0] == 206
        assert scoped.control("DELETE", f"/v1/sessions/{sid}", token=runner)[0] == 200
        assert request(session["url"], headers={"Range": "bytes=0-9"})[0] == 404
    finally:
        scoped.stop()


def test_cli_sessions_and_errors(fetcher: FetcherProcess, backup: dict[str, Any]) -> None:
    cli = Cli(backup["cli"].cluster, backup["prefix"], fetcher.env_overrides)
    created = cli.json("fetcher", "session", "create", backup["backup_id"])
    assert created["url"].endswith("/disk.qcow2") and created["session_id"]
    assert fetcher.settings.secret not in created["url"]
    listed = cli.json("fetcher", "session", "list")["sessions"]
    assert created["session_id"] in {s["session_id"] for s in listed}
    assert cli.run("fetcher", "session", "close", created["session_id"]).returncode == 0
    assert "not open" in cli.fails("fetcher", "session", "close", created["session_id"])
    assert "does not exist" in cli.fails("fetcher", "session", "create",
                                         "20200101T000000Z-00000000")
    down = {"RBD_RESTORE_FETCHER_CONTROL_LISTEN": "127.0.0.1:9"}
    assert "unreachable" in cli.fails("fetcher", "session", "list", env=down)
    logs = fetcher.logs()
    assert fetcher.settings.secret not in logs
    assert cli.cluster.s3_secret_key not in logs


def test_cache_survives_restart_and_sigkill_keeps_bytes_correct(
        fetcher: FetcherProcess, reference: tuple[str, bytes]) -> None:
    url, whole = reference
    host, port, path = split(url)
    stop = threading.Event()
    results = {"reads": 0, "errors": 0, "wrong": 0}

    def reader() -> None:
        rng = random.Random(7)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while not stop.is_set() or results["reads"] < 50:
            start = rng.randrange(len(whole) - 1)
            end = min(len(whole), start + rng.randint(1, 6 * MiB))
            try:
                conn.request("GET", path, headers={"Range": f"bytes={start}-{end - 1}"})
                reply = conn.getresponse()
                body = reply.read()
            except (OSError, http.client.HTTPException):
                results["errors"] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
                continue
            if reply.status != 206 or body != whole[start:end]:
                results["wrong"] += 1
            results["reads"] += 1
            if results["reads"] > 2000:
                break
        conn.close()

    thread = threading.Thread(target=reader)
    thread.start()
    def ten_more_reads() -> None:
        reads_before = results["reads"]
        while results["reads"] < reads_before + 10 and thread.is_alive():
            thread.join(0.05)

    try:
        for _ in range(2):
            ten_more_reads()
            fetcher.stop(signal.SIGKILL)
            fetcher.start()
        # The last process must serve reads too, or its metrics below say nothing (the
        # reader may have made its 50 reads before it started).
        ten_more_reads()
    finally:
        stop.set()
        thread.join(120)
    assert results["wrong"] == 0
    assert results["reads"] >= 50 and results["errors"] >= 1
    # Everything was cached before the kills: the new process answers without S3.
    assert fetcher.metrics().get("rbd_restore_fetcher_s3_gets_total", 0) == 0
    assert fetcher.metrics()["rbd_restore_fetcher_cache_hits_total"] > 0


def test_one_s3_get_per_chunk_however_many_readers(cluster: devcluster.ClusterInfo,
                                                   backup: dict[str, Any],
                                                   tmp_path: Path) -> None:
    fetcher = FetcherProcess(cluster, tmp_path / "cache", backup["prefix"],
                             {"RBD_RESTORE_FETCHER_PRIME_SESSIONS": "0"})
    fetcher.start()
    try:
        url = fetcher.create_session(backup["backup_id"])["url"]
        _twelve_readers_one_get(fetcher, url)
    finally:
        fetcher.stop()


def _twelve_readers_one_get(fetcher: FetcherProcess, url: str) -> None:
    size = int(request(url, "HEAD")[1]["content-length"])
    before = fetcher.metrics().get("rbd_restore_fetcher_s3_gets_total", 0)
    # Twelve guest-sized reads of the same cold chunk at once (sessions are not primed).
    start = size - 2 * MiB
    results: list[tuple[int, bytes]] = []

    def read(i: int) -> None:
        status, _, body = request(url, headers={"Range": f"bytes={start + i}-{start + i + 99}"})
        results.append((status, body))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [s for s, _ in results] == [206] * 12
    assert fetcher.metrics()["rbd_restore_fetcher_s3_gets_total"] - before == 1

