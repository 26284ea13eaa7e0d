"""Locks that keep ``gc`` and running backups apart (docs/format.md, "Locks").

A backup may reuse a chunk that no manifest references yet (dedup against a
deleted backup's leftovers); gc must not delete it meanwhile. Each side first
writes its own lock object, then looks for the other's: with S3's
read-after-write consistency at least one of two racing parties sees the other.
gc then gives up; a backup waits for gc to finish. Locks are refreshed while
held and count as stale (a crashed holder) after ``LOCK_TTL`` without refresh.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rbd_restore.errors import UnavailableError, UserError
from rbd_restore.periodic import every
from rbd_restore.repo.layout import KeyLayout
from rbd_restore.repo.store import ObjectStore

LOCK_TTL = dt.timedelta(minutes=10)
REFRESH_SECONDS = 60.0
GC_WAIT_SECONDS = 3600.0


class RepositoryBusy(UserError):
    """Another process holds a lock that excludes this operation."""


def _lock_body(kind: str, ident: str) -> bytes:
    return json.dumps({"kind": kind, "id": ident, "host": socket.gethostname(),
                       "pid": os.getpid(), "time": dt.datetime.now(dt.UTC).isoformat()}).encode()


def live_locks(store: ObjectStore, layout: KeyLayout, kind: str) -> list[str]:
    now = dt.datetime.now(dt.UTC)
    prefix = layout.lock(f"{kind}-")
    return [info.key.removeprefix(prefix) for info in store.list_objects(prefix)
            if now - info.last_modified < LOCK_TTL]


@contextmanager
def _held(store: ObjectStore, key: str, body: bytes) -> Iterator[None]:
    store.put(key, body)

    def refresh() -> None:
        # A failed refresh is retried at the next tick; the TTL leaves room for misses.
        with contextlib.suppress(UserError):
            store.put(key, body)

    try:
        with every(REFRESH_SECONDS, refresh, f"lock-refresh {key}"):
            yield
    finally:
        store.delete(key)


@contextmanager
def backup_lock(store: ObjectStore, layout: KeyLayout, backup_id: str,
                wait_seconds: float = GC_WAIT_SECONDS) -> Iterator[None]:
    with _held(store, layout.lock(f"backup-{backup_id}"), _lock_body("backup", backup_id)):
        deadline = time.monotonic() + wait_seconds
        while live_locks(store, layout, "gc"):
            if time.monotonic() > deadline:
                raise UnavailableError("gc has held the repository lock for too long; "
                                       "backup gave up waiting")
            time.sleep(1.0)
        yield


@contextmanager
def gc_lock(store: ObjectStore, layout: KeyLayout) -> Iterator[None]:
    ident = f"{socket.gethostname()}-{os.getpid()}"
    key = layout.lock(f"gc-{ident}")
    with _held(store, key, _lock_body("gc", ident)):
        running = live_locks(store, layout, "backup")
        if running:
            raise RepositoryBusy(f"gc skipped: backup {running[0]} is running "
                                 f"({len(running)} in all); run gc again when it finishes")
        yield
