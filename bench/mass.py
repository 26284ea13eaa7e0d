"""Mass restore: 1, 4 and 16 VMs instantly restored at once from one fetcher.

Sixteen volumes made from one base image (the test guest's disk), each with
4 MiB of its own data written where its file system has free blocks, are
backed up as sixteen backups: in S3 they share the base's chunks. For each
concurrency N, in the same run:

- N QEMU guests booted at once on the N local RBD volumes (the baseline: this
  machine's two cores slow N QEMUs whatever their disks are);
- N instant restores started at once from one fetcher with an empty cache, S3
  behind the benchmark's WAN model (20 ms, 100 MB/s per connection), one job
  runner relocating N jobs at once from the start (the guests hold the image's
  lock, so each relocation runs in its guest's librbd), N guests booted as soon
  as their restore says ready; every guest's data checked, every job committed,
  each volume's own 4 MiB read back from its restored image;
- the same with the boot's recorded reads replayed (bench/trace.py) instead of
  QEMU: the reads a guest issues without its CPU cost, against N local volumes
  and N instant restores, once with the runner relocating all N meanwhile
  (outside the guests: a replay holds no lock) and once with the relocations
  not started.

Each boot is timed from the moment the N restores (or QEMUs) start to the
guest's marker line. S3 bytes are what the fetcher fetched (its metric); unique
bytes are the stored size of the distinct chunks of the N backups, all of which
the relocations need.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bench.backup_restore import _delete_prefix
from bench.boot import BANDWIDTH, RTT_MS, _p99_ms, _proxy, _used
from bench.common import (
    JobStates,
    Report,
    Row,
    bench_cluster,
    cli,
    drop_caches,
    median,
    open_volumes,
)
from bench.fetcher import Fetcher, floor_cpu_per_gib
from bench.trace import record
from rbd_restore import config as config_mod
from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from rbd_restore.repo import keyring
from rbd_restore.repo.store import make_client
from tests.support.vm import Vm, build_guest

T = TypeVar("T")
MiB = 1 << 20
CHANGE_AT = 640 * MiB  # free blocks of the guest's file system: not read at boot
CHANGE = 4 * MiB
COUNTS = (1, 4, 16)
RESULTS = ("hit", "wait", "miss")


@dataclasses.dataclass
class Site:
    cluster: devcluster.ClusterInfo
    guest: Path
    info: dict[str, Any]
    work: Path
    env: dict[str, str]  # the bench prefix, S3 behind the WAN model
    sources: list[str]
    backups: list[str]
    changes: list[bytes]
    trace: Path

    @property
    def conf(self) -> str:
        return str(self.cluster.ceph_conf)


def _together(count: int, action: Callable[[int], T]) -> list[T]:
    """``action(i)`` for i < count, all started at the same moment."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(action, range(count)))


def _boot(site: Site, image: str) -> tuple[float, Vm]:
    """Boot the guest on ``image`` to its marker (``time.monotonic()`` then) and its end."""
    vm = Vm(site.guest, f"rbd:volumes/{image}:conf={site.conf}",
            site.work / f"{image}-{uuid.uuid4().hex[:4]}.console")
    started = time.monotonic()
    vm.start()
    try:
        marker_at = started + vm.wait_for(site.info["marker"], timeout=900)
        vm.wait_exit(timeout=600)
    finally:
        vm.stop()
    return marker_at, vm


def _replay(site: Site, image: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "bench.trace", "replay", "--conf", site.conf,
                           f"volumes/{image}", str(site.trace)],
                          check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


