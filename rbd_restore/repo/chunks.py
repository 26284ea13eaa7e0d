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


# Incompressible chunks (encrypted volumes, media, compressed databases) skip the
# compressor: three samples are tried first, and when none of them shrinks the chunk
# goes into a frame of raw blocks. zstd level 1 still ran its match finder over every
# byte of such a chunk, 2.8 ms per 4 MiB here, for nothing.
SAMPLE_BYTES = 16 << 10
INCOMPRESSIBLE = 0.97  # a sample this size or more after compression did not shrink
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
RAW_BLOCK_BYTES = 128 << 10  # zstd's largest block
# Frame header descriptor: 4-byte content size (flag 2), single segment, no checksum.
_SINGLE_SEGMENT_FCS4 = bytes([0b1010_0000])


def encode_chunk(data: bytes | memoryview) -> bytes:
    """The stored form of a chunk: one zstd frame that records its content size."""
    view = memoryview(data)
    if len(view) >= 4 * SAMPLE_BYTES and _incompressible(view):
        return raw_frame(view)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)


def _incompressible(view: memoryview) -> bool:
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    middle = (len(view) // 2) & ~4095
    for start in (0, middle, len(view) - SAMPLE_BYTES):
        sample = view[start:start + SAMPLE_BYTES]
        if len(compressor.compress(sample)) < INCOMPRESSIBLE * len(sample):
            return False
    return True


def raw_frame(data: bytes | memoryview) -> bytes:
    """A zstd frame (RFC 8878, section 3.1.1) holding ``data`` in raw blocks, no copy
    made but the one into the result. Any zstd decoder reads it."""
    view = memoryview(data)
    if len(view) >= 1 << 32:
        raise ValueError("a raw zstd frame here holds less than 4 GiB")
    parts: list[bytes | memoryview] = [ZSTD_MAGIC, _SINGLE_SEGMENT_FCS4,
                                       len(view).to_bytes(4, "little")]
    for start in range(0, max(len(view), 1), RAW_BLOCK_BYTES):
        block = view[start:start + RAW_BLOCK_BYTES]
        last = start + RAW_BLOCK_BYTES >= len(view)
        # Block header: bit 0 last block, bits 1-2 type (0: raw), bits 3-23 size.
        parts.append((len(block) << 3 | int(last)).to_bytes(3, "little"))
        parts.append(block)
    return b"".join(parts)


def decode_chunk(expected_id: str, stored: bytes | bytearray,
                 expected_length: int | None = None) -> bytes:
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
