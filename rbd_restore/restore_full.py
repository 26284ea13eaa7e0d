"""``rbd-restore restore --mode full``: write a backup into a new RBD image.

Only non-zero chunks are written, so the result is thin. Each distinct chunk is
downloaded once and verified against its name before any byte of it is
written. The image is built under a ``.partial`` name and renamed at the end:
an image with the requested name is always complete. It carries the snapshot
``rbd-restore.<backup-id>``, so the next backup of it is incremental.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rbd_restore.ceph import Cluster, ImageRef, image_exists, open_image, remove_image
from rbd_restore.errors import AlreadyExistsError, UserError
from rbd_restore.parallel import run_bounded
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.repository import Repository, snapshot_name

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    image: ImageRef
    bytes_written: int
    chunks_fetched: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "image": str(self.image), "mode": "full",
                "bytes_written": self.bytes_written, "chunks_fetched": self.chunks_fetched,
                "seconds": round(self.seconds, 3)}


def partial_name(name: str, backup_id: str) -> str:
    return f"{name}.partial-{backup_id}"


def restore_full(cluster: Cluster, repo: Repository, backup_id: str, ref: ImageRef,
                 workers: int = 8, progress: Progress | None = None) -> RestoreResult:
    import rbd

    started = time.monotonic()
    manifest = repo.load_manifest(backup_id)
    with cluster.ioctx(ref.pool) as ioctx:
        if image_exists(ioctx, ref.name):
            raise AlreadyExistsError(f"image {ref} already exists; restore never overwrites")
        staging = ImageRef(ref.pool, partial_name(ref.name, backup_id))
        remove_image(ioctx, staging.name)  # left by an earlier, interrupted restore
        rbd.RBD().create(ioctx, staging.name, manifest.image_size, old_format=False)
        try:
            with open_image(ioctx, staging) as image:
                written, fetched = _write_chunks(repo, manifest, image, workers, progress)
                image.flush()
                image.create_snap(snapshot_name(backup_id))
            rbd.RBD().rename(ioctx, staging.name, ref.name)
        except BaseException:
            remove_image(ioctx, staging.name)
            raise
    return RestoreResult(backup_id, ref, written, fetched, time.monotonic() - started)


def _write_chunks(repo: Repository, manifest: Manifest, image: Any, workers: int,
                  progress: Progress | None) -> tuple[int, int]:
    places: dict[str, list[int]] = defaultdict(list)
    for index, cid in manifest.allocated():
        places[cid].append(index)
    total = manifest.allocated_bytes
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

    run_bounded(restore_one, places, workers, "restore")
    return written, len(places)
