"""A backup repository: manifests and chunks in one bucket under one prefix.

Write order (docs/format.md, "Ordering"): every chunk a manifest names is
stored before the manifest, so a manifest that exists is always complete.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rbd_restore.errors import IntegrityError, NotFoundError, UnknownKey, UsageError
from rbd_restore.repo.codec import LEGACY, Codec
from rbd_restore.repo.layout import BACKUP_ID, KeyLayout
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.store import ObjectMissing, ObjectStore

log = logging.getLogger(__name__)

# A chunk that fails its hash, or a manifest its checksum, is read again this many
# times in all before it counts as damaged: the damage may have happened in transit.
READ_ATTEMPTS = 3
_ANY_CHUNK_ID = re.compile(rb"[0-9a-f]{64}")


def new_backup_id(now: dt.datetime | None = None) -> str:
    """Sortable by creation time; the random tail keeps concurrent backups apart."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


def snapshot_name(backup_id: str) -> str:
    return f"rbd-restore.{backup_id}"


def backup_id_of_snapshot(name: str) -> str | None:
    tail = name.removeprefix("rbd-restore.")
    return tail if tail != name and BACKUP_ID.match(tail) else None


@dataclass(frozen=True)
class UnreadableManifest:
    backup_id: str
    reason: str
    # Every chunk id the stored bytes mention: gc keeps them, since nothing says the
    # backup does not need them. None: a sealed manifest that does not open, whose
    # chunks nobody can know.
    mentioned: frozenset[str] | None


@dataclass(frozen=True)
class ManifestScan:
    manifests: list[Manifest]  # oldest first
    unreadable: list[UnreadableManifest]


class Repository:
    """``codec`` says how objects are named and stored: format 1 by default, else what
    :func:`rbd_restore.repo.keyring.open_codec` found."""

    def __init__(self, store: ObjectStore, prefix: str = "",
                 codec: Codec | Callable[[], Codec] = LEGACY) -> None:
        self.store = store
        self.keys = KeyLayout(prefix)
        # A loader is called when the codec is first needed (a fetcher may start before
        # the first backup creates the repository) and again when a key added since
        # turns up.
        self._loader = codec if callable(codec) else None
        self._codec = None if callable(codec) else codec
        self._codec_lock = threading.Lock()  # backup workers ask at once: one load

    @property
    def codec(self) -> Codec:
        codec = self._codec
        if codec is None:
            with self._codec_lock:
                if self._codec is None:
                    assert self._loader is not None
                    self._codec = self._loader()
                codec = self._codec
        return codec

    def _reload_codec(self) -> bool:
        """Read the keys again; whether anything could change."""
        if self._loader is None:
            return False
        with self._codec_lock:
            self._codec = self._loader()
        return True

    # Manifests

    def load_manifest(self, backup_id: str) -> Manifest:
        if not BACKUP_ID.match(backup_id):
            raise UsageError(f"{backup_id!r:.80} is not a backup id "
                             "(they look like 20261125T173000Z-1a2b3c4d)")
        return self._load_manifest(backup_id)[0]

    def _load_manifest(self, backup_id: str) -> tuple[Manifest, bytes]:
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                data = self.store.get(self.keys.manifest(backup_id))
            except ObjectMissing:
                raise NotFoundError(f"backup {backup_id} does not exist in bucket "
                                    f"{self.store.bucket}") from None
            try:
                return self.codec.decode_manifest(data, backup_id), data
            except UnknownKey:
                if attempt == READ_ATTEMPTS or not self._reload_codec():
                    raise
            except IntegrityError as exc:
                if attempt == READ_ATTEMPTS:
                    raise IntegrityError(f"{exc.message} ({READ_ATTEMPTS} reads)") from None
                log.info("%s; reading it again", exc.message)
        raise AssertionError("unreachable")

    def save_manifest(self, manifest: Manifest) -> None:
        """Store a manifest, refusing one that a reader would refuse: a manifest that
        cannot be read must never reach the bucket."""
        data = self.codec.encode_manifest(manifest)
        try:
            self.codec.decode_manifest(data, manifest.backup_id)
        except IntegrityError as exc:
            raise IntegrityError(f"refusing to store backup {manifest.backup_id}: "
                                 f"{exc.message}") from None
        self.store.put(self.keys.manifest(manifest.backup_id), data)

    def backup_ids(self, stable: bool = False) -> list[str]:
        """Every backup id; ``stable``: from a listing read until it agrees with itself,
        for callers that delete what no manifest names."""
        prefix = self.keys.manifests_prefix
        infos = self.store.list_stable(prefix) if stable else self.store.list_objects(prefix)
        ids = (self.keys.backup_id_of(info.key) for info in infos)
        return sorted(i for i in ids if i)

    def scan_manifests(self, workers: int = 16, stable: bool = False) -> ManifestScan:
        """Every manifest, oldest first, and the ones that failed validation (each
        reported, never a failure of the whole repository)."""

        def read(backup_id: str) -> Manifest | UnreadableManifest | None:
            try:
                return self._load_manifest(backup_id)[0]
            except NotFoundError:
                return None  # deleted since the listing
            except IntegrityError as exc:
                try:
                    raw = self.store.get(self.keys.manifest(backup_id))
                except ObjectMissing:
                    return None
                text = self.codec.manifest_text(raw, backup_id)
                mentioned = None if text is None else frozenset(
                    m.decode() for m in _ANY_CHUNK_ID.findall(text))
                return UnreadableManifest(backup_id, exc.message, mentioned)

        manifests: list[Manifest] = []
        unreadable: list[UnreadableManifest] = []
        with ThreadPoolExecutor(workers) as pool:
            for found in pool.map(read, self.backup_ids(stable)):
                if isinstance(found, Manifest):
                    manifests.append(found)
                elif found is not None:
                    log.info("backup %s skipped: %s", found.backup_id, found.reason)
                    unreadable.append(found)
        manifests.sort(key=lambda m: (m.created_at, m.backup_id))
        return ManifestScan(manifests, unreadable)

    def remove_manifest(self, backup_id: str) -> None:
        """The last step of deleting a backup (rbd_restore.repo.deletion decides when)."""
        self.store.delete(self.keys.manifest(backup_id))

    # Chunks

    def has_chunk(self, chunk_id: str) -> bool:
        return self.store.exists(self.keys.chunk(chunk_id))

    def put_chunk(self, chunk_id: str, stored: bytes | bytearray) -> None:
        self.store.put(self.keys.chunk(chunk_id), stored)

    def get_chunk(self, chunk_id: str, length: int | None = None) -> bytes:
        """The plain bytes of a chunk, verified against its name; read again when they
        do not verify, and refused when they still do not."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            stored = self.store.get(self.keys.chunk(chunk_id), verify_etag=False)
            try:
                return self.codec.decode_chunk(chunk_id, stored, length)
            except IntegrityError as exc:
                if attempt == READ_ATTEMPTS:
                    raise
                log.info("%s; reading it again", exc.message)
        raise AssertionError("unreachable")
