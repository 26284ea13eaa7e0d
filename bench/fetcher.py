"""Fetcher throughput and latency against parallel boto3 GETs of the same chunks.

Those GETs only fetch; a fetcher must also open, decompress and verify every
chunk, on the same two cores as RGW and the OSD. So the cold pass is also
compared with the fastest that work can go here: the same parallel GETs, each
chunk decoded as the fetcher must (one process, nothing served).

Cold: sequential 4 MiB range reads over one keep-alive connection through an
empty cache. Warm: the same reads from a disk cache that holds every chunk (a
first pass by a fetcher with memory_cache = 0 fills it). Then 4 KiB random
reads from the warm cache (p99), and the fetcher's RSS while serving a 100 GiB
backup and at its peak during the cold pass (the relocation's read pattern).

CPU: the fetcher's CPU-seconds per GiB served in the cold pass, against the
floor of its mandatory work measured in the same run: one process that only
GETs the same chunk objects in the same order over one connection (signed as
the fetcher signs them, urllib3: no botocore on the data path) and opens, decompresses and
verifies each (the repository's codec, as the fetcher must), with the allocator
settings the fetcher uses (rbd_restore/allocator.py: a fresh 4 MiB buffer
costs page faults here; the same process without them spends 1.9 CPU-s per GiB
instead of 1.1). Serving the bytes is not in that floor; what sending them
costs by itself is measured too (the serving floor: one process answering a
reader's 4 MiB requests with a bare blocking ``sendall`` over loopback TCP).
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.backup_restore import CHUNK, WORKERS, _delete_prefix, _extent, _pool_bytes
from bench.common import (
    Report,
    Row,
    bench_cluster,
    cli,
    map_all,
    median,
    open_volumes,
    run_alone,
    timed,
)
from rbd_restore import config as config_mod
from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from rbd_restore.repo import keyring
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.repository import new_backup_id
from rbd_restore.repo.store import make_client
from tests.support.fetcher_proc import FetcherProcess

MiB = 1 << 20
GET_THREADS = 16


class Fetcher(FetcherProcess):
    """A fetcher for one benchmark step, started at once: quiet logs, an 8 GB cache,
    ``extra_env`` on top of the bench cluster's configuration."""

    def __init__(self, cluster: devcluster.ClusterInfo, prefix: str, cache: Path,
                 extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        super().__init__(cluster, cache, prefix, dict(extra_env or {}),
                         ("--cache-size", "8G", *args), log_level="warning")
        self.start()

    def session(self, backup_id: str) -> str:
        return str(self.create_session(backup_id)["url"])

    def peak_rss_during(self, action: Callable[[], Any]) -> tuple[Any, float]:
        """``action``'s result and the fetcher's highest RSS while it ran (sampled)."""
        peak = [self.rss_mib()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], self.rss_mib())

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            return action(), max(peak[0], self.rss_mib())
        finally:
            done.set()
            sampler.join()

    def cpu_seconds(self) -> float:
        """User and system CPU the fetcher process has used so far, all threads."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def _connect(url: str) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the URL's host and the URL's path."""
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=300), parts.path


def _reads(url: str, ranges: list[tuple[int, int]]) -> list[float]:
    conn, path = _connect(url)
    latencies = []
    for start, end in ranges:
        began = time.perf_counter()
        conn.request("GET", path, headers={"Range": f"bytes={start}-{end - 1}"})
        reply = conn.getresponse()
        body = reply.read()
        if reply.status != 206 or len(body) != end - start:
            raise RuntimeError(f"bad reply {reply.status} for {start}-{end}")
        latencies.append(time.perf_counter() - began)
    conn.close()
    return latencies


def _file_size(url: str) -> int:
    conn, path = _connect(url)
    conn.request("HEAD", path)
    size = int(conn.getresponse().getheader("Content-Length") or 0)
    conn.close()
    return size