class InstantRound:
    """One fetcher with an empty cache and one job runner, for N restores at once."""

    def __init__(self, site: Site, name: str, count: int, relocate: bool = True) -> None:
        self.site = site
        self.fetcher = Fetcher(site.cluster, site.env["RBD_RESTORE_S3_PREFIX"],
                               site.work / name, extra_env=site.env)
        self.env = {**site.env, **self.fetcher.env_overrides}
        self.targets = [f"{name}-{i}-{uuid.uuid4().hex[:4]}" for i in range(count)]
        self.jobs: list[str] = ["" for _ in range(count)]
        self.states = JobStates(site.cluster)
        self.cpu_before = self.fetcher.cpu_seconds()
        self.runner = subprocess.Popen(
            [sys.executable, "-m", "rbd_restore.cli", "jobs", "run", "--jobs", str(count),
             "--log-level", "warning"],
            env={**self.fetcher.env, **self.env}, stdout=subprocess.DEVNULL,
            stderr=open(site.work / f"{name}-runner.log", "wb")  # noqa: SIM115
        ) if relocate else None

    def restore(self, i: int) -> str:
        self.jobs[i] = cli(self.site.cluster, "restore", self.site.backups[i],
                           f"volumes/{self.targets[i]}", "--mode", "instant",
                           env=self.env)["job_id"]
        return self.targets[i]

    def state(self, i: int) -> str:
        return self.states.state(self.jobs[i])

    def wait_committed(self, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        pending = set(range(len(self.jobs)))
        while pending:
            for i in sorted(pending):
                state = self.state(i)
                if state == "committed":
                    pending.discard(i)
                elif state in ("failed", "aborted"):
                    raise RuntimeError(f"job {self.jobs[i]} {state}")
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"jobs not committed after {timeout} s")
            time.sleep(0.5)

    def metrics(self) -> dict[str, float]:
        found = self.fetcher.metrics()
        found["cpu_seconds"] = self.fetcher.cpu_seconds() - self.cpu_before
        return found

    def close(self) -> None:
        """Stop the runner, abort what it did not commit, remove the images."""
        if self.runner is not None:
            self.runner.send_signal(signal.SIGTERM)
            self.runner.wait(timeout=120)
        try:
            for i, job in enumerate(self.jobs):
                if job and self.state(i) not in ("committed", "aborted"):
                    cli(self.site.cluster, "abort", job, env=self.env)
        finally:
            self.states.close()
            self.fetcher.stop()
        handle, ioctx = open_volumes(self.site.cluster)
        try:
            for target in self.targets:
                remove_image(ioctx, target)
        finally:
            ioctx.close()
            handle.shutdown()


def _check_round(site: Site, round_: InstantRound, vms: list[Vm]) -> int:
    """Every guest read its data right; each committed image holds its volume's own
    change. Returns the bytes the N images use in the pool."""
    used = 0
    for i, vm in enumerate(vms):
        assert vm.sums() == site.info["sums"], f"guest {i} read wrong data"
        assert "I/O error" not in vm.output(), f"guest {i}: I/O error"
        target = round_.targets[i]
        got = subprocess.run(["rbd", "-c", site.conf, "export", "--no-progress",
                              f"volumes/{target}", "-"], check=True, capture_output=True).stdout
        assert got[CHANGE_AT:CHANGE_AT + CHANGE] == site.changes[i], f"image {i}: wrong data"
        used += _used(site.cluster, target)
    return used


def _boots(site: Site, count: int, samples: dict[str, Any]) -> None:
    started = time.monotonic()
    local = _together(count, lambda i: _boot(site, site.sources[i])[0] - started)
    samples["local"][count] = local
    round_ = InstantRound(site, f"mass-boot{count}", count)
    try:
        started = time.monotonic()

        def restore_and_boot(i: int) -> tuple[float, float, Vm]:
            target = round_.restore(i)
            ready = time.monotonic() - started
            marker_at, vm = _boot(site, target)
            return ready, marker_at - started, vm

        booted = _together(count, restore_and_boot)
        round_.wait_committed()
        relocated_in = time.monotonic() - started
        metrics = round_.metrics()
        used = _check_round(site, round_, [vm for _, _, vm in booted])
    finally:
        round_.close()
    samples["ready"][count] = [ready for ready, _, _ in booted]
    samples["instant"][count] = [boot for _, boot, _ in booted]
    samples["metrics"][count] = metrics
    samples["relocated"][count] = (used, relocated_in)


def _replay_restored(round_: InstantRound, i: int) -> dict[str, float]:
    return _replay(round_.site, round_.restore(i))


def _replays(site: Site, count: int, samples: dict[str, Any]) -> None:
    samples["replay_local"][count] = _together(count, lambda i: _replay(site, site.sources[i]))
    for key, relocate in (("replay_instant", True), ("replay_later", False)):
        round_ = InstantRound(site, f"mass-{key}{count}", count, relocate)
        try:
            samples[key][count] = _together(count, functools.partial(_replay_restored, round_))
            if relocate:
                samples["replay_metrics"][count] = round_.metrics()
        finally:
            round_.close()
        drop_caches(site.work)


