"""What every command needs from the global options: config, cluster, repository."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

from rbd_restore import config as config_mod
from rbd_restore.ceph import Cluster

if TYPE_CHECKING:
    from rbd_restore.repo.repository import Repository


def load_config(ctx: typer.Context) -> config_mod.Config:
    root = ctx.find_root()
    path = root.obj.get("config") if isinstance(root.obj, dict) else None
    return config_mod.load(path)


def open_repository(cfg: config_mod.Config, workers: int = 16,
                    create: bool = False) -> Repository:
    """``create``: an empty prefix becomes an encrypted repository (backups only)."""
    # Imported here: the repository's stack (cryptography, urllib3, botocore) is a
    # tenth of a second that commands working without one, `restore --mode instant`
    # first of all, need not wait for.
    from rbd_restore.repo import keyring

    return keyring.open_repository(cfg.s3, cfg.repository, workers + 8, create)


def open_cluster(cfg: config_mod.Config) -> Cluster:
    return Cluster(cfg.ceph)


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A byte progress bar on stderr when it is a terminal, else nothing."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    # Imported here: rich.progress costs every command 20 ms, and most never draw a bar.
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)  # 0: not known

        yield update
