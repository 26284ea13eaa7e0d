"""``rbd-restore dev``: the embedded single-node cluster for demos and tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rbd_restore import devcluster
from rbd_restore.devcluster.layout import DEFAULT_OSD_BYTES
from rbd_restore.errors import UsageError
from rbd_restore.units import parse_size

dev_app = typer.Typer(help="Run an embedded single-node Ceph cluster with RGW (S3).",
                      no_args_is_help=True)

DirOption = Annotated[Path, typer.Option("--dir", help="Directory holding the cluster.")]


@dev_app.command("up")
def dev_up(
    dir: DirOption,
    osd_size: Annotated[str, typer.Option(
        "--osd-size", help="OSD capacity, e.g. 8G or 512M.")] = f"{DEFAULT_OSD_BYTES >> 30}G",
    objectstore: Annotated[str, typer.Option(
        "--objectstore", help="memstore (RAM, default) or bluestore (sparse file in DIR).",
    )] = "memstore",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Start (or check) the embedded cluster in DIR and write its rbd-restore config."""
    if objectstore not in ("memstore", "bluestore"):
        raise UsageError(f"--objectstore must be memstore or bluestore, not {objectstore!r}")
    result = devcluster.up(dir, parse_size(osd_size, "--osd-size"), objectstore)
    info = result.info
    if as_json:
        typer.echo(json.dumps({**info.as_json(), "already_running": result.already_running,
                               "seconds": round(result.seconds, 2)}, indent=2))
        return
    if result.already_running:
        typer.echo(f"cluster in {info.dir} is already running")
    elif result.restarted:
        typer.echo(f"restarted {', '.join(result.restarted)} in {info.dir} "
                   f"in {result.seconds:.1f} s")
    else:
        typer.echo(f"cluster up in {info.dir} in {result.seconds:.1f} s")
    typer.echo(f"  ceph.conf    {info.ceph_conf}")
    typer.echo(f"  keyring      {info.keyring}")
    typer.echo(f"  S3 endpoint  {info.s3_endpoint} (bucket {info.bucket})")
    typer.echo(f"  config       {info.config}")
    typer.echo(f"  use it:      export RBD_RESTORE_CONFIG={info.config}")


@dev_app.command("down")
def dev_down(
    dir: DirOption,
    purge: Annotated[bool, typer.Option("--purge", help="Also remove DIR.")] = False,
) -> None:
    """Stop the daemons that `dev up` started in DIR and wait for them to exit."""
    killed = devcluster.down(dir, purge=purge)
    note = f" (killed after timeout: {', '.join(killed)})" if killed else ""
    typer.echo(f"cluster in {dir} stopped{note}" + ("; directory removed" if purge else ""))


@dev_app.command("status")
def dev_status(dir: DirOption) -> None:
    """Show which daemons of the embedded cluster in DIR are running."""
    for name, running in devcluster.status(dir).items():
        typer.echo(f"{name:4} {'running' if running else 'stopped'}")
