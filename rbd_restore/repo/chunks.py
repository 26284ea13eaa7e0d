"""Chunks: named by the SHA-256 of their plain bytes, stored zstd-compressed.

Nothing is served or written from a chunk until its plain bytes hash back to its
name (:func:`decode_chunk`).
"""

from __future__ import annotations

import hashlib

import zstandard

from rbd_restore.errors import IntegrityError, UsageError

MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 32 << 20
DEFAULT_CHUNK_SIZE = 4 << 20
ZSTD_LEVEL = 1


def validate_chunk_size(size: int) -> int:
    if size < MIN_CHUNK_SIZE or size > MAX_CHUNK_SIZE or size & (size - 1):
        raise UsageError(
            f"chunk size {size} must be a power of two from {MIN_CHUNK_SIZE} (64 KiB) "
            f"to {MAX_CHUNK_SIZE} (32 MiB)"
        )
    return size


def chunk_id(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


_ZERO_BLOCK = bytes(MAX_CHUNK_SIZE)


def is_zero(data: bytes | memoryview) -> bool:
    view = memoryview(data)
    return view == memoryview(_ZERO_BLOCK)[: len(view)]


def encode_chunk(data: bytes | memoryview) -> bytes:
    """The stored form of a chunk: one zstd frame that records its content size."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)


def decode_chunk(expected_id: str, stored: bytes, expected_length: int | None = None) -> bytes:
    """Decompress and verify a stored chunk, or raise :class:`IntegrityError`."""
    try:
        plain = zstandard.ZstdDecompressor().decompress(stored, max_output_size=MAX_CHUNK_SIZE)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"chunk {expected_id} is not a valid zstd frame: {exc}") from None
    actual = chunk_id(plain)
    if actual != expected_id:
        raise IntegrityError(
            f"chunk {expected_id} failed verification: its content hashes to {actual}"
        )
    if expected_length is not None and len(plain) != expected_length:
        raise IntegrityError(
            f"chunk {expected_id} holds {len(plain)} bytes where {expected_length} are expected"
        )
    return plain