def _unique_bytes(cluster: devcluster.ClusterInfo, prefix: str, backups: list[str],
                  counts: tuple[int, ...]) -> tuple[list[int], float]:
    """Stored bytes of the distinct chunks of the first N backups, for each N in COUNTS,
    and the GiB of data the first backup's chunks hold (what the floor decodes)."""
    cfg = config_mod.load(str(cluster.config))
    repo = keyring.open_repository(dataclasses.replace(cfg.s3, prefix=prefix), cfg.repository)
    sizes = {}
    pages = repo.store.client.get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket=cluster.bucket, Prefix=f"{prefix}chunks/"):
        for item in page.get("Contents", []):
            sizes[item["Key"]] = int(item["Size"])
    result = []
    for count in counts:
        keys = {repo.keys.chunk(c) for b in backups[:count]
                for c in repo.load_manifest(b).chunks if c is not None}
        result.append(sum(sizes[k] for k in keys))
    first = repo.load_manifest(backups[0])
    data = sum(1 for c in first.chunks if c is not None) * first.chunk_size
    return result, data / 2**30


def _setup(cluster: devcluster.ClusterInfo, work: Path, env: dict[str, str],
           volumes: int) -> Site:
    guest, info = build_guest()
    tag = uuid.uuid4().hex[:4]
    sources, backups, changes = [], [], []
    handle, ioctx = open_volumes(cluster)
    import rbd

    rng = random.Random(18)
    try:
        for i in range(volumes):
            source = f"mass-src-{tag}-{i}"
            subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "import", "--no-progress",
                            str(guest / "root.img"), f"volumes/{source}"], check=True)
            sources.append(source)
            changes.append(rng.randbytes(CHANGE))
            with rbd.Image(ioctx, source) as image:
                image.write(changes[-1], CHANGE_AT)
            # Backups go to RGW directly: the WAN model is for the restores.
            backups.append(cli(cluster, "backup", f"volumes/{source}",
                               env={"RBD_RESTORE_S3_PREFIX": env["RBD_RESTORE_S3_PREFIX"]}
                               )["backup_id"])
    finally:
        ioctx.close()
        handle.shutdown()
    trace = work / "boot-trace.json"
    record(trace)
    return Site(cluster, guest, info, work, env, sources, backups, changes, trace)


def run(cluster: devcluster.ClusterInfo | None = None,
        counts: tuple[int, ...] = COUNTS) -> Report:
    cluster = cluster or bench_cluster()
    cfg = config_mod.load(str(cluster.config))
    work = Path(cluster.dir) / f"mass-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    proxy, wan_endpoint = _proxy(cluster)
    prefix = f"bench-mass-{uuid.uuid4().hex[:6]}/"
    env = {"RBD_RESTORE_S3_PREFIX": prefix, "RBD_RESTORE_S3_ENDPOINT": wan_endpoint}
    samples: dict[str, dict[int, Any]] = {k: {} for k in (
        "local", "ready", "instant", "metrics", "relocated", "replay_local", "replay_instant",
        "replay_later", "replay_metrics")}
    site = None
    try:
        site = _setup(cluster, work, env, max(counts))
        unique, floor_gib = _unique_bytes(cluster, prefix, site.backups, counts)
        for count in counts:
            _boots(site, count, samples)
            drop_caches(work)
            _replays(site, count, samples)
            drop_caches(work)
        floor = floor_cpu_per_gib(cluster, prefix, site.backups[0], floor_gib, wan_endpoint)
    finally:
        if site is not None:
            handle, ioctx = open_volumes(cluster)
            for source in site.sources:
                remove_image(ioctx, source)
            ioctx.close()
            handle.shutdown()
        _delete_prefix(make_client(cfg.s3), cluster.bucket, prefix)
        proxy.kill()
        proxy.wait()
        drop_caches(work)
    return _report(samples, counts, unique, floor)


