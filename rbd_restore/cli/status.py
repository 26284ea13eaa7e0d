"""``rbd-restore status [--watch]``: instant restores as they hydrate."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from rbd_restore.cli.context import load_config, open_cluster
from rbd_restore.errors import UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs.store import ACTIVE
from rbd_restore.jobs.view import JobView, job_views
from rbd_restore.output import print_json
from rbd_restore.units import format_size


def _eta(view: JobView) -> str:
    r = view.record
    if r.state in ACTIVE and (due_in := r.due_in()) > 0:
        return f"relocation starts in {due_in:.0f} s"
    if r.eta_seconds is None:
        return "ETA -"
    minutes, secs = divmod(int(r.eta_seconds), 60)
    return f"ETA {minutes}m{secs:02d}s" if minutes else f"ETA {secs}s"


def _row(view: JobView) -> list[str]:
    r = view.record
    progress = (f"{r.progress * 100:.1f} % of {format_size(r.bytes_total)}" if r.bytes_total
                else f"{r.progress * 100:.1f} %")
    rate = f"{format_size(int(r.rate_bytes_per_s))}/s" if r.state in ACTIVE else "-"
    ratio = view.cache_hit_ratio
    reads = "-"
    if view.guest_reads is not None:
        reads = str(view.guest_reads) + (f", {ratio * 100:.0f} % cached" if ratio is not None
                                         else "")
    return [r.id, r.spec, view.phase, progress, rate, _eta(view), reads, r.error or ""]


# "guest reads" are the VM's reads the fetcher served, with the share its cache answered
HEADERS = ["job", "image", "phase", "relocated", "rate", "ETA", "guest reads", "note"]


def _panel(views: list[JobView]) -> Any:
    """Two lines a job, so that an 80-column terminal shows every field whole: the job and
    its image and phase, then a bar with bytes, rate, time left and the guest's reads."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(f"rbd-restore jobs at {time.strftime('%H:%M:%S')}", style="bold")]
    if not views:
        parts.append(Text("no jobs"))
    for view in views:
        r = view.record
        cells = dict(zip(HEADERS, _row(view), strict=True))
        head = Text.assemble((f"{view.phase:<11}", "cyan"), (r.id, "bold"), "  ", r.spec)
        if r.error:
            head.append(f"  {r.error}", style="yellow")
        line = Table.grid(padding=(0, 1))
        line.add_row(ProgressBar(total=1.0, completed=r.progress, width=10),
                     Text(f"{cells['relocated']}, {cells['rate']}, {cells['ETA']}, "
                          f"reads {cells['guest reads']}", overflow="fold"))
        parts += [head, line]
    return Group(*parts)


def status(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Argument(help="One job id; all jobs without it.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Redraw every --interval seconds "
                                        "until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, max=3600)] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (once).")] = False,
) -> None:
    """Instant-restore jobs: phase, progress, rate, time left, guest reads.

    Guest reads are the VM's reads the fetcher served, with the share its cache
    answered."""
    cfg = load_config(ctx)
    try:
        control: ControlClient | None = ControlClient(cfg.fetcher, timeout=5)
    except UserError:
        control = None  # no fetcher configured here: records only
    with open_cluster(cfg) as cluster:
        if watch and not as_json:
            _watch(cluster, control, job, interval)
            return
        views, problems = job_views(cluster, control, job)
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    if as_json:
        print_json({"jobs": [v.as_json() for v in views], "problems": problems})
        return
    for view in views:
        cells = _row(view)
        typer.echo(f"{cells[0]}  {cells[1]:28} {cells[2]:11} {cells[3]}, {cells[4]}"
                   f", {cells[5]}, guest reads {cells[6]}"
                   + (f"  ({cells[7]})" if cells[7] else ""))


def _watch(cluster: Any, control: ControlClient | None, job: str | None,
           interval: float) -> None:
    from rich.live import Live

    views, _ = job_views(cluster, control, job)
    try:
        with Live(_panel(views), refresh_per_second=4, transient=False) as live:
            while True:
                time.sleep(interval)
                views, _ = job_views(cluster, control, job)
                live.update(_panel(views))
    except KeyboardInterrupt:
        pass  # Ctrl-C ends a watch: not a failure
