"""``rbd-restore profile show|clear``: the boot profiles the fetcher keeps per volume."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rbd_restore.ceph import ImageRef, open_image
from rbd_restore.cli.context import load_config, open_cluster, open_repository
from rbd_restore.config import Config
from rbd_restore.errors import NotFoundError
from rbd_restore.output import print_json
from rbd_restore.units import format_size

# The repository's modules are imported where used (see cli/context.py).
if TYPE_CHECKING:
    from rbd_restore.prefetch.profiles import VolumeKey
    from rbd_restore.repo.repository import Repository

profile_app = typer.Typer(help="Show or clear the boot profile instant restores prefetch by.",
                          no_args_is_help=True)
ImageArg = Annotated[str, typer.Argument(help="POOL/IMAGE whose backups the profile serves.")]


def volume_of(cfg: Config, repo: Repository, text: str) -> VolumeKey:
    """The volume behind POOL/IMAGE: its newest backup's source, else the live image.

    Backups first, because a restored image is a new image (a new id) while the
    profile that its restores use belongs to the volume the backups came from.
    """
    from rbd_restore.prefetch.profiles import VolumeKey

    ref = ImageRef.parse(text, cfg.pools.backup_default)
    backups = [m for m in repo.scan_manifests().manifests
               if (m.source.pool, m.source.image) == (ref.pool, ref.name)]
    if backups:
        return VolumeKey.of(max(backups, key=lambda m: (m.created_at, m.backup_id)))
    with open_cluster(cfg) as cluster, cluster.ioctx(ref.pool) as ioctx, \
            open_image(ioctx, ref, read_only=True) as image:
        return VolumeKey(cluster.fsid, str(image.id()))


@profile_app.command("show")
def profile_show(ctx: typer.Context, image: ImageArg,
                 as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object "
                                                       "with every entry.")] = False) -> None:
    """Show the chunks a VM booting from IMAGE's backups read, in first-read order."""
    from rbd_restore.prefetch.profiles import ProfileStore, describe

    cfg = load_config(ctx)
    repo = open_repository(cfg)
    volume = volume_of(cfg, repo, image)
    profile = ProfileStore(repo).load(volume)
    if profile is None:
        raise NotFoundError(f"no boot profile for {image} (volume {volume.fsid}/"
                            f"{volume.image_id}) yet: one is recorded by its first instant "
                            "restore")
    summary = describe(profile)
    if as_json:
        print_json(summary)
        return
    typer.echo(f"volume   {volume.fsid}/{volume.image_id}\nboots    {profile.boots}\n"
               f"updated  {profile.updated}\nchunks   {len(profile.entries)} "
               f"({format_size(summary['bytes'])} at {format_size(profile.chunk_size)} each)")
    for entry in profile.entries:
        typer.echo(f"  chunk {entry.chunk:>8}  offset {entry.chunk * profile.chunk_size:>14}  "
                   f"at {entry.at_ms / 1000:8.3f} s  last read in boot {entry.last_boot}")


@profile_app.command("clear")
def profile_clear(ctx: typer.Context, image: ImageArg) -> None:
    """Forget IMAGE's boot profile; the next instant restore records a new one."""
    from rbd_restore.prefetch.profiles import ProfileStore

    cfg = load_config(ctx)
    repo = open_repository(cfg)
    volume = volume_of(cfg, repo, image)
    if not ProfileStore(repo).clear(volume):
        raise NotFoundError(f"no boot profile for {image}")
    typer.echo(f"cleared the boot profile of {image}")
