"""`make bench`: every benchmark on the bench cluster, one report."""

from __future__ import annotations

import sys

from bench import backup_restore, boot, fetcher, relocation
from bench.common import bench_cluster, write_reports


def main() -> int:
    cluster = bench_cluster()
    print(f"bench cluster in {cluster.dir}", flush=True)
    reports = [boot.run(cluster), relocation.run(cluster), backup_restore.run(cluster),
               fetcher.run(cluster)]
    path = write_reports(reports)
    print(f"report: {path} and {path.parent / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
