"""``rbd-restore fetcher``: run the daemon, and manage its sessions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rbd_restore.cli.context import load_config
from rbd_restore.config import Config
from rbd_restore.errors import UsageError, UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.logs import use_json_logs
from rbd_restore.output import print_json
from rbd_restore.units import parse_size

if TYPE_CHECKING:  # aiohttp loads only for `fetcher serve`
    from prometheus_client import CollectorRegistry

    from rbd_restore.fetcher.server import FetcherService

fetcher_app = typer.Typer(help="The fetcher daemon that serves backups to librbd.",
                          no_args_is_help=True)
session_app = typer.Typer(help="Sessions: one signed URL per restore.", no_args_is_help=True)
fetcher_app.add_typer(session_app, name="session")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@fetcher_app.command("serve")
def serve(
    ctx: typer.Context,
    listen: Annotated[str | None, typer.Option("--listen", help="Data plane HOST:PORT.")]
    = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Chunk cache directory.")]
    = None,
    cache_size: Annotated[str | None, typer.Option("--cache-size", help="e.g. 20G.")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")]
    = "info",
    run_jobs: Annotated[bool, typer.Option(
        "--run-jobs", help="Also host the job runner (needs the [ceph] settings): one "
        "process for a small site.")] = False,
) -> None:
    """Serve backups as qcow2 files over HTTP until stopped (SIGTERM or Ctrl-C)."""
    from rbd_restore.allocator import reuse_large_buffers
    from rbd_restore.fetcher.server import FetcherService

    reuse_large_buffers()  # before any thread: see rbd_restore/allocator.py

    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise UsageError(f"unknown log level {log_level!r}")
    use_json_logs(level)
    cfg = load_config(ctx)
    service = FetcherService(cfg, cache_dir=cache_dir,
                             cache_size=parse_size(cache_size, "--cache-size")
                             if cache_size else None, listen=listen)

    def ready() -> None:
        if run_jobs:
            threading.Thread(target=_host_job_runner, args=(cfg, service.metrics.registry),
                             name="job-runner",
                             daemon=True).start()
        print(f"fetcher ready: data {service.listeners.data}, control "
              f"{service.listeners.control}, metrics {service.listeners.metrics}"
              + (", job runner on" if run_jobs else ""), file=sys.stderr, flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signal(service, ready))


def _host_job_runner(cfg: Config, registry: CollectorRegistry) -> None:
    """The job runner in the fetcher's process; it talks to the control plane like any
    other runner, so the two roles stay separable. Its metrics join the fetcher's."""
    from rbd_restore.cli.context import open_cluster
    from rbd_restore.jobs.metrics import RunnerMetrics
    from rbd_restore.jobs.runner import JobRunner

    metrics = RunnerMetrics(registry)
    log = logging.getLogger("rbd_restore.jobs")
    while True:
        try:
            with open_cluster(cfg) as cluster:
                JobRunner(cluster, ControlClient(cfg.fetcher), metrics=metrics).serve()
        except UserError as exc:
            log.error("job runner: %s; starting again in 10 s", exc.message)
        except Exception:  # a bug must not end the runner for the fetcher's lifetime
            log.exception("job runner failed; starting again in 10 s")
        time.sleep(10)


async def _serve_until_signal(service: FetcherService, ready: Callable[[], None]) -> None:
    task = asyncio.ensure_future(service.serve(ready))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


@session_app.command("create")
def session_create(ctx: typer.Context, backup_id: str, as_json: JsonOption = False) -> None:
    """Open a session for BACKUP_ID and print its URL."""
    session = ControlClient(load_config(ctx).fetcher).create(backup_id)
    if as_json:
        print_json(session)
    else:
        typer.echo(f"{session['session_id']} {session['url']}")


@session_app.command("list")
def session_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List open sessions."""
    sessions = ControlClient(load_config(ctx).fetcher).list()
    if as_json:
        print_json({"sessions": sessions})
        return
    for s in sessions:
        typer.echo(f"{s['session_id']}  {s['backup_id']}  {s['created'][:19]}")


@session_app.command("close")
def session_close(ctx: typer.Context, session_id: str) -> None:
    """Close a session: its URL answers 404 from now on, on every replica."""
    ControlClient(load_config(ctx).fetcher).close(session_id)
    typer.echo(f"session {session_id} closed")
