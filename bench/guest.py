"""A real distribution on instant restores (issue 17): Debian 12 with systemd.

The guest is scripts/build-debian-guest.py's (2 GiB disk, ~210 MiB of files),
its boot recorded once by bench/trace.py (QEMU's own reads: the ground truth of
what it reads). S3 is behind the WAN model of bench/boot.py (20 ms, 100 MB/s
per connection) and every instant restore runs the default flow: a fresh
`fetcher serve --run-jobs` with an empty cache, so the relocation starts the
moment the restore is ready. Per round, each kind paired with its local
baseline taken just before:

- the boot's reads replayed at KVM speed through python-rbd (`bench.trace
  replay`), starting the moment the restore says ready: local image, instant
  cold, instant with the profile the real boot below saved, Ceph's own
  import-only (raw over its `s3` stream);
- QEMU boots to the marker (ready + boot): local, instant cold, with a profile;
- the profile the cold QEMU boot left (the VM held the lock, the relocation ran
  in its librbd): recall and precision against the recorded trace's chunks;
- restore start to committed.

    .venv/bin/python -m bench.guest [RUNS] [SIZE_GIB ...]   (default: 3 runs, 2 GiB)
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.backup_restore import _delete_prefix
from bench.boot import _boot, _proxy, _rr
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
from bench.fetcher import Fetcher
from bench.trace import record, replay
from rbd_restore import config as config_mod
from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from rbd_restore.repo.store import make_client
from tests.support.vm import REPO

GUEST = REPO / ".cache" / "debian-guest"


def debian_guest() -> tuple[Path, dict[str, Any]]:
    subprocess.run([sys.executable, str(REPO / "scripts" / "build-debian-guest.py")],
                   check=True, capture_output=True)
    return GUEST, json.loads((GUEST / "guest.json").read_text())


def trace_chunks(trace: dict[str, Any], chunk_size: int) -> set[int]:
    """Every chunk index the recorded boot read."""
    chunks: set[int] = set()
    for _, offset, length in trace["reads"]:
        first, last = int(offset) // chunk_size, (int(offset) + int(length) - 1) // chunk_size
        chunks.update(range(first, last + 1))
    return chunks


def recall_precision(profile: dict[str, Any], read: set[int]) -> tuple[float, float]:
    named = {int(e["chunk"]) for e in profile.get("entries", [])}
    hit = len(named & read)
    return hit / max(1, len(read)), hit / max(1, len(named))


class Site:
    """One size of the guest: its source image, backup and WAN; restores of it."""

    def __init__(self, cluster: devcluster.ClusterInfo, guest: Path, size_gib: int,
                 work: Path) -> None:
        self.cluster, self.guest, self.work = cluster, guest, work
        self.proxy, endpoint = _proxy(cluster)
        self.wan = {"RBD_RESTORE_S3_ENDPOINT": endpoint}
        self.env = {"RBD_RESTORE_S3_PREFIX": f"bench-guest-{uuid.uuid4().hex[:6]}/",
                    **self.wan}
        self.source = f"guest-src-{size_gib}g-{uuid.uuid4().hex[:6]}"
        self.spec = f"volumes/{self.source}"
        conf = str(cluster.ceph_conf)
        subprocess.run(["rbd", "-c", conf, "import", "--no-progress", str(guest / "root.img"),
                        self.spec], check=True)
        if size_gib > 2:
            subprocess.run(["rbd", "-c", conf, "resize", "--no-progress", "--size",
                            f"{size_gib}G", self.spec], check=True)
        self.backup = cli(cluster, "backup", self.spec, env=self.env)["backup_id"]

    def forget_profile(self) -> None:
        _rr(self.cluster, self.env, "profile", "clear", self.spec, check=False)

    def profile(self) -> dict[str, Any]:
        shown = subprocess.run([sys.executable, "-m", "rbd_restore.cli", "profile", "show",
                                self.spec, "--json"], capture_output=True, text=True,
                               env={**_environ(self.cluster), **self.env})
        return json.loads(shown.stdout) if shown.returncode == 0 else {}

    def instant(self, name: str, action: Callable[[str], Any]) -> tuple[float, Any, float]:
        """A fresh ``fetcher serve --run-jobs`` (empty cache, the relocation at once),
        an instant restore and ``action(image)`` as soon as it is ready: the seconds
        from the restore's start to ready, ``action``'s result, and the seconds from
        the restore's start to committed."""
        fetcher = Fetcher(self.cluster, self.env["RBD_RESTORE_S3_PREFIX"],
                          self.work / f"cache-{name}", extra_env=self.wan,
                          args=("--run-jobs",))
        target = f"{name}-{uuid.uuid4().hex[:4]}"
        fenv = {**self.env, **fetcher.env_overrides}
        states = JobStates(self.cluster)
        try:
            started = time.monotonic()
            job = cli(self.cluster, "restore", self.backup, f"volumes/{target}", "--mode",
                      "instant", env=fenv)["job_id"]
            ready = time.monotonic() - started
            committed_at: list[float] = []

            def watch() -> None:  # while the action runs: the commit may come first
                deadline = time.monotonic() + 900
                while time.monotonic() < deadline:
                    if states.state(job) == "committed":
                        committed_at.append(time.monotonic())
                        return
                    time.sleep(0.25)

            watcher = threading.Thread(target=watch)
            watcher.start()
            result = action(target)
            watcher.join()
            assert committed_at, f"job {job} not committed"
            committed = committed_at[0] - started
        finally:
            states.close()
            fetcher.stop()
        _, ioctx = handles = open_volumes(self.cluster)
        try:
            remove_image(ioctx, target)
        finally:
            ioctx.close()
            handles[0].shutdown()
        return ready, result, committed

    def close(self) -> None:
        handle, ioctx = open_volumes(self.cluster)
        try:
            remove_image(ioctx, self.source)
        finally:
            ioctx.close()
            handle.shutdown()
            # The backup, profile and sessions: nine runs had left 2 GiB in the bucket.
            cfg = config_mod.load(str(self.cluster.config))
            _delete_prefix(make_client(cfg.s3), self.cluster.bucket,
                           self.env["RBD_RESTORE_S3_PREFIX"])
        self.proxy.kill()
        self.proxy.wait()


