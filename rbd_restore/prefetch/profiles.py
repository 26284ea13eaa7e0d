"""Boot profiles: which chunks of a volume a VM read while booting, in first-touch order.

A profile belongs to a volume, named by its source cluster's fsid and the RBD
image id recorded in every manifest, so any backup of the volume can use it.
Entries are chunk indices of the virtual disk (not chunk ids): the chunk at an
index changes from backup to backup, its role at boot does not. Each boot's
recording is merged into the stored profile: chunks this boot read take this
boot's times; chunks it did not read stay for ``KEEP_BOOTS`` boots, then go.
Stored as ``profiles/<fsid>/<image-id>.json`` (docs/format.md, "Profiles").
"""

from __future__ import annotations

import datetime as dt
import json
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from rbd_restore.errors import IntegrityError, UsageError
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.repository import Repository
from rbd_restore.repo.store import ObjectMissing

FORMAT_VERSION = 1
KEEP_BOOTS = 3  # a chunk no boot has read for this many boots leaves the profile
MAX_ENTRIES = 1 << 16
FSID = re.compile(r"^[0-9a-fA-F-]{1,64}$")
IMAGE_ID = re.compile(r"^[0-9a-zA-Z.]{1,64}$")
SECTOR = 512


@dataclass(frozen=True)
class VolumeKey:
    fsid: str
    image_id: str

    def __post_init__(self) -> None:
        if not FSID.match(self.fsid) or not IMAGE_ID.match(self.image_id):
            raise UsageError(f"{self.fsid!r:.70}/{self.image_id!r:.70} does not name a volume")

    @classmethod
    def of(cls, manifest: Manifest) -> VolumeKey:
        return cls(manifest.source.fsid, manifest.source.image_id)


@dataclass(frozen=True)
class ProfileEntry:
    chunk: int  # index of the chunk in the virtual disk
    at_ms: int  # first read, milliseconds after the session opened
    last_boot: int  # the newest boot that read it


