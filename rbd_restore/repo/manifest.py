"""Manifests: the complete, self-checking description of one backup.

A manifest is one JSON object (docs/format.md, "Manifest"). ``chunks`` lists the
image's chunks in order: a string is a chunk id, a positive integer ``n`` stands
for ``n`` consecutive all-zero (or unallocated) chunks. ``checksum`` is the
SHA-256 of the canonical JSON of every other field, so a truncated or edited
manifest is refused on read. Format 2 replaces it with ``mac``, an HMAC under
the data key the manifest names, so only a holder of the key can write one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from rbd_restore.errors import IntegrityError, UnknownKey
from rbd_restore.repo.chunks import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from rbd_restore.repo.image_layout import Layout, parse_layout
from rbd_restore.repo.layout import BACKUP_ID, CHUNK_ID

if TYPE_CHECKING:
    from rbd_restore.repo.crypto import DataKey

FORMAT_VERSION = 1
KEYED_FORMAT_VERSION = 2
LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9_.:/-]{0,127}$")
LABELS_MAX_BYTES = 256 << 10

# One entry per chunk of the image: a chunk id, or None for an all-zero chunk.
ChunkList = list[str | None]


@dataclass(frozen=True)
class Source:
    fsid: str
    pool: str
    image: str
    image_id: str
    snapshot: str
    namespace: str = ""

    @property
    def spec(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.pool}/{ns}{self.image}"


@dataclass(frozen=True)
class Stats:
    bytes_read: int = 0
    bytes_uploaded: int = 0
    chunks_new: int = 0
    chunks_reused: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Manifest:
    backup_id: str
    created: str
    source: Source
    image_size: int
    chunk_size: int
    chunks: ChunkList
    parent: str | None = None
    stats: Stats = field(default_factory=Stats)
    labels: dict[str, str] = field(default_factory=dict)  # e.g. openstack.volume_id
    key_id: str = ""  # format 2: the data key its chunk ids and MAC are under
    layout: Layout | None = None  # None: a backup written before layouts were kept

    @property
    def created_at(self) -> dt.datetime:
        """Creation time; backup ids sort by it only to the second."""
        try:
            return dt.datetime.fromisoformat(self.created)
        except ValueError:
            return dt.datetime.min.replace(tzinfo=dt.UTC)

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.image_size, self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """Plain length of chunk ``index``: the last chunk may be short."""
        return min(self.chunk_size, self.image_size - index * self.chunk_size)

    def allocated(self) -> Iterator[tuple[int, str]]:
        for index, cid in enumerate(self.chunks):
            if cid is not None:
                yield index, cid

    @property
    def allocated_bytes(self) -> int:
        return sum(self.chunk_length(i) for i, _ in self.allocated())

    def unique_chunk_ids(self) -> set[str]:
        return {cid for cid in self.chunks if cid is not None}

    def allocation_marks(self, points: int = 100) -> list[float]:
        """Where in the image (as a fraction of its size) each ``1/points`` of the
        allocated bytes is reached: ``points + 1`` rising fractions, from where the
        data starts to where it ends. A relocation walks the image's objects in order;
        these turn its position into the share of the data copied."""
        total = self.allocated_bytes
        if total == 0 or self.image_size == 0:
            return []
        marks: list[float] = []
        done = 0
        for index, _ in self.allocated():
            length = self.chunk_length(index)
            start = index * self.chunk_size
            while len(marks) <= points and done + length >= total * len(marks) / points:
                within = total * len(marks) / points - done
                marks.append(round((start + within) / self.image_size, 6))
            done += length
        return marks


def chunk_count(image_size: int, chunk_size: int) -> int:
    return -(-image_size // chunk_size)


def encode_chunk_list(chunks: Sequence[str | None]) -> list[str | int]:
    encoded: list[str | int] = []
    for cid in chunks:
        if cid is None:
            if encoded and isinstance(encoded[-1], int):
                encoded[-1] += 1
            else:
                encoded.append(1)
        else:
            encoded.append(cid)
    return encoded


def decode_chunk_list(encoded: Any) -> ChunkList:
    if not isinstance(encoded, list):
        raise IntegrityError("manifest field chunks is not a list")
    chunks: ChunkList = []
    for item in encoded:
        if isinstance(item, str) and CHUNK_ID.match(item):
            chunks.append(item)
        elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
            chunks.extend([None] * item)
        else:
            raise IntegrityError(f"manifest field chunks holds an invalid entry {item!r:.80}")
    return chunks


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def to_json(manifest: Manifest, key: DataKey | None = None, encryption: str = "") -> bytes:
    """Format 1 without ``key``; format 2, authenticated under ``key``, with it."""
    body: dict[str, Any] = {
        "format_version": KEYED_FORMAT_VERSION if key else FORMAT_VERSION,
        "backup_id": manifest.backup_id,
        "created": manifest.created,
        "source": asdict(manifest.source),
        "parent": manifest.parent,
        "image_size": manifest.image_size,
        "chunk_size": manifest.chunk_size,
        "hash": "hmac-sha256" if key else "sha256",
        "compression": "zstd",
        "chunks": encode_chunk_list(manifest.chunks),
        "stats": asdict(manifest.stats),
    }
    if manifest.labels:  # absent when empty: manifests written before labels read alike
        body["labels"] = dict(manifest.labels)
    if manifest.layout is not None:
        body["layout"] = manifest.layout.as_json()
    if key:
        body["key_id"] = key.key_id
        body["encryption"] = encryption
        body["mac"] = "hmac-sha256:" + key.mac(_canonical(body))
    else:
        body["checksum"] = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps(body, indent=1).encode() + b"\n"


def _field(body: dict[str, Any], name: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise IntegrityError(f"manifest field {name} is missing or has the wrong type")
    return value


def from_json(data: bytes, expected_id: str | None = None,
              keys: Mapping[str, DataKey] | None = None, encryption: str = "") -> Manifest:
    """Parse and validate a manifest; anything off raises :class:`IntegrityError`.
    Without ``keys`` only format 1 is read; with them only format 2, whose MAC must
    verify under the key it names and whose ``encryption`` must be the repository's."""
    what = f"manifest {expected_id}" if expected_id else "manifest"
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{what} is not valid JSON (truncated or damaged)") from None
    if not isinstance(body, dict):
        raise IntegrityError(f"{what} is not a JSON object")
    key_id = _authenticate(what, body, keys, encryption)
    backup_id = _field(body, "backup_id", str)
    if not BACKUP_ID.match(backup_id) or (expected_id and backup_id != expected_id):
        raise IntegrityError(f"{what} names backup {backup_id!r:.40}")
    if body.get("hash") != ("hmac-sha256" if keys is not None else "sha256") or body.get(
            "compression") != "zstd":
        raise IntegrityError(f"{what} uses an unknown hash or compression")
    image_size = _field(body, "image_size", int)
    chunk_size = _field(body, "chunk_size", int)
    if image_size < 0 or chunk_size < MIN_CHUNK_SIZE or chunk_size > MAX_CHUNK_SIZE or (
            chunk_size & (chunk_size - 1)):
        raise IntegrityError(f"{what} has an invalid image or chunk size")
    chunks = decode_chunk_list(body.get("chunks"))
    if len(chunks) != chunk_count(image_size, chunk_size):
        raise IntegrityError(f"{what} lists {len(chunks)} chunks where the image has "
                             f"{chunk_count(image_size, chunk_size)}")
    raw_source = _field(body, "source", dict)
    try:
        source = Source(**{k: str(raw_source[k]) for k in
                           ("fsid", "pool", "image", "image_id", "snapshot")},
                        namespace=str(raw_source.get("namespace", "")))
        stats = Stats(**_field(body, "stats", dict))
    except (KeyError, TypeError):
        raise IntegrityError(f"{what} has an incomplete source or stats field") from None
    parent = body.get("parent")
    if parent is not None and (not isinstance(parent, str) or not BACKUP_ID.match(parent)):
        raise IntegrityError(f"{what} has an invalid parent")
    labels = body.get("labels", {})
    try:
        check_labels(labels)
        layout = parse_layout(body["layout"]) if "layout" in body else None
    except ValueError as exc:
        raise IntegrityError(f"{what}: {exc}") from None
    return Manifest(backup_id=backup_id, created=_field(body, "created", str), source=source,
                    image_size=image_size, chunk_size=chunk_size, chunks=chunks, parent=parent,
                    stats=stats, labels=labels, key_id=key_id, layout=layout)


