"""Commands on the backup repository: backup, backups ..., gc, restore."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rbd_restore.ceph import ImageRef
from rbd_restore.cli.context import load_config, open_cluster, open_repository, progress_bar
from rbd_restore.errors import AlreadyExistsError, IntegrityError, UsageError, UserError
from rbd_restore.output import print_json
from rbd_restore.repo.chunks import DEFAULT_CHUNK_SIZE
from rbd_restore.units import format_size, parse_size

# The repository's modules are imported where used (see cli/context.py).
if TYPE_CHECKING:
    from rbd_restore.repo.manifest import Manifest

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
WorkersOption = Annotated[int, typer.Option("--workers", min=1, max=64,
                                            help="Parallel reads and S3 requests.")]

backups_app = typer.Typer(help="List, inspect, verify and delete backups.",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("backup")(backup)
    app.command("restore")(restore)
    app.command("gc")(gc)
    app.add_typer(backups_app, name="backups")


def backup(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="POOL/IMAGE to back up.")],
    full: Annotated[bool, typer.Option("--full", help="Read every allocated extent, "
                                       "not only what changed since the last backup.")] = False,
    chunk_size: Annotated[str, typer.Option("--chunk-size", help="Power of two, 64K to 32M.")]
    = f"{DEFAULT_CHUNK_SIZE >> 20}M",
    workers: WorkersOption = 16,
    label: Annotated[list[str] | None, typer.Option(
        "--label", help="NAME=VALUE stored with the backup (repeatable).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Snapshot POOL/IMAGE and store it in the bucket (incremental when possible)."""
    from rbd_restore.backup import run_backup  # not paid by the commands that never back up

    cfg = load_config(ctx)
    ref = ImageRef.parse(image, cfg.pools.backup_default)
    size = parse_size(chunk_size, "--chunk-size")
    labels = parse_labels(label or [])
    repo = open_repository(cfg, workers, create=True)
    with open_cluster(cfg) as cluster, progress_bar(f"backup {ref}", not as_json) as progress:
        result = run_backup(cluster, repo, ref, size, full=full, workers=workers,
                            progress=progress, labels=labels)
    if as_json:
        print_json(result.as_json())
        return
    stats = result.manifest.stats
    kind = f"incremental on {result.parent}" if result.parent else "full"
    typer.echo(f"backup {result.manifest.backup_id} of {ref} ({kind}): read "
               f"{format_size(stats.bytes_read)}, uploaded {format_size(stats.bytes_uploaded)} "
               f"in {stats.chunks_new} new chunks, {stats.chunks_reused} reused, "
               f"{stats.seconds:.1f} s")


def restore(
    ctx: typer.Context,
    backup_id: Annotated[str, typer.Argument(help="Backup id.")],
    image: Annotated[str, typer.Argument(help="POOL/IMAGE to create.")],
    mode: Annotated[str, typer.Option("--mode", help="instant: boot now, data on demand; "
                                      "full: copy everything first.")] = "full",
    wait: Annotated[bool, typer.Option("--wait", help="instant: stay until committed.")]
    = False,
    concurrency: Annotated[int | None, typer.Option(
        "--relocation-concurrency", min=1, max=64, help="instant with --wait: objects "
        "copied in parallel.")] = None,
    rate_limit: Annotated[float, typer.Option(
        "--rate-limit", min=0, help="instant: relocation reads from the backup, MiB/s "
        "(0 = unlimited).")] = 0,
    with_history: Annotated[int, typer.Option(
        "--with-history", min=0, max=15, help="instant: also bring the previous N backups "
        "of the volume, as RBD snapshots.")] = 0,
    relocate_after: Annotated[float, typer.Option(
        "--relocate-after", min=0, max=86400, help="instant: seconds before the relocation "
        "may start, e.g. while the VM boots (0 = at once).")] = 0,
    workers: WorkersOption = 16,
    as_json: JsonOption = False,
) -> None:
    """Restore a backup into a new image (never overwrites an existing one)."""
    if mode not in ("full", "instant"):
        raise UsageError(f"--mode must be instant or full, not {mode!r}")
    if mode == "full" and with_history:
        raise UsageError("--with-history needs --mode instant")
    if mode == "full" and relocate_after:
        raise UsageError("--relocate-after needs --mode instant")
    cfg = load_config(ctx)
    ref = ImageRef.parse(image, cfg.pools.restore_default)
    if mode == "instant":
        from rbd_restore.cli.jobs import restore_instant

        restore_instant(cfg, backup_id, ref, wait, as_json, concurrency, rate_limit,
                        with_history, relocate_after)
        return
    from rbd_restore.restore_full import restore_full

    repo = open_repository(cfg, workers)
    with open_cluster(cfg) as cluster, progress_bar(f"restore {ref}", not as_json) as progress:
        result = restore_full(cluster, repo, backup_id, ref, workers=workers, progress=progress)
    if as_json:
        print_json(result.as_json())
        return
    typer.echo(f"restored {backup_id} to {ref}: wrote {format_size(result.bytes_written)} "
               f"from {result.chunks_fetched} chunks in {result.seconds:.1f} s")