@dataclass
class Profile:
    volume: VolumeKey
    chunk_size: int
    boots: int = 0
    updated: str = ""
    entries: list[ProfileEntry] = field(default_factory=list)

    def chunks(self) -> list[int]:
        return [e.chunk for e in self.entries]

    def merged(self, reads: list[tuple[int, int]], now: float | None = None) -> Profile:
        """This profile with one more boot's ``(chunk, at_ms)`` first touches merged in."""
        boot = self.boots + 1
        kept = {e.chunk: e for e in self.entries if boot - e.last_boot < KEEP_BOOTS}
        for chunk, _ in reads:
            kept.pop(chunk, None)
        # Stable by time: reads in the same millisecond keep the order they came in.
        ordered = sorted([*kept.values(), *(ProfileEntry(c, t, boot) for c, t in reads)],
                         key=lambda e: e.at_ms)[:MAX_ENTRIES]
        stamp = dt.datetime.fromtimestamp(now if now is not None else time.time(), dt.UTC)
        return Profile(self.volume, self.chunk_size, boot,
                       stamp.isoformat(timespec="seconds"), ordered)

    def to_json(self) -> bytes:
        return json.dumps({
            "format_version": FORMAT_VERSION, "fsid": self.volume.fsid,
            "image_id": self.volume.image_id, "chunk_size": self.chunk_size,
            "boots": self.boots, "updated": self.updated,
            "chunks": [[e.chunk, e.at_ms, e.last_boot] for e in self.entries],
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, volume: VolumeKey) -> Profile:
        try:
            body = json.loads(data)
            if body["format_version"] != FORMAT_VERSION:
                raise IntegrityError(f"profile format {body['format_version']!r} is not "
                                     f"{FORMAT_VERSION}")
            if (body["fsid"], body["image_id"]) != (volume.fsid, volume.image_id):
                raise IntegrityError("profile names another volume")
            entries = [ProfileEntry(int(c), int(t), int(b)) for c, t, b in body["chunks"]]
            chunk_size, boots = int(body["chunk_size"]), int(body["boots"])
            updated = str(body["updated"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"profile of {volume.fsid}/{volume.image_id} is damaged: "
                                 f"{type(exc).__name__}") from None
        if chunk_size <= 0 or any(e.chunk < 0 for e in entries):
            raise IntegrityError(f"profile of {volume.fsid}/{volume.image_id} is damaged")
        return cls(volume, chunk_size, boots, updated, entries)


def _context(volume: VolumeKey) -> str:
    return f"profile:{volume.fsid}/{volume.image_id}"


class ProfileStore:
    """Profiles in the repository's bucket. Methods block (S3)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def load(self, volume: VolumeKey) -> Profile | None:
        try:
            data = self.repo.store.get(self.repo.keys.profile(volume.fsid, volume.image_id))
        except ObjectMissing:
            return None
        return Profile.from_json(self.repo.codec.open_object(_context(volume), data), volume)

    def record_boot(self, volume: VolumeKey, chunk_size: int,
                    reads: list[tuple[int, int]]) -> Profile:
        """Merge one boot's first touches into the stored profile and save it.

        Two fetchers saving the same volume's profile at once: the last write
        wins and one boot's recording is lost, which only costs prefetch hits.
        """
        try:
            old = self.load(volume)
        except IntegrityError:
            old = None  # a damaged profile is replaced, never trusted
        if old is None or old.chunk_size != chunk_size:
            old = Profile(volume, chunk_size)
        new = old.merged(reads)
        self.repo.store.put(self.repo.keys.profile(volume.fsid, volume.image_id),
                            self.repo.codec.seal_object(_context(volume), new.to_json()))
        return new

    def clear(self, volume: VolumeKey) -> bool:
        key = self.repo.keys.profile(volume.fsid, volume.image_id)
        if not self.repo.store.exists(key):
            return False
        self.repo.store.delete(key)
        return True


class BootRecorder:
    """First touches of one session's guest reads, until the boot window ends."""

    def __init__(self, opened_at: float, window_seconds: float) -> None:
        self.opened_at = opened_at
        self.window_seconds = window_seconds
        self.first_touch: dict[int, int] = {}
        self.finished = False

    def record(self, chunk: int, now: float) -> bool:
        """Note a read of ``chunk``; False once the window is over (the caller saves)."""
        if self.finished:
            return False
        if now - self.opened_at > self.window_seconds:
            self.finished = True
            return False
        if chunk not in self.first_touch:
            self.first_touch[chunk] = max(0, int((now - self.opened_at) * 1000))
        return True

    def finish(self) -> list[tuple[int, int]]:
        self.finished = True
        # Stable: chunks first read in the same millisecond stay in the order they were.
        return sorted(self.first_touch.items(), key=lambda item: item[1])


def partition_starts(first_sectors: bytes) -> list[int]:
    """Byte offsets of the partitions an MBR or GPT in the disk's first sectors lists.

    ``first_sectors`` should hold at least the first 34 sectors (MBR, GPT header
    and the first 128 GPT entries); anything shorter yields what it can.
    """
    if len(first_sectors) < SECTOR or first_sectors[510:512] != b"\x55\xaa":
        return []
    starts: list[int] = []
    protective = False
    for slot in range(4):
        entry = first_sectors[446 + 16 * slot:446 + 16 * (slot + 1)]
        kind, lba = entry[4], struct.unpack_from("<I", entry, 8)[0]
        if kind == 0xEE:
            protective = True
        elif kind and lba:
            starts.append(lba * SECTOR)
    if not protective or len(first_sectors) < 2 * SECTOR:
        return starts
    header = first_sectors[SECTOR:2 * SECTOR]
    if header[:8] != b"EFI PART":
        return starts
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    if size < 128 or count > 1024:
        return starts
    table = first_sectors[entries_lba * SECTOR:entries_lba * SECTOR + count * size]
    for at in range(0, len(table) - size + 1, size):
        if table[at:at + 16] != bytes(16):
            starts.append(struct.unpack_from("<Q", table, at + 32)[0] * SECTOR)
    return starts


def heuristic_chunks(manifest: Manifest, head_bytes: int, starts: list[int]) -> list[int]:
    """Chunks to stage when a volume has no profile: the first ``head_bytes`` of the disk
    and of each partition, and the disk's last chunk (where a backup GPT lives).
    ``head_bytes`` 0 turns the heuristic off."""
    if head_bytes <= 0:
        return []
    size = manifest.chunk_size
    count = len(manifest.chunks)
    wanted: list[int] = []
    for start in (0, *starts):
        if 0 <= start < manifest.image_size:
            wanted.extend(range(start // size, min(count, -(-(start + head_bytes) // size))))
    if count:
        wanted.append(count - 1)
    return [c for c in dict.fromkeys(wanted) if manifest.chunks[c]]


def describe(profile: Profile) -> dict[str, Any]:
    return {"fsid": profile.volume.fsid, "image_id": profile.volume.image_id,
            "chunk_size": profile.chunk_size, "boots": profile.boots,
            "updated": profile.updated, "chunks": len(profile.entries),
            "bytes": len(profile.entries) * profile.chunk_size,
            "entries": [{"chunk": e.chunk, "at_ms": e.at_ms, "last_boot": e.last_boot}
                        for e in profile.entries]}
