"""``rbd-restore cinder``: backups and restores of Cinder volumes, by volume id or name.

For a control node with cinder.conf (read as Cinder reads it) and OpenStack
credentials (``--os-cloud``, ``$OS_CLOUD``, ``OS_*``). docs/openstack.md.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from rbd_restore.ceph import Cluster
from rbd_restore.cli.cinder_restore import abort, run_restore, status
from rbd_restore.cli.cinder_site import Site
from rbd_restore.cli.context import open_repository, progress_bar
from rbd_restore.errors import NotFoundError, UserError
from rbd_restore.openstack import conf as cinder_conf
from rbd_restore.openstack import volumes as ops
from rbd_restore.output import print_json

cinder_app = typer.Typer(help="Back up and restore Cinder volumes (OpenStack).",
                         no_args_is_help=True)
backups_app = typer.Typer(help="Backups of Cinder volumes.", no_args_is_help=True)
cinder_app.add_typer(backups_app, name="backups")
cinder_app.command("status")(status)
cinder_app.command("abort")(abort)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


@cinder_app.callback()
def cinder_root(
    ctx: typer.Context,
    cinder_config: Annotated[list[str] | None, typer.Option(
        "--cinder-config", help="cinder.conf (repeatable; default /etc/cinder/cinder.conf "
        "and cinder.conf.d).")] = None,
    cinder_config_dir: Annotated[list[str] | None, typer.Option(
        "--cinder-config-dir", help="A cinder.conf.d (repeatable).")] = None,
    os_cloud: Annotated[str | None, typer.Option(
        "--os-cloud", envvar="OS_CLOUD", help="clouds.yaml entry (default: OS_* variables).")]
    = None,
    keyring: Annotated[str | None, typer.Option(
        "--keyring", help="Ceph keyring of the backends' rbd_user (default: librados' "
        "search, /etc/ceph/<cluster>.client.<user>.keyring).")] = None,
) -> None:
    obj = ctx.ensure_object(dict)
    obj.update(cinder_config=cinder_config, cinder_config_dir=cinder_config_dir,
               os_cloud=os_cloud, keyring=keyring)


def _cluster(site: Site, backend: cinder_conf.CinderBackend) -> Cluster:
    return site.cluster(backend)


@cinder_app.command("check")
def check(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Doctor: every RBD backend's pool with its user, librbd, the fetcher, the API."""
    import rbd

    from rbd_restore.fetcher.client import ControlClient

    site = Site(ctx)
    results: list[dict[str, Any]] = []

    def probe(name: str, call: Any) -> None:
        try:
            detail = call()
            results.append({"check": name, "ok": True, "detail": detail})
        except UserError as exc:
            results.append({"check": name, "ok": False, "detail": exc.message})

    for backend in site.conf.backends.values():
        if not backend.is_rbd:
            continue

        def pool(b: cinder_conf.CinderBackend = backend) -> str:
            with _cluster(site, b) as cluster, cluster.ioctx(b.pool) as ioctx:
                count = len(rbd.RBD().list(ioctx))
            return f"pool {b.pool} as client.{b.user or 'admin'}: {count} images"

        probe(f"backend {backend.name}", pool)
    major, minor, extra = rbd.RBD().version()
    results.append({"check": "librbd", "ok": (major, minor) >= (1, 16),
                    "detail": f"{major}.{minor}.{extra} (import-only migration from http "
                              "needs Ceph 16.2, Pacific)"})
    probe("fetcher control plane",
          lambda: f"{len(ControlClient(site.cfg.fetcher).list())} open sessions")
    probe("Cinder API (admin)", lambda: f"{site.api.check_admin()} services")
    failed = [r for r in results if not r["ok"]]
    if as_json:
        print_json({"ok": not failed, "checks": results})
    else:
        for r in results:
            typer.echo(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}: {r['detail']}")
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} checks failed")


