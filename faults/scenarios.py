"""The soak's scenarios: each does real work under injected faults and checks the bytes.

- ``backups``: a volume changed (and sometimes resized) between rounds is backed
  up, deep-verified and restored in full, all through the faulty S3, with gc
  racing the backup; the restore is compared with the backup's snapshot.
- ``instant``: an instant restore relocated by a job runner while one daemon
  fault strikes mid-relocation (fetcher, runner, RGW or OSD killed and
  restarted, or a second runner on the same job); the committed image is
  compared with the backup's snapshot.
- ``guest``: a QEMU guest boots on an instant restore while the fetcher is
  killed and restarted, writes files during the relocation and the commit, and
  every file is read back by the guest and found in the image afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from typing import Any

from faults.site import MiB, Site
from rbd_restore.ceph import remove_image
from tests.support.e2e import guest_files
from tests.support.vm import Vm, build_guest

VOLUME_BYTES = 96 * MiB


def _digest(site: Site, spec: str) -> str:
    proc = subprocess.Popen(["rbd", "-c", str(site.cluster.ceph_conf), "export", spec, "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    digest = hashlib.sha256()
    assert proc.stdout is not None
    for block in iter(lambda: proc.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
        digest.update(block)
    if proc.wait() != 0:
        raise RuntimeError(f"rbd export {spec} failed")
    return digest.hexdigest()


def _remove(site: Site, name: str) -> None:
    import rados
    import rbd

    with rados.Rados(conffile=str(site.cluster.ceph_conf)) as handle, \
            handle.open_ioctx("volumes") as ioctx:
        deadline = time.monotonic() + 90  # a killed client's watch lingers 30 s
        while True:
            try:
                with contextlib.suppress(rbd.InvalidArgument, rbd.ImageNotFound):
                    rbd.RBD().migration_abort(ioctx, name)
                remove_image(ioctx, name)
                return
            except rbd.ImageBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


def _change(site: Site, name: str, round_no: int) -> None:
    """New data in a few places; now and then the volume grows or shrinks."""
    import rados
    import rbd

    with rados.Rados(conffile=str(site.cluster.ceph_conf)) as handle, \
            handle.open_ioctx("volumes") as ioctx:
        if round_no == 0:
            rbd.RBD().create(ioctx, name, VOLUME_BYTES, old_format=False)
        with rbd.Image(ioctx, name) as image:
            if round_no and site.rng.random() < 0.3:
                grown = image.size() + site.rng.choice((-1, 1)) * site.rng.randrange(1, 9) * MiB
                image.resize(max(32 * MiB, grown), allow_shrink=True)
                site.tally.fault("volume resized between backups")
            size = image.size()
            for _ in range(6 if round_no else 20):
                length = site.rng.randrange(4096, 3 * MiB)
                offset = site.rng.randrange(0, size - length)
                image.write(os.urandom(length), offset)


def backups(site: Site, volume: str, round_no: int) -> tuple[str, str]:
    """One round; returns the backup id and the digest of what it holds."""
    site.tally.scenarios["backups"] += 1
    _change(site, volume, round_no)
    before = site.proxy.injected.copy()
    racing = None
    if site.rng.random() < 0.5:  # gc runs while the backup does: one of them gives way
        racing = subprocess.Popen(site.cli.command("gc", "--grace", "0"), env=site.cli.env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        site.tally.fault("gc racing a backup")
    backup = site.json("backup", f"volumes/{volume}", "--workers", "4")
    if racing is not None:
        _, err = racing.communicate(timeout=300)
        site.tally.check("gc racing a backup: ran or stood aside", racing.returncode == 0
                         or "is running" in err, err[-300:])
    backup_id = backup["backup_id"]
    want = _digest(site, f"volumes/{volume}@rbd-restore.{backup_id}")
    site.run("backups", "verify", backup_id, "--deep")
    target = f"{volume}-full-{round_no}"
    site.json("restore", backup_id, f"volumes/{target}", "--workers", "4")
    got = _digest(site, f"volumes/{target}")
    site.tally.check("full restores bit-exact", got == want, f"{backup_id}: {got} != {want}")
    _remove(site, target)
    listed = site.clean_cli.json("backups", "list")
    site.tally.check("manifests readable", not listed["unreadable"], str(listed["unreadable"]))
    site.tally.checks["manifests checked"] += len(listed["backups"])
    site.proxy_faults(before)
    return backup_id, want


DAEMON_FAULTS = ("fetcher", "runner", "rgw", "osd", "second runner")


def _runner(site: Site, job_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(site.cli.command("jobs", "run", job_id, "--once"),
                            env=site.cli.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _job(site: Site, job_id: str) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = site.clean_cli.json("status", job_id)["jobs"]
    return jobs[0]


def instant(site: Site, backup_id: str, want: str, round_no: int) -> None:
    site.tally.scenarios["instant"] += 1
    before = site.proxy.injected.copy()
    target = f"soak-instant-{round_no}"
    job_id = site.json("restore", backup_id, f"volumes/{target}", "--mode", "instant",
                       "--rate-limit", "16")["job_id"]
    runners = [_runner(site, job_id)]
    fault = DAEMON_FAULTS[round_no % len(DAEMON_FAULTS)]
    deadline = time.monotonic() + 60
    while _job(site, job_id)["state"] == "staged" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(site.rng.uniform(0.5, 2.5))  # somewhere in the middle of the relocation
    if fault == "fetcher":
        site.fetcher.kill()
        time.sleep(1)
        site.fetcher.start()
        site.tally.fault("fetcher SIGKILLed and restarted mid-relocation")
    elif fault == "runner":
        runners[0].send_signal(signal.SIGKILL)
        runners[0].wait()
        runners.append(_runner(site, job_id))
        site.tally.fault("runner SIGKILLed mid-relocation")
    elif fault == "second runner":
        runners.append(_runner(site, job_id))
        site.tally.fault("second runner on the same job")
    else:
        site.restart(fault)
    deadline = time.monotonic() + 300
    while (state := _job(site, job_id)["state"]) not in ("committed", "failed", "aborted"):
        if time.monotonic() > deadline or all(r.poll() is not None for r in runners):
            break
        time.sleep(0.5)
    for runner in runners:
        with contextlib.suppress(subprocess.TimeoutExpired):
            runner.wait(timeout=60)
        if runner.poll() is None:
            runner.kill()
    site.tally.check("instant restores committed (no stuck job)", state == "committed",
                     f"{job_id} after {fault}: {state}")
    if state == "committed":
        got = _digest(site, f"volumes/{target}")
        site.tally.check("instant restores bit-exact", got == want, f"{job_id} after {fault}")
    _remove(site, target)
    site.proxy_faults(before)


def guest(site: Site) -> None:
    """A real boot with a fetcher crash in it and writes during relocation and commit."""
    site.tally.scenarios["guest"] += 1
    before = site.proxy.injected.copy()
    guest_dir, info = build_guest()
    source = "soak-guest-src"
    subprocess.run(["rbd", "-c", str(site.cluster.ceph_conf), "import", "--no-progress",
                    str(guest_dir / "root.img"), f"volumes/{source}"], check=True)
    backup_id = site.json("backup", f"volumes/{source}")["backup_id"]
    _remove(site, source)
    target = "soak-guest"
    job_id = site.json("restore", backup_id, f"volumes/{target}", "--mode", "instant",
                       "--rate-limit", "4")["job_id"]
    vm = Vm(guest_dir, f"rbd:volumes/{target}:conf={site.cluster.ceph_conf}",
            site.work / "guest.console", writes=24, write_every=1)
    vm.start()
    runner = None
    try:
        vm.wait_for("RBD-RESTORE-GUEST-SUM", timeout=300)
        site.fetcher.kill()
        time.sleep(1)
        site.fetcher.start()
        site.tally.fault("fetcher SIGKILLed and restarted during a guest boot")
        vm.wait_for(info["marker"], timeout=600)
        site.tally.check("guest read its data set bit-exact", vm.sums() == info["sums"],
                         str(vm.sums()))
        vm.wait_for("RBD-RESTORE-GUEST-WRITE-SUM", timeout=120)
        runner = _runner(site, job_id)
        deadline = time.monotonic() + 600
        while _job(site, job_id)["state"] != "committed" and time.monotonic() < deadline:
            time.sleep(0.5)
        vm.wait_for("RBD-RESTORE-GUEST-WRITES-DONE", timeout=600)
        vm.wait_exit()
    finally:
        vm.stop()
        if runner is not None and runner.poll() is None:
            runner.kill()
    site.tally.check("instant restores committed (no stuck job)",
                     _job(site, job_id)["state"] == "committed", job_id)
    written = vm.sums("WRITE-SUM")
    readback = vm.sums("READBACK-SUM")
    found = guest_files(site.cluster, target, site.work, sorted(written))
    lost = [p for p in written if readback.get(p) != written[p] or found.get(p) != written[p]]
    site.tally.checks["guest writes checked"] += len(written)
    site.tally.checks["guest writes lost"] += len(lost)
    site.tally.check("guest writes all present", not lost and len(written) == 24, str(lost))
    site.tally.check("guest saw no I/O error", "I/O error" not in vm.output(),
                     vm.output()[-500:])
    _remove(site, target)
    site.proxy_faults(before)

