"""Instant-restore jobs from every state they can be left in (issue: trust).

A runner resumes from each migration state, marks a job failed after bounded
retries, runs several jobs at once so a stuck one blocks nothing, survives
bad records and pools it may not read, and stops when it loses a job's lock.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rados
import rbd

from rbd_restore import devcluster, lazy_clone
from rbd_restore.jobs.store import JOBS_OBJECT, JobRecord, new_job_id, now_iso
from tests.support.fetcher_proc import FetcherProcess, free_port
from tests.support.helpers import Cli, export_digest, wait_for

MiB = 1 << 20


@pytest.fixture
def fetcher(cluster: devcluster.ClusterInfo, cli: Cli, tmp_path: Path) -> Iterator[FetcherProcess]:
    proc = FetcherProcess(cluster, tmp_path / "cache", cli.prefix)
    proc.start()
    yield proc
    proc.stop()


def via(fetcher: FetcherProcess) -> Cli:
    return Cli(fetcher.cluster, fetcher.prefix, fetcher.env_overrides)


def stage(fetcher: FetcherProcess, source: dict[str, str], images: list[str],
          *extra: str) -> tuple[str, str]:
    target = f"{source['name']}-{len(images)}"
    images.append(target)
    job_id = via(fetcher).json("restore", source["backup_id"], f"volumes/{target}",
                               "--mode", "instant", *extra)["job_id"]
    return target, job_id


def state(cli: Cli, job_id: str) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = cli.json("status", job_id)["jobs"]
    return jobs[0]


def run_once(cli: Cli, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = cli.run("jobs", "run", "--once", *args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize("public_url", ["http://127.0.0.1:{closed}",
                                        "http://fetcher.invalid:8080"])
def test_a_fetcher_url_librbd_cannot_reach_is_named_and_leaves_nothing(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, source: dict[str, str],
        images: list[str], tmp_path: Path, public_url: str) -> None:
    """The commonest mistake in a deployment: a ``fetcher.public_url`` the Ceph clients
    cannot reach. librbd says only ImageNotFound or errno 111."""
    url = public_url.format(closed=free_port())
    fetcher = FetcherProcess(cluster, tmp_path / "cache", cli.prefix,
                             {"RBD_RESTORE_FETCHER_PUBLIC_URL": url})
    fetcher.start()
    try:
        target = f"{source['name']}-unreachable"
        images.append(target)
        line = via(fetcher).fails("restore", source["backup_id"], f"volumes/{target}",
                                  "--mode", "instant")
        assert url in line and "fetcher.public_url" in line and "/v1/s/" not in line
        assert target not in rbd.RBD().list(ioctx)
        assert all(job["image"] != f"volumes/{target}" for job in cli.json("status")["jobs"])
        assert fetcher.control("GET", "/v1/sessions")[1]["sessions"] == []
    finally:
        fetcher.stop()


def test_a_copy_finished_by_hand_but_not_committed_is_committed(
        cluster: devcluster.ClusterInfo, fetcher: FetcherProcess, source: dict[str, str],
        images: list[str]) -> None:
    target, job_id = stage(fetcher, source, images)
    subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "migration", "execute",
                    f"volumes/{target}"], check=True, capture_output=True)
    cli = via(fetcher)
    assert state(cli, job_id)["migration"] == "executed"
    run_once(cli, job_id, timeout=60)  # retried forever before
    final = state(cli, job_id)
    assert final["state"] == "committed" and final["error"] is None
    assert export_digest(cluster, f"volumes/{target}") == source["digest"]


def test_failing_jobs_are_marked_failed_and_never_hold_up_the_others(
        cluster: devcluster.ClusterInfo, cli: Cli, source: dict[str, str], images: list[str],
        tmp_path: Path) -> None:
    gone = FetcherProcess(cluster, tmp_path / "gone", cli.prefix)
    gone.start()
    stuck_target, stuck = stage(gone, source, images)
    gone.stop()  # its session's URL now reaches nothing: every attempt fails
    live = FetcherProcess(cluster, tmp_path / "live", cli.prefix)
    live.start()
    runner = None
    try:
        # The stuck job comes first and keeps failing; the other one still commits.
        target, job_id = stage(live, source, images)
        runner = subprocess.Popen([sys.executable, "-m", "rbd_restore.cli", "jobs", "run",
                                   "--jobs", "2", "--max-attempts", "1000"],
                                  env=via(live).env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        wait_for(lambda: state(cli, job_id)["state"] == "committed", timeout=90)
        assert export_digest(cluster, f"volumes/{target}") == source["digest"]
        still = state(cli, stuck)
        assert still["state"] in ("staged", "relocating") and "retrying" in still["error"]
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 0

        # Bounded: after 3 failed attempts in a row (counted across runners) the job is
        # failed, with the reason.
        run_once(via(live), stuck, "--max-attempts", "3")
        failed = state(cli, stuck)
        assert failed["state"] == "failed" and "gave up after" in failed["error"]
        assert "migration status unavailable" in failed["error"]
        assert "only failed jobs" in via(live).fails("jobs", "retry", job_id)

        # The operator brings the fetcher back and puts the job back in the queue: its
        # session stayed open, since the image was still staged.
        back = FetcherProcess(cluster, tmp_path / "back", cli.prefix,
                              {"RBD_RESTORE_FETCHER_LISTEN":
                               gone.env_overrides["RBD_RESTORE_FETCHER_LISTEN"]})
        back.start()
        try:
            assert via(back).run("jobs", "retry", stuck).returncode == 0
            run_once(via(back), stuck)
            assert state(cli, stuck)["state"] == "committed"
            assert export_digest(cluster, f"volumes/{stuck_target}") == source["digest"]
        finally:
            back.stop()
    finally:
        if runner is not None and runner.poll() is None:
            runner.kill()
        live.stop()


def put_record(ioctx: Any, key: str, value: bytes) -> None:
    with rados.WriteOpCtx() as op:
        ioctx.set_omap(op, (key,), (value,))
        ioctx.operate_write_op(op, JOBS_OBJECT)


def drop_record(ioctx: Any, key: str) -> None:
    with rados.WriteOpCtx() as op:
        ioctx.remove_omap_keys(op, (key,))
        ioctx.operate_write_op(op, JOBS_OBJECT)


def test_bad_records_and_unreadable_pools_are_reported_never_fatal(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, ioctx: Any,
        fetcher: FetcherProcess, source: dict[str, str], images: list[str],
        tmp_path: Path) -> None:
    garbage, foreign = new_job_id(), new_job_id()
    other_pool = JobRecord(id=foreign, backup_id=source["backup_id"], pool="rbd",
                           image="victim", session_id="", created=now_iso())
    put_record(ioctx, garbage, b"{not json")
    put_record(ioctx, foreign, other_pool.encode())  # claims to be about pool rbd
    with rados_cluster.open_ioctx("rbd") as rbd_pool:
        put_record(rbd_pool, new_job_id(), b"{}")  # a pool the limited user may not read
    keyring = tmp_path / "limited.keyring"
    subprocess.run(["ceph", "-c", str(cluster.ceph_conf), "auth", "get-or-create",
                    "client.rr-limited", "mon", "profile rbd", "osd",
                    "profile rbd pool=volumes", "-o", str(keyring)], check=True,
                   capture_output=True)
    try:
        _target, job_id = stage(fetcher, source, images)
        limited = Cli(cluster, fetcher.prefix, {
            **fetcher.env_overrides, "RBD_RESTORE_CEPH_CLIENT_NAME": "client.rr-limited",
            "RBD_RESTORE_CEPH_KEYRING": str(keyring)})
        shown = limited.run("status", "--json")
        assert shown.returncode == 0, shown.stderr
        listed = json.loads(shown.stdout)
        assert job_id in [j["id"] for j in listed["jobs"]]
        problems = " ".join(listed["problems"])
        assert garbage in problems and "not JSON" in problems
        assert foreign in problems and "names pool" in problems
        assert "pool rbd: job records not readable" in problems
        run_once(limited, job_id, "--max-attempts", "2")
        assert state(limited, job_id)["state"] == "committed"
    finally:
        drop_record(ioctx, garbage)
        drop_record(ioctx, foreign)
        with rados_cluster.open_ioctx("rbd") as rbd_pool:
            rbd_pool.remove_object(JOBS_OBJECT)
        subprocess.run(["ceph", "-c", str(cluster.ceph_conf), "auth", "rm",
                        "client.rr-limited"], check=True, capture_output=True)


def test_a_restore_killed_before_or_after_preparing_is_finished_by_a_runner(
        cluster: devcluster.ClusterInfo, ioctx: Any, fetcher: FetcherProcess,
        source: dict[str, str], images: list[str]) -> None:
    """What `restore --mode instant` leaves when killed: a `preparing` record, with the
    image made (killed after prepare) or not (killed before)."""
    cli = via(fetcher)
    made, never = f"{source['name']}-made", f"{source['name']}-never"
    images.extend([made, never])
    records = []
    for target in (made, never):
        job_id = new_job_id()
        session = fetcher.create_session(source["backup_id"])
        if target == made:
            lazy_clone.prepare(ioctx, target, session["url"])
        record = JobRecord(id=job_id, backup_id=source["backup_id"], pool="volumes",
                           image=target, session_id=session["session_id"],
                           state="preparing", created=now_iso())
        put_record(ioctx, job_id, record.encode())
        records.append((record, session["session_id"]))
    assert "image half made" not in cli.run("status").stdout
    for record, _session in records:
        run_once(cli, record.id)
    assert state(cli, records[0][0].id)["state"] == "committed"
    assert export_digest(cluster, f"volumes/{made}") == source["digest"]
    never_state = state(cli, records[1][0].id)
    assert never_state["state"] == "aborted" and "before its image" in never_state["error"]
    open_sessions = {s["session_id"] for s in cli.json("fetcher", "session", "list")["sessions"]}
    assert not open_sessions & {records[0][1], records[1][1]}  # both closed


def lock_holder(cluster: devcluster.ClusterInfo, job_id: str) -> dict[str, Any]:
    out = subprocess.run(["rados", "-c", str(cluster.ceph_conf), "-p", "volumes", "lock",
                          "info", JOBS_OBJECT, f"job.{job_id}", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    lockers: list[dict[str, Any]] = json.loads(out)["lockers"]
    return lockers[0] if lockers else {}


def test_two_runners_never_run_one_job_twice_and_a_runner_that_loses_its_lock_stops(
        cluster: devcluster.ClusterInfo, fetcher: FetcherProcess, source: dict[str, str],
        images: list[str], tmp_path: Path) -> None:
    cli = via(fetcher)
    target, job_id = stage(fetcher, source, images, "--rate-limit", "2")  # 20 MiB: 10 s
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    def start(log: Path, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "rbd_restore.cli", "jobs", "run", *args],
                                env=cli.env(), stdout=subprocess.DEVNULL,
                                stderr=open(log, "wb"))

    first = start(logs[0])
    second = None
    try:
        held = wait_for(lambda: lock_holder(cluster, job_id))
        wait_for(lambda: state(cli, job_id)["state"] == "relocating")
        # A second runner on the same job waits: the job is the first one's.
        second = start(logs[1], job_id, "--once")
        time.sleep(3)  # long enough for it to have tried, and been refused
        assert second.poll() is None and lock_holder(cluster, job_id) == held
        # The first one loses its lock (as it would, paused past the lock's expiry).
        subprocess.run(["rados", "-c", str(cluster.ceph_conf), "-p", "volumes", "lock",
                        "break", JOBS_OBJECT, f"job.{job_id}", held["name"],
                        "--lock-cookie", held["cookie"]], check=True, capture_output=True)
        assert second.wait(timeout=120) == 0
        wait_for(lambda: "lost its lock" in logs[0].read_text()
                 or "another runner took the lock" in logs[0].read_text(), timeout=30)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
        if second is not None and second.poll() is None:
            second.kill()
    assert state(cli, job_id)["state"] == "committed"
    first_log = logs[0].read_text()
    assert "job committed" not in first_log and "job committed" in logs[1].read_text()
    assert export_digest(cluster, f"volumes/{target}") == source["digest"]


def test_the_runner_in_the_fetcher_survives_what_used_to_stop_it(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, source: dict[str, str],
        images: list[str], tmp_path: Path) -> None:
    garbage = new_job_id()
    put_record(ioctx, garbage, b"[1, 2")  # raised JSONDecodeError in every runner
    combined = FetcherProcess(cluster, tmp_path / "cache", cli.prefix, args=("--run-jobs",))
    combined.start()
    try:
        _target, job_id = stage(combined, source, images)
        wait_for(lambda: state(via(combined), job_id)["state"] == "committed", timeout=90)
    finally:
        combined.stop()
        drop_record(ioctx, garbage)


def test_a_job_follows_its_image_when_it_is_renamed(
        cluster: devcluster.ClusterInfo, ioctx: Any, fetcher: FetcherProcess,
        source: dict[str, str], images: list[str]) -> None:
    """Cinder renames images (a generic migration, manage): the job must not take the
    renamed image for a removed one, close its session and strand it."""
    target, job_id = stage(fetcher, source, images)
    renamed = f"{target}-renamed"
    images.append(renamed)
    rbd.RBD().rename(ioctx, target, renamed)
    cli = via(fetcher)
    assert state(cli, job_id)["image"] == f"volumes/{renamed}"
    run_once(cli, job_id)
    final = state(cli, job_id)
    assert final["state"] == "committed" and final["image"] == f"volumes/{renamed}"
    assert export_digest(cluster, f"volumes/{renamed}") == source["digest"]


def test_two_runner_processes_commit_every_job_of_several_exactly_once(
        cluster: devcluster.ClusterInfo, fetcher: FetcherProcess, source: dict[str, str],
        images: list[str], tmp_path: Path) -> None:
    """Two hosts' runners on the same six jobs at once (issue 18): each job is
    relocated and committed by one of them, never both, and every image is right."""
    cli = via(fetcher)
    jobs = dict(stage(fetcher, source, images, "--rate-limit", "4") for _ in range(6))
    logs = [tmp_path / "runner-a.log", tmp_path / "runner-b.log"]
    runners = [subprocess.Popen([sys.executable, "-m", "rbd_restore.cli", "jobs", "run",
                                 "--once", "--jobs", "2"],
                                env=cli.env(), stdout=subprocess.DEVNULL,
                                stderr=open(log, "wb"))  # noqa: SIM115
               for log in logs]
    try:
        for runner in runners:
            assert runner.wait(timeout=300) == 0
    finally:
        for runner in runners:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
    commits: dict[str, list[str]] = {job_id: [] for job_id in jobs.values()}
    for log in logs:
        for line in log.read_text().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}  # also "runner ready"
            if entry.get("msg") == "job committed":
                commits[entry["job"]].append(log.name)
    assert all(len(by) == 1 for by in commits.values()), commits
    assert {name for by in commits.values() for name in by} == {log.name for log in logs}, \
        "both runners should have had jobs to run"
    for target, job_id in jobs.items():
        assert state(cli, job_id)["state"] == "committed"
        assert export_digest(cluster, f"volumes/{target}") == source["digest"]


def test_a_rate_limited_relocation_reads_no_faster_than_its_limit(
        cluster: devcluster.ClusterInfo, fetcher: FetcherProcess, source: dict[str, str],
        images: list[str]) -> None:
    cli = via(fetcher)
    target, job_id = stage(fetcher, source, images, "--rate-limit", "4")  # 20 MiB: 5 s
    started = time.monotonic()
    run_once(cli, job_id)
    elapsed = time.monotonic() - started
    assert state(cli, job_id)["state"] == "committed"
    assert elapsed >= 4.0
    assert export_digest(cluster, f"volumes/{target}") == source["digest"]