def run(cluster: devcluster.ClusterInfo | None = None, runs: int = 3,
        data_gib: int = 1) -> Report:
    import rbd

    cluster = cluster or bench_cluster()
    cfg = config_mod.load(str(cluster.config))
    s3 = make_client(cfg.s3, max_connections=GET_THREADS * 2)
    report = Report(f"Fetcher ({data_gib} GiB of data, 4 MiB chunks)")
    prefix = f"bench-fetch-{uuid.uuid4().hex[:8]}/"
    handle, ioctx = open_volumes(cluster)
    name = f"bench-fetch-{uuid.uuid4().hex[:8]}"
    count = data_gib * 256
    pool = _pool_bytes()
    samples: dict[str, list[float]] = {"cold": [], "get": [], "warm": [], "p99": [], "rss": [],
                                       "rss_cold": [], "cpu": [], "floor": [], "send": [],
                                       "decode_limit": []}
    workdir = Path(tempfile.mkdtemp(dir=str(cluster.dir)))
    try:
        rbd.RBD().create(ioctx, name, count * CHUNK, old_format=False)
        with rbd.Image(ioctx, name) as image, ThreadPoolExecutor(WORKERS) as ex:
            list(ex.map(lambda i: image.write(_extent(pool, i), i * CHUNK), range(count)))
        backup_id = cli(cluster, "backup", f"volumes/{name}",
                        env={"RBD_RESTORE_S3_PREFIX": prefix})["backup_id"]
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=cluster.bucket, Prefix=f"{prefix}chunks/") for o in page.get("Contents", [])]
        data_bytes = count * CHUNK
        for run_no in range(runs):
            fetcher = Fetcher(cluster, prefix, workdir / f"cache-{run_no}")
            try:
                url = fetcher.session(backup_id)
                size = _file_size(url)
                first_data = size - data_bytes
                ranges = [(o, o + CHUNK) for o in range(first_data, size, CHUNK)]
                cpu_before = fetcher.cpu_seconds()
                (secs, _), peak = fetcher.peak_rss_during(
                    functools.partial(timed, _reads, url, ranges))
                samples["cpu"].append((fetcher.cpu_seconds() - cpu_before) / data_gib)
                samples["cold"].append(data_bytes / secs / MiB)
                samples["rss_cold"].append(peak)
            finally:
                fetcher.stop()
            samples["floor"].append(floor_cpu_per_gib(cluster, prefix, backup_id, data_gib))
            samples["send"].append(send_floor_cpu_per_gib(data_gib))
            # A sequential reader's chunks pass through memory and stay out of the disk
            # cache by default; a warm cache is one that holds them: filled here by a
            # first pass of a fetcher that keeps every chunk on disk (memory_cache = 0).
            fetcher = Fetcher(cluster, prefix, workdir / f"warm-{run_no}",
                              extra_env={"RBD_RESTORE_FETCHER_MEMORY_CACHE": "0"})
            try:
                url = fetcher.session(backup_id)
                _reads(url, ranges)
                secs, _ = timed(_reads, url, ranges)
                samples["warm"].append(data_bytes / secs / MiB)
                rng = random.Random(run_no)
                small = [(o, o + 4096) for o in
                         (rng.randrange(first_data, size - 4096) for _ in range(2000))]
                latencies = _reads(url, small)
                samples["p99"].append(statistics.quantiles(latencies, n=100)[98] * 1000)
            finally:
                fetcher.stop()

            def get(key: str) -> None:
                s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read()

            with ThreadPoolExecutor(GET_THREADS) as ex:
                secs, _ = timed(map_all, ex, get, keys)
            samples["get"].append(data_bytes / secs / MiB)
            samples["decode_limit"].append(decode_limit_mib_s(cluster, prefix, backup_id,
                                                              data_gib))
        samples["rss"].append(_rss_for_100_gib(cluster, cfg, prefix, backup_id, workdir))
    finally:
        remove_image(ioctx, name)
        ioctx.close()
        handle.shutdown()
        _delete_prefix(s3, cluster.bucket, prefix)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    report.add(Row("cold sequential 4 MiB reads (one connection)", "throughput",
                   median(samples["cold"]), "MiB/s", f"parallel boto3 GET ({GET_THREADS} threads)",
                   median(samples["get"]), ">= 0.9x", samples["cold"]))
    report.add(Row(f"parallel boto3 GET ({GET_THREADS} threads)", "throughput",
                   median(samples["get"]), "MiB/s", runs=samples["get"]))
    limit = f"parallel GET + open + decompress + verify ({GET_THREADS} threads)"
    report.add(Row(limit, "throughput", median(samples["decode_limit"]), "MiB/s",
                   runs=samples["decode_limit"]))
    report.add(Row("cold sequential 4 MiB reads (one connection)", "throughput",
                   median(samples["cold"]), "MiB/s", limit, median(samples["decode_limit"]),
                   runs=samples["cold"]))
    report.add(Row("cold sequential 4 MiB reads: fetcher CPU", "CPU-s per GiB",
                   median(samples["cpu"]), "s", "floor: GET + open + decompress + verify, "
                   "one process", median(samples["floor"]), "<= 1.3x (issue 18)",
                   samples["cpu"]))
    report.add(Row("floor: GET (SigV4 headers, urllib3) + open + decompress + verify",
                   "CPU-s per GiB", median(samples["floor"]), "s", runs=samples["floor"]))
    add_serving_rows(report, "cold sequential 4 MiB reads: fetcher CPU", samples,
                     "4 MiB a request")
    report.add(Row("warm sequential 4 MiB reads", "throughput", median(samples["warm"]),
                   "MiB/s", target=">= 300 MB/s", runs=samples["warm"]))
    report.add(Row("warm 4 KiB random reads", "p99 latency", median(samples["p99"]), "ms",
                   target="< 2 ms", runs=samples["p99"]))
    report.add(Row("serving a 100 GiB backup", "fetcher RSS", max(samples["rss"]), "MiB",
                   target="< 300 MiB", runs=samples["rss"]))
    report.add(Row("cold sequential 4 MiB reads (relocation's pattern)", "fetcher RSS, peak",
                   max(samples["rss_cold"]), "MiB", target="< 300 MiB", runs=samples["rss_cold"]))
    return report


