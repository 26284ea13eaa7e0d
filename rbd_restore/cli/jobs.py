"""Instant restore and its jobs: restore --mode instant, status, abort, jobs run."""

from __future__ import annotations

import logging
import signal
import time
from typing import Annotated

import typer

from rbd_restore.ceph import ImageRef
from rbd_restore.cli.context import load_config, open_cluster, progress_bar
from rbd_restore.config import Config
from rbd_restore.errors import UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs import instant
from rbd_restore.jobs.abort import abort_job
from rbd_restore.jobs.metrics import RunnerMetrics, serve_metrics
from rbd_restore.jobs.runner import MAX_ATTEMPTS, PARALLEL_JOBS, JobRunner
from rbd_restore.jobs.store import JobRecord, JobStore
from rbd_restore.logs import use_json_logs
from rbd_restore.output import print_json

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
jobs_app = typer.Typer(help="The job runner that relocates and commits instant restores.",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    from rbd_restore.cli.status import status

    app.command("status")(status)
    app.command("abort")(abort)
    app.add_typer(jobs_app, name="jobs")


def restore_instant(cfg: Config, backup_id: str, ref: ImageRef, wait: bool, as_json: bool,
                    concurrency: int | None, rate_limit_mib: float = 0,
                    history: int = 0, relocate_after: float = 0) -> None:
    started = time.monotonic()
    control = ControlClient(cfg.fetcher)
    with open_cluster(cfg) as cluster:
        record = instant.start(cluster, control, backup_id, ref,
                               int(rate_limit_mib * (1 << 20)), history, relocate_after,
                               boot_set_seconds=cfg.fetcher.boot_set_seconds)
        if not as_json:
            typer.echo(f"ready: {ref} can boot now ({record.ready_seconds:.1f} s); "
                       f"job {record.id}")
        if not wait:
            if as_json:
                print_json({"job_id": record.id, "image": str(ref),
                            "ready_seconds": round(record.ready_seconds, 3)})
            else:
                typer.echo("a job runner (`rbd-restore jobs run`) relocates and commits it; "
                           f"follow it with `rbd-restore status {record.id}`")
            return
        runner = JobRunner(cluster, control, concurrency)
        with progress_bar(f"relocate {ref}", not as_json) as bar:
            def report(_fraction: float, current: JobRecord) -> None:
                if bar:
                    bar(current.bytes_relocated, current.bytes_total)

            final = runner.run(record, report)
    committed = time.monotonic() - started
    if final.state != "committed":
        raise UserError(f"job {record.id} ended {final.state}: {final.error}")
    if as_json:
        print_json({"job_id": record.id, "image": str(ref),
                    "ready_seconds": round(record.ready_seconds, 3),
                    "committed_seconds": round(committed, 3)})
    else:
        typer.echo(f"committed: {ref} is an ordinary RBD image ({committed:.1f} s)")


def abort(ctx: typer.Context, job: str, as_json: JsonOption = False) -> None:
    """Abort an instant restore: deletes the image and every write made to it.

    An image the restore replaced is put back. Refused while anything (a VM, a job
    runner) has the image open.
    """
    cfg = load_config(ctx)
    with open_cluster(cfg) as cluster:
        outcome = abort_job(cluster, ControlClient(cfg.fetcher), job)
    record = outcome.record
    if outcome.session_warning:
        typer.echo(f"warning: {outcome.session_warning}", err=True)
    if as_json:
        print_json({"job_id": job, "image": record.spec, "state": "aborted",
                    "put_back": outcome.put_back or None})
        return
    put_back = f"; {outcome.put_back} is {record.image} again" if outcome.put_back else ""
    typer.echo(f"aborted job {job}: image {record.spec} removed{put_back}")


@jobs_app.command("run")
def jobs_run(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Argument(
        help="Only this job (it must exist); default: every job.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Exit when no job is left.")] = False,
    concurrency: Annotated[int | None, typer.Option(
        "--relocation-concurrency", min=1, max=64,
        help="Objects copied in parallel (image metadata "
             "conf_rbd_concurrent_management_ops).")] = None,
    parallel_jobs: Annotated[int, typer.Option(
        "--jobs", min=1, max=64, help="Jobs relocated at once, the pools taking turns.")]
    = PARALLEL_JOBS,
    max_attempts: Annotated[int, typer.Option(
        "--max-attempts", min=1, max=1000, help="Failed attempts in a row, without "
        "progress, before a job is marked failed.")] = MAX_ATTEMPTS,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    metrics_listen: Annotated[str | None, typer.Option(
        "--metrics-listen", help="Serve Prometheus metrics (/metrics) on HOST:PORT.")] = None,
) -> None:
    """Relocate and commit every staged instant restore, resuming interrupted ones."""
    level = logging.getLevelName(log_level.upper())
    use_json_logs(level if isinstance(level, int) else logging.INFO)
    cfg = load_config(ctx)
    with open_cluster(cfg) as cluster:
        if job is not None:
            JobStore(cluster).get(job)  # an unknown id is an error, not an idle runner
        metrics = RunnerMetrics()
        if metrics_listen is not None:
            serve_metrics(metrics.registry, metrics_listen)
        runner = JobRunner(cluster, ControlClient(cfg.fetcher), concurrency,
                           max_attempts=max_attempts, parallel_jobs=parallel_jobs,
                           metrics=metrics)
        # SIGTERM (systemd, an operator): running relocations stop at their next object,
        # their progress is saved, and another runner resumes them.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: runner.stopping.set())
        typer.echo("job runner ready", err=True)
        runner.serve(once=once, only=job)
    if runner.stopping.is_set() and not once:
        typer.echo("job runner stopped", err=True)


@jobs_app.command("retry")
def jobs_retry(ctx: typer.Context, job: str) -> None:
    """Put a failed job back in the queue; a job runner takes it up again."""
    with open_cluster(load_config(ctx)) as cluster:
        store = JobStore(cluster)
        record = store.get(job)
        if record.state != "failed":
            raise UserError(f"job {job} is {record.state}; only failed jobs are retried")
        store.save(record.with_(state="staged", attempts=0, error=""))
    typer.echo(f"job {job} is queued again")
