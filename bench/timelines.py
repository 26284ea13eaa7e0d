"""Pictures of one boot and one relocation, S3 behind one shared 20 ms / 100 MB/s link.

Boot: the bytes the guest has read over time, from QEMU's block statistics
(QMP ``query-blockstats``, every 50 ms), for the local image (the reference),
Ceph's import-only migration from the raw image in S3, and rbd-restore's
instant restore from a fetcher with an empty cache, cold and with the boot
profile the cold restore saved. Time starts when the restore command starts
(for the local image: when QEMU starts), so a restore's preparation counts.
No relocation runs during these boots, as in the boot benchmark.

Relocation: the share of the data copied over time, for rbd-restore's
relocation and Ceph's import of the same 1 GiB of incompressible data, both
from librbd's progress callback (the position among the image's objects),
turned into the share of the data with the backup's allocation marks.

Writes the report (JSON, Markdown) and ``docs/bench-boot-reads.png`` and
``docs/bench-relocation.png``; ``python -m bench.timelines --plot FILE``
redraws the pictures from a report.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.backup_restore import CHUNK, WORKERS, _delete_prefix, _extent, _pool_bytes
from bench.boot import RTT_MS, _proxy, _rr
from bench.common import (
    REPO_ROOT,
    RESULTS,
    Report,
    Row,
    bench_cluster,
    cli,
    drop_caches,
    machine,
    open_volumes,
)
from bench.fetcher import Fetcher
from rbd_restore import config as config_mod
from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from rbd_restore.jobs.store import JobRecord
from rbd_restore.repo.repository import Repository
from rbd_restore.repo.store import ObjectStore, make_client
from tests.support.vm import Vm, build_guest

MiB = 1 << 20
DOCS = REPO_ROOT / "docs"
SAMPLE_SECONDS = 0.05
Series = list[tuple[float, float]]  # (seconds, value)

BOOT_KINDS = {"local": "local RBD image", "ceph": "Ceph import-only migration (raw, s3)",
              "cold": "rbd-restore instant, cold", "profile": "rbd-restore instant, with profile"}


class BlockReads:
    """Samples the guest's read bytes from QEMU's QMP socket on a thread of its own."""

    def __init__(self, path: Path, started: float) -> None:
        self.path, self.started = path, started
        self.series: Series = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 30
        while not self.path.exists():
            if time.monotonic() > deadline or self.done.is_set():
                return
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as sock, contextlib.suppress(OSError):
            # OSError: QEMU exited (powered off) between two samples
            sock.connect(str(self.path))
            replies = sock.makefile("r")
            replies.readline()  # the greeting
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            replies.readline()
            while not self.done.is_set():
                sock.sendall(b'{"execute": "query-blockstats"}\n')
                while True:
                    line = replies.readline()
                    if not line:
                        return  # QEMU exited
                    reply = json.loads(line)
                    if "return" in reply:
                        break  # events (the guest's shutdown) are skipped
                read = sum(device["stats"]["rd_bytes"] for device in reply["return"])
                self.series.append((time.monotonic() - self.started, read))
                self.done.wait(SAMPLE_SECONDS)

    def __enter__(self) -> BlockReads:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join(10)


def boot_timeline(guest: Path, cluster: devcluster.ClusterInfo, image: str, work: Path,
                  marker: str, started: float) -> tuple[Series, float]:
    """Boot the guest on ``image``: its read bytes over time since ``started``, and when
    its marker line appeared."""
    qmp = work / f"{image}.qmp"
    vm = Vm(guest, f"rbd:volumes/{image}:conf={cluster.ceph_conf}", work / f"{image}.console",
            qmp=qmp)
    with BlockReads(qmp, started) as reads:
        vm.start()
        try:
            marker_at = time.monotonic() + vm.wait_for(marker, timeout=300) - started
            marker_at = min(marker_at, time.monotonic() - started)
            vm.wait_exit()
        finally:
            vm.stop()
    return reads.series, marker_at


def relocation_timeline(ioctx: Any, image: str, marks: tuple[float, ...]) -> Series:
    """``migration_execute`` + commit of ``image``: the share of the data copied over
    time (librbd's position through the allocation marks)."""
    import rbd

    record = JobRecord(id="-", backup_id="-", pool="-", image="-", session_id="",
                       allocation_marks=marks)
    series: Series = [(0.0, 0.0)]
    started = time.monotonic()

    def progress(offset: int, total: int) -> int:
        series.append((time.monotonic() - started,
                       record.data_progress(offset / total if total else 1.0)))
        return 0

    rbd.RBD().migration_execute(ioctx, image, on_progress=progress)
    rbd.RBD().migration_commit(ioctx, image)
    series.append((time.monotonic() - started, 1.0))
    return series


def run(cluster: devcluster.ClusterInfo | None = None, data_mib: int = 1024) -> Report:
    import rbd

    cluster = cluster or bench_cluster()
    cfg = config_mod.load(str(cluster.config))
    guest, info = build_guest()
    proxy, wan_endpoint = _proxy(cluster, "link")
    wan = {"RBD_RESTORE_S3_ENDPOINT": wan_endpoint}
    prefix = f"bench-timelines-{uuid.uuid4().hex[:6]}/"
    env = {"RBD_RESTORE_S3_PREFIX": prefix, **wan}
    s3 = make_client(cfg.s3)
    handle, ioctx = open_volumes(cluster)
    work = Path(cluster.dir) / f"timelines-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    tag = uuid.uuid4().hex[:6]
    boot_src, data_src = f"tl-boot-{tag}", f"tl-data-{tag}"
    boots: dict[str, Series] = {}
    markers: dict[str, float] = {}
    relocations: dict[str, Series] = {}

    def raw_spec(image: str) -> str:
        key = f"{prefix}raw/{image}.raw"
        raw = work / f"{image}.raw"
        rbd_cli = ["rbd", "-c", str(cluster.ceph_conf)]
        subprocess.run([*rbd_cli, "export", "--no-progress", f"volumes/{image}", str(raw)],
                       check=True)
        s3.upload_file(str(raw), cluster.bucket, key)
        raw.unlink()
        return json.dumps({"type": "raw", "stream": {
            "type": "s3", "url": f"{wan_endpoint}/{cluster.bucket}/{key}",
            "access_key": cluster.s3_access_key, "secret_key": cluster.s3_secret_key}})

    def instant(backup_id: str, cache: str, action: Callable[[str, float], Any]) -> Any:
        fetcher = Fetcher(cluster, prefix, work / cache, extra_env=wan)
        target = f"tl-{cache}-{tag}"
        fenv = {**env, **fetcher.env_overrides}
        try:
            started = time.monotonic()
            job = cli(cluster, "restore", backup_id, f"volumes/{target}", "--mode", "instant",
                      env=fenv)
            result = action(target, started)
            if lazy_state(ioctx, target):
                _rr(cluster, fenv, "abort", job["job_id"])  # closes the session: a profile
            else:
                _rr(cluster, fenv, "jobs", "run", job["job_id"], "--once")  # closes it
            return result
        finally:
            fetcher.stop()
            remove_image(ioctx, target)

    try:
        subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "import", "--no-progress",
                        str(guest / "root.img"), f"volumes/{boot_src}"], check=True)
        boot_backup = cli(cluster, "backup", f"volumes/{boot_src}", env=env)["backup_id"]
        boot_raw = raw_spec(boot_src)

        def boot(target: str, started: float) -> tuple[Series, float]:
            return boot_timeline(guest, cluster, target, work, info["marker"], started)

        boots["local"], markers["local"] = boot(boot_src, time.monotonic())
        target = f"tl-ceph-{tag}"
        started = time.monotonic()
        rbd.RBD().migration_prepare_import(boot_raw, ioctx, target)
        boots["ceph"], markers["ceph"] = boot(target, started)
        rbd.RBD().migration_abort(ioctx, target)
        _rr(cluster, env, "profile", "clear", f"volumes/{boot_src}", check=False)
        boots["cold"], markers["cold"] = instant(boot_backup, "cold", boot)
        boots["profile"], markers["profile"] = instant(boot_backup, "profile", boot)

        pool = _pool_bytes()
        count = data_mib * MiB // CHUNK
        rbd.RBD().create(ioctx, data_src, count * CHUNK, old_format=False)
        with rbd.Image(ioctx, data_src) as image, ThreadPoolExecutor(WORKERS) as ex:
            list(ex.map(lambda i: image.write(_extent(pool, i), i * CHUNK), range(count)))
        data_backup = cli(cluster, "backup", f"volumes/{data_src}", env=env)["backup_id"]
        data_raw = raw_spec(data_src)
        repo = Repository(ObjectStore(cfg.s3), prefix)
        marks = tuple(repo.load_manifest(data_backup).allocation_marks())

        def relocate(target: str, _started: float) -> Series:
            return relocation_timeline(ioctx, target, marks)

        relocations["ours"] = instant(data_backup, "reloc", relocate)
        target = f"tl-ceph-reloc-{tag}"
        rbd.RBD().migration_prepare_import(data_raw, ioctx, target)
        relocations["ceph"] = relocation_timeline(ioctx, target, marks)
        remove_image(ioctx, target)
    finally:
        drop_caches(work)
        for image in (boot_src, data_src):
            remove_image(ioctx, image)
        _delete_prefix(s3, cluster.bucket, prefix)
        ioctx.close()
        handle.shutdown()
        proxy.kill()
        proxy.wait()

    report = Report(f"Timelines of one boot and one relocation, S3 behind {RTT_MS:.0f} ms "
                    "and one shared 100 MB/s link (one run each: pictures, not medians)")
    for kind in ("ceph", "cold", "profile"):
        report.add(Row(f"boot: {BOOT_KINDS[kind]}", "marker seen", markers[kind], "s",
                       "local RBD image", markers["local"]))
    for kind, label in (("ours", "rbd-restore"), ("ceph", "Ceph import-only migration")):
        report.add(Row(f"relocation of {data_mib} MiB: {label}", "all data copied",
                       relocations[kind][-1][0], "s"))
    report.notes.append("Series: " + json.dumps({"boots": boots, "markers": markers,
                                                 "relocations": relocations}))
    draw(boots, markers, relocations, data_mib)
    return report


