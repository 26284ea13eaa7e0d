"""What every soak scenario works on: a cluster, S3 behind the fault proxy, a fetcher,
and the tally of faults injected and of what was checked."""

from __future__ import annotations

import json
import random
import subprocess
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbd_restore import devcluster
from tests.support.faultproxy import FaultPlan, FaultProxy, through
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli

MiB = 1 << 20
OSD_BYTES = 24 << 30
PROXY_FAULTS = ("slowdown", "error", "reset", "stall", "truncate", "corrupt_reply",
                "corrupt_request")


@dataclass
class Tally:
    """Faults injected and checks made, for the report."""

    faults: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    scenarios: Counter[str] = field(default_factory=Counter)

    def fault(self, kind: str, count: int = 1) -> None:
        self.faults[kind] += count

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        """One verification; a failed one is a problem the report lists."""
        self.checks[what] += 1
        if not ok:
            self.checks[f"{what} FAILED"] += 1
            self.problems.append(f"{what}: {detail}"[:500])

    def failure(self, scenario: str, exc: BaseException) -> None:
        self.checks["scenario errors"] += 1
        self.problems.append(f"{scenario}: {type(exc).__name__}: {exc}"[:500] + "\n" +
                             traceback.format_exc()[-800:])


@dataclass
class Site:
    work: Path
    cluster: devcluster.ClusterInfo
    proxy: FaultProxy
    fetcher: FetcherProcess
    tally: Tally
    rng: random.Random
    prefix: str

    @classmethod
    def open(cls, work: Path, rate: float, seed: int) -> Site:
        work.mkdir(parents=True, exist_ok=True)
        info = devcluster.up(work / "cluster", OSD_BYTES, "bluestore").info
        host, port = info.s3_endpoint.removeprefix("http://").split(":")
        proxy = FaultProxy(host, int(port), FaultPlan(rate=rate, stall_seconds=3,
                                                      faults=PROXY_FAULTS, seed=seed))
        proxy.start()
        prefix = f"soak-{int(time.time())}/"
        fetcher = FetcherProcess(info, work / "fetcher-cache", prefix, through(proxy),
                                 log_level="info", socket_activation=True)
        fetcher.start()
        return cls(work, info, proxy, fetcher, Tally(), random.Random(seed), prefix)

    def close(self, purge: bool) -> None:
        self.fetcher.close()
        self.proxy.stop()
        devcluster.down(self.cluster.dir, purge=purge)

    @property
    def cli(self) -> Cli:
        """The CLI with S3 through the proxy and the fetcher's control plane."""
        return Cli(self.cluster, self.prefix, {**through(self.proxy),
                                                **self.fetcher.env_overrides})

    @property
    def clean_cli(self) -> Cli:
        """The CLI straight to RGW: for checks, never for the work under test."""
        return Cli(self.cluster, self.prefix, self.fetcher.env_overrides)

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """A command that must succeed; a failure is counted, and its stderr must be one
        line without a traceback."""
        result = self.cli.run(*args, timeout=timeout)
        lines = result.stderr.strip().splitlines()
        if result.returncode != 0:
            self.tally.check("commands that must succeed", False,
                             f"{' '.join(args[:3])}: exit {result.returncode}: "
                             f"{result.stderr.strip()[-300:]}")
        else:
            self.tally.check("commands that must succeed", True)
        self.tally.check("error output one line, no traceback",
                         "Traceback" not in result.stderr and
                         (result.returncode == 0 or len(lines) == 1), result.stderr[-300:])
        return result

    def json(self, *args: str, timeout: float = 600) -> Any:
        result = self.run(*args, "--json", timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip()[-200:]}")
        return json.loads(result.stdout)

    def proxy_faults(self, before: Counter[str]) -> None:
        for kind, count in (self.proxy.injected - before).items():
            self.tally.fault(f"s3 {kind}", count)

    def restart(self, daemon: str) -> None:
        """Kill a Ceph daemon (SIGKILL) and start it again, as a crash and a restart."""
        devcluster.kill(self.cluster.dir, daemon)
        self.tally.fault(f"{daemon} killed and restarted")
        time.sleep(self.rng.uniform(0.5, 2.0))
        devcluster.up(self.cluster.dir, OSD_BYTES, "bluestore")
