"""``rbd-restore restore --mode full``: write a backup into a new RBD image.

Only non-zero chunks are written, so the result is thin. Each distinct chunk is
downloaded once and verified against its name before any byte of it is
written. The image is built under a ``.partial`` name and renamed at the end:
an image with the requested name is always complete. It carries the snapshot
``rbd-restore.<backup-id>``, so the next backup of it is incremental.

Resumable: the partial image records which chunks are written (image metadata
``rbd-restore.restored``, a zlib-compressed bitmap, saved every few seconds
after a flush). A restore that fails or is interrupted keeps the partial image,
and the same command run again writes only what is missing.
"""

from __future__ import annotations

import base64
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rbd_restore.ceph import Cluster, ImageRef, image_exists, open_image, remove_image
from rbd_restore.errors import AlreadyExistsError, IntegrityError, UserError
from rbd_restore.image_layout import apply_metadata, create_options
from rbd_restore.parallel import run_bounded
from rbd_restore.pool_room import ensure_room
from rbd_restore.repo.locks import reading
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.repository import Repository, snapshot_name

Progress = Callable[[int, int], None]

RESTORED_KEY = "rbd-restore.restored"
SAVE_EVERY = 5.0


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    image: ImageRef
    bytes_written: int
    chunks_fetched: int
    seconds: float
    resumed_chunks: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "image": str(self.image), "mode": "full",
                "bytes_written": self.bytes_written, "chunks_fetched": self.chunks_fetched,
                "resumed_chunks": self.resumed_chunks, "seconds": round(self.seconds, 3)}


def partial_name(name: str, backup_id: str) -> str:
    return f"{name}.partial-{backup_id}"


def encode_done(done: Iterable[int], count: int) -> str:
    bits = bytearray((count + 7) // 8)
    for index in done:
        bits[index >> 3] |= 1 << (index & 7)
    return base64.b64encode(zlib.compress(bytes(bits))).decode()


def decode_done(text: str, count: int) -> set[int]:
    """Chunk indices marked written; empty for anything that does not decode."""
    try:
        bits = zlib.decompress(base64.b64decode(text, validate=True))
    except (ValueError, zlib.error):
        return set()
    if len(bits) != (count + 7) // 8:
        return set()
    return {i for i in range(count) if bits[i >> 3] >> (i & 7) & 1}


class _Ledger:
    """Which chunks are written, saved to the image from time to time (after a flush,
    so a chunk marked written is in RADOS)."""

    def __init__(self, image: Any, count: int, done: set[int]) -> None:
        self.image = image
        self.count = count
        self.done = set(done)
        self.lock = threading.Lock()
        self.saved_at = time.monotonic()

    def mark(self, indices: list[int]) -> None:
        with self.lock:
            self.done.update(indices)
            due = time.monotonic() - self.saved_at >= SAVE_EVERY
        if due:
            self.save()

    def save(self) -> None:
        with self.lock:
            marked = set(self.done)
            self.saved_at = time.monotonic()
        self.image.flush()
        self.image.metadata_set(RESTORED_KEY, encode_done(marked, self.count))


def _resumable(ioctx: Any, name: str, manifest: Manifest) -> set[int] | None:
    """What an earlier run wrote into the partial image; None when there is none (or
    one that cannot be trusted, which is removed)."""
    import rbd

    if not image_exists(ioctx, name):
        return None
    try:
        with rbd.Image(ioctx, name, read_only=True) as image:
            if image.size() != manifest.image_size:
                raise ValueError("size differs")
            try:
                text = image.metadata_get(RESTORED_KEY)
            except KeyError:
                text = ""
    except (ValueError, rbd.Error):
        remove_image(ioctx, name)
        return None
    return decode_done(text, manifest.chunk_count)


def restore_full(cluster: Cluster, repo: Repository, backup_id: str, ref: ImageRef,
                 workers: int = 8, progress: Progress | None = None) -> RestoreResult:
    import rbd

    started = time.monotonic()
    with reading(repo.store, repo.keys, backup_id, "restore"), \
            cluster.ioctx(ref.pool) as ioctx:
        manifest = repo.load_manifest(backup_id)
        if image_exists(ioctx, ref.name):
            raise AlreadyExistsError(f"image {ref} already exists; restore never overwrites")
        staging = ImageRef(ref.pool, partial_name(ref.name, backup_id))
        done = _resumable(ioctx, staging.name, manifest)
        options = create_options(cluster, manifest.layout, staging=False)
        # Before the first write: one into a pool without room waits forever.
        ensure_room(cluster, ref.pool, sum(manifest.chunk_length(i)
                                           for i, _ in manifest.allocated()
                                           if i not in (done or ())),
                    options.get("data_pool", ""),
                    manifest.layout.object_size if manifest.layout else 0)
        if done is None:
            rbd.RBD().create(ioctx, staging.name, manifest.image_size, old_format=False,
                             **options)
            done = set()
        try:
            written, fetched = _fill(repo, manifest, ioctx, staging, done, workers, progress)
        except IntegrityError:
            remove_image(ioctx, staging.name)  # a chunk stored damaged: a rerun cannot help
            raise
        except UserError as exc:
            raise type(exc)(f"{exc.message}; the partial image {staging} is kept: run the "
                            "same command again to resume") from None
        rbd.RBD().rename(ioctx, staging.name, ref.name)
    return RestoreResult(backup_id, ref, written, fetched, time.monotonic() - started,
                         len(done))


def _fill(repo: Repository, manifest: Manifest, ioctx: Any, staging: ImageRef,
          done: set[int], workers: int, progress: Progress | None) -> tuple[int, int]:
    """Write what the partial image lacks; its ledger is saved however this ends."""
    with open_image(ioctx, staging) as image:
        ledger = _Ledger(image, manifest.chunk_count, done)
        try:
            result = _write_chunks(repo, manifest, image, workers, progress, ledger)
        finally:
            ledger.save()
        # Only now: a QoS limit in it (conf_rbd_qos_*) would have paced these writes.
        apply_metadata(image, manifest.layout)
        snap = snapshot_name(manifest.backup_id)
        if not any(s["name"] == snap for s in image.list_snaps()):  # an earlier run's
            image.create_snap(snap)
        image.metadata_remove(RESTORED_KEY)
    return result


def _write_chunks(repo: Repository, manifest: Manifest, image: Any, workers: int,
                  progress: Progress | None, ledger: _Ledger) -> tuple[int, int]:
    places: dict[str, list[int]] = defaultdict(list)
    for index, cid in manifest.allocated():
        if index not in ledger.done:
            places[cid].append(index)
    total = sum(manifest.chunk_length(i) for indices in places.values() for i in indices)
    written = 0
    lock = threading.Lock()

    def restore_one(cid: str) -> None:
        nonlocal written
        indices = places[cid]
        length = manifest.chunk_length(indices[0])
        try:
            data = repo.get_chunk(cid, length)
        except UserError as exc:
            offset = indices[0] * manifest.chunk_size
            raise type(exc)(f"restore stopped at chunk {indices[0]} (offset {offset}): "
                            f"{exc.message}") from None
        for index in indices:
            image.write(data, index * manifest.chunk_size)
            with lock:
                written += len(data)
                if progress:
                    progress(written, total)
        ledger.mark(indices)

    run_bounded(restore_one, places, workers, "restore")
    return written, len(places)