def _rss_for_100_gib(cluster: devcluster.ClusterInfo, cfg: config_mod.Config, prefix: str,
                     backup_id: str, workdir: Path) -> float:
    """A 100 GiB manifest (every chunk allocated, reusing the stored chunks) served for reads."""
    repo = keyring.open_repository(dataclasses.replace(cfg.s3, prefix=prefix), cfg.repository)
    small = repo.load_manifest(backup_id)
    ids = [c for c in small.chunks if c is not None]
    big = Manifest(backup_id=new_backup_id(), created=small.created, source=small.source,
                   image_size=100 << 30, chunk_size=CHUNK,
                   chunks=[ids[i % len(ids)] for i in range((100 << 30) // CHUNK)])
    repo.save_manifest(big)
    fetcher = Fetcher(cluster, prefix, workdir / "cache-rss")
    try:
        url = fetcher.session(big.backup_id)
        size = _file_size(url)
        rng = random.Random(1)
        peak = 0.0
        for _ in range(20):
            starts = [rng.randrange(0, size - CHUNK) for _ in range(10)]
            _reads(url, [(s, s + CHUNK) for s in starts])
            peak = max(peak, fetcher.rss_mib())
        return peak
    finally:
        fetcher.stop()


FLOOR = """
import dataclasses, json, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
import urllib3
from rbd_restore import config
from rbd_restore.allocator import reuse_large_buffers
from rbd_restore.repo import keyring
reuse_large_buffers()
cfg = config.load(sys.argv[1])
repo = keyring.open_repository(dataclasses.replace(cfg.s3, prefix=sys.argv[2]), cfg.repository)
manifest = repo.load_manifest(sys.argv[3])
threads = int(sys.argv[4])
ids = [c for c in manifest.chunks if c is not None]
lean = repo.store.lean
urls = [lean.url(repo.keys.chunk(c)) for c in ids]
codec = repo.codec
pool = urllib3.PoolManager(maxsize=threads)

def fetch(chunk_id, url):
    reply = pool.request("GET", url, headers=lean.signed_headers(url), preload_content=True)
    assert reply.status == 200, reply.status
    codec.decode_chunk(chunk_id, reply.data, manifest.chunk_size)

began, started = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
if threads == 1:
    for chunk_id, url in zip(ids, urls):
        fetch(chunk_id, url)
else:
    with ThreadPoolExecutor(threads) as workers:
        list(workers.map(fetch, ids, urls))
done = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps([done.ru_utime + done.ru_stime - started.ru_utime - started.ru_stime,
                  time.monotonic() - began]))
"""


def _floor_run(cluster: devcluster.ClusterInfo, prefix: str, backup_id: str, threads: int,
               endpoint: str | None) -> tuple[float, float]:
    """(CPU-seconds, wall seconds) of one process GETting, opening, decompressing and
    verifying every chunk of the backup with ``threads`` threads."""
    env = {**os.environ, "RBD_RESTORE_S3_ENDPOINT": endpoint} if endpoint else None
    done = subprocess.run([sys.executable, "-c", FLOOR, str(cluster.config), prefix, backup_id,
                           str(threads)], check=True, capture_output=True, text=True, env=env)
    cpu, wall = json.loads(done.stdout)
    return float(cpu), float(wall)


def floor_cpu_per_gib(cluster: devcluster.ClusterInfo, prefix: str, backup_id: str,
                      data_gib: float, endpoint: str | None = None) -> float:
    """CPU-seconds per GiB of the mandatory work of serving these chunks cold.
    ``endpoint``: the S3 endpoint the fetcher measured beside it used (the WAN model's
    proxy): its GETs arrive paced, in more and smaller receives than from RGW
    directly, and the floor must fetch the same way."""
    return _floor_run(cluster, prefix, backup_id, 1, endpoint)[0] / data_gib


def decode_limit_mib_s(cluster: devcluster.ClusterInfo, prefix: str, backup_id: str,
                       data_gib: float) -> float:
    """The fastest any fetcher could serve these chunks cold on this machine: the same
    parallel GETs as the boto3 baseline, each chunk also opened, decompressed and
    verified (the work the baseline skips), nothing served."""
    return data_gib * 1024 / _floor_run(cluster, prefix, backup_id, GET_THREADS, None)[1]


def add_serving_rows(report: Report, scenario: str, samples: dict[str, list[float]],
                     requests: str) -> None:
    """The serving floor's row and the fetcher's CPU (``samples["cpu"]``) against the
    floor plus it, run by run (``samples["floor"]``, ``samples["send"]``)."""
    report.add(Row(f"serving floor: the same bytes sent over loopback TCP, {requests}",
                   "CPU-s per GiB", median(samples["send"]), "s", runs=samples["send"]))
    both = [f + s for f, s in zip(samples["floor"], samples["send"], strict=True)]
    report.add(Row(scenario, "CPU-s per GiB", median(samples["cpu"]), "s",
                   "floor + serving floor, same run", median(both), runs=samples["cpu"]))


SEND_FLOOR = """
import json, os, resource, socket, sys
count, size, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
buffers = [os.urandom(size) for _ in range(4)]
sock = socket.create_connection(("127.0.0.1", port))
started = resource.getrusage(resource.RUSAGE_SELF)
for i in range(count):
    assert sock.recv(1) == b"?"
    sock.sendall(buffers[i % 4])
done = resource.getrusage(resource.RUSAGE_SELF)
sock.close()
print(json.dumps(done.ru_utime + done.ru_stime - started.ru_utime - started.ru_stime))
"""


def send_floor_cpu_per_gib(data_gib: float, request_bytes: int = CHUNK) -> float:
    """CPU-seconds per GiB that sending the bytes costs a process by itself, answering
    one ``request_bytes`` request at a time: the serving part of the fetcher's work,
    which the floor above leaves out."""
    count = int(data_gib * (1 << 30)) // request_bytes
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = subprocess.Popen([sys.executable, "-c", SEND_FLOOR, str(count),
                                   str(request_bytes), str(listener.getsockname()[1])],
                                  stdout=subprocess.PIPE, text=True)
        try:
            conn, _ = listener.accept()
            with conn:
                buffer = memoryview(bytearray(request_bytes))
                for _ in range(count):
                    conn.sendall(b"?")
                    received = 0
                    while received < request_bytes:
                        got = conn.recv_into(buffer[received:])
                        if not got:
                            raise RuntimeError("the serving floor's sender closed early")
                        received += got
            out, _ = sender.communicate(timeout=300)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    if sender.returncode != 0:
        raise RuntimeError(f"the serving floor's sender failed ({sender.returncode})")
    return float(json.loads(out)) / data_gib


def main() -> Any:
    return run_alone(run)


if __name__ == "__main__":
    main()
