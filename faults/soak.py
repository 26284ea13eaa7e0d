"""`make faults`: rounds of the scenarios (faults/scenarios.py) until enough faults were
injected or the time is up, then a report in faults/results/ (JSON and Markdown).

    python -m faults.soak [--minutes 25] [--min-faults 200] [--rate 0.08] [--seed 1]
                          [--no-guest] [--keep] [--work DIR]

Exit status 0 only when every check held: no wrong byte restored or served, no
guest write lost, no unreadable manifest, no stuck job, every command that had
to succeed did, and every failure was one line without a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from faults import scenarios
from faults.site import Site, Tally

RESULTS = Path(__file__).resolve().parent / "results"
MUST_BE_ZERO = ("full restores bit-exact FAILED", "instant restores bit-exact FAILED",
                "guest writes lost", "manifests readable FAILED",
                "instant restores committed (no stuck job) FAILED",
                "commands that must succeed FAILED",
                "error output one line, no traceback FAILED", "scenario errors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faults.soak")
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--min-faults", type=int, default=200)
    parser.add_argument("--rate", type=float, default=0.08, help="S3 faults per exchange")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-guest", action="store_true", help="skip the QEMU scenario")
    parser.add_argument("--keep", action="store_true", help="keep the cluster afterwards")
    parser.add_argument("--work", type=Path, default=Path(".faults"))
    args = parser.parse_args(argv)
    if args.work.exists() and not args.keep:
        shutil.rmtree(args.work)
    started = time.monotonic()
    site = Site.open(args.work.resolve(), args.rate, args.seed)
    try:
        run_rounds(site, args, started)
        stuck = [j for j in site.clean_cli.json("status")["jobs"]
                 if j["state"] not in ("committed", "aborted")]
        site.tally.check("no job left unfinished", not stuck, str(stuck)[:300])
    finally:
        site.close(purge=not args.keep)
    report = render(site.tally, time.monotonic() - started, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["ok"] else 1


def run_rounds(site: Site, args: argparse.Namespace, started: float) -> None:
    volume = "soak-volume"
    round_no = 0
    need_guest = not args.no_guest
    while True:
        elapsed = (time.monotonic() - started) / 60
        enough = sum(site.tally.faults.values()) >= args.min_faults and not need_guest \
            and round_no >= len(scenarios.DAEMON_FAULTS)
        if enough or elapsed > args.minutes:
            return
        try:
            backup_id, digest = scenarios.backups(site, volume, round_no)
            scenarios.instant(site, backup_id, digest, round_no)
        except Exception as exc:  # counted and reported; the soak goes on
            site.tally.failure(f"round {round_no}", exc)
        if need_guest:
            try:
                scenarios.guest(site)
            except Exception as exc:
                site.tally.failure("guest", exc)
            need_guest = False
        round_no += 1
        print(f"soak: round {round_no} done, {sum(site.tally.faults.values())} faults, "
              f"{(time.monotonic() - started) / 60:.1f} min", file=sys.stderr, flush=True)


def render(tally: Tally, seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    zero = {name: tally.checks.get(name, 0) for name in MUST_BE_ZERO}
    return {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds), "rate": args.rate, "seed": args.seed,
            "faults_total": sum(tally.faults.values()), "faults": dict(tally.faults),
            "scenarios": dict(tally.scenarios), "checks": dict(tally.checks),
            "must_be_zero": zero, "problems": tally.problems,
            "ok": not any(zero.values()) and sum(tally.faults.values()) > 0
            and not tally.checks.get("no job left unfinished FAILED", 0)}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Fault soak, {report['when']}", "",
             f"{report['faults_total']} faults injected in {report['seconds']} s "
             f"(S3 fault rate {report['rate']} per exchange, seed {report['seed']}); "
             f"scenarios run: " + ", ".join(f"{k} {v}" for k, v in
                                           sorted(report["scenarios"].items())) + ".", "",
             "| fault | injected |", "|---|---|"]
    lines += [f"| {kind} | {count} |" for kind, count in sorted(report["faults"].items())]
    lines += ["", "| check | count |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in sorted(report["checks"].items())]
    lines += ["", "| must be zero | found |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in report["must_be_zero"].items()]
    lines += ["", f"**{'OK' if report['ok'] else 'FAILED'}**"]
    if report["problems"]:
        lines += ["", "Problems:", ""] + [f"- {p.splitlines()[0]}" for p in report["problems"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
