"""Backups written by Cinder's chunked drivers (S3, Swift format), read and verified.

The layout (cinder/backup/chunkeddriver.py, format 1.0.0): under a prefix
``volume_<volume-id>/<YYYYmmddHHMMSS>/az_<zone>_backup_<backup-id>`` a backup has
``<prefix>_metadata`` (JSON: its objects in order, each ``{key: {offset, length,
compression, md5}}``, ``parent_id``, ``volume_meta``), ``<prefix>_sha256file``
(JSON: a SHA-256 per 32 KiB block of the whole volume at that backup's time) and
its data objects ``<prefix>-00001`` ... (more digits past 99999: never sort keys).
An incremental stores only the blocks that changed since its parent; restoring
applies the chain oldest first, newer objects over older ones.

Cinder never checks those hashes when it restores; this reader checks every
object against its MD5 (of the uncompressed bytes) and every 32 KiB block of the
rebuilt volume against the newest SHA-256 list before a byte is used.
"""

from __future__ import annotations

import bisect
import bz2
import hashlib
import json
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import zstandard

from rbd_restore.errors import IntegrityError, NotFoundError, UsageError
from rbd_restore.repo.store import ObjectMissing, ObjectStore

FORMAT = "1.0.0"
SHA_BLOCK = 32 << 10
MAX_OBJECT = 1 << 30


@dataclass(frozen=True)
class CinderObject:
    key: str
    offset: int
    length: int
    compression: str
    md5: str


@dataclass(frozen=True)
class CinderBackup:
    backup_id: str
    volume_id: str
    prefix: str  # the keys' common start, up to and with _backup_<id>
    metadata: dict[str, Any]
    objects: list[CinderObject]
    parent_id: str | None

    @property
    def created(self) -> str:
        return str(self.metadata.get("created_at", ""))

    @property
    def volume_meta(self) -> str:
        value = self.metadata.get("volume_meta")
        return value if isinstance(value, str) else ""


def _decompress(data: bytes, compression: str, key: str) -> bytes:
    kind = (compression or "none").lower()
    try:
        if kind in ("none", "off", "no"):
            return data
        if kind in ("zlib", "gzip"):
            return zlib.decompress(data)
        if kind in ("bz2", "bzip2"):
            return bz2.decompress(data)
        if kind == "zstd":
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_OBJECT)
    except (zlib.error, OSError, ValueError, zstandard.ZstdError) as exc:
        raise IntegrityError(f"Cinder object {key} does not decompress ({kind}): "
                             f"{type(exc).__name__}") from None
    raise UsageError(f"Cinder object {key} uses compression {compression!r}, unknown here")