def _report(samples: dict[str, dict[int, Any]], counts: tuple[int, ...], unique: list[int],
            floor: float) -> Report:
    report = Report(f"Mass restore: N instant restores at once from one fetcher, S3 behind "
                    f"{RTT_MS:.0f} ms RTT and {BANDWIDTH / 1e6:.0f} MB/s (test guest volumes "
                    "sharing a base image)")
    for count, unique_bytes in zip(counts, unique, strict=True):
        local, instant = samples["local"][count], samples["instant"][count]
        metrics = samples["metrics"][count]
        targets = ("<= 1.3x (issue 18)", "<= 1.6x (issue 18)") if count == 16 else ("", "")
        report.add(Row(f"{count} at once: boot to marker, median of the VMs", "seconds",
                       median(instant), "s", f"{count} local boots at once", median(local),
                       targets[0], instant))
        report.add(Row(f"{count} at once: boot to marker, slowest VM", "seconds", max(instant),
                       "s", f"{count} local boots at once", max(local), targets[1]))
        report.add(Row(f"{count} at once: restore ready, slowest", "seconds",
                       max(samples["ready"][count]), "s", runs=samples["ready"][count]))
        fetched = metrics["rbd_restore_fetcher_s3_get_bytes_total"]
        report.add(Row(f"{count} at once: S3 bytes fetched", "MiB", fetched / MiB, "MiB",
                       "unique bytes the backups hold", unique_bytes / MiB,
                       "<= 1.2x (issue 18)" if count == 16 else ""))
        used, seconds = samples["relocated"][count]
        report.add(Row(f"{count} at once: relocation of all jobs, restore start to all "
                       "committed", "MB/s", used / seconds / 1e6, "MB/s",
                       runs=[seconds]))
        served = metrics["rbd_restore_fetcher_served_bytes_total"] / 2**30
        report.add(Row(f"{count} at once: fetcher CPU per GiB served (boots and relocations)",
                       "CPU-s/GiB", metrics["cpu_seconds"] / served, "CPU-s/GiB",
                       "floor: GET + decode + verify, one process", floor))
        replay_local = [r["seconds"] for r in samples["replay_local"][count]]
        replay = [r["seconds"] for r in samples["replay_instant"][count]]
        later = [r["seconds"] for r in samples["replay_later"][count]]
        for label, values, target in (
                ("relocations running", replay, ""),
                ("relocations not started", later, "<= 2x (issue 18)" if count == 16 else "")):
            report.add(Row(f"{count} at once: boot trace replay, {label}, median", "seconds",
                           median(values), "s", f"{count} replays on local volumes at once",
                           median(replay_local), target, values))
            report.add(Row(f"{count} at once: boot trace replay, {label}, slowest", "seconds",
                           max(values), "s", f"{count} replays on local volumes at once",
                           max(replay_local)))
        report.add(Row(f"{count} at once: replay read p99, worst VM", "ms",
                       max(r["p99_ms"] for r in samples["replay_instant"][count]), "ms",
                       "local volumes", max(r["p99_ms"] for r in samples["replay_local"][count])))
    for count in counts:
        for kind, metrics in (("boots", samples["metrics"][count]),
                              ("replays", samples["replay_metrics"][count])):
            report.notes.append(f"{count} at once, {kind}: " + _diagnosis(metrics))
    report.notes.append("Boot rows: seconds from the moment the N restores (or N QEMUs) "
                        "start to each guest's marker line; the restores include the "
                        "`rbd-restore restore` command (a Python process each).")
    report.notes.append("Relocation: the N restored images' `rbd du` bytes over the time from "
                        "the restores' start to the last commit; one `jobs run --jobs N`.")
    report.notes.append("Fetcher CPU: all its CPU during the N boots and relocations over the "
                        "bytes it served; the floor is one process fetching the one backup's "
                        "chunks over one connection and decoding them.")
    return report


def _diagnosis(metrics: dict[str, float]) -> str:
    """Where the fetcher's reads came from, and what prefetch threw away."""
    def total(prefix: str) -> float:
        return sum(v for k, v in metrics.items() if k.startswith(prefix))

    def outcomes(reader: str) -> str:
        return "/".join(str(int(metrics.get(
            f'rbd_restore_fetcher_chunk_reads_total{{reader="{reader}",result="{result}"}}', 0)))
            for result in RESULTS)

    reads = f"guest {outcomes('guest')}, relocation {outcomes('relocation')}"
    return (f"chunk reads hit/wait/miss: {reads}; S3 GETs "
            f"{int(metrics.get('rbd_restore_fetcher_s3_gets_total', 0))}; prefetched "
            f"{total('rbd_restore_fetcher_prefetch_bytes_total') / MiB:.0f} MiB, dropped unread "
            f"{total('rbd_restore_fetcher_prefetch_wasted_bytes_total') / MiB:.0f} MiB; "
            f"guest read p99 at the fetcher {_p99_ms(metrics, 'demand_read_seconds'):.1f} ms; "
            f"relocation reads held "
            f"{int(metrics.get('rbd_restore_fetcher_relocation_reads_held_total', 0))}")


def main() -> Any:
    return run()


if __name__ == "__main__":
    from bench.common import write_reports

    print(write_reports([run(counts=tuple(int(n) for n in sys.argv[1:]) or COUNTS)]))
