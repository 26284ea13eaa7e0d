"""Relocation throughput with S3 behind the emulated WAN: rbd-restore, Ceph, raw GETs.

One image of incompressible data (every chunk distinct), backed up. Each run:
- rbd-restore: an instant restore from a fetcher with an empty cache, then
  ``migration_execute`` + ``migration_commit`` timed in this process (the job
  runner does the same calls; its Python start-up is left out);
- Ceph's own import-only migration from the raw image object over its ``s3``
  stream, execute + commit timed the same way;
- the limit: parallel boto3 GETs of the backup's chunk objects (16 threads,
  the fetcher's S3 concurrency).
All three go through the same WAN proxy. ``rbd du`` USED after each commit.

Two WAN models (``cap``): 100 MB/s for each connection on its own, where 16
parallel GETs reach 300+ MB/s and the machine's two cores are the limit; and
one 100 MB/s link that every connection shares, the "20 ms / 100 MB/s link"
of DESIGN.md, where the link is the limit and the question is whether a
relocation keeps it busy.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.backup_restore import CHUNK, WORKERS, _delete_prefix, _extent, _pool_bytes
from bench.boot import _proxy, _used
from bench.common import (
    Report,
    Row,
    bench_cluster,
    cli,
    drop_caches,
    execute_commit,
    map_all,
    median,
    open_volumes,
    run_alone,
    timed,
)
from bench.fetcher import (
    Fetcher,
    add_serving_rows,
    floor_cpu_per_gib,
    send_floor_cpu_per_gib,
)
from rbd_restore import config as config_mod
from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from rbd_restore.qcow2.view import MAX_CLUSTER_SIZE
from rbd_restore.repo.store import make_client

MiB = 1 << 20
GET_THREADS = 16


WAN_MODELS = {"per_connection": "100 MB/s per connection",
              "link": "one 100 MB/s link all connections share"}


def run(cluster: devcluster.ClusterInfo | None = None, runs: int = 3,
        data_mib: int = 1024, cap: str = "per_connection") -> Report:
    import rbd

    cluster = cluster or bench_cluster()
    cfg = config_mod.load(str(cluster.config))
    proxy, wan_endpoint = _proxy(cluster, cap)
    wan = {"RBD_RESTORE_S3_ENDPOINT": wan_endpoint}
    prefix = f"bench-reloc-{uuid.uuid4().hex[:6]}/"
    env = {"RBD_RESTORE_S3_PREFIX": prefix, **wan}
    s3 = make_client(cfg.s3, GET_THREADS * 2)
    wan_s3 = make_client(config_mod.S3Settings(**{**cfg.s3.__dict__, "endpoint": wan_endpoint}),
                         GET_THREADS * 2)
    handle, ioctx = open_volumes(cluster)
    source = f"reloc-src-{uuid.uuid4().hex[:6]}"
    raw_key = f"{prefix}raw/{source}.raw"
    count = data_mib * MiB // CHUNK
    data = count * CHUNK
    work = Path(cluster.dir) / f"reloc-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    report = Report(f"Relocation to a committed image, S3 behind 20 ms and "
                    f"{WAN_MODELS[cap]} ({data_mib} MiB of incompressible data)")
    samples: dict[str, list[float]] = {"ours": [], "ceph": [], "get": [], "import": [],
                                       "cpu": [], "floor": [], "send": []}
    used: dict[str, int] = {}
    try:
        pool = _pool_bytes()
        rbd.RBD().create(ioctx, source, data, old_format=False)
        with rbd.Image(ioctx, source) as image, ThreadPoolExecutor(WORKERS) as ex:
            list(ex.map(lambda i: image.write(_extent(pool, i), i * CHUNK), range(count)))
        backup_id = cli(cluster, "backup", f"volumes/{source}", env=env)["backup_id"]
        raw_file = work / "source.raw"
        subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "export", "--no-progress",
                        f"volumes/{source}", str(raw_file)], check=True)
        s3.upload_file(str(raw_file), cluster.bucket, raw_key)
        ceph_spec = json.dumps({"type": "raw", "stream": {
            "type": "s3", "url": f"{wan_endpoint}/{cluster.bucket}/{raw_key}",
            "access_key": cluster.s3_access_key, "secret_key": cluster.s3_secret_key}})
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=cluster.bucket, Prefix=f"{prefix}chunks/") for o in page.get("Contents", [])]

        def get(key: str) -> None:
            wan_s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read()

        for run_no in range(runs):
            with ThreadPoolExecutor(GET_THREADS) as ex:
                secs, _ = timed(map_all, ex, get, keys)
            samples["get"].append(secs)
            # The other half of a relocation: writing the same data into the pool.
            imported = f"reloc-import-{run_no}-{uuid.uuid4().hex[:4]}"
            secs, _ = timed(
                subprocess.run,
                ["rbd", "-c", str(cluster.ceph_conf), "import", "--no-progress", str(raw_file),
                 f"volumes/{imported}"], check=True, capture_output=True)
            samples["import"].append(secs)
            remove_image(ioctx, imported)

            fetcher = Fetcher(cluster, prefix, work / f"cache-{run_no}", extra_env=wan)
            target = f"reloc-ours-{run_no}-{uuid.uuid4().hex[:4]}"
            try:
                job = cli(cluster, "restore", backup_id, f"volumes/{target}", "--mode",
                          "instant", env={**env, **fetcher.env_overrides})["job_id"]
                cpu_before = fetcher.cpu_seconds()
                secs, _ = timed(execute_commit, ioctx, target)
                samples["cpu"].append((fetcher.cpu_seconds() - cpu_before) / (data / (1 << 30)))
                samples["ours"].append(secs)
                used["ours"] = _used(cluster, target)
                del job  # committed by hand: the record stays "staged" until a runner looks
            finally:
                fetcher.stop()
                remove_image(ioctx, target)
            samples["floor"].append(floor_cpu_per_gib(cluster, prefix, backup_id,
                                                       data / (1 << 30), wan_endpoint))
            # librbd reads the qcow2 file a 2 MiB cluster at a time.
            samples["send"].append(send_floor_cpu_per_gib(data / (1 << 30), MAX_CLUSTER_SIZE))

            target = f"reloc-ceph-{run_no}-{uuid.uuid4().hex[:4]}"
            rbd.RBD().migration_prepare_import(ceph_spec, ioctx, target)
            secs, _ = timed(execute_commit, ioctx, target)
            samples["ceph"].append(secs)
            used["ceph"] = _used(cluster, target)
            remove_image(ioctx, target)
    finally:
        (work / "source.raw").unlink(missing_ok=True)
        drop_caches(work)
        remove_image(ioctx, source)
        _delete_prefix(s3, cluster.bucket, prefix)
        ioctx.close()
        handle.shutdown()
        proxy.kill()
        proxy.wait()
    limit = data / MiB / median(samples["get"])
    for key, label in (("ours", "relocation: rbd-restore (execute + commit)"),
                       ("ceph", "relocation: Ceph raw s3 import (execute + commit)")):
        report.add(Row(label, "seconds", median(samples[key]), "s", runs=samples[key]))
        report.add(Row(label, "MB/s", data / 1e6 / median(samples[key]), "MB/s",
                       "raw parallel GETs", data / 1e6 / median(samples["get"]),
                       ">= 0.9x (issue 6)" if key == "ours" else "",
                       [data / 1e6 / s for s in samples[key]]))
    report.add(Row(f"relocation limit: raw parallel boto3 GETs ({GET_THREADS} threads)",
                   "MB/s", data / 1e6 / median(samples["get"]), "MB/s",
                   runs=[data / 1e6 / s for s in samples["get"]]))
    report.add(Row("rbd import of the same data", "MB/s", data / 1e6 / median(samples["import"]),
                   "MB/s", runs=[data / 1e6 / s for s in samples["import"]]))
    # A relocation downloads *and* writes; on a machine whose cores also run the OSD and
    # RGW, the two costs add up. This row compares with doing both back to back.
    back_to_back = data / 1e6 / (median(samples["get"]) + median(samples["import"]))
    report.add(Row("relocation: rbd-restore vs GET and import one after the other", "MB/s",
                   data / 1e6 / median(samples["ours"]), "MB/s",
                   "GET + rbd import, back to back", back_to_back, "",
                   [data / 1e6 / s for s in samples["ours"]]))
    report.add(Row("relocation: fetcher CPU", "CPU-s per GiB", median(samples["cpu"]), "s",
                   "floor: GET + open + decompress + verify, one process",
                   median(samples["floor"]), "<= 1.3x (issue 18)", samples["cpu"]))
    add_serving_rows(report, "relocation: fetcher CPU", samples, "2 MiB a request")
    for key, label in (("ours", "rbd-restore"), ("ceph", "Ceph raw s3 import")):
        report.add(Row(f"rbd du USED after commit: {label}", "MiB", used.get(key, 0) / MiB,
                       "MiB", "data", data / MiB))
    report.notes.append(f"Raw GET limit {limit:.0f} MiB/s; every system reaches RGW through "
                        f"the same proxy: 20 ms round trip, {WAN_MODELS[cap]}.")
    return report


def main() -> Any:
    return run_alone(run)


if __name__ == "__main__":
    main()
