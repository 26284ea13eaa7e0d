"""Shared pieces of the benchmarks: the cluster they run on, timing and reports."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rbd_restore import devcluster

T = TypeVar("T")
BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent


def bench_cluster(osd_gib: int = 48) -> devcluster.ClusterInfo:
    """A bluestore cluster (data on a sparse file) in bench/.work, reused across runs."""
    root = Path(os.environ.get("RBD_RESTORE_BENCH_DIR", BENCH_DIR / ".work" / "cluster"))
    return devcluster.up(root, osd_bytes=osd_gib << 30, objectstore="bluestore").info


def collect_rgw_garbage(cluster: devcluster.ClusterInfo) -> None:
    """Free what deleted bench objects still hold, now, outside every measurement.

    RGW frees the data of deleted objects in the background two hours after the
    delete (rgw_gc_obj_min_wait): a run after an earlier one had that work, several
    GiB of it, land in the middle of its measurements, and repeated runs filled
    the bench OSD."""
    subprocess.run(["radosgw-admin", "-c", str(cluster.ceph_conf), "gc", "process",
                    "--include-all"], check=True, capture_output=True)


def drop_caches(work: Path) -> None:
    """Remove the fetcher caches a benchmark left in ``work``; keep its logs and consoles
    (files), which say what happened. Each boot run left 270 MiB of caches behind."""
    for entry in work.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def open_volumes(cluster: devcluster.ClusterInfo) -> tuple[Any, Any]:
    """A RADOS handle as admin and an ioctx on the ``volumes`` pool; the caller closes both."""
    import rados

    handle = rados.Rados(conffile=str(cluster.ceph_conf), rados_id="admin",
                         conf={"keyring": str(cluster.keyring)})
    handle.connect()
    return handle, handle.open_ioctx("volumes")


class JobStates:
    """Job states read from RADOS by this process, for the benchmarks that wait for a
    commit while they measure. Each ``rbd-restore status`` process costs 0.3-0.4
    CPU-seconds here (Python and its imports): polled every 0.25 s beside a booting
    guest, it took half a core of the two that the guest, the fetcher and the cluster
    share, and only the instant side of each comparison had it."""

    def __init__(self, cluster: devcluster.ClusterInfo, pool: str = "volumes") -> None:
        from rbd_restore import config as config_mod
        from rbd_restore.ceph import Cluster
        from rbd_restore.jobs.store import JobStore

        self.pool = pool
        self.ceph = Cluster(config_mod.load(str(cluster.config)).ceph)
        self.store = JobStore(self.ceph)

    def state(self, job_id: str) -> str:
        record = self.store.load(self.pool, job_id)
        if record is None:
            raise RuntimeError(f"job {job_id} is not in pool {self.pool}")
        return record.state

    def close(self) -> None:
        self.ceph.close()


def timed(action: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Seconds ``action(*args, **kwargs)`` took, and its result."""
    started = time.monotonic()
    result = action(*args, **kwargs)
    return time.monotonic() - started, result


def execute_commit(ioctx: Any, name: str) -> None:
    """Relocate a prepared migration and commit it: what ``rbd migration execute`` and
    ``commit`` do."""
    import rbd

    rbd.RBD().migration_execute(ioctx, name)
    rbd.RBD().migration_commit(ioctx, name)


def map_all(executor: Executor, action: Callable[[T], Any], items: Iterable[T]) -> list[Any]:
    """``action`` over every item on ``executor``; waits for all (for :func:`timed`)."""
    return list(executor.map(action, items))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def cli(cluster: devcluster.ClusterInfo, *args: str, env: dict[str, str] | None = None) -> Any:
    full_env = {**os.environ, "RBD_RESTORE_CONFIG": str(cluster.config), **(env or {})}
    out = subprocess.run([sys.executable, "-m", "rbd_restore.cli", *args, "--json"],
                         capture_output=True, text=True, env=full_env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"rbd-restore {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ceph = subprocess.run(["ceph", "--version"], capture_output=True, text=True,
                          check=False).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / (1 << 30), 1),
            "kernel": platform.release(), "python": platform.python_version(), "ceph": ceph}


@dataclass
class Row:
    scenario: str
    measure: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    target: str = ""
    runs: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if not self.baseline_value:
            return None
        return self.value / self.baseline_value


@dataclass
class Report:
    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.scenario}: {row.measure} = {row.value:.2f} {row.unit}"
              + (f" (ratio {row.ratio:.2f} vs {row.baseline})" if row.ratio else ""),
              flush=True)
        return row

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "notes": self.notes,
                "rows": [{**row.__dict__, "ratio": row.ratio} for row in self.rows]}

    def markdown(self) -> str:
        lines = [f"### {self.name}", "",
                 "| scenario | measure | value | baseline | ratio | target |",
                 "|---|---|---|---|---|---|"]
        for row in self.rows:
            base = (f"{row.baseline}: {row.baseline_value:.2f} {row.unit}"
                    if row.baseline_value is not None else row.baseline)
            ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
            lines.append(f"| {row.scenario} | {row.measure} | {row.value:.2f} {row.unit} | "
                         f"{base} | {ratio} | {row.target} |")
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def write_reports(reports: list[Report]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{stamp}.json"
    path.write_text(json.dumps({"created": stamp, "machine": machine(),
                                "reports": [r.as_json() for r in reports]}, indent=2) + "\n")
    write_latest(path)
    return path


def run_alone(run: Callable[[], Report]) -> Path:
    """One benchmark on its own (``python -m bench.NAME``): its report written."""
    path = write_reports([run()])
    print(f"report: {path}")
    return path


def _sections(markdown: str) -> dict[str, str]:
    """The ``### report`` sections of a latest.md, by report name."""
    sections: dict[str, str] = {}
    for block in markdown.split("\n### ")[1:]:
        name = block.split("\n", 1)[0]
        sections[name] = "### " + block.rstrip("\n") + "\n"
    return sections


def write_latest(path: Path) -> None:
    """``latest.md`` from a run's JSON report (``python -m bench.common FILE`` redoes it).
    A run of one benchmark replaces only its own sections: the others keep the
    numbers of the run that last measured them, each section naming its run."""
    run = json.loads(path.read_text())
    info = run["machine"]
    reports = [Report(r["name"], [Row(**{k: v for k, v in row.items() if k != "ratio"})
                                  for row in r["rows"]], r["notes"]) for r in run["reports"]]
    latest = RESULTS / "latest.md"
    sections = _sections(latest.read_text()) if latest.exists() else {}
    for report in reports:
        table = report.markdown().split("\n", 1)[1]
        sections[report.name] = (f"### {report.name}\n\nRun {run['created']}: {info['cpu']}, "
                                 f"{info['cores']} cores, {info['memory_gib']} GiB, kernel "
                                 f"{info['kernel']}, {info['ceph']}.\n{table}")
    header = ["# rbd-restore benchmarks", "",
              "Values are medians of the runs listed in the JSON report of the run each "
              "section names; ratios are computed within that run.", ""]
    latest.write_text("\n".join(header) + "\n" + "\n".join(sections.values()))


if __name__ == "__main__":
    write_latest(Path(sys.argv[1]))
