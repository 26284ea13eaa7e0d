"""Faults while a real QEMU guest runs on an instant restore (issue: trust).

- The fetcher SIGKILLed and restarted while the guest boots. librbd 16.2.15
  sends a dropped connection's requests again on a new one, but fails the
  guest's queued reads if that new connection is refused. With its sockets held
  by the service manager (socket activation) the fetcher restarts without
  refusing anything: the guest pauses and boots with correct data.
- One of two fetcher replicas behind HAProxy SIGKILLed while the guest boots and
  left dead: HAProxy sends the reads it did not answer, and librbd the ones it
  cut short, to the other replica.
- S3 misbehaving under the fetcher (the fault proxy): the boot and the
  relocation come out bit-exact.
- The guest writing during the relocation and the commit: every write is
  there afterwards, read back by the guest and found in the image.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rbd_restore import devcluster
from tests.support.e2e import guest_files, job, objects_differing, runner, vm_on, wait_job
from tests.support.faultproxy import FaultPlan, FaultProxy, through
from tests.support.fetcher_proc import FetcherProcess
from tests.support.haproxy import replicas_behind_haproxy
from tests.support.helpers import Cli


def test_fetcher_killed_while_the_guest_boots_costs_the_guest_nothing(
        cluster: devcluster.ClusterInfo, site: dict[str, Any], target: str,
        tmp_path: Path) -> None:
    # No priming: the guest's reads reach S3 through the fetcher while it boots.
    fetcher = FetcherProcess(cluster, tmp_path / "cache", site["fetcher"].prefix,
                             {"RBD_RESTORE_FETCHER_PRIME_SESSIONS": "0"},
                             socket_activation=True)
    fetcher.start()
    cli = Cli(cluster, fetcher.prefix, fetcher.env_overrides)
    try:
        started = cli.json("restore", site["backup"]["backup_id"], f"volumes/{target}",
                           "--mode", "instant")
        first = fetcher.proc.pid if fetcher.proc else 0

        def restart() -> None:
            fetcher.kill()
            time.sleep(1)  # the fault: a second with no fetcher process at all
            fetcher.start()
            assert fetcher.proc is not None and fetcher.proc.pid != first

        boot_through(site, cluster, target, started["job_id"], restart)
    finally:
        fetcher.close()


def boot_through(site: dict[str, Any], cluster: devcluster.ClusterInfo, target: str,
                 job_id: str, fault: Callable[[], None]) -> None:
    """Boot the guest on the staged ``target``, ``fault()`` once it is between its data
    files (reading on), and check: its data right, no I/O error, then the job
    relocated and committed and the image bit-exact."""
    vm = vm_on(site, cluster, target, hold=0)
    vm.start()
    try:
        vm.wait_for("RBD-RESTORE-GUEST-SUM")
        fault()
        vm.wait_for(site["info"]["marker"])
        assert vm.sums() == site["info"]["sums"]
        vm.wait_exit()
    finally:
        vm.stop()
    assert "I/O error" not in vm.output() and "EXT4-fs error" not in vm.output()
    run = runner(site, job_id, "--once")
    assert run.wait(timeout=180) == 0
    assert job(site, job_id)["state"] == "committed"
    objects_differing(cluster, target, site["guest"] / "root.img")


def test_fetcher_replica_killed_while_the_guest_boots_behind_haproxy(
        cluster: devcluster.ClusterInfo, site: dict[str, Any], target: str,
        tmp_path: Path) -> None:
    """Two replicas behind HAProxy (contrib/haproxy); the one serving the guest is
    SIGKILLed mid-boot and not restarted: the other serves the rest of the boot and
    the relocation."""
    with replicas_behind_haproxy(cluster, site["fetcher"].prefix, tmp_path,
                                 {"RBD_RESTORE_FETCHER_PRIME_SESSIONS": "0"}) as (_proxy,
                                                                                 replicas):
        cli = Cli(cluster, site["fetcher"].prefix, replicas[0].env_overrides)
        started = cli.json("restore", site["backup"]["backup_id"], f"volumes/{target}",
                           "--mode", "instant")
        session_id = job(site, started["job_id"])["session_id"]
        killed: list[FetcherProcess] = []

        def kill_the_serving_replica() -> None:
            killed.extend(r for r in replicas
                          if r.control("GET", f"/v1/sessions/{session_id}/prefetch")[0] == 200)
            assert len(killed) == 1
            killed[0].kill()

        boot_through(site, cluster, target, started["job_id"], kill_the_serving_replica)
        [survivor] = [r for r in replicas if r is not killed[0]]
        assert survivor.metrics()["rbd_restore_fetcher_demand_chunks_total"] > 0


def test_boot_and_relocation_through_s3_faults_are_bit_exact(
        cluster: devcluster.ClusterInfo, site: dict[str, Any], target: str,
        tmp_path: Path) -> None:
    host, port = cluster.s3_endpoint.removeprefix("http://").split(":")
    plan = FaultPlan(rate=0.15, stall_seconds=3,
                     faults=("slowdown", "error", "reset", "stall", "truncate",
                             "corrupt_reply"), at=(2, 4, 6, 8, 10))
    with FaultProxy(host, int(port), plan).running() as proxy:
        fetcher = FetcherProcess(cluster, tmp_path / "cache", site["fetcher"].prefix,
                                 through(proxy))
        fetcher.start()
        cli = Cli(cluster, fetcher.prefix, fetcher.env_overrides)
        try:
            started = cli.json("restore", site["backup"]["backup_id"], f"volumes/{target}",
                               "--mode", "instant")
            vm = vm_on(site, cluster, target, hold=0)
            vm.start()
            try:
                vm.wait_for(site["info"]["marker"], timeout=300)
                assert vm.sums() == site["info"]["sums"]
                vm.wait_exit()
            finally:
                vm.stop()
            run = subprocess.run(cli.command("jobs", "run", started["job_id"], "--once"),
                                 env=cli.env(), capture_output=True, timeout=300, check=False)
            assert run.returncode == 0, run.stderr[-1000:]
            assert job(site, started["job_id"])["state"] == "committed"
            metrics = fetcher.metrics()
        finally:
            fetcher.stop()
    assert proxy.total_injected >= 5, proxy.injected
    assert metrics["rbd_restore_fetcher_s3_retries_total"] >= 1
    # Every object the guest did not write is the backup's, byte for byte.
    objects_differing(cluster, target, site["guest"] / "root.img")


def test_guest_writes_during_the_relocation_and_the_commit_are_all_there(
        cluster: devcluster.ClusterInfo, site: dict[str, Any], target: str) -> None:
    cli: Cli = site["cli"]
    # 76 MiB at 4 MiB/s: the relocation takes about 19 s of the guest's 30 s of writes.
    started = cli.json("restore", site["backup"]["backup_id"], f"volumes/{target}",
                       "--mode", "instant", "--rate-limit", "4")
    vm = vm_on(site, cluster, target, hold=0)
    vm.writes, vm.write_every = 30, 1
    vm.start()
    run = None
    try:
        vm.wait_for("RBD-RESTORE-GUEST-WRITE-SUM")
        run = runner(site, started["job_id"], "--once")  # relocation, inside QEMU's librbd
        wait_job(site, started["job_id"], lambda j: j["state"] == "committed", timeout=300)
        before_commit = len(vm.sums("WRITE-SUM"))
        vm.wait_for("RBD-RESTORE-GUEST-WRITES-DONE", timeout=300)
        vm.wait_exit()
    finally:
        vm.stop()
        if run is not None and run.poll() is None:
            run.kill()
    assert run is not None and run.wait(timeout=60) == 0
    written = vm.sums("WRITE-SUM")
    assert len(written) == 30 and 1 <= before_commit < 30, before_commit
    assert vm.sums("READBACK-SUM") == written  # read back from the disk by the guest
    found = guest_files(cluster, target, site["work"], sorted(written))
    assert found == written  # and found in the committed image by the host
    assert "I/O error" not in vm.output()
