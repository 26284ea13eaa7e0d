"""`make bench`: every benchmark on the bench cluster, one report."""

from __future__ import annotations

import compileall
import sys
from functools import partial

from bench import backup_restore, boot, encryption, fetcher, guest, mass, relocation, timelines
from bench.common import REPO_ROOT, bench_cluster, collect_rgw_garbage, write_reports


def main() -> int:
    # As an installed package would be: byte-compiled. The editable install is not, and
    # with PYTHONDONTWRITEBYTECODE set every command would compile its modules again.
    compileall.compile_dir(str(REPO_ROOT / "rbd_restore"), quiet=1)
    cluster = bench_cluster()
    print(f"bench cluster in {cluster.dir}", flush=True)
    reports = []
    # The relocation twice: S3 capped per connection (the cores are the limit here),
    # then behind one shared link (the link is the limit).
    for benchmark in (boot.run, relocation.run, partial(relocation.run, cap="link"),
                      backup_restore.run, encryption.run, fetcher.run, mass.run, guest.run,
                      timelines.run):
        collect_rgw_garbage(cluster)  # what the previous one (or an earlier run) deleted
        reports.append(benchmark(cluster))
    collect_rgw_garbage(cluster)
    path = write_reports(reports)
    print(f"report: {path} and {path.parent / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