class ChunkedReader:
    """Reads one Cinder backup chain from a bucket."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def _json(self, key: str) -> dict[str, Any]:
        try:
            raw = json.loads(self.store.get(key, verify_etag=True))
        except ObjectMissing:
            raise NotFoundError(f"{key} is not in bucket {self.store.bucket}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise IntegrityError(f"{key} is not JSON") from None
        if not isinstance(raw, dict):
            raise IntegrityError(f"{key} is not a JSON object")
        return raw

    def find(self, backup_id: str, volume_id: str) -> CinderBackup:
        suffix = f"_backup_{backup_id}_metadata"
        keys = [info.key for info in self.store.list_objects(f"volume_{volume_id}/")
                if info.key.endswith(suffix)]
        if not keys:
            raise NotFoundError(f"no Cinder backup {backup_id} of volume {volume_id} in "
                                f"bucket {self.store.bucket}")
        prefix = keys[0].removesuffix("_metadata")
        meta = self._json(keys[0])
        if meta.get("version") != FORMAT:
            raise UsageError(f"Cinder backup {backup_id} has format {meta.get('version')!r}; "
                             f"this reader knows {FORMAT}")
        objects = []
        for entry in meta.get("objects", []):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise IntegrityError(f"{keys[0]}: an object entry is malformed")
            ((name, info),) = entry.items()
            try:
                objects.append(CinderObject(str(name), int(info["offset"]),
                                            int(info["length"]),
                                            str(info.get("compression") or "none"),
                                            str(info["md5"])))
            except (KeyError, TypeError, ValueError):
                raise IntegrityError(f"{keys[0]}: object {name} is malformed") from None
        parent = meta.get("parent_id")
        return CinderBackup(backup_id, volume_id, prefix, meta, objects,
                            str(parent) if parent else None)

    def chain(self, backup_id: str, volume_id: str) -> list[CinderBackup]:
        """The backup and its parents, oldest (the full backup) first."""
        chain = [self.find(backup_id, volume_id)]
        while chain[-1].parent_id:
            if len(chain) > 10000:
                raise IntegrityError(f"Cinder backup {backup_id}: parent chain loops")
            chain.append(self.find(chain[-1].parent_id, volume_id))
        return chain[::-1]

    def sha256s(self, backup: CinderBackup) -> list[str]:
        body = self._json(f"{backup.prefix}_sha256file")
        if int(body.get("chunk_size", 0)) != SHA_BLOCK:
            raise UsageError(f"Cinder backup {backup.backup_id} hashes blocks of "
                             f"{body.get('chunk_size')} bytes; this reader knows {SHA_BLOCK}")
        hashes = body.get("sha256s")
        if not isinstance(hashes, list):
            raise IntegrityError(f"{backup.prefix}_sha256file has no sha256s")
        return [str(h) for h in hashes]

    def object_bytes(self, item: CinderObject) -> bytes:
        """An object's uncompressed bytes, checked against the MD5 Cinder recorded."""
        try:
            stored = self.store.get(item.key, verify_etag=False)
        except ObjectMissing:
            raise NotFoundError(f"Cinder object {item.key} is missing") from None
        data = _decompress(stored, item.compression, item.key)
        if len(data) != item.length or hashlib.md5(data).hexdigest() != item.md5:
            raise IntegrityError(f"Cinder object {item.key} fails its MD5 (or length)")
        return data


@dataclass(frozen=True)
class Piece:
    start: int  # in the volume
    end: int
    source: CinderObject
    skip: int  # bytes into the object


def overlay(chain: list[CinderBackup]) -> list[Piece]:
    """The volume as pieces of objects, newer objects over older: ordered, disjoint."""
    starts: list[int] = []
    pieces: list[Piece] = []
    for backup in chain:
        for item in backup.objects:
            new = Piece(item.offset, item.offset + item.length, item, 0)
            at = bisect.bisect_right(starts, new.start) - 1
            at = max(at, 0)
            kept: list[Piece] = []
            while at < len(pieces) and pieces[at].start < new.end:
                old = pieces[at]
                if old.end > new.start:  # overlaps: keep what sticks out
                    if old.start < new.start:
                        kept.append(Piece(old.start, new.start, old.source, old.skip))
                    if old.end > new.end:
                        kept.append(Piece(new.end, old.end, old.source,
                                          old.skip + new.end - old.start))
                    del pieces[at]
                    del starts[at]
                else:
                    at += 1
            for piece in [*kept, new]:
                slot = bisect.bisect_left(starts, piece.start)
                starts.insert(slot, piece.start)
                pieces.insert(slot, piece)
    return pieces


def volume_bytes(reader: ChunkedReader, pieces: list[Piece], size: int,
                 window: int) -> Iterator[bytes]:
    """The rebuilt volume, ``window`` bytes at a time (zeros where no object says
    otherwise); each object is fetched and checked once while its pieces are used."""
    cache: OrderedDict[str, bytes] = OrderedDict()
    position = 0
    index = 0
    while position < size:
        end = min(size, position + window)
        out = bytearray(end - position)
        while index < len(pieces) and pieces[index].end <= position:
            index += 1
        scan = index
        while scan < len(pieces) and pieces[scan].start < end:
            piece = pieces[scan]
            data = cache.get(piece.source.key)
            if data is None:
                data = reader.object_bytes(piece.source)
                cache[piece.source.key] = data
                while len(cache) > 2:
                    cache.popitem(last=False)
            lo, hi = max(piece.start, position), min(piece.end, end)
            base = piece.skip + lo - piece.start
            out[lo - position:hi - position] = data[base:base + hi - lo]
            scan += 1
        yield bytes(out)
        position = end
