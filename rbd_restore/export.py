"""``rbd-restore backups export``: a backup's raw image as a byte stream or a file.

For consumers that take a file (Cinder's generic restore into an attached
volume, ``dd``, ``qemu-img``): every chunk is fetched and verified before a
byte of it is written, several at a time, written in order. Into a regular
file zero chunks become holes.

A file is new (export never overwrites), and when the export fails it is
removed, as ``rbd export`` removes its own: a partial image left under the
name asked for would pass for the backup.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from rbd_restore.repo.locks import reading
from rbd_restore.repo.repository import Repository

Progress = Callable[[int, int], None]


def export_backup(repo: Repository, backup_id: str, out: BinaryIO, workers: int = 8,
                  progress: Progress | None = None) -> int:
    """Write the image of ``backup_id`` to ``out``; returns the bytes it spans."""
    with reading(repo.store, repo.keys, backup_id, "export"):
        manifest = repo.load_manifest(backup_id)
        sparse = _seekable_file(out)
        window: deque[tuple[int, Future[bytes] | None]] = deque()
        done = 0
        with ThreadPoolExecutor(workers, thread_name_prefix="export") as pool:
            for index, cid in enumerate(manifest.chunks):
                length = manifest.chunk_length(index)
                window.append((length, pool.submit(repo.get_chunk, cid, length)
                               if cid is not None else None))
                while len(window) > 2 * workers:
                    done += _write(out, *window.popleft(), sparse)
                    if progress:
                        progress(done, manifest.image_size)
            while window:
                done += _write(out, *window.popleft(), sparse)
                if progress:
                    progress(done, manifest.image_size)
        if sparse:
            out.truncate(manifest.image_size)
        out.flush()
    return manifest.image_size


def export_to_file(repo: Repository, backup_id: str, destination: str, workers: int = 8,
                   progress: Progress | None = None) -> int:
    """Export into a new file: the whole image, on disk (fsync) when this returns, or no
    file at all. Raises FileExistsError when ``destination`` exists."""
    out = open(destination, "xb")  # noqa: SIM115 (closed below, before any unlink)
    try:
        with out:
            size = export_backup(repo, backup_id, out, workers, progress)
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(destination)
        raise
    return size


def _write(out: BinaryIO, length: int, pending: Future[bytes] | None, sparse: bool) -> int:
    if pending is not None:
        out.write(pending.result())
    elif sparse:
        out.seek(length, os.SEEK_CUR)
    else:
        out.write(bytes(length))
    return length


def _seekable_file(out: BinaryIO) -> bool:
    try:
        return out.seekable() and os.path.isfile(f"/proc/self/fd/{out.fileno()}")
    except (OSError, ValueError):
        return False
