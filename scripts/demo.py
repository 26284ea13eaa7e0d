#!/usr/bin/env python3
"""`make demo`: why instant restore exists, on the embedded cluster.

A 20 GiB volume holding a booting guest and a few GiB of application data is
backed up to S3 and deleted. S3 sits behind the WAN model the benchmarks use
(20 ms round trip, one 100 MB/s link that every transfer shares), so restores
take the time they would from a bucket in another site. The same backup is
then restored twice: a full restore (copy everything, then boot) and an
instant restore (boot at once, data on demand, relocation in the background,
then commit), and the two are printed side by side. The cluster keeps running
afterwards for the user to play with; `make demo-down` stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbd_restore.devcluster.layout import Layout

REPO = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("DEMO_DIR", REPO / ".demo")).resolve()
BIN = REPO / ".venv" / "bin"
RR = str(BIN / "rbd-restore")
DISK_BYTES = 20 << 30
BULK_BYTES = int(float(os.environ.get("DEMO_DATA_GIB", "3")) * (1 << 30))
RTT_MS, LINK_BYTES_PER_S = 20.0, 100e6
OSD_SIZE = f"{max(16, int(BULK_BYTES * 4 * 1.5) >> 30) + 4}G"
GUEST = REPO / ".cache" / f"guest-demo-{DISK_BYTES >> 30}g-{BULK_BYTES >> 20}m"
MARKER = "RBD-RESTORE-GUEST-BOOTED"


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def run(*args: str, env: dict[str, str] | None = None, quiet: bool = False) -> str:
    result = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"demo: `{' '.join(args[:4])} ...` failed:\n{result.stderr.strip()}")
    if not quiet and result.stdout.strip():
        for line in result.stdout.strip().splitlines():
            say(line)
    return result.stdout


@dataclass
class Demo:
    env: dict[str, str] = field(default_factory=dict)
    conf: str = ""
    prefix: str = ""
    children: list[subprocess.Popen[Any]] = field(default_factory=list)

    def rr(self, *args: str, quiet: bool = False) -> str:
        return run(RR, *args, env=self.env, quiet=quiet)

    def rr_json(self, *args: str) -> Any:
        return json.loads(self.rr(*args, "--json", quiet=True))

    def rbd(self, *args: str, quiet: bool = False) -> str:
        return run("rbd", "-c", self.conf, *args, quiet=quiet)

    def start(self, args: list[str], log: Path, ready: str | None = None) -> None:
        with open(log, "w") as out:
            child = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     text=True)
        self.children.append(child)
        deadline = time.monotonic() + 60
        while ready and ready not in log.read_text():
            if child.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"demo: {args[1]} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop_children(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()

    def boot(self, image: str) -> float:
        """Boot the guest from volumes/IMAGE; seconds until its marker line, after it
        checked every file it reads at boot."""
        console = DEMO / f"{image}.console"
        console.unlink(missing_ok=True)
        started = time.monotonic()
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-display", "none",
             "-no-reboot", "-monitor", "none", "-serial", f"file:{console}",
             "-kernel", str(GUEST / "vmlinuz"), "-initrd", str(GUEST / "initrd.img"),
             "-append", "console=ttyS0 quiet panic=-1 no_timer_check",  # as tests/support/vm.py
             "-drive", f"file=rbd:volumes/{image}:conf={self.conf},format=raw,if=virtio,"
                       "cache=writeback"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        booted = None
        while booted is None:
            text = console.read_text(errors="replace") if console.exists() else ""
            if MARKER in text:
                booted = time.monotonic() - started
            elif qemu.poll() is not None or time.monotonic() - started > 300:
                qemu.kill()
                errors = qemu.stderr.read() if qemu.stderr else ""
                sys.exit(f"demo: the VM did not boot:\n{text[-1500:]}{errors}")
            else:
                time.sleep(0.05)
        qemu.wait(timeout=120)
        want = json.loads((GUEST / "guest.json").read_text())["sums"]
        got = {line.split()[2]: line.split()[1]
               for line in console.read_text(errors="replace").splitlines()
               if line.startswith("RBD-RESTORE-GUEST-SUM ")}
        if got != want:
            sys.exit(f"demo: the guest read different data than was backed up ({image})")
        say(f"booted in {booted:.1f} s: the guest read and checked its {len(got)} boot files, "
            "wrote a file and powered off")
        return booted


def cluster(demo: Demo) -> None:
    root = DEMO / "cluster"
    state = Layout(root).read_state()
    if state is not None and state.objectstore != "bluestore":
        say(f"{root} holds an older demo cluster (memstore): replacing it")
        run(RR, "dev", "down", "--dir", str(root), "--purge")
    started = time.monotonic()
    # A run holds four copies of the data (volume, backup, two restores) at most; the
    # previous run's are freed first. The sparse file grows to what was written.
    run(RR, "dev", "up", "--dir", str(root), "--objectstore", "bluestore", "--osd-size",
        OSD_SIZE, quiet=True)
    say(f"mon, mgr, a bluestore OSD (sparse file) and RGW on 127.0.0.1 "
        f"({time.monotonic() - started:.0f} s)")
    demo.conf = str(root / "ceph.conf")
    # A prefix per run: every run's backup is a first, full one, not deduplicated
    # against the previous run's chunks.
    demo.prefix = f"demo-{time.strftime('%Y%m%dT%H%M%S')}/"
    demo.env = {**os.environ, "RBD_RESTORE_CONFIG": str(root / "rbd-restore.toml"),
                "RBD_RESTORE_S3_PREFIX": demo.prefix}


def wan(demo: Demo) -> None:
    info = json.loads(run(RR, "dev", "up", "--dir", str(DEMO / "cluster"), "--json",
                          quiet=True))
    parts = urllib.parse.urlsplit(info["s3_endpoint"])
    proxy = subprocess.Popen([str(BIN / "python"), "-m", "bench.wanproxy", str(parts.hostname),
                              str(parts.port), str(RTT_MS), str(LINK_BYTES_PER_S), "link"],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    demo.children.append(proxy)
    assert proxy.stdout is not None
    port = proxy.stdout.readline().strip()
    demo.env["RBD_RESTORE_S3_ENDPOINT"] = f"http://127.0.0.1:{port}"
    say(f"every S3 request of this demo crosses it: {RTT_MS:.0f} ms round trip, one "
        f"{LINK_BYTES_PER_S / 1e6:.0f} MB/s link shared by all transfers")


def clean_previous_run(demo: Demo) -> None:
    """A demo run leaves its images and backups for the user; the next run removes them
    (and its repository prefix), so the cluster's disk does not fill run after run."""
    last = DEMO / "last-run.json"
    if not last.exists():
        return
    previous = json.loads(last.read_text())
    for image in previous.get("images", []):
        for command in (["snap", "purge"], ["rm", "--no-progress"]):
            subprocess.run(["rbd", "-c", demo.conf, *command, f"volumes/{image}"],
                           capture_output=True, check=False)
    if previous.get("prefix", "").startswith("demo-"):
        from rbd_restore import config as config_mod
        from rbd_restore.repo.store import make_client

        settings = config_mod.load(demo.env["RBD_RESTORE_CONFIG"]).s3
        s3 = make_client(settings)
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket,
                                                             Prefix=previous["prefix"])
        for page in pages:
            if page.get("Contents"):
                s3.delete_objects(Bucket=settings.bucket, Delete={
                    "Objects": [{"Key": o["Key"]} for o in page["Contents"]]})
        # RGW frees deleted objects' data two hours later by default: now, so that the
        # OSD reuses the space instead of growing its file.
        subprocess.run(["radosgw-admin", "-c", demo.conf, "gc", "process", "--include-all"],
                       capture_output=True, check=False)
    last.unlink()


