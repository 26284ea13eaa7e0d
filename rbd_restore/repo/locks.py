"""Locks in the bucket that keep deletions away from data in use (docs/format.md, "Locks").

- ``gc`` against running backups: a backup may reuse a chunk that no manifest
  references yet (dedup against a deleted backup's leftovers); gc must not
  delete it meanwhile.
- ``backups delete`` against new sessions: a session opened on a backup while
  it is being deleted would serve a backup whose chunks gc may then free.

Each side first writes its own lock object, then looks for the other's: with
S3's read-after-write consistency at least one of two racing parties sees the
other. Locks are refreshed while held and count as stale (a crashed holder)
after ``LOCK_TTL`` without refresh. Ages are measured by S3's clock (the
``LastModified`` of the lock just written), never this host's: a host whose
clock runs fast would otherwise take a live lock for a stale one.
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
from dataclasses import dataclass, field

from rbd_restore.errors import UnavailableError, UserError
from rbd_restore.periodic import every
from rbd_restore.repo.layout import KeyLayout
from rbd_restore.repo.store import ObjectStore

LOCK_TTL = dt.timedelta(minutes=10)
REFRESH_SECONDS = 60.0
GC_WAIT_SECONDS = 3600.0


class RepositoryBusy(UserError):
    """Another process holds a lock that excludes this operation."""


@dataclass(frozen=True)
class S3Clock:
    """S3's time, read once from an object's ``LastModified`` and advanced by this
    host's monotonic clock (which may run at the wrong time of day, not at the wrong
    speed)."""

    at: dt.datetime
    read_at: float = field(default_factory=time.monotonic)

    def now(self) -> dt.datetime:
        return self.at + dt.timedelta(seconds=time.monotonic() - self.read_at)


def read_clock(store: ObjectStore, key: str, body: bytes) -> S3Clock:
    """Write ``body`` to ``key`` and read S3's time off it."""
    return S3Clock(store.put_stamped(key, body))


def lock_body(kind: str, ident: str) -> bytes:
    return json.dumps({"kind": kind, "id": ident, "host": socket.gethostname(),
                       "pid": os.getpid(), "time": dt.datetime.now(dt.UTC).isoformat()}).encode()


def _live(store: ObjectStore, prefix: str, clock: S3Clock) -> list[str]:
    """What follows ``prefix`` in the keys of locks refreshed within the TTL, leaving out
    those whose holder ran on this host and is gone (killed: it left its lock)."""
    now = clock.now()
    return [info.key.removeprefix(prefix) for info in store.list_objects(prefix)
            if now - info.last_modified < LOCK_TTL and not _holder_gone(store, info.key)]


def _holder_gone(store: ObjectStore, key: str) -> bool:
    try:
        body = json.loads(store.get(key))
    except (UserError, ValueError):
        return False  # gone already, or unreadable: count it live
    if not isinstance(body, dict) or body.get("host") != socket.gethostname():
        return False
    pid = body.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def live_locks(store: ObjectStore, layout: KeyLayout, kind: str, clock: S3Clock) -> list[str]:
    """Names (after ``kind-``) of the locks of that kind refreshed within the TTL."""
    return _live(store, layout.lock(f"{kind}-"), clock)


@contextmanager
def _held(store: ObjectStore, key: str, body: bytes) -> Iterator[S3Clock]:
    clock = read_clock(store, key, body)

    def refresh() -> None:
        # A failed refresh is retried at the next tick; the TTL leaves room for misses.
        with contextlib.suppress(UserError):
            store.put(key, body)

    try:
        with every(REFRESH_SECONDS, refresh, f"lock-refresh {key}"):
            yield clock
    finally:
        with contextlib.suppress(UserError):  # left behind, it goes stale by itself
            store.delete(key)


@contextmanager
def backup_lock(store: ObjectStore, layout: KeyLayout, backup_id: str,
                wait_seconds: float = GC_WAIT_SECONDS) -> Iterator[S3Clock]:
    """Held while a backup runs; yields S3's clock."""
    with _held(store, layout.lock(f"backup-{backup_id}"),
               lock_body("backup", backup_id)) as clock:
        deadline = time.monotonic() + wait_seconds
        while live_locks(store, layout, "gc", clock):
            if time.monotonic() > deadline:
                raise UnavailableError("gc has held the repository lock for too long; "
                                       "backup gave up waiting")
            time.sleep(1.0)
        yield clock


def backup_running(store: ObjectStore, layout: KeyLayout, backup_id: str,
                   clock: S3Clock) -> bool:
    return backup_id in live_locks(store, layout, "backup", clock)


@contextmanager
def gc_lock(store: ObjectStore, layout: KeyLayout) -> Iterator[S3Clock]:
    """Held while gc runs; yields S3's clock, by which chunk ages are measured."""
    ident = f"{socket.gethostname()}-{os.getpid()}"
    key = layout.lock(f"gc-{ident}")
    with _held(store, key, lock_body("gc", ident)) as clock:
        running = live_locks(store, layout, "backup", clock)
        if running:
            raise RepositoryBusy(f"gc skipped: backup {running[0]} is running "
                                 f"({len(running)} in all); run gc again when it finishes")
        yield clock


@contextmanager
def delete_intent(store: ObjectStore, layout: KeyLayout, backup_id: str) -> Iterator[S3Clock]:
    """Announces that ``backup_id`` is being deleted, for sessions opening meanwhile."""
    with _held(store, layout.lock(f"delete-{backup_id}"),
               lock_body("delete", backup_id)) as clock:
        yield clock


@contextmanager
def reading(store: ObjectStore, layout: KeyLayout, backup_id: str, what: str) -> Iterator[None]:
    """Held while a full restore or a deep verify reads ``backup_id``, so the backup is
    not deleted under it. Load the manifest inside the block: a deletion that
    finished before the lock was written has removed it by then."""
    ident = f"{backup_id}.{socket.gethostname()}-{os.getpid()}"
    with _held(store, layout.lock(f"read-{ident}"), lock_body(f"read {what}", ident)) as clock:
        if being_deleted(store, layout, (backup_id,), clock):
            raise RepositoryBusy(f"backup {backup_id} is being deleted")
        yield


def readers(store: ObjectStore, layout: KeyLayout, backup_id: str, clock: S3Clock) -> list[str]:
    """Live readers of ``backup_id`` as ``host-pid``."""
    return _live(store, layout.lock(f"read-{backup_id}."), clock)


def being_deleted(store: ObjectStore, layout: KeyLayout, backup_ids: tuple[str, ...],
                  clock: S3Clock) -> list[str]:
    live = set(live_locks(store, layout, "delete", clock))
    return [b for b in backup_ids if b in live]