def gc(
    ctx: typer.Context,
    grace: Annotated[str | None, typer.Option("--grace", help="Keep unreferenced chunks "
                                              "younger than this many seconds (default: an "
                                              "hour).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, delete nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete chunks that no backup references (not while a backup runs)."""
    from rbd_restore.repo.maintenance import DEFAULT_GC_GRACE, collect_garbage

    if grace is not None and not grace.isdigit():
        raise UsageError(f"--grace takes a number of seconds, not {grace!r}")
    repo = open_repository(load_config(ctx))
    with progress_bar("gc", not as_json) as progress:
        result = collect_garbage(
            repo, DEFAULT_GC_GRACE if grace is None else dt.timedelta(seconds=int(grace)),
            dry_run=dry_run, progress=progress)
    for backup_id in result.unreadable_manifests:
        typer.echo(f"warning: backup {backup_id} has a manifest that fails validation; "
                   "gc kept every chunk it names", err=True)
    if as_json:
        print_json(result.as_json())
        return
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"gc: {result.manifests} backups reference chunks; {verb} "
               f"{result.chunks_deleted} of {result.chunks_seen} chunks "
               f"({format_size(result.bytes_freed)}); {result.chunks_too_young} unreferenced "
               f"chunks are younger than the grace period")


def parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--label {item!r:.60} is not NAME=VALUE")
        labels[name] = value
    return labels


def _summary(manifest: Manifest) -> dict[str, object]:
    return {"backup_id": manifest.backup_id, "created": manifest.created,
            "image": manifest.source.spec, "image_id": manifest.source.image_id,
            "fsid": manifest.source.fsid, "parent": manifest.parent,
            "image_size": manifest.image_size, "chunk_size": manifest.chunk_size,
            "allocated_bytes": manifest.allocated_bytes,
            "chunks": manifest.chunk_count,
            "chunks_allocated": sum(1 for _ in manifest.allocated()),
            "snapshot": manifest.source.snapshot,
            "stats": manifest.stats.__dict__, "labels": manifest.labels,
            "layout": manifest.layout.as_json() if manifest.layout else None}


@backups_app.command("list")
def backups_list(
    ctx: typer.Context,
    image: Annotated[str | None, typer.Option("--image", help="Only backups of POOL/IMAGE.")]
    = None,
    as_json: JsonOption = False,
) -> None:
    """List backups, oldest first."""
    cfg = load_config(ctx)
    ref = ImageRef.parse(image, cfg.pools.backup_default) if image else None
    repo = open_repository(cfg)
    scan = repo.scan_manifests()
    rows = [m for m in scan.manifests
            if ref is None or (m.source.pool, m.source.image) == (ref.pool, ref.name)]
    for bad in scan.unreadable:
        typer.echo(f"warning: backup {bad.backup_id} skipped: {bad.reason}", err=True)
    if as_json:
        print_json({"backups": [_summary(m) for m in rows],
                    "unreadable": [{"backup_id": b.backup_id, "reason": b.reason}
                                   for b in scan.unreadable]})
        return
    for m in rows:
        typer.echo(f"{m.backup_id}  {m.created[:19]}  {m.source.spec:30}  "
                   f"{format_size(m.image_size):>10}  {format_size(m.allocated_bytes):>10} used"
                   f"  {'parent ' + m.parent if m.parent else 'full'}")


@backups_app.command("show")
def backups_show(ctx: typer.Context, backup_id: str, as_json: JsonOption = False) -> None:
    """Show one backup's manifest summary."""
    manifest = open_repository(load_config(ctx)).load_manifest(backup_id)
    summary = _summary(manifest)
    if as_json:
        print_json(summary)
        return
    for key, value in summary.items():
        typer.echo(f"{key:17} {value}")


@backups_app.command("verify")
def backups_verify(
    ctx: typer.Context,
    backup_id: Annotated[str | None, typer.Argument(
        help="The backup; without it, --sample scrubs the whole repository.")] = None,
    deep: Annotated[bool, typer.Option("--deep", help="Download and hash every chunk.")]
    = False,
    sample: Annotated[float | None, typer.Option(
        "--sample", min=0.001, max=100, help="Download and hash this percentage of all the "
        "chunks the backups reference, chosen at random (scheduled scrubs).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check that every chunk of a backup is stored (and with --deep, intact), or a
    random sample of the whole repository (--sample PERCENT)."""
    from rbd_restore.repo.maintenance import verify_backup, verify_sample

    repo = open_repository(load_config(ctx))
    if sample is not None:
        if backup_id is not None or deep:
            raise UsageError("--sample checks the whole repository: give no backup id or "
                             "--deep with it")
        with progress_bar("scrub", not as_json) as progress:
            result = verify_sample(repo, sample, progress=progress)
        _report_problems(result.problems, as_json, result.as_json())
        if result.problems or result.unreadable_manifests:
            raise IntegrityError(f"scrub: {len(result.problems)} bad or missing chunks, "
                                 f"{len(result.unreadable_manifests)} unreadable manifests "
                                 f"(of {result.chunks_checked} chunks checked)")
        if not as_json:
            typer.echo(f"scrub: {result.chunks_checked} of {result.chunks_total} chunks "
                       "checked, every one intact")
        return
    if backup_id is None:
        raise UsageError("give a backup id, or --sample PERCENT")
    with progress_bar(f"verify {backup_id}", deep and not as_json) as progress:
        problems = verify_backup(repo, backup_id, deep, progress=progress)
    _report_problems(problems, as_json, {"backup_id": backup_id, "deep": deep,
                                         "ok": not problems,
                                         "problems": [p.as_json() for p in problems]})
    if problems:
        raise IntegrityError(f"backup {backup_id}: {len(problems)} bad or missing chunks")
    if not as_json:
        typer.echo(f"backup {backup_id}: {'every chunk intact' if deep else 'every chunk present'}")


def _report_problems(problems: list[Any], as_json: bool, payload: dict[str, Any]) -> None:
    if as_json:
        print_json(payload)
        return
    for p in problems:
        typer.echo(f"chunk {p.index} (offset {p.offset}) {p.chunk_id}: {p.reason}")


@backups_app.command("delete")
def backups_delete(
    ctx: typer.Context,
    backup_id: str,
    force: Annotated[bool, typer.Option(
        "--force", help="Delete even while a restore reads the backup: that restore then "
        "fails (I/O errors in its VM) once gc frees the chunks.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete a backup's manifest; `gc` then frees the chunks only it used.

    Refused while an unfinished restore reads the backup (an instant restore not
    yet committed or aborted, a full restore, a deep verify).
    """
    from rbd_restore.repo.deletion import delete_backup

    result = delete_backup(open_repository(load_config(ctx)), backup_id, force)
    for holder in result.forced_past:
        typer.echo(f"warning: deleted although {holder} reads it", err=True)
    if as_json:
        print_json({"backup_id": backup_id, "deleted": True, "forced_past": result.forced_past})
        return
    typer.echo(f"deleted backup {backup_id} of {result.manifest.source.spec}; run "
               "`rbd-restore gc` to free its chunks")


@backups_app.command("export")
def backups_export(
    ctx: typer.Context,
    backup_id: str,
    destination: Annotated[str, typer.Argument(help="A file, or - for standard output.")],
    workers: WorkersOption = 8,
) -> None:
    """Write a backup's raw image to a new file (zero chunks as holes; removed if the export
    fails) or to stdout."""
    import sys

    from rbd_restore.export import export_backup, export_to_file

    repo = open_repository(load_config(ctx), workers)
    if destination == "-":
        export_backup(repo, backup_id, sys.stdout.buffer, workers)
        return
    try:
        size = export_to_file(repo, backup_id, destination, workers)
    except FileExistsError:
        raise AlreadyExistsError(f"{destination} exists; export never overwrites") from None
    except OSError as exc:
        raise UserError(f"cannot write {destination}: {exc.strerror}") from None
    typer.echo(f"exported backup {backup_id} to {destination} ({format_size(size)})")