def main() -> int:
    DEMO.mkdir(parents=True, exist_ok=True)
    demo = Demo()
    try:
        return story(demo)
    finally:
        demo.stop_children()


def story(demo: Demo) -> int:
    step(f"Embedded Ceph cluster in {DEMO / 'cluster'}")
    cluster(demo)
    clean_previous_run(demo)

    step("S3 in another site: the benchmarks' WAN model in front of RGW")
    wan(demo)

    step(f"A {DISK_BYTES >> 30} GiB volume: a guest that boots from it, and "
         f"{BULK_BYTES / (1 << 30):.1f} GiB of application data its boot does not read")
    started = time.monotonic()
    run(str(BIN / "python"), str(REPO / "scripts" / "build-guest.py"), "--out", str(GUEST),
        "--disk-size", str(DISK_BYTES), "--bulk", str(BULK_BYTES), quiet=True)
    image = f"vm-{time.strftime('%H%M%S')}"
    (DEMO / "last-run.json").write_text(json.dumps(
        {"images": [image, f"{image}-full"], "prefix": demo.prefix}))
    demo.rbd("import", "--no-progress", str(GUEST / "root.img"), f"volumes/{image}",
             quiet=True)
    used = json.loads(demo.rbd("du", "--format", "json", f"volumes/{image}", quiet=True))
    say(f"volumes/{image}: {DISK_BYTES >> 30} GiB, "
        f"{used['images'][0]['used_size'] / (1 << 30):.1f} GiB used "
        f"({time.monotonic() - started:.0f} s to build and import)")

    step("Back it up to S3: snapshot, allocated extents, deduplicated zstd chunks, "
         "encrypted (AES-256-GCM)")
    repository = demo.rr_json("init")
    say(f"repository {repository['repository']}: {repository['encryption']}, "
        f"key {repository['key_id']} (wrapped by the key file in the demo's config)")
    started = time.monotonic()
    backup = demo.rr_json("backup", f"volumes/{image}")
    seconds = time.monotonic() - started
    backup_id = backup["backup_id"]
    say(f"backup {backup_id} in {seconds:.1f} s over the link")

    step("Disaster: the volume is deleted")
    demo.rbd("snap", "purge", f"volumes/{image}", quiet=True)
    demo.rbd("rm", "--no-progress", f"volumes/{image}", quiet=True)
    say(f"volumes/{image} is gone; only the backup in S3 is left")

    step("The fetcher (serves backups to librbd) and the job runner (relocates, commits)")
    cache = DEMO / "fetcher-cache"
    shutil.rmtree(cache, ignore_errors=True)
    demo.start([RR, "fetcher", "serve", "--cache-dir", str(cache), "--log-level", "warning"],
               DEMO / "fetcher.log", ready="fetcher ready")
    demo.start([RR, "jobs", "run", "--log-level", "warning"], DEMO / "runner.log",
               ready="job runner ready")
    say("both running, the fetcher with an empty cache")

    step("Full restore: copy every byte from S3, then boot")
    started = time.monotonic()
    demo.rr("restore", backup_id, f"volumes/{image}-full", "--mode", "full", quiet=True)
    full_copy = time.monotonic() - started
    say(f"copied in {full_copy:.1f} s; now the VM can start")
    full_boot = demo.boot(f"{image}-full")
    full_total = full_copy + full_boot

    step("Instant restore: boot at once, data on demand, relocation in the background")
    started = time.monotonic()
    job = demo.rr_json("restore", backup_id, f"volumes/{image}", "--mode", "instant")
    ready = time.monotonic() - started
    say(f"ready to boot after {ready:.1f} s (job {job['job_id']})")
    instant_boot = demo.boot(image)
    booted = ready + instant_boot
    last_print = 0.0
    while True:
        status = demo.rr_json("status", job["job_id"])["jobs"][0]
        if status["state"] in ("committed", "failed", "aborted"):
            break
        if time.monotonic() - last_print > 5:
            say(f"relocating: {status['percent']:5.1f} % at "
                f"{status['rate_bytes_per_s'] / 1e6:.0f} MB/s (rbd-restore status --watch "
                "shows this live)")
            last_print = time.monotonic()
        time.sleep(0.5)
    if status["state"] != "committed":
        sys.exit(f"demo: the instant restore ended {status['state']}: {status.get('error')}")
    committed = time.monotonic() - started
    say(f"relocated and committed after {committed:.1f} s: volumes/{image} is an ordinary "
        "RBD image")

    step("Side by side")
    rows = [("ready to boot", full_copy, ready),
            ("VM booted", full_total, booted),
            ("all data in the pool (committed)", full_copy, committed)]
    say(f"{'':34}{'full restore':>14}{'instant restore':>18}")
    for label, full, instant in rows:
        say(f"{label:34}{full:>12.1f} s{instant:>16.1f} s")
    say("")
    say(f"the VM was running {full_total / booted:.1f}x sooner with instant restore "
        f"({booted:.1f} s instead of {full_total:.1f} s); ready {full_copy / ready:.0f}x sooner")
    say(f"instant restore booted before the full restore had finished copying: "
        f"{'yes' if booted < full_copy else 'no'}")
    say("")
    say("The cluster keeps running (S3 without the WAN proxy now). To use this backup:")
    say(f"   export RBD_RESTORE_CONFIG={demo.env['RBD_RESTORE_CONFIG']} "
        f"RBD_RESTORE_S3_PREFIX={demo.prefix}")
    say("   .venv/bin/rbd-restore backups list")
    say("Stop it: make demo-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