def _environ(cluster: devcluster.ClusterInfo) -> dict[str, str]:
    import os

    return {**os.environ, "RBD_RESTORE_CONFIG": str(cluster.config)}


def run(cluster: devcluster.ClusterInfo | None = None, runs: int = 3,
        sizes: tuple[int, ...] = (2,)) -> Report:
    import rbd

    cluster = cluster or bench_cluster()
    cfg = config_mod.load(str(cluster.config))
    guest, info = debian_guest()
    work = Path(cluster.dir) / f"guest-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    report = Report("A real distribution (Debian 12, systemd), S3 behind 20 ms / 100 MB/s, "
                    "relocation at once (fetcher serve --run-jobs)")
    trace = record(work / "trace.json", guest)
    conf = str(cluster.ceph_conf)
    s3 = make_client(cfg.s3)
    try:
        for size in sizes:
            site = Site(cluster, guest, size, work)
            samples: dict[str, list[float]] = {}

            def add(key: str, value: float, into: dict[str, list[float]] = samples) -> None:
                into.setdefault(key, []).append(value)

            def replay_on(image: str) -> dict[str, float]:
                return replay(conf, f"volumes/{image}", trace)

            def boot_on(image: str) -> float:
                started = time.monotonic()
                return _boot(guest, cluster, image, work, info["marker"]) - started

            raw_key = f"{site.env['RBD_RESTORE_S3_PREFIX']}raw/root.raw"
            ceph_spec = ""
            if size == 2:  # Ceph's import needs the raw disk as one object: 2 GiB only
                s3.upload_file(str(guest / "root.img"), cluster.bucket, raw_key)
                ceph_spec = json.dumps({"type": "raw", "stream": {
                    "type": "s3", "url": f"{site.wan['RBD_RESTORE_S3_ENDPOINT']}/"
                    f"{cluster.bucket}/{raw_key}", "access_key": cluster.s3_access_key,
                    "secret_key": cluster.s3_secret_key}})
            try:
                for run_no in range(runs):
                    site.forget_profile()
                    local = replay_on(site.source)
                    add("replay_local", local["seconds"])
                    add("replay_local_p99", local["p99_ms"])
                    ready, cold, committed = site.instant(f"replay-cold-{run_no}", replay_on)
                    add("ready", ready)
                    add("replay_cold", cold["seconds"])
                    add("replay_cold_p99", cold["p99_ms"])
                    add("committed_replay", committed)
                    site.forget_profile()  # the replay's session left one: cold means none
                    local_boot = boot_on(site.source)
                    ready, booted, committed = site.instant(f"boot-cold-{run_no}", boot_on)
                    add("boot_local", local_boot)
                    add("boot_cold", ready + booted)
                    add("boot_cold_paired", (ready + booted) / local_boot)
                    add("committed_boot", committed)
                    recall, precision = recall_precision(
                        site.profile(), trace_chunks(trace, 4 << 20))
                    add("recall", recall)
                    add("precision", precision)
                    _, warm, _ = site.instant(f"replay-prof-{run_no}", replay_on)
                    add("replay_profile", warm["seconds"])
                    add("replay_profile_p99", warm["p99_ms"])
                    local_boot = boot_on(site.source)
                    ready, booted, _ = site.instant(f"boot-prof-{run_no}", boot_on)
                    add("boot_profile", ready + booted)
                    add("boot_profile_paired", (ready + booted) / local_boot)
                    if ceph_spec:
                        handle, ioctx = open_volumes(cluster)
                        target = f"guest-ceph-{run_no}-{uuid.uuid4().hex[:4]}"
                        try:
                            rbd.RBD().migration_prepare_import(ceph_spec, ioctx, target)
                            add("replay_ceph", replay_on(target)["seconds"])
                            rbd.RBD().migration_abort(ioctx, target)
                        finally:
                            ioctx.close()
                            handle.shutdown()
            finally:
                if ceph_spec:
                    s3.delete_object(Bucket=cluster.bucket, Key=raw_key)
                site.close()
            _rows(report, size, samples, trace)
    finally:
        drop_caches(work)
    return report


