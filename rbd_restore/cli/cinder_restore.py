"""``rbd-restore cinder restore``, ``status`` and ``abort``: restores that keep Cinder's
database in step (rbd_restore/openstack/volumes.py says how)."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from rbd_restore.cli.cinder_site import Site
from rbd_restore.cli.context import open_repository
from rbd_restore.errors import UserError
from rbd_restore.fetcher.client import ControlClient
from rbd_restore.jobs import instant
from rbd_restore.jobs.abort import abort_job, reconcile
from rbd_restore.jobs.store import JobRecord, JobStore
from rbd_restore.openstack import volumes as ops
from rbd_restore.output import print_json
from rbd_restore.pool_room import ensure_room
from rbd_restore.repo.manifest import Manifest

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def run_restore(site: Site, backup_id: str, volume: str | None, name: str | None,
                volume_type: str | None, az: str | None, size: int | None, mode: str,
                dry_run: bool, started: float) -> dict[str, Any]:
    manifest = open_repository(site.cfg).load_manifest(backup_id)
    existing = snapshots = None
    if volume is not None:
        existing = ops.placement(site.conf, site.api.volume(volume))
        snapshots = site.api.snapshot_count(existing.volume.id)
    plan = ops.plan_restore(manifest, mode, existing, name, size, volume_type, az,
                            snapshots or 0)
    if dry_run:
        return {**plan.as_json(), "dry_run": True}
    if existing is None:
        created = site.api.create_volume(plan.volume_name, plan.size_gb, plan.volume_type,
                                         plan.availability_zone)
        site.api.set_metadata(created.id, {ops.NEW_VOLUME_KEY: manifest.backup_id})
        target = ops.placement(site.conf, created)
        try:
            job_id = _swap(site, target, manifest, mode, keep_old=False)
        except BaseException:
            site.api.delete_volume(created.id)  # made for this restore only
            raise
    else:
        target = existing
        with ops.fenced(site.api, target.volume.id):
            job_id = _swap(site, target, manifest, mode, keep_old=True)
    ready = ops.elapsed_since(started)
    ops.apply_volume_metadata(site.api, target.volume.id, manifest)
    return {"volume_id": target.volume.id, "volume_name": target.volume.name,
            "backup_id": manifest.backup_id, "mode": mode, "target": plan.target,
            "image": str(target.image), "job_id": job_id, "ready_seconds": ready,
            "seconds": ops.elapsed_since(started)}


def _swap(site: Site, target: ops.Placement, manifest: Manifest, mode: str,
          keep_old: bool) -> str | None:
    """Put the backup in place of the volume's image; the job id of an instant one."""
    from rbd_restore.restore_full import restore_full

    backup_id = manifest.backup_id
    keep = keep_old and mode == "instant"  # its job removes the old image at the commit
    with site.cluster(target.backend) as cluster:
        # Before the image is moved aside: a rename in a full pool waits for room too.
        # (How much room the backup needs, and in which pool, the restore checks.)
        ensure_room(cluster, target.image.pool, 0)
        with ops.image_set_aside(cluster, target.image, keep=keep) as aside:
            job_id = None
            if mode == "full":
                restore_full(cluster, open_repository(site.cfg), backup_id, target.image)
            else:
                job_id = instant.start(
                    cluster, ControlClient(site.cfg.fetcher), backup_id, target.image,
                    replaces=aside if keep_old else "",
                    boot_set_seconds=site.cfg.fetcher.boot_set_seconds).id
            ops.grow_to(cluster, target.image, target.volume.size_gb)
            return job_id


def _volume_of(site: Site, record: JobRecord) -> str | None:
    """The Cinder volume whose image a job restores, from volume_name_template."""
    pattern = re.escape(site.conf.volume_name_template).replace(re.escape("%s"), "(.+)")
    found = re.fullmatch(pattern, record.image)
    return found.group(1) if found else None


def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Instant restores of Cinder volumes, with the volumes' ids and Cinder statuses."""
    site = Site(ctx)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        cinder = site.api.volumes_by_id()
        api_error = ""
    except UserError as exc:
        cinder, api_error = {}, exc.message
    for backend in (b for b in site.conf.backends.values() if b.is_rbd):
        with site.cluster(backend) as cluster:
            for record in JobStore(cluster).list():
                if record.id in seen or record.pool != backend.pool:
                    continue
                seen.add(record.id)
                record, migration = reconcile(cluster, record)
                volume_id = _volume_of(site, record)
                volume = cinder.get(volume_id or "")
                rows.append({**record.as_status(), "migration": migration or None,
                             "volume_id": volume_id, "backend": backend.name,
                             "volume_status": volume.status if volume else None,
                             "volume_name": volume.name if volume else None})
    if as_json:
        print_json({"jobs": rows, "api_error": api_error or None})
        return
    if api_error:
        typer.echo(f"warning: {api_error}", err=True)
    for r in rows:
        typer.echo(f"{r['id']}  volume {r['volume_id'] or '?'} ({r['volume_status'] or '-'})"
                   f"  {r['state']:10} {r['percent']:5.1f}%  {r['error'] or ''}")


def abort(ctx: typer.Context, job: str, as_json: JsonOption = False) -> None:
    """Abort an instant restore of a Cinder volume: in place, the volume's previous image
    comes back; into a new volume, that volume is deleted. Refused while anything (a VM)
    has the image open."""
    site = Site(ctx)
    for backend in (b for b in site.conf.backends.values() if b.is_rbd):
        with site.cluster(backend) as cluster:
            if not any(r.id == job for r in JobStore(cluster).list()):
                continue
            outcome = abort_job(cluster, ControlClient(site.cfg.fetcher), job)
        volume_id = _volume_of(site, outcome.record)
        deleted = False
        if volume_id and not outcome.put_back:
            volume = site.api.volume(volume_id)
            # Only a volume this restore had Cinder create is deleted with it.
            if volume.metadata.get(ops.NEW_VOLUME_KEY) == outcome.record.backup_id:
                site.api.delete_volume(volume_id)
                deleted = True
        result = {"job_id": job, "volume_id": volume_id, "put_back": bool(outcome.put_back),
                  "volume_deleted": deleted}
        if as_json:
            print_json(result)
        else:
            typer.echo(f"aborted job {job}; volume {volume_id} " + (
                "has its previous data again" if outcome.put_back else
                "deleted" if deleted else "kept, without an image: delete it"))
        return
    raise UserError(f"job {job} is not an instant restore in any Cinder RBD backend")



