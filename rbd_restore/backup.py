"""``rbd-restore backup``: snapshot an RBD image and store it in the repository.

Only allocated extents are read (``diff_iterate``), and when the previous
backup's snapshot still exists only what changed since it; unchanged chunks are
taken from the parent manifest. A chunk is uploaded only if the bucket does not
hold it yet. Reads, hashing, compression and uploads run on a bounded pool of
workers, so memory stays at about ``2 * workers`` chunks whatever the image size.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rbd_restore.ceph import Cluster, ImageRef, open_image
from rbd_restore.errors import UsageError, UserError
from rbd_restore.image_layout import read_layout
from rbd_restore.jobs.store import JobStore
from rbd_restore.parallel import run_bounded
from rbd_restore.pool_room import refuse_if_full
from rbd_restore.repo import chunks as chunk_codec
from rbd_restore.repo.layout import BACKUP_ID
from rbd_restore.repo.locks import S3Clock, backup_lock, backup_running
from rbd_restore.repo.manifest import Manifest, Source, Stats, check_labels, chunk_count
from rbd_restore.repo.repository import (
    Repository,
    backup_id_of_snapshot,
    new_backup_id,
    snapshot_name,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest
    parent: str | None
    chunks_read: int

    def as_json(self) -> dict[str, Any]:
        stats = self.manifest.stats
        return {"backup_id": self.manifest.backup_id, "image": self.manifest.source.spec,
                "parent": self.parent, "bytes_read": stats.bytes_read,
                "bytes_uploaded": stats.bytes_uploaded, "chunks_new": stats.chunks_new,
                "chunks_reused": stats.chunks_reused, "seconds": round(stats.seconds, 3)}


@dataclass
class _Counters:
    bytes_read: int = 0
    bytes_uploaded: int = 0
    chunks_new: int = 0
    chunks_read: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Uploader:
    """Stores each distinct chunk at most once, even when workers race on it."""

    def __init__(self, repo: Repository, known: set[str], counters: _Counters) -> None:
        self.repo = repo
        self.known = known
        self.counters = counters
        self.lock = threading.Lock()
        self.in_flight: dict[str, threading.Event] = {}

    def ensure(self, cid: str, data: bytes | memoryview) -> None:
        with self.lock:
            if cid in self.known:
                return
            pending = self.in_flight.get(cid)
            if pending is None:
                self.in_flight[cid] = threading.Event()
        if pending is not None:
            pending.wait()
            if cid in self.known:
                return
            return self.ensure(cid, data)  # the other worker failed: try ourselves
        try:
            if not self.repo.has_chunk(cid):
                stored = self.repo.codec.encode_chunk(cid, data)
                self.repo.put_chunk(cid, stored)
                with self.counters.lock:
                    self.counters.bytes_uploaded += len(stored)
                    self.counters.chunks_new += 1
            with self.lock:
                self.known.add(cid)
        finally:
            with self.lock:
                self.in_flight.pop(cid).set()


def _find_parent(repo: Repository, image: Any, chunk_size: int) -> Manifest | None:
    """Newest backup whose snapshot is still on the image and can seed an incremental."""
    snaps = sorted(image.list_snaps(), key=lambda s: s["id"], reverse=True)
    for snap in snaps:
        backup_id = backup_id_of_snapshot(snap["name"])
        if backup_id is None:
            continue
        try:
            manifest = repo.load_manifest(backup_id)
        except UserError as exc:
            log.info("snapshot %s cannot seed an incremental: %s", snap["name"], exc)
            continue
        if manifest.key_id != repo.codec.current_key_id:
            # Its chunk ids are under an older key: reusing them would keep data under
            # a key being retired. The first backup under a new key reads everything.
            log.info("backup %s is under key %s, not the current one: a full backup",
                     backup_id, manifest.key_id)
            return None
        if manifest.chunk_size == chunk_size and manifest.image_size == snap["size"]:
            return manifest
    return None


def _dirty_chunks(image: Any, start: int, end: int, chunk_size: int,
                  since: str | None, include_parent: bool = True) -> set[int]:
    """Chunks with extents in ``[start, end)`` allocated (``since`` None) or changed since
    that snapshot; with ``include_parent``, a clone's parent data counts as its own."""
    dirty: set[int] = set()

    def mark(offset: int, length: int, _exists: bool) -> int:
        dirty.update(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
        return 0

    if end > start:
        image.diff_iterate(start, end - start, since, mark, include_parent=include_parent,
                           whole_object=True)
    return dirty


def chunks_to_read(image: Any, size: int, chunk_size: int, parent: Manifest | None,
                   include_parent: bool = True) -> list[int]:
    """The chunks whose content must be read: all allocated ones for a full backup;
    for an incremental, those changed since the parent's snapshot, plus what a
    resize between the two backups changed. Without ``include_parent``, only the
    image's own data counts (see :func:`_staged_from`)."""
    if parent is None:
        return sorted(_dirty_chunks(image, 0, size, chunk_size, None, include_parent))
    dirty = _dirty_chunks(image, 0, size, chunk_size, snapshot_name(parent.backup_id),
                          include_parent)
    dirty |= _resized(parent.image_size, size, chunk_size)
    # What was written past the old end (extend, then write), whether or not the
    # diff against a smaller snapshot reports it.
    dirty |= _dirty_chunks(image, parent.image_size, size, chunk_size, None, include_parent)
    return sorted(i for i in dirty if i < chunk_count(size, chunk_size))


def _resized(old_size: int, size: int, chunk_size: int) -> set[int]:
    """A chunk cut by either end changed length, hence id, whatever its bytes."""
    if old_size == size:
        return set()
    return {end // chunk_size for end in (old_size, size) if end % chunk_size}


def _staged_from(cluster: Cluster, repo: Repository, ref: ImageRef, image: Any
                 ) -> Manifest | None:
    """The backup an instant restore staged ``image`` from, while the image still reads
    through to it (a librbd migration); None for an image not migrating.

    librbd 16.2.15 cannot diff such an image with its source: ``diff_iterate`` with
    ``include_parent`` fails an assertion and ends the process (measured; the backup
    died of SIGFPE). So its own data is diffed alone, and where it has none, its
    content is that backup's."""
    import rbd

    if not int(image.features()) & rbd.RBD_FEATURE_MIGRATING:
        return None
    image_id = str(image.id())
    for record in JobStore(cluster).in_pool(ref.pool):
        if record.image_id == image_id or (not record.image_id and record.image == ref.name):
            return repo.load_manifest(record.backup_id)
    raise UserError(f"image {ref} is being migrated, and not by an rbd-restore instant "
                    "restore: back it up once the migration is committed")


def _chunks_under(other: Manifest, size: int, chunk_size: int) -> set[int]:
    """This backup's chunks (of ``chunk_size``, image of ``size``) that overlap a chunk
    ``other`` holds data in."""
    found: set[int] = set()
    for index, _ in other.allocated():
        start = index * other.chunk_size
        end = min(start + other.chunk_length(index), size)
        if start < end:
            found.update(range(start // chunk_size, (end - 1) // chunk_size + 1))
    return found


IN_PROGRESS_KEY = "rbd-restore.backup-in-progress."


def _remove_abandoned_snapshots(repo: Repository, image: Any, clock: S3Clock) -> None:
    """Remove the snapshots of backups of this image that were killed before their
    manifest was written (and their in-progress marks). Each backup marks the image
    before it takes its snapshot, so restored history, which carries the same kind
    of name, is never mistaken for one."""
    for key, _value in list(image.metadata_list()):
        backup_id = key.removeprefix(IN_PROGRESS_KEY)
        if backup_id == key or not BACKUP_ID.match(backup_id):
            continue
        if backup_running(repo.store, repo.keys, backup_id, clock):
            continue
        try:
            repo.load_manifest(backup_id)
            finished = True
        except UserError:
            finished = False
        if not finished:
            snap = snapshot_name(backup_id)
            if any(s["name"] == snap for s in image.list_snaps()):
                log.warning("removing snapshot %s of a backup that did not finish", snap)
                image.remove_snap(snap)
        image.metadata_remove(key)


def _remove_older_snapshots(repo: Repository, image: Any, keep: str, source: Source) -> None:
    """Remove the older snapshots that backups of this image made.

    Snapshots that came with a restore (older backups of another image, exposed
    with --with-history) carry the same kind of name but are not ours to remove.
    """
    for snap in list(image.list_snaps()):
        backup_id = backup_id_of_snapshot(snap["name"])
        if snap["name"] == keep or backup_id is None:
            continue
        try:
            owner = repo.load_manifest(backup_id).source
        except UserError:
            continue
        if (owner.fsid, owner.image_id) != (source.fsid, source.image_id):
            continue
        try:
            image.remove_snap(snap["name"])
        except Exception as exc:  # a protected or cloned snapshot stays; say so
            log.warning("kept snapshot %s: %s", snap["name"], type(exc).__name__)


def run_backup(cluster: Cluster, repo: Repository, ref: ImageRef, chunk_size: int,
               full: bool = False, workers: int = 8, progress: Progress | None = None,
               labels: dict[str, str] | None = None) -> BackupResult:
    """Back up ``ref``; ``labels`` are stored in the manifest (docs/format.md)."""
    chunk_codec.validate_chunk_size(chunk_size)
    try:
        check_labels(labels or {})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    started = time.monotonic()
    repo.store.check_bucket()
    backup_id = new_backup_id()
    snap = snapshot_name(backup_id)
    refuse_if_full(cluster, ref.pool, f"a backup of {ref} (its snapshot)")
    with cluster.ioctx(ref.pool) as ioctx, open_image(ioctx, ref) as image, \
            backup_lock(repo.store, repo.keys, backup_id) as clock:
        _remove_abandoned_snapshots(repo, image, clock)
        staged_from = _staged_from(cluster, repo, ref, image)
        parent = None if full else _find_parent(repo, image, chunk_size)
        mark = IN_PROGRESS_KEY + backup_id
        image.metadata_set(mark, dt.datetime.now(dt.UTC).isoformat())
        try:
            image.create_snap(snap)
            try:
                source = Source(fsid=cluster.fsid, pool=ref.pool, image=ref.name,
                                image_id=str(image.id()), snapshot=snap)
                with open_image(ioctx, ref, snapshot=snap, read_only=True) as frozen:
                    manifest, chunks_read = _store_snapshot(
                        repo, frozen, backup_id, parent, chunk_size, workers, progress,
                        source, started, staged_from)
                manifest = dataclasses.replace(manifest, labels=dict(labels or {}),
                                               layout=read_layout(cluster, image))
                repo.save_manifest(manifest)
            except BaseException:
                image.remove_snap(snap)
                raise
        finally:
            image.metadata_remove(mark)
        _remove_older_snapshots(repo, image, snap, source)
    return BackupResult(manifest, parent.backup_id if parent else None, chunks_read)


def _store_snapshot(repo: Repository, frozen: Any, backup_id: str, parent: Manifest | None,
                    chunk_size: int, workers: int, progress: Progress | None, source: Source,
                    started: float, staged_from: Manifest | None = None
                    ) -> tuple[Manifest, int]:
    size = int(frozen.size())
    count = chunk_count(size, chunk_size)
    # The parent's snapshot on this image holds exactly the parent backup's content.
    dirty = set(chunks_to_read(frozen, size, chunk_size, parent,
                               include_parent=staged_from is None))
    seed = parent
    if staged_from is not None and parent is None:
        if staged_from.chunk_size == chunk_size and \
                staged_from.key_id == repo.codec.current_key_id:
            seed = staged_from  # what the image shows where it has no data of its own
            dirty |= {i for i in _resized(staged_from.image_size, size, chunk_size)
                      if i < count}
        else:  # its chunk ids cannot be reused: read what it holds through the image
            dirty |= _chunks_under(staged_from, size, chunk_size)
    # Unchanged chunks keep the seed's ids; past its end (the image grew) they are zero
    # unless read; past the new end (it shrank) they are gone.
    chunk_ids: list[str | None] = [None] * count
    if seed:
        kept = min(count, len(seed.chunks))
        chunk_ids[:kept] = seed.chunks[:kept]
    counters = _Counters()
    uploader = _Uploader(repo, seed.unique_chunk_ids() if seed else set(), counters)
    total = sum(min(chunk_size, size - i * chunk_size) for i in dirty)

    def work(index: int) -> None:
        offset = index * chunk_size
        data = frozen.read(offset, min(chunk_size, size - offset))
        with counters.lock:
            counters.bytes_read += len(data)
            counters.chunks_read += 1
            if progress:
                progress(counters.bytes_read, total)
        if chunk_codec.is_zero(data):
            chunk_ids[index] = None
            return
        cid = repo.codec.chunk_id(data)
        uploader.ensure(cid, data)
        chunk_ids[index] = cid

    run_bounded(work, sorted(dirty), workers, "backup")
    nonzero = sum(1 for cid in chunk_ids if cid is not None)
    stats = Stats(bytes_read=counters.bytes_read, bytes_uploaded=counters.bytes_uploaded,
                  chunks_new=counters.chunks_new, chunks_reused=nonzero - counters.chunks_new,
                  seconds=time.monotonic() - started)
    manifest = Manifest(
        backup_id=backup_id, created=dt.datetime.now(dt.UTC).isoformat(), source=source,
        image_size=size, chunk_size=chunk_size, chunks=chunk_ids,
        parent=parent.backup_id if parent else None, stats=stats,
        key_id=repo.codec.current_key_id)
    return manifest, counters.chunks_read