def _authenticate(what: str, body: dict[str, Any], keys: Mapping[str, DataKey] | None,
                  encryption: str) -> str:
    """Check the version and the checksum or MAC, and take them out of ``body``;
    returns the key id (format 2) or ``""``."""
    version = body.get("format_version")
    wanted = FORMAT_VERSION if keys is None else KEYED_FORMAT_VERSION
    if version != wanted:
        raise IntegrityError(f"{what} has format_version {version!r} where the repository "
                             f"holds version {wanted}")
    if keys is None:
        checksum = body.pop("checksum", None)
        if checksum != "sha256:" + hashlib.sha256(_canonical(body)).hexdigest():
            raise IntegrityError(f"{what} fails its checksum (edited or damaged)")
        return ""
    mac = body.pop("mac", None)
    key_id = body.get("key_id")
    key = keys.get(key_id) if isinstance(key_id, str) else None
    if key is None:
        raise UnknownKey(f"{what} is under key {key_id!s:.20}, which the configured "
                             "credential does not open")
    if not isinstance(mac, str) or not hmac.compare_digest(
            mac, "hmac-sha256:" + key.mac(_canonical(body))):
        raise IntegrityError(f"{what} fails its MAC (edited, forged or damaged)")
    if body.get("encryption") != encryption:
        raise IntegrityError(f"{what} says encryption {body.get('encryption')!r:.20} in a "
                             f"repository whose encryption is {encryption}")
    return key.key_id


def check_labels(labels: Any) -> dict[str, str]:
    """Labels as stored: an object of string values under keys matching LABEL_KEY,
    at most 256 KiB of JSON; ``ValueError`` otherwise."""
    if not isinstance(labels, dict):
        raise ValueError("labels is not an object")
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY.match(key):
            raise ValueError(f"label name {key!r:.60} is not of the form a-z0-9_.:/-")
        if not isinstance(value, str):
            raise ValueError(f"label {key} is not a string")
    if len(json.dumps(labels)) > LABELS_MAX_BYTES:
        raise ValueError("labels exceed 256 KiB")
    return labels
