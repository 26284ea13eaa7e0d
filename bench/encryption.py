"""What encryption costs: encrypted and plaintext (format 2) repositories, same run.

Both modes name chunks by a keyed HMAC and authenticate manifests; the
encrypted one also seals every chunk with AES-256-GCM. Rows, each pairing the
encrypted run with the plaintext one just before or after it (alternating
which goes first):

- backup --full and restore --mode full of a 4 GiB image holding 1 GiB of
  incompressible data (the throughput rows of backup_restore.py, where
  compression does not hide the cipher's cost);
- an instant restore of the test guest behind the emulated WAN: QEMU boot to
  its marker and the guest's recorded reads replayed at full speed, each from a
  new fetcher with an empty cache;
- the cipher's own cost per GiB on this machine (seal and open of 4 MiB
  chunks on one core), for scale.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from bench.backup_restore import _delete_prefix, _fill, _pool_bytes
from bench.boot import _boot, _fresh_instant, _proxy, _rr
from bench.common import (
    Report,
    Row,
    bench_cluster,
    cli,
    drop_caches,
    median,
    open_volumes,
    run_alone,
)
from bench.trace import record, replay
from rbd_restore import config as config_mod
from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from rbd_restore.repo.crypto import DataKey
from rbd_restore.repo.store import make_client
from tests.support.vm import build_guest

MiB = 1 << 20
CHUNK = 4 * MiB
MODES = ("encrypted", "plaintext")


def _prefix(cluster: devcluster.ClusterInfo, mode: str) -> dict[str, str]:
    env = {"RBD_RESTORE_S3_PREFIX": f"bench-enc-{mode[:5]}-{uuid.uuid4().hex[:8]}/"}
    cli(cluster, "init", *(["--plaintext"] if mode == "plaintext" else []), env=env)
    return env


def _cipher_seconds_per_gib() -> float:
    key = DataKey.generate("00" * 16, "")
    chunk = os.urandom(CHUNK)
    started = time.process_time()
    for _ in range(64):  # 256 MiB
        key.open(b"chunk:x", key.seal(b"chunk:x", chunk))
    return (time.process_time() - started) * 4


def _throughput(cluster: devcluster.ClusterInfo, report: Report, runs: int) -> None:
    handle, ioctx = open_volumes(cluster)
    s3 = make_client(config_mod.load(str(cluster.config)).s3)
    src = f"bench-enc-{uuid.uuid4().hex[:8]}"
    extents = list(range(0, 1024, 4))  # 1 GiB of 4 MiB extents in 4 GiB
    data = len(extents) * CHUNK
    samples: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("backup", "restore")
                                       for m in MODES}
    try:
        _fill(ioctx, src, 4 << 30, extents, _pool_bytes())
        for run_no in range(runs):
            for mode in MODES if run_no % 2 == 0 else reversed(MODES):
                env = _prefix(cluster, mode)
                started = time.monotonic()
                backup_id = cli(cluster, "backup", f"volumes/{src}", "--full",
                                env=env)["backup_id"]
                samples[f"backup_{mode}"].append(data / (time.monotonic() - started) / MiB)
                target = f"{src}-{mode[:3]}{run_no}"
                started = time.monotonic()
                cli(cluster, "restore", backup_id, f"volumes/{target}", env=env)
                samples[f"restore_{mode}"].append(data / (time.monotonic() - started) / MiB)
                remove_image(ioctx, target)
                _delete_prefix(s3, cluster.bucket, env["RBD_RESTORE_S3_PREFIX"])
                subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "snap", "purge",
                                f"volumes/{src}"], check=True, capture_output=True)
    finally:
        remove_image(ioctx, src)
        ioctx.close()
        handle.shutdown()
    for kind, label in (("backup", "backup --full"), ("restore", "restore --mode full")):
        plain = median(samples[f"{kind}_plaintext"])
        report.add(Row(f"{label}, encrypted (AES-256-GCM)", "throughput",
                       median(samples[f"{kind}_encrypted"]), "MiB/s", "the same, plaintext "
                       "repository", plain, ">= 0.9x (issue 19)",
                       samples[f"{kind}_encrypted"]))
        report.add(Row(f"{label}, plaintext repository (keyed ids, MAC)", "throughput", plain,
                       "MiB/s", runs=samples[f"{kind}_plaintext"]))


def _instant(cluster: devcluster.ClusterInfo, report: Report, runs: int) -> None:
    guest, info = build_guest()
    work = Path(cluster.dir) / f"enc-boot-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    proxy, wan_endpoint = _proxy(cluster)
    wan = {"RBD_RESTORE_S3_ENDPOINT": wan_endpoint}
    handle, ioctx = open_volumes(cluster)
    source = f"enc-boot-src-{uuid.uuid4().hex[:6]}"
    conf = str(cluster.ceph_conf)
    samples: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("boot", "replay", "p99")
                                       for m in MODES}
    envs: dict[str, dict[str, str]] = {}
    try:
        subprocess.run(["rbd", "-c", conf, "import", "--no-progress", str(guest / "root.img"),
                        f"volumes/{source}"], check=True)
        backups = {}
        for mode in MODES:
            envs[mode] = {**_prefix(cluster, mode), **wan}
            backups[mode] = cli(cluster, "backup", f"volumes/{source}", "--full",
                                env=envs[mode])["backup_id"]
        trace = record(work / "boot-trace.json")
        for run_no in range(runs):
            for mode in MODES if run_no % 2 == 0 else reversed(MODES):
                env = envs[mode]
                # Cold: no profile, a new fetcher with an empty cache each time.
                _rr(cluster, env, "profile", "clear", f"volumes/{source}", check=False)
                started, marker_at, _ = _fresh_instant(
                    cluster, env, wan, work / f"boot-{mode}-{run_no}", backups[mode],
                    lambda target: _boot(guest, cluster, target, work, info["marker"]))
                samples[f"boot_{mode}"].append(marker_at - started)
                _rr(cluster, env, "profile", "clear", f"volumes/{source}", check=False)
                _, replayed, _ = _fresh_instant(
                    cluster, env, wan, work / f"replay-{mode}-{run_no}", backups[mode],
                    lambda target: replay(conf, f"volumes/{target}", trace))
                samples[f"replay_{mode}"].append(replayed["seconds"])
                samples[f"p99_{mode}"].append(replayed["p99_ms"])
    finally:
        remove_image(ioctx, source)
        s3 = make_client(config_mod.load(str(cluster.config)).s3)
        for env in envs.values():
            _delete_prefix(s3, cluster.bucket, env["RBD_RESTORE_S3_PREFIX"])
        ioctx.close()
        handle.shutdown()
        proxy.kill()
        proxy.wait()
        drop_caches(work)
    for key, label, unit in (("boot", "instant restore, cold: QEMU boot to marker", "s"),
                             ("replay", "instant restore, cold: boot trace replay", "s"),
                             ("p99", "instant restore, cold: replay read p99", "ms")):
        plain = median(samples[f"{key}_plaintext"])
        report.add(Row(f"{label}, encrypted", "seconds" if unit == "s" else unit,
                       median(samples[f"{key}_encrypted"]), unit, "the same, plaintext",
                       plain, "<= 1.10x (issue 19)" if key == "boot" else "",
                       samples[f"{key}_encrypted"]))
        report.add(Row(f"{label}, plaintext", "seconds" if unit == "s" else unit, plain, unit,
                       runs=samples[f"{key}_plaintext"]))


def run(cluster: devcluster.ClusterInfo | None = None, runs: int = 3) -> Report:
    cluster = cluster or bench_cluster()
    report = Report("Encryption: encrypted vs plaintext repositories, same run")
    _throughput(cluster, report, runs)
    _instant(cluster, report, runs)
    report.add(Row("AES-256-GCM seal + open of 4 MiB chunks, one core", "CPU-s per GiB",
                   _cipher_seconds_per_gib(), "s"))
    report.notes.append("Each encrypted sample is paired with a plaintext one in the same "
                        "round; the order alternates between rounds.")
    return report


def main() -> Any:
    return run_alone(run)


if __name__ == "__main__":
    main()
