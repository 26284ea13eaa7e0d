"""The chunk cache keeps restored data private: directory 0700, files 0600."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import pytest

from rbd_restore.cache.chunk_cache import ChunkCache
from rbd_restore.cache.metrics import FetcherMetrics
from rbd_restore.errors import ConfigError

DATA = b"restored volume data" * 200
CHUNK_ID = hashlib.sha256(DATA).hexdigest()


async def fetch(chunk_id: str, length: int, executor: Executor) -> bytes:
    assert chunk_id == CHUNK_ID
    return DATA


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cache_directory_and_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    old_umask = os.umask(0o002)
    try:
        with ThreadPoolExecutor(2) as pool:
            cache = ChunkCache(directory, 1 << 20, fetch, pool, FetcherMetrics())
            assert asyncio.run(cache.read(CHUNK_ID, len(DATA), 0, 8)) == DATA[:8]
    finally:
        os.umask(old_umask)
    assert mode(directory) == 0o700
    assert mode(directory / CHUNK_ID) == 0o600


def test_an_open_cache_left_by_an_older_fetcher_is_made_private(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    (directory / CHUNK_ID).write_bytes(DATA)
    (directory / CHUNK_ID).chmod(0o644)
    with ThreadPoolExecutor(1) as pool:
        ChunkCache(directory, 1 << 20, fetch, pool, FetcherMetrics())
    assert mode(directory) == 0o700
    assert mode(directory / CHUNK_ID) == 0o600


def test_a_cache_directory_that_cannot_be_made_is_named_not_an_internal_error(
        tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    with ThreadPoolExecutor(1) as pool:
        for directory in (a_file / "cache", a_file):
            with pytest.raises(ConfigError, match=rf"cache directory {directory} cannot be "
                               r"used: Not a directory"):
                ChunkCache(directory, 1 << 20, fetch, pool, FetcherMetrics())
