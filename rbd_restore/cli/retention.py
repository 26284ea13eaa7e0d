"""``rbd-restore forget``: retention by policy (restic's rules, rbd_restore/repo/retention.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from rbd_restore.ceph import ImageRef
from rbd_restore.cli.context import load_config, open_repository
from rbd_restore.output import print_json


def forget(
    ctx: typer.Context,
    keep_last: Annotated[int, typer.Option("--keep-last", min=0,
                                           help="The newest N backups.")] = 0,
    keep_hourly: Annotated[int, typer.Option("--keep-hourly", min=0,
                                             help="The newest of each of N hours.")] = 0,
    keep_daily: Annotated[int, typer.Option("--keep-daily", min=0,
                                            help="The newest of each of N days.")] = 0,
    keep_weekly: Annotated[int, typer.Option("--keep-weekly", min=0,
                                             help="The newest of each of N ISO weeks.")] = 0,
    keep_monthly: Annotated[int, typer.Option("--keep-monthly", min=0,
                                              help="The newest of each of N months.")] = 0,
    keep_yearly: Annotated[int, typer.Option("--keep-yearly", min=0,
                                             help="The newest of each of N years.")] = 0,
    image: Annotated[str | None, typer.Option(
        "--image", help="Only backups of POOL/IMAGE.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say, delete nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Delete the backups a retention policy does not keep (then run gc).

    Each volume is judged on its own. A backup an unfinished restore reads is never
    deleted."""
    from rbd_restore.repo.deletion import forget as run_forget
    from rbd_restore.repo.retention import Policy

    cfg = load_config(ctx)
    policy = Policy(last=keep_last, hourly=keep_hourly, daily=keep_daily, weekly=keep_weekly,
                    monthly=keep_monthly, yearly=keep_yearly)
    ref = ImageRef.parse(image, cfg.pools.backup_default) if image else None
    result = run_forget(open_repository(cfg), policy, (ref.pool, ref.name) if ref else None,
                        dry_run)
    if as_json:
        print_json({**result.as_json(), "dry_run": dry_run})
        return
    verb = "would remove" if dry_run else "removed"
    for manifest, rules in result.kept:
        typer.echo(f"keep    {manifest.backup_id}  {manifest.source.spec}  "
                   f"({', '.join(rules)})")
    for manifest in result.removed:
        typer.echo(f"{verb:7} {manifest.backup_id}  {manifest.source.spec}")
    for manifest, holders in result.held:
        typer.echo(f"held    {manifest.backup_id}  {manifest.source.spec}  (in use by "
                   f"{holders[0]})")
    for backup_id in result.unreadable:
        typer.echo(f"warning: backup {backup_id} has a manifest that fails validation; "
                   "left alone", err=True)
    typer.echo(f"forget: kept {len(result.kept)}, {verb} {len(result.removed)}, held "
               f"{len(result.held)}" + ("; run `rbd-restore gc` to free their chunks"
                                        if result.removed and not dry_run else ""))
