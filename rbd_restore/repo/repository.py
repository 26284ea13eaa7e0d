"""A backup repository: manifests and chunks in one bucket under one prefix.

Write order (docs/format.md, "Ordering"): every chunk a manifest names is
stored before the manifest, so a manifest that exists is always complete.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from rbd_restore.errors import NotFoundError, UsageError
from rbd_restore.repo import chunks as chunk_codec
from rbd_restore.repo import manifest as manifest_codec
from rbd_restore.repo.layout import BACKUP_ID, KeyLayout
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.store import ObjectMissing, ObjectStore


def new_backup_id(now: dt.datetime | None = None) -> str:
    """Sortable by creation time; the random tail keeps concurrent backups apart."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


def snapshot_name(backup_id: str) -> str:
    return f"rbd-restore.{backup_id}"


def backup_id_of_snapshot(name: str) -> str | None:
    tail = name.removeprefix("rbd-restore.")
    return tail if tail != name and BACKUP_ID.match(tail) else None


class Repository:
    def __init__(self, store: ObjectStore, prefix: str = "") -> None:
        self.store = store
        self.keys = KeyLayout(prefix)

    # Manifests

    def load_manifest(self, backup_id: str) -> Manifest:
        if not BACKUP_ID.match(backup_id):
            raise UsageError(f"{backup_id!r:.80} is not a backup id "
                             "(they look like 20261125T173000Z-1a2b3c4d)")
        try:
            data = self.store.get(self.keys.manifest(backup_id))
        except ObjectMissing:
            raise NotFoundError(f"backup {backup_id} does not exist in bucket "
                                f"{self.store.bucket}") from None
        return manifest_codec.from_json(data, expected_id=backup_id)

    def save_manifest(self, manifest: Manifest) -> None:
        data = manifest_codec.to_json(manifest)
        self.store.put(self.keys.manifest(manifest.backup_id), data)

    def backup_ids(self) -> list[str]:
        ids = (self.keys.backup_id_of(info.key)
               for info in self.store.list_objects(self.keys.manifests_prefix))
        return sorted(i for i in ids if i)

    def manifests(self, workers: int = 16) -> Iterator[Manifest]:
        """Every manifest, oldest first; an unreadable one raises."""
        with ThreadPoolExecutor(workers) as pool:
            yield from pool.map(self.load_manifest, self.backup_ids())

    def delete_backup(self, backup_id: str) -> Manifest:
        manifest = self.load_manifest(backup_id)
        self.store.delete(self.keys.manifest(backup_id))
        return manifest

    # Chunks

    def has_chunk(self, chunk_id: str) -> bool:
        return self.store.exists(self.keys.chunk(chunk_id))

    def put_chunk(self, chunk_id: str, stored: bytes) -> None:
        self.store.put(self.keys.chunk(chunk_id), stored)

    def get_chunk(self, chunk_id: str, length: int | None = None) -> bytes:
        """The plain bytes of a chunk, verified against its name."""
        return chunk_codec.decode_chunk(chunk_id, self.store.get(self.keys.chunk(chunk_id)),
                                        length)
