"""Prefetch on the real cluster and RGW: a recorded profile replayed, a relocation followed."""

from __future__ import annotations

import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rados
import rbd

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli, export_digest

MiB = 1 << 20
CHUNK = MiB
DATA = 192 * MiB  # 192 chunks of random data, then zeros
# No heuristic and a one-chunk first window: only a profile can make guest reads hits.
QUIET = {"cold_prefetch": "0", "relocation_window_min": "1"}
NO_BOOT_SET = {"RBD_RESTORE_FETCHER_BOOT_SET_SECONDS": "0"}


@pytest.fixture(scope="module")
def volume(cluster: devcluster.ClusterInfo, rados_cluster: Any) -> Iterator[dict[str, Any]]:
    prefix = f"prefetch-{uuid.uuid4().hex[:8]}/"
    name = f"pf-src-{uuid.uuid4().hex[:8]}"
    rng = random.Random(6)
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, name, 512 * MiB, old_format=False)
        with rbd.Image(ioctx, name) as image:
            for offset in range(0, DATA, 16 * MiB):
                image.write(rng.randbytes(16 * MiB), offset)
        backup = Cli(cluster, prefix, {}).json("backup", f"volumes/{name}", "--chunk-size",
                                               "1M")
        try:
            yield {"prefix": prefix, "name": name, "backup_id": backup["backup_id"]}
        finally:
            remove_image(ioctx, name)


def fetcher_for(cluster: devcluster.ClusterInfo, volume: dict[str, Any], cache: Path,
                **settings: str) -> FetcherProcess:
    proc = FetcherProcess(cluster, cache, volume["prefix"],
                          {f"RBD_RESTORE_FETCHER_{k.upper()}": v for k, v in settings.items()})
    proc.start()
    return proc


def counts(fetcher: FetcherProcess, *readers: str) -> dict[str, float]:
    metrics = fetcher.metrics()
    return {result: sum(metrics.get(f'rbd_restore_fetcher_chunk_reads_total{{reader="{reader}",'
                                    f'result="{result}"}}', 0.0) for reader in readers)
            for result in ("hit", "wait", "miss")}


def instant(cli: Cli, volume: dict[str, Any], target: str, *extra: str) -> tuple[str, str]:
    job = cli.json("restore", volume["backup_id"], f"volumes/{target}", "--mode", "instant",
                   *extra)
    record = cli.json("status", job["job_id"])["jobs"][0]
    return job["job_id"], record["session_id"]


