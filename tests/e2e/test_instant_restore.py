"""Instant restore of a booting guest: real cluster, RGW, fetcher, job runner and QEMU."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.e2e import job, objects_differing, runner, vm_on, wait_job
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, du_used, export_digest

MiB = 1 << 20
OBJECT = 4 * MiB


def watchers(cluster: devcluster.ClusterInfo, image: str) -> int:
    """Clients with the image open (the runner's librbd, QEMU's)."""
    shown = subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "status", "--format", "json",
                            f"volumes/{image}"], capture_output=True, text=True, check=True)
    return len(json.loads(shown.stdout).get("watchers", []))


def assert_no_secrets(cluster: devcluster.ClusterInfo, site: dict[str, Any], image: str,
                      *texts: str) -> None:
    fetcher: FetcherProcess = site["fetcher"]
    secrets = [cluster.s3_secret_key, cluster.s3_access_key, fetcher.settings.secret,
               fetcher.settings.control_token]
    status = subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "status", f"volumes/{image}"],
                            capture_output=True, text=True, check=False).stdout
    meta = subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "image-meta", "list",
                           f"volumes/{image}"], capture_output=True, text=True,
                          check=False).stdout
    metrics = urllib.request.urlopen(f"http://{fetcher.settings.metrics_listen}/metrics",
                                     timeout=30).read().decode()
    runner_logs = [p.read_text(errors="replace") for p in site["work"].glob("runner-*.log")]
    for text in (status, meta, fetcher.logs(), metrics, *runner_logs, *texts):
        for secret in secrets:
            assert secret not in text


def command_lines(*pids: int) -> list[str]:
    """What `ps` shows every user of these processes."""
    return [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            for pid in pids]


def test_vm_boots_on_staged_image_then_relocation_and_commit(
        cluster: devcluster.ClusterInfo, site: dict[str, Any], target: str) -> None:
    cli: Cli = site["cli"]
    started = cli.json("restore", site["backup"]["backup_id"], f"volumes/{target}",
                       "--mode", "instant")
    assert started["image"] == f"volumes/{target}" and started["ready_seconds"] < 30
    assert job(site, started["job_id"])["state"] == "staged"
    status_while_staged = subprocess.run(
        ["rbd", "-c", str(cluster.ceph_conf), "status", f"volumes/{target}"],
        capture_output=True, text=True, check=True).stdout
    assert "disk.qcow2" in status_while_staged  # the session URL, and only that

    vm = vm_on(site, cluster, target, hold=30)
    vm.start()
    try:
        vm.wait_for(site["info"]["marker"])
        assert vm.sums() == site["info"]["sums"]
        vm.wait_for("RBD-RESTORE-GUEST-WROTE")
        # The VM holds the exclusive lock: librbd forwards the relocation to QEMU.
        run = runner(site, "--once")
        assert vm.proc is not None and site["fetcher"].proc is not None
        argv = command_lines(vm.proc.pid, run.pid, site["fetcher"].proc.pid)
        assert run.wait(timeout=180) == 0
        final = job(site, started["job_id"])
        assert final["state"] == "committed" and final["percent"] == 100.0
        assert vm.proc is not None and vm.proc.poll() is None  # still running
    finally:
        vm.stop()
    differing = objects_differing(cluster, target, site["guest"] / "root.img")
    assert 1 <= differing <= 8
    allocated = cli.json("backups", "show", site["backup"]["backup_id"])["allocated_bytes"]
    assert du_used(cluster, f"volumes/{target}") <= allocated + differing * OBJECT
    assert_no_secrets(cluster, site, target, status_while_staged, *argv,
                      cli.run("status", "--json").stdout)
    listed = {s["session_id"] for s in cli.json("fetcher", "session", "list")["sessions"]}
    assert final["session_id"] not in listed  # closed at commit


def test_relocation_first_vm_midway_and_runner_killed(
        cluster: devcluster.ClusterInfo, site: dict[str, Any], target: str) -> None:
    cli: Cli = site["cli"]
    # No boot set: with the profile earlier tests recorded it copies 17 of the disk's 18
    # objects before the restore is ready, and the relocation was over before the VM
    # started (a CI run; this test needs a relocation still under way).
    started = cli.json("restore", site["backup"]["backup_id"], f"volumes/{target}",
                       "--mode", "instant", "--rate-limit", "1.5",
                       env={"RBD_RESTORE_FETCHER_BOOT_SET_SECONDS": "0"})
    assert job(site, started["job_id"])["boot_set_objects"] == 0
    first = runner(site)
    vm = vm_on(site, cluster, target, hold=60)
    try:
        wait_job(site, started["job_id"], lambda j: j["state"] == "relocating"
                 and j["percent"] > 5)
        vm.start()  # the VM boots in the middle of the relocation
        # A paced relocation paces the guest too once it runs in QEMU (its reads queue
        # behind the relocation's on QEMU's one connection): the boot ends with it, so
        # the runner is killed once QEMU has the image open, not after the boot.
        wait_job(site, started["job_id"], lambda _: watchers(cluster, target) >= 2)
        assert job(site, started["job_id"])["state"] == "relocating"  # 1.5 MiB/s: ~48 s
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        line = cli.fails("abort", started["job_id"])
        assert "stop the VM first" in line  # the VM still has it open
        second = runner(site, "--once")
        assert second.wait(timeout=300) == 0
        final = job(site, started["job_id"])
        assert final["state"] == "committed"
        vm.wait_for(site["info"]["marker"])
        assert vm.sums() == site["info"]["sums"]
        assert vm.proc is not None and vm.proc.poll() is None  # the VM kept running
    finally:
        vm.stop()
        if first.poll() is None:
            first.kill()
    objects_differing(cluster, target, site["guest"] / "root.img")


def test_abort_is_refused_while_the_vm_runs_then_removes_the_image(
        cluster: devcluster.ClusterInfo, site: dict[str, Any], target: str,
        rados_cluster: Any) -> None:
    import rbd

    cli: Cli = site["cli"]
    started = cli.json("restore", site["backup"]["backup_id"], f"volumes/{target}",
                       "--mode", "instant")
    vm = vm_on(site, cluster, target, hold=10)
    vm.start()
    try:
        vm.wait_for(site["info"]["marker"])
        line = cli.fails("abort", started["job_id"])
        assert "delete the image and every write" in line
        vm.wait_exit()  # the guest powers off; QEMU closes the image and its watch
    finally:
        vm.stop()
    result = cli.run("abort", started["job_id"])
    assert result.returncode == 0, result.stderr
    with rados_cluster.open_ioctx("volumes") as ioctx:
        assert target not in rbd.RBD().list(ioctx)
    assert job(site, started["job_id"])["state"] == "aborted"


def test_bad_input_creates_nothing(cluster: devcluster.ClusterInfo, site: dict[str, Any],
                                   target: str, rados_cluster: Any) -> None:
    import rbd

    cli: Cli = site["cli"]
    backup_id = site["backup"]["backup_id"]
    assert "does not exist" in cli.fails("restore", "20200101T000000Z-00000000",
                                         f"volumes/{target}", "--mode", "instant")
    assert "unreachable" in cli.fails(
        "restore", backup_id, f"volumes/{target}", "--mode", "instant",
        env={"RBD_RESTORE_FETCHER_CONTROL_LISTEN": "127.0.0.1:9"})
    with rados_cluster.open_ioctx("volumes") as ioctx:
        assert target not in rbd.RBD().list(ioctx)
        rbd.RBD().create(ioctx, target, MiB)
    assert "already exists" in cli.fails("restore", backup_id, f"volumes/{target}",
                                         "--mode", "instant")
    jobs = cli.json("status")["jobs"]
    assert not any(j["image"] == f"volumes/{target}" for j in jobs)
    assert "does not exist" in cli.fails("jobs", "run", "r20200101T000000Z-000000", "--once")
    assert "not a job id" in cli.fails("jobs", "run", "nonsense", "--once")


def test_restore_with_history_brings_snapshots_and_next_backup_is_incremental(
        cluster: devcluster.ClusterInfo, site: dict[str, Any], target: str,
        rados_cluster: Any) -> None:
    import rbd

    cli: Cli = site["cli"]
    source = f"hist-src-{uuid.uuid4().hex[:6]}"
    digests = {}
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, source, 32 * MiB, old_format=False)
        try:
            backups = []
            for generation in range(3):
                with rbd.Image(ioctx, source) as image:
                    image.write(bytes([generation + 1]) * MiB, generation * 8 * MiB)
                backup = cli.json("backup", f"volumes/{source}")["backup_id"]
                digests[backup] = export_digest(cluster, f"volumes/{source}")
                backups.append(backup)
        finally:
            remove_image(ioctx, source)
    head = backups[-1]
    cli.json("restore", head, f"volumes/{target}", "--mode", "instant", "--with-history", "2",
             "--wait")
    with rados_cluster.open_ioctx("volumes") as ioctx, rbd.Image(ioctx, target) as image:
        names = [s["name"] for s in image.list_snaps()]
    assert names == [f"rbd-restore.{b}" for b in backups]
    for backup in backups:
        assert export_digest(cluster, f"volumes/{target}@rbd-restore.{backup}") == digests[backup]
    assert export_digest(cluster, f"volumes/{target}") == digests[head]

    again = cli.json("backup", f"volumes/{target}")
    assert again["parent"] == head and again["bytes_read"] == 0
    with rados_cluster.open_ioctx("volumes") as ioctx, rbd.Image(ioctx, target) as image:
        kept = [s["name"] for s in image.list_snaps()]
    # The restored history stays; only snapshots of this image's own backups rotate.
    assert kept[:3] == names and kept[3] == f"rbd-restore.{again['backup_id']}"


def test_fetcher_can_host_the_job_runner(cluster: devcluster.ClusterInfo,
                                         site: dict[str, Any], target: str) -> None:
    fetcher: FetcherProcess = site["fetcher"]
    combined = FetcherProcess(cluster, site["work"] / f"cache-{uuid.uuid4().hex[:6]}",
                              fetcher.prefix, args=("--run-jobs",))
    combined.start()
    try:
        cli = Cli(cluster, fetcher.prefix, combined.env_overrides)
        started = cli.json("restore", site["backup"]["backup_id"], f"volumes/{target}",
                           "--mode", "instant")
        deadline = time.monotonic() + 120
        while cli.json("status", started["job_id"])["jobs"][0]["state"] != "committed":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert "job runner on" in combined.logs()
    finally:
        combined.stop()


def test_second_restore_boots_with_the_profile_the_first_recorded(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, site: dict[str, Any],
        tmp_path: Path) -> None:
    # A volume of its own, so no other test's boots are in its profile.
    source = f"guest-pf-{uuid.uuid4().hex[:6]}"
    subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "import", "--no-progress",
                    str(site["guest"] / "root.img"), f"volumes/{source}"], check=True)
    backup = site["cli"].json("backup", f"volumes/{source}")["backup_id"]
    with rados_cluster.open_ioctx("volumes") as ioctx:
        remove_image(ioctx, source)
    primed: list[dict[str, Any]] = []
    metrics = []
    for attempt in ("first", "second"):
        # A fetcher with an empty cache each time: what the second one stages, it
        # stages because of the profile in the bucket.
        fetcher = FetcherProcess(cluster, tmp_path / attempt, site["fetcher"].prefix)
        fetcher.start()
        cli = Cli(cluster, fetcher.prefix, fetcher.env_overrides)
        try:
            target = f"restored-{attempt}-{uuid.uuid4().hex[:6]}"
            started = cli.json("restore", backup, f"volumes/{target}", "--mode", "instant")
            session = job(site, started["job_id"])["session_id"]
            vm = vm_on(site, cluster, target, hold=0)
            vm.start()
            try:
                vm.wait_for(site["info"]["marker"])
                assert vm.sums() == site["info"]["sums"]
                vm.wait_exit()
            finally:
                vm.stop()
            status, state = fetcher.control("GET", f"/v1/sessions/{session}/prefetch")
            assert status == 200, state
            primed.append(state)
            metrics.append(fetcher.metrics())
            # Abort closes the session: the fetcher merges this boot into the profile.
            cli.run("abort", started["job_id"]).check_returncode()
        finally:
            fetcher.stop()
        if attempt == "first":
            profile = cli.json("profile", "show", f"volumes/{source}")
            assert profile["boots"] == 1 and profile["chunks"] > 0
    assert primed[0]["primed_by"] == "heuristic" and primed[1]["primed_by"] == "profile"
    assert primed[1]["profile_chunks"] == profile["chunks"]
    # The chunks the second boot read as scattered reads were in the profile.
    second = primed[1]
    assert second["demand_chunks"] > 0
    assert second["profile_covered_chunks"] >= 0.9 * second["demand_chunks"], second
    assert metrics[1]['rbd_restore_fetcher_profile_sessions_total{primed_by="profile"}'] == 1
    assert metrics[1]['rbd_restore_fetcher_prefetch_used_bytes_total{class="profile"}'] > 0
    assert metrics[1]["rbd_restore_fetcher_profile_covered_chunks_total"] > 0
    assert cli.json("profile", "show", f"volumes/{source}")["boots"] == 2