def draw(boots: dict[str, Series], markers: dict[str, float],
         relocations: dict[str, Series], data_mib: int, out: Path = DOCS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"local": "black", "ceph": "tab:red", "cold": "tab:blue", "profile": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for kind, series in boots.items():
        if series:
            ax.plot([t for t, _ in series], [b / MiB for _, b in series], label=BOOT_KINDS[kind],
                    color=colours[kind])
            ax.axvline(markers[kind], color=colours[kind], linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since the restore started (local: since QEMU started)")
    ax.set_ylabel("MiB read by the guest")
    ax.set_title("One boot of the test guest; dotted: the guest's boot marker")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "bench-boot-reads.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for kind, label, colour in (("ours", "rbd-restore relocation", "tab:blue"),
                                ("ceph", "Ceph import-only migration", "tab:red")):
        series = relocations[kind]
        ax.plot([t for t, _ in series], [p * 100 for _, p in series], label=label,
                color=colour)
    ax.set_xlabel("seconds since migration_execute started")
    ax.set_ylabel("% of the data copied into the pool")
    ax.set_title(f"Relocation of {data_mib} MiB of incompressible data over one "
                 "100 MB/s link")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "bench-relocation.png")
    plt.close(fig)


def lazy_state(ioctx: Any, image: str) -> bool:
    from rbd_restore import lazy_clone

    return lazy_clone.state(ioctx, image) is not None


def main() -> Any:
    if sys.argv[1:2] == ["--plot"]:
        saved = json.loads(Path(sys.argv[2]).read_text())
        for report in saved["reports"]:
            for note in report["notes"]:
                if note.startswith("Series: "):
                    series = json.loads(note.removeprefix("Series: "))
                    draw(series["boots"], series["markers"], series["relocations"], 1024)
                    return 0
        sys.exit("no timelines in that report")
    # Alone, this writes its own report: bench/results/latest.md stays the full run's.
    report = run()
    path = RESULTS / f"timelines-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps({"machine": machine(), "reports": [report.as_json()]},
                               indent=2) + "\n")
    print(report.markdown())
    print(f"report: {path}; pictures in {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