def boot_like_reads(rng: random.Random) -> list[tuple[int, int]]:
    """Small reads scattered over the data, as a booting guest makes them."""
    reads = []
    for _ in range(60):
        length = rng.choice((4096, 16384, 65536))
        reads.append((rng.randrange(8 * MiB, DATA - length) // 4096 * 4096, length))
    return reads


def replay(ioctx: Any, target: str, reads: list[tuple[int, int]],
           source: rbd.Image) -> None:
    with rbd.Image(ioctx, target, read_only=True) as image:
        for offset, length in reads:
            assert image.read(offset, length) == source.read(offset, length)


def test_profile_recorded_then_replayed_from_the_cache(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, volume: dict[str, Any],
        tmp_path: Path) -> None:
    reads = boot_like_reads(random.Random(11))
    first_touch: list[int] = []
    for offset, length in reads:
        for chunk in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1):
            if chunk not in first_touch:
                first_touch.append(chunk)
    with rados_cluster.open_ioctx("volumes") as ioctx, \
            rbd.Image(ioctx, volume["name"], read_only=True) as source:
        recorder = fetcher_for(cluster, volume, tmp_path / "first", **QUIET)
        try:
            cli = Cli(cluster, volume["prefix"], recorder.env_overrides)
            job, _ = instant(cli, volume, target := f"pf-a-{uuid.uuid4().hex[:6]}")
            try:
                replay(ioctx, target, reads, source)
            finally:
                cli.run("abort", job).check_returncode()  # closes the session: profile saved
        finally:
            recorder.stop()
        profile = cli.json("profile", "show", f"volumes/{volume['name']}")
        assert profile["boots"] == 1
        recorded = [e["chunk"] for e in profile["entries"]]
        # In first-read order; a read that happens to continue a recent one is taken
        # for a sequential walk and left to the relocation follower instead.
        assert recorded == [c for c in first_touch if c in set(recorded)]
        assert len(recorded) >= 0.85 * len(first_touch)

        replayer = fetcher_for(cluster, volume, tmp_path / "second", **QUIET)
        try:
            # Served by the fetcher, not copied into the image first (next test).
            cli = Cli(cluster, volume["prefix"], {**replayer.env_overrides, **NO_BOOT_SET})
            job, session = instant(cli, volume, target := f"pf-b-{uuid.uuid4().hex[:6]}")
            try:
                state = wait_for_profile(replayer, session, len(recorded))
                assert state["primed_by"] == "profile"
                before = counts(replayer, "guest", "relocation")
                replay(ioctx, target, reads, source)
                after = counts(replayer, "guest", "relocation")
            finally:
                cli.run("abort", job).check_returncode()
        finally:
            replayer.stop()
    done = {k: after[k] - before[k] for k in after}
    # librbd keeps the last cluster it read: a read in the same cluster stays in QEMU.
    assert sum(done.values()) >= 0.8 * len(first_touch)
    assert done["hit"] / sum(done.values()) >= 0.9, done
    merged = cli.json("profile", "show", f"volumes/{volume['name']}")
    assert merged["boots"] == 2
    cli.run("profile", "clear", f"volumes/{volume['name']}").check_returncode()
    assert "no boot profile" in cli.fails("profile", "show", f"volumes/{volume['name']}")
    assert "no boot profile" in cli.fails("profile", "clear", f"volumes/{volume['name']}")


def test_the_profile_is_in_the_image_when_the_restore_is_ready(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, volume: dict[str, Any],
        tmp_path: Path) -> None:
    reads = boot_like_reads(random.Random(21))
    with rados_cluster.open_ioctx("volumes") as ioctx, \
            rbd.Image(ioctx, volume["name"], read_only=True) as source:
        recorder = fetcher_for(cluster, volume, tmp_path / "first", **QUIET)
        try:
            cli = Cli(cluster, volume["prefix"], {**recorder.env_overrides, **NO_BOOT_SET})
            job, _ = instant(cli, volume, target := f"pf-h-{uuid.uuid4().hex[:6]}")
            try:
                replay(ioctx, target, reads, source)
            finally:
                cli.run("abort", job).check_returncode()  # the profile is saved
        finally:
            recorder.stop()
        chunks = [e["chunk"] for e in cli.json("profile", "show",
                                                f"volumes/{volume['name']}")["entries"]]
        object_size = 1 << source.stat()["order"]
        wanted = {c * CHUNK // object_size for c in chunks}
        assert len(wanted) >= 10
        restorer = fetcher_for(cluster, volume, tmp_path / "second", **QUIET)
        try:
            cli = Cli(cluster, volume["prefix"], {**restorer.env_overrides,
                                                  "RBD_RESTORE_FETCHER_BOOT_SET_SECONDS": "30"})
            job, _ = instant(cli, volume, target := f"pf-i-{uuid.uuid4().hex[:6]}")
            try:
                assert cli.json("status", job)["jobs"][0]["boot_set_objects"] == len(wanted)
                with rbd.Image(ioctx, target) as image:
                    prefix = image.stat()["block_name_prefix"]
                    # Handed over as it was staged: no lock held, no copy-on-read left on.
                    assert not list(image.list_lockers() or [])
                    assert "conf_rbd_clone_copy_on_read" not in dict(image.metadata_list())
                present = set()
                for number in range(DATA // object_size):
                    try:
                        ioctx.stat(f"{prefix}.{number:016x}")
                        present.add(number)
                    except rados.ObjectNotFound:
                        pass
                assert present == wanted  # the profile's objects, and nothing else yet
                before = counts(restorer, "guest", "relocation")
                replay(ioctx, target, reads, source)  # the bytes, compared
                after = counts(restorer, "guest", "relocation")
            finally:
                cli.run("abort", job).check_returncode()
        finally:
            restorer.stop()
    # librbd reads the copied objects from RADOS: what reaches the fetcher is only what
    # the profile missed.
    assert sum(after.values()) - sum(before.values()) <= 0.2 * len(chunks)
    cli.run("profile", "clear", f"volumes/{volume['name']}").check_returncode()


def test_a_cold_restore_relocates_after_the_guest_booted_and_learns_all_of_it(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, volume: dict[str, Any],
        tmp_path: Path) -> None:
    Cli(cluster, volume["prefix"], {}).run("profile", "clear", f"volumes/{volume['name']}")
    scattered = boot_like_reads(random.Random(31))
    straight = [(offset, 256 * 1024) for offset in range(100 * MiB, 108 * MiB, 256 * 1024)]
    reads = scattered[:30] + straight + scattered[30:]  # a file read through, mid-boot
    touched = {c for offset, length in reads
               for c in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)}
    fetcher = fetcher_for(cluster, volume, tmp_path / "cache", learn_quiet_seconds="2",
                          **QUIET)
    try:
        cli = Cli(cluster, volume["prefix"], fetcher.env_overrides)
        job, _ = instant(cli, volume, target := f"pf-l-{uuid.uuid4().hex[:6]}")
        runner = subprocess.Popen([sys.executable, "-m", "rbd_restore.cli", "jobs", "run",
                                   job, "--once"], env=cli.env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        try:
            with rados_cluster.open_ioctx("volumes") as ioctx, \
                    rbd.Image(ioctx, volume["name"], read_only=True) as source:
                time.sleep(2)  # a VM starts a moment after the restore is ready
                for number, (offset, length) in enumerate(reads):
                    replay(ioctx, target, [(offset, length)], source)
                    if number % 10 == 0:  # still booting: nothing relocated
                        assert cli.json("status", job)["jobs"][0]["state"] == "staged"
                    time.sleep(0.05)
                booted = time.monotonic()
            assert runner.wait(timeout=120) == 0, runner.stderr
        finally:
            if runner.poll() is None:
                runner.kill()
        assert time.monotonic() - booted >= 2  # it waited for the reads to stop
        assert cli.json("status", job)["jobs"][0]["state"] == "committed"
        assert export_digest(cluster, f"volumes/{target}") == export_digest(
            cluster, f"volumes/{volume['name']}")
    finally:
        fetcher.stop()
    profile = cli.json("profile", "show", f"volumes/{volume['name']}")
    named = {e["chunk"] for e in profile["entries"]}
    assert len(named & touched) >= 0.9 * len(touched)  # the straight read too
    assert len(named & touched) >= 0.9 * len(named)
    Cli(cluster, volume["prefix"], {}).run("profile", "clear", f"volumes/{volume['name']}")


def test_a_vm_that_opened_the_image_holds_the_relocation_until_its_boot_read(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, volume: dict[str, Any],
        tmp_path: Path) -> None:
    """QEMU opens the image and probes its first sector, then the kernel boots for
    seconds before the next read (5-10 s under TCG on a busy host): longer than
    ``learn_wait_seconds``, yet the relocation must wait, or it copies the boot's
    chunks before the guest reads them and the profile misses them."""
    Cli(cluster, volume["prefix"], {}).run("profile", "clear", f"volumes/{volume['name']}")
    reads = boot_like_reads(random.Random(37))
    touched = {c for offset, length in reads
               for c in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)}
    fetcher = fetcher_for(cluster, volume, tmp_path / "cache", learn_wait_seconds="3",
                          learn_quiet_seconds="2", **QUIET)
    try:
        cli = Cli(cluster, volume["prefix"], fetcher.env_overrides)
        job, session = instant(cli, volume, target := f"pf-a-{uuid.uuid4().hex[:6]}")
        assert fetcher.control("GET", f"/v1/sessions/{session}/prefetch")[1]["clients"] == 0
        runner = subprocess.Popen([sys.executable, "-m", "rbd_restore.cli", "jobs", "run",
                                   job, "--once"], env=cli.env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        try:
            with rados_cluster.open_ioctx("volumes") as ioctx, \
                    rbd.Image(ioctx, volume["name"], read_only=True) as source, \
                    rbd.Image(ioctx, target, read_only=True) as vm:
                assert vm.read(0, 512) == source.read(0, 512)  # the probe
                time.sleep(4)  # the kernel boots: longer than learn_wait_seconds
                state = fetcher.control("GET", f"/v1/sessions/{session}/prefetch")[1]
                assert (state.get("clients"), state.get("learning")) == (1, True), state
                assert cli.json("status", job)["jobs"][0]["state"] == "staged"
                for offset, length in reads:
                    assert vm.read(offset, length) == source.read(offset, length)
            assert runner.wait(timeout=120) == 0, runner.stderr
        finally:
            if runner.poll() is None:
                runner.kill()
        assert export_digest(cluster, f"volumes/{target}") == export_digest(
            cluster, f"volumes/{volume['name']}")
    finally:
        fetcher.stop()
    named = {e["chunk"] for e in cli.json("profile", "show",
                                          f"volumes/{volume['name']}")["entries"]}
    assert len(named & touched) >= 0.9 * len(touched)
    assert len(named & touched) >= 0.9 * len(named)
    Cli(cluster, volume["prefix"], {}).run("profile", "clear", f"volumes/{volume['name']}")


def test_file_read_straight_through_is_in_the_next_profile(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, volume: dict[str, Any],
        tmp_path: Path) -> None:
    """A guest reading a file in the middle of the disk straight through: its reads
    look like the relocation's, and are recorded for the next boot all the same."""
    start, length = 100 * MiB, 12 * MiB
    file_chunks = list(range(start // CHUNK, (start + length) // CHUNK))
    name = f"volumes/{volume['name']}"

    def read_file(ioctx: Any, target: str, source: rbd.Image) -> None:
        with rbd.Image(ioctx, target, read_only=True) as image:
            for offset in range(start, start + length, 256 * 1024):
                assert image.read(offset, 256 * 1024) == source.read(offset, 256 * 1024)

    Cli(cluster, volume["prefix"], {}).run("profile", "clear", name)
    with rados_cluster.open_ioctx("volumes") as ioctx, \
            rbd.Image(ioctx, volume["name"], read_only=True) as source:
        for round_no, cache in enumerate(("first", "second")):
            fetcher = fetcher_for(cluster, volume, tmp_path / cache, **QUIET)
            try:
                # The fetcher stages the profile in memory (not copied into the image).
                cli = Cli(cluster, volume["prefix"], {**fetcher.env_overrides, **NO_BOOT_SET})
                job, session = instant(cli, volume, target := f"pf-f-{uuid.uuid4().hex[:6]}")
                try:
                    if round_no:
                        assert wait_for_profile(fetcher, session, len(file_chunks))[
                            "primed_by"] == "profile"
                    before = counts(fetcher, "guest", "relocation")
                    read_file(ioctx, target, source)
                    after = counts(fetcher, "guest", "relocation")
                finally:
                    cli.run("abort", job).check_returncode()  # profile saved at close
            finally:
                fetcher.stop()
            if not round_no:
                profile = cli.json("profile", "show", name)
                assert [e["chunk"] for e in profile["entries"]] == file_chunks
    done = {k: after[k] - before[k] for k in after}
    assert done["hit"] == len(file_chunks) and done["miss"] == done["wait"] == 0, done
    cli.run("profile", "clear", name).check_returncode()


def test_profile_commands_refuse_bad_input(cluster: devcluster.ClusterInfo,
                                           volume: dict[str, Any]) -> None:
    cli = Cli(cluster, volume["prefix"], {})
    assert "does not exist" in cli.fails("profile", "show", "volumes/no-such-image")
    assert "not of the form POOL/IMAGE" in cli.fails("profile", "show", "a/b/c")
    assert "does not exist" in cli.fails("profile", "clear", "no-such-pool/img")


def wait_for_profile(fetcher: FetcherProcess, session: str, chunks: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        status, state = fetcher.control("GET", f"/v1/sessions/{session}/prefetch")
        if status == 200 and state["profile_staged"] >= chunks:
            return dict(state)
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def test_relocation_reads_after_the_first_window_are_cache_hits(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, volume: dict[str, Any],
        tmp_path: Path) -> None:
    # No profile: nothing copied into the image before the relocation reads it.
    Cli(cluster, volume["prefix"], {}).run("profile", "clear", f"volumes/{volume['name']}")
    fetcher = fetcher_for(cluster, volume, tmp_path / "cache")
    target = f"pf-r-{uuid.uuid4().hex[:6]}"
    try:
        cli = Cli(cluster, volume["prefix"], fetcher.env_overrides)
        # Paced below what RGW serves: the follower is to stay ahead whenever S3 can.
        # Unpaced, the relocation and RGW share the cores, and under a loaded suite the
        # relocation caught up with S3 (25 of 192 reads waited for fetches under way).
        job, _ = instant(cli, volume, target, "--rate-limit", "64")
        before = counts(fetcher, "relocation", "guest")
        ran = cli.run("jobs", "run", job, "--once")
        assert ran.returncode == 0, ran.stderr
        assert cli.json("status", job)["jobs"][0]["state"] == "committed"
        after = counts(fetcher, "relocation", "guest")
    finally:
        fetcher.stop()
    done = {k: after[k] - before[k] for k in after}
    total = sum(done.values())
    assert total >= DATA // CHUNK  # every data chunk came through the relocation
    first_window = 8  # relocation_window_min
    assert done["hit"] >= 0.95 * (total - first_window), done
    assert export_digest(cluster, f"volumes/{target}") == export_digest(
        cluster, f"volumes/{volume['name']}")
    with rados_cluster.open_ioctx("volumes") as ioctx:
        remove_image(ioctx, target)