def _rows(report: Report, size: int, samples: dict[str, list[float]],
          trace: dict[str, Any]) -> None:
    tag = f"{size} GiB"
    local = median(samples["replay_local"])
    local_p99 = median(samples["replay_local_p99"])
    report.add(Row(f"{tag}: boot trace replay ({len(trace['reads'])} reads, "
                   f"{trace['bytes'] >> 20} MiB), local RBD image", "seconds", local, "s",
                   runs=samples["replay_local"]))
    for key, label, target in (("replay_cold", "instant, cold", "<= 2x (issue 17)"),
                               ("replay_profile", "instant, with the boot's profile",
                                "<= 1.3x (issue 17)"),
                               ("replay_ceph", "Ceph import-only, raw over s3", "")):
        if key in samples:
            report.add(Row(f"{tag}: boot trace replay, {label}", "seconds",
                           median(samples[key]), "s", "local RBD image", local, target,
                           samples[key]))
    for key, label in (("replay_cold_p99", "instant, cold"),
                       ("replay_profile_p99", "instant, with the profile")):
        report.add(Row(f"{tag}: replay read p99, {label}", "ms", median(samples[key]), "ms",
                       "local RBD image", local_p99, "<= 2x (issue 17)", samples[key]))
    report.add(Row(f"{tag}: instant restore ready", "seconds", median(samples["ready"]), "s",
                   target="< 2 s (issue 17)", runs=samples["ready"]))
    boot = median(samples["boot_local"])
    report.add(Row(f"{tag}: QEMU boot, local RBD image", "seconds to marker", boot, "s",
                   runs=samples["boot_local"]))
    for key, label, target in (("boot_cold_paired", "instant cold", "<= 1.10x (issue 17)"),
                               ("boot_profile_paired", "instant with a profile",
                                "<= 1.05x (issue 17)")):
        report.add(Row(f"{tag}: QEMU boot (ready + boot), {label} / local boot just before",
                       "ratio, paired", median(samples[key]), "x", target=target,
                       runs=samples[key]))
    for key, label in (("recall", "recall: chunks the boot read that the profile names"),
                       ("precision", "precision: profile chunks the boot read")):
        report.add(Row(f"{tag}: profile after a cold QEMU boot, {label}", "%",
                       100 * median(samples[key]), "%", target=">= 90 % (issue 17)",
                       runs=[100 * v for v in samples[key]]))
    for key, label in (("committed_boot", "with a QEMU boot"),
                       ("committed_replay", "with the replay")):
        report.add(Row(f"{tag}: restore start to committed, {label}", "seconds",
                       median(samples[key]), "s", runs=samples[key]))


def main() -> Any:
    args = [int(a) for a in sys.argv[1:]]
    return run(runs=args[0] if args else 3, sizes=tuple(args[1:]) or (2,))


if __name__ == "__main__":
    from bench.common import write_reports

    print(write_reports([main()]))
