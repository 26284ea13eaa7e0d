"""How a repository names and stores what it holds (docs/format.md).

Format 1 names a chunk by the SHA-256 of its plain bytes and stores everything in
the clear, each manifest under an unkeyed checksum. Format 2 names chunks by a
keyed HMAC, stores each object under a header that names its data key, and
either seals chunks, manifests, profiles and session records with AES-256-GCM
(``aes-256-gcm``, the default) or keeps them readable (``none``) with every
manifest authenticated by a keyed MAC. Which one a repository uses is settled by
its ``config`` object and the keys that open (rbd_restore.repo.keyring).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import zstandard

from rbd_restore.errors import IntegrityError, UnknownKey
from rbd_restore.repo import chunks as chunk_codec
from rbd_restore.repo import manifest as manifest_codec
from rbd_restore.repo.crypto import HEADER_BYTES, PLAIN, SEALED, DataKey, Unopenable, header_of
from rbd_restore.repo.manifest import Manifest

ENCRYPTED = "aes-256-gcm"
AUTHENTICATED = "none"  # format 2 without encryption: keyed ids and manifest MACs
ENCRYPTION_MODES = (ENCRYPTED, AUTHENTICATED)


@dataclass(frozen=True)
class Codec:
    """Format 1 when ``keys`` is empty; format 2 otherwise."""

    encryption: str = AUTHENTICATED
    keys: dict[str, DataKey] = field(default_factory=dict)  # every key this client opened
    current: DataKey | None = None  # new objects go under it
    repository_id: str = ""

    @property
    def format_version(self) -> int:
        return 2 if self.current else 1

    @property
    def encrypted(self) -> bool:
        return self.current is not None and self.encryption == ENCRYPTED

    @property
    def current_key_id(self) -> str:
        return self.current.key_id if self.current else ""

    def describe(self) -> str:
        if not self.current:
            return "format 1 (unauthenticated)"
        kind = "encrypted (AES-256-GCM)" if self.encrypted else "authenticated, not encrypted"
        return f"format 2, {kind}, key {self.current.key_id}"

    # Chunks

    def chunk_id(self, plain: bytes | memoryview) -> str:
        return self.current.chunk_id(plain) if self.current else chunk_codec.chunk_id(plain)

    def id_hashers(self) -> list[Any]:
        """Fresh hash objects, one per key this client holds, whose hex digest over a
        chunk's plain bytes is its id under that key."""
        if not self.current:
            return [hashlib.sha256()]
        return [hmac.new(k.id_key, digestmod=hashlib.sha256) for k in self.keys.values()]

    def encode_chunk(self, chunk_id: str, plain: bytes | memoryview) -> bytes | bytearray:
        """The stored form of a chunk whose id :meth:`chunk_id` gave."""
        frame = chunk_codec.encode_chunk(plain)
        if not self.current:
            return frame
        if self.encrypted:
            return self.current.seal(b"chunk:" + chunk_id.encode(), frame)
        return bytes([PLAIN]) + self.current.header_id + frame

    def decode_chunk(self, chunk_id: str, stored: bytes | bytearray,
                     length: int | None = None) -> bytes:
        """Open, decompress and verify a stored chunk, or raise :class:`IntegrityError`."""
        if not self.current:
            return chunk_codec.decode_chunk(chunk_id, stored, length)
        what = f"chunk {chunk_id}"
        key, frame = self._open(what, b"chunk:" + chunk_id.encode(), stored)
        try:
            plain = zstandard.ZstdDecompressor().decompress(
                frame, max_output_size=chunk_codec.MAX_CHUNK_SIZE)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what} is not a valid zstd frame: {exc}") from None
        if not hmac.compare_digest(key.chunk_id(plain), chunk_id):
            raise IntegrityError(f"{what} failed verification: its content does not match "
                                 "its keyed id")
        if length is not None and len(plain) != length:
            raise IntegrityError(f"{what} holds {len(plain)} bytes where {length} are expected")
        return plain

    def _open(self, what: str, context: bytes,
              stored: bytes | bytearray) -> tuple[DataKey, bytearray | memoryview]:
        try:
            kind, key_id = header_of(stored)
        except Unopenable as exc:
            raise IntegrityError(f"{what} {exc}") from None
        key = self.keys.get(key_id)
        if key is None:
            raise UnknownKey(f"{what} is under key {key_id}, which the configured "
                                 "credential does not open")
        wanted = SEALED if self.encrypted else PLAIN
        if kind != wanted:
            raise IntegrityError(f"{what} is {'sealed' if kind == SEALED else 'in the clear'}"
                                 f" in a repository whose encryption is {self.encryption}")
        if kind == PLAIN:
            return key, memoryview(stored)[HEADER_BYTES:]
        try:
            return key, key.open(context, stored)
        except Unopenable as exc:
            raise IntegrityError(f"{what} {exc}") from None

    # Manifests

    def encode_manifest(self, manifest: Manifest) -> bytes:
        data = manifest_codec.to_json(manifest, self.current, self.encryption)
        if self.encrypted:
            assert self.current is not None
            return bytes(self.current.seal(b"manifest:" + manifest.backup_id.encode(), data))
        return data

    def decode_manifest(self, data: bytes, expected_id: str) -> Manifest:
        if not self.current:
            return manifest_codec.from_json(data, expected_id)
        if self.encrypted:
            data = bytes(self._open(f"manifest {expected_id}",
                                    b"manifest:" + expected_id.encode(), data)[1])
        return manifest_codec.from_json(data, expected_id, self.keys, self.encryption)

    def manifest_text(self, data: bytes, backup_id: str) -> bytes | None:
        """The JSON of a stored manifest that may not validate, to find what it names;
        None when a sealed one does not open (then nothing can be known of it)."""
        if not self.encrypted:
            return data
        try:
            return bytes(self._open(f"manifest {backup_id}",
                                    b"manifest:" + backup_id.encode(), data)[1])
        except IntegrityError:
            return None

    # Profiles and session records: sealed when the repository is encrypted.

    def seal_object(self, context: str, data: bytes) -> bytes:
        if self.encrypted:
            assert self.current is not None
            return bytes(self.current.seal(context.encode(), data))
        return data

    def open_object(self, context: str, data: bytes) -> bytes:
        """The plain bytes of a profile or session record; ``IntegrityError`` when a
        sealed one does not open."""
        if not self.encrypted:
            return data
        return bytes(self._open(context, context.encode(), data)[1])


LEGACY = Codec()
