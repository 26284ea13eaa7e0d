"""Instant restore and its jobs: restore --mode instant, status, abort, jobs run."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import typer

from rbd_restore import lazy_clone
from rbd_restore.ceph import Cluster, ImageRef
from rbd_restore.cli_context import load_config, open_cluster, progress_bar
from rbd_restore.config import Config
from rbd_restore.errors import NotFoundError, UnavailableError, UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs import instant
from rbd_restore.jobs.runner import JobRunner
from rbd_restore.jobs.store import ACTIVE, JobRecord, JobStore
from rbd_restore.logs import use_json_logs
from rbd_restore.output import print_json
from rbd_restore.units import format_size

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
jobs_app = typer.Typer(help="The job runner that relocates and commits instant restores.",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
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
                               int(rate_limit_mib * (1 << 20)), history, relocate_after)
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


def _reconciled(cluster: Cluster, record: JobRecord) -> JobRecord:
    """The header's migration state wins over a record that a dead runner left behind."""
    if record.state not in ACTIVE:
        return record
    try:
        with cluster.ioctx(record.pool) as ioctx:
            migration = lazy_clone.state(ioctx, record.image)
    except NotFoundError:
        return record.with_(state="aborted", error="the image no longer exists")
    except UnavailableError as exc:  # say so, and still show every other job
        return record.with_(error=exc.message)
    if migration is None:
        return record.with_(state="committed", progress=1.0)
    return record


def status(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Argument(help="One job id; all jobs without it.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show instant-restore jobs: state, progress, rate and time left."""
    with open_cluster(load_config(ctx)) as cluster:
        store = JobStore(cluster)
        records = [store.get(job)] if job else store.list()
        records = [_reconciled(cluster, r) for r in records]
    if as_json:
        print_json({"jobs": [r.as_status() for r in records]})
        return
    for r in records:
        eta = f", {r.eta_seconds:.0f} s left" if r.eta_seconds is not None else ""
        rate = f", {format_size(int(r.rate_bytes_per_s))}/s" if r.state in ACTIVE else ""
        error = f"  ({r.error})" if r.error else ""
        if r.state in ACTIVE and (due_in := r.due_in()) > 0:
            eta = f", relocation starts in {due_in:.0f} s"
        typer.echo(f"{r.id}  {r.spec:28} {r.state:10} {r.progress * 100:5.1f}%  "
                   f"{format_size(r.bytes_relocated)}{rate}{eta}{error}")


def abort(ctx: typer.Context, job: str) -> None:
    """Abort an instant restore: deletes the image and every write made to it.

    Refused while anything (a VM, a job runner) has the image open.
    """
    cfg = load_config(ctx)
    with open_cluster(cfg) as cluster:
        store = JobStore(cluster)
        record = _reconciled(cluster, store.get(job))
        if record.state not in ACTIVE:
            raise UserError(f"job {job} is {record.state}; only staged or relocating "
                            "restores can be aborted")
        with cluster.ioctx(record.pool) as ioctx:
            lazy_clone.abort(ioctx, record.image)
        store.save(record.with_(state="aborted", error="aborted by the operator"))
    try:
        ControlClient(cfg.fetcher).close(record.session_id)
    except UserError as exc:
        typer.echo(f"warning: session {record.session_id} not closed: {exc.message}", err=True)
    typer.echo(f"aborted job {job}: image {record.spec} removed")


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
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Relocate and commit every staged instant restore, resuming interrupted ones."""
    level = logging.getLevelName(log_level.upper())
    use_json_logs(level if isinstance(level, int) else logging.INFO)
    cfg = load_config(ctx)
    with open_cluster(cfg) as cluster:
        if job is not None:
            JobStore(cluster).get(job)  # an unknown id is an error, not an idle runner
        runner = JobRunner(cluster, ControlClient(cfg.fetcher), concurrency)
        typer.echo("job runner ready", err=True)
        runner.serve(once=once, only=job)