@cinder_app.command("backup")
def backup(
    ctx: typer.Context,
    volume: Annotated[str, typer.Argument(help="Volume id or name (in-use volumes too).")],
    full: Annotated[bool, typer.Option("--full", help="Not incremental.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Back up a Cinder volume, with its id, project, name, type, zone, size, bootable
    flag and image metadata."""
    from rbd_restore.backup import run_backup
    from rbd_restore.repo.chunks import DEFAULT_CHUNK_SIZE

    site = Site(ctx)
    place = ops.placement(site.conf, site.api.volume(volume))
    ops.refuse_unsupported(place.volume)
    chunk_size = place.backend.chunk_size_mib << 20 or DEFAULT_CHUNK_SIZE
    repo = open_repository(site.cfg, create=True)
    with _cluster(site, place.backend) as cluster, \
            progress_bar(f"backup {place.volume.id}", not as_json) as progress:
        result = run_backup(cluster, repo, place.image, chunk_size, full=full,
                            progress=progress, labels=ops.backup_labels(place.volume))
    out = {**result.as_json(), "volume_id": place.volume.id}
    if as_json:
        print_json(out)
        return
    typer.echo(f"backup {out['backup_id']} of volume {place.volume.id} ({place.image}): "
               f"read {out['bytes_read']} bytes, uploaded {out['bytes_uploaded']}")


def _row(manifest: Any) -> dict[str, Any]:
    labels = manifest.labels
    return {"backup_id": manifest.backup_id, "created": manifest.created,
            "volume_id": labels.get("openstack.volume_id"),
            "volume_name": labels.get("openstack.name"),
            "project_id": labels.get("openstack.project_id"),
            "size_gb": int(labels.get("openstack.size_gb", 0)) or None,
            "bootable": labels.get("openstack.bootable") == "true",
            "cinder_backup_id": labels.get("openstack.cinder_backup_id"),
            "image": manifest.source.spec, "allocated_bytes": manifest.allocated_bytes}


@backups_app.command("list")
def backups_list(
    ctx: typer.Context,
    volume: Annotated[str | None, typer.Option("--volume", help="Volume id or name.")] = None,
    project: Annotated[str | None, typer.Option("--project", help="Project id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Backups of Cinder volumes, oldest first."""
    site = Site(ctx)
    volume_id = None
    if volume:
        try:
            volume_id = site.api.volume(volume).id
        except NotFoundError:
            volume_id = volume  # a deleted volume's backups, by its id
    rows = [_row(m) for m in open_repository(site.cfg).scan_manifests().manifests
            if "openstack.volume_id" in m.labels
            and volume_id in (None, m.labels["openstack.volume_id"])
            and project in (None, m.labels.get("openstack.project_id"))]
    if as_json:
        print_json({"backups": rows})
        return
    for r in rows:
        typer.echo(f"{r['backup_id']}  {r['created'][:19]}  volume {r['volume_id']} "
                   f"({r['volume_name'] or '-'})  {r['size_gb']} GiB")


@backups_app.command("show")
def backups_show(ctx: typer.Context, backup_id: str, as_json: JsonOption = False) -> None:
    """One backup of a Cinder volume."""
    manifest = open_repository(Site(ctx).cfg).load_manifest(backup_id)
    row = {**_row(manifest), "labels": manifest.labels}
    if as_json:
        print_json(row)
        return
    for key, value in row.items():
        typer.echo(f"{key:17} {value}")


@cinder_app.command("restore")
def restore(
    ctx: typer.Context,
    backup_id: Annotated[str, typer.Argument(help="rbd-restore backup id.")],
    new_volume: Annotated[bool, typer.Option("--new-volume", help="Into a new volume.")]
    = False,
    volume: Annotated[str | None, typer.Option(
        "--volume", help="Into this volume, in place (available, detached).")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm an in-place restore.")] = False,
    name: Annotated[str | None, typer.Option("--name")] = None,
    volume_type: Annotated[str | None, typer.Option("--type")] = None,
    az: Annotated[str | None, typer.Option("--az")] = None,
    size: Annotated[int | None, typer.Option("--size", min=1, help="GiB.")] = None,
    mode: Annotated[str, typer.Option("--mode", help="instant or full.")] = "instant",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Restore a backup into a new Cinder volume or in place of an existing one."""
    if new_volume == (volume is not None):
        raise UserError("give either --new-volume or --volume VOLUME")
    if volume is not None and not (yes or dry_run):
        raise UserError(f"restoring in place replaces volume {volume}'s data: add --yes")
    site = Site(ctx)
    started = time.monotonic()
    result = run_restore(site, backup_id, volume, name, volume_type, az, size, mode,
                         dry_run, started)
    if as_json:
        print_json(result)
        return
    if dry_run:
        typer.echo("plan: " + ", ".join(f"{k}={v}" for k, v in result.items()))
        return
    typer.echo(f"volume {result['volume_id']} ready in {result['ready_seconds']:.1f} s "
               f"({result['mode']} restore of {backup_id}"
               + (f", job {result['job_id']})" if result.get("job_id") else ")"))


@cinder_app.command("import-backup")
def import_backup(
    ctx: typer.Context,
    cinder_backup: Annotated[str, typer.Argument(help="Cinder backup id (S3 driver).")],
    volume_id: Annotated[str | None, typer.Option(
        "--volume-id", help="Its volume (default: asked of the Cinder API).")] = None,
    bucket: Annotated[str | None, typer.Option(
        "--bucket", help="Its bucket (default: the backup's container, else "
        "backup_s3_store_bucket).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Turn a backup written by Cinder's S3 driver into an rbd-restore backup (every
    object's MD5 and every 32 KiB block's SHA-256 checked), restorable instantly."""
    import dataclasses

    from rbd_restore.openstack.importer import import_backup as run_import
    from rbd_restore.openstack.importer import summary
    from rbd_restore.repo.store import ObjectStore

    site = Site(ctx)
    s3 = site.conf.backup_s3
    if s3 is None:
        raise UserError("cinder.conf sets no backup_s3_endpoint_url: only backups of "
                        "Cinder's S3 driver can be imported")
    if s3.sse_customer_key:
        raise UserError("Cinder's backups use SSE-C (backup_s3_sse_customer_key): not "
                        "supported by import-backup")
    container = ""
    if volume_id is None:
        volume_id, container = site.api.backup_location(cinder_backup)
    settings = dataclasses.replace(s3.settings(), bucket=bucket or container or s3.bucket)
    manifest = run_import(open_repository(site.cfg, create=True), ObjectStore(settings),
                          cinder_backup, volume_id)
    result = summary(manifest)
    if as_json:
        print_json(result)
        return
    typer.echo(f"Cinder backup {cinder_backup} is rbd-restore backup {result['backup_id']} "
               f"({result['image_size']} bytes, {result['chunks_new']} new chunks)")
