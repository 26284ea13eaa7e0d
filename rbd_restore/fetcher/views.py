"""The fetcher's qcow2 views of backups, built once per backup and kept (LRU).

A view is built from the backup's manifest (and, for a restore with history, the
older manifests that become its snapshots): an S3 read or more and some CPU, so
requests for a backup whose view is being built wait for that one build.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from rbd_restore.qcow2.view import Qcow2View
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.repository import Repository

VIEWS_KEPT = 32

Blocking = Callable[..., Awaitable[Any]]


class ViewCache:
    def __init__(self, repo: Repository, blocking: Blocking, kept: int = VIEWS_KEPT) -> None:
        self.repo = repo
        self.blocking = blocking
        self.kept = kept
        self.views: OrderedDict[tuple[str, ...], Qcow2View] = OrderedDict()
        self.loads: dict[tuple[str, ...], asyncio.Task[Qcow2View]] = {}

    async def get(self, backup_id: str, history: tuple[str, ...] = (),
                  head: Manifest | None = None) -> Qcow2View:
        """The backup's view (with ``history`` as snapshots); ``head``: its manifest, when
        the caller has just read it."""
        key = (backup_id, *history)
        cached = self.views.get(key)
        if cached is not None:
            self.views.move_to_end(key)
            return cached
        task = self.loads.get(key)
        if task is None:
            task = asyncio.ensure_future(self.blocking(self._build, key, head))
            self.loads[key] = task
            task.add_done_callback(lambda _t: self.loads.pop(key, None))
        view = await asyncio.shield(task)
        self.views[key] = view
        while len(self.views) > self.kept:
            self.views.popitem(last=False)
        return view

    def _build(self, key: tuple[str, ...], loaded: Manifest | None) -> Qcow2View:
        head, *history = key
        manifest = loaded or self.repo.load_manifest(head)
        older = [manifest if h == head else self.repo.load_manifest(h) for h in history]
        return Qcow2View(manifest, older)
