"""The chunk cache's read path: page-cache hits on the event loop, the rest on threads."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rbd_restore.fetcher import cache as cache_module
from rbd_restore.fetcher.cache import ChunkCache
from rbd_restore.fetcher.metrics import FetcherMetrics

DATA = bytes(range(256)) * 64
CHUNK_ID = hashlib.sha256(DATA).hexdigest()


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(2)
        self.calls: list[str] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls.append(getattr(fn, "__name__", repr(fn)))
        return super().submit(fn, *args, **kwargs)


async def fetch(chunk_id: str, length: int, executor: Any) -> bytes:
    assert chunk_id == CHUNK_ID and length == len(DATA)
    return DATA


def cached(tmp_path: Path, executor: CountingExecutor) -> ChunkCache:
    cache = ChunkCache(tmp_path, 1 << 20, fetch, executor, FetcherMetrics())
    asyncio.run(cache.read(CHUNK_ID, len(DATA), 0, 1))  # fetched and written to disk
    assert (tmp_path / CHUNK_ID).exists()
    executor.calls.clear()
    return cache


@pytest.mark.skipif(cache_module.RWF_NOWAIT == 0, reason="no RWF_NOWAIT on this platform")
def test_a_chunk_in_the_page_cache_is_read_without_a_thread_hop(tmp_path: Path) -> None:
    with CountingExecutor() as executor:
        cache = cached(tmp_path, executor)
        assert asyncio.run(cache.read(CHUNK_ID, len(DATA), 100, 5000)) == DATA[100:5100]
        # Past the chunk's end: zeros, still from the page cache.
        tail = asyncio.run(cache.read(CHUNK_ID, len(DATA), len(DATA) - 10, 30))
        assert tail == DATA[-10:] + bytes(20)
        assert executor.calls == []


def test_a_read_that_could_wait_for_the_disk_goes_to_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def would_block(*_args: Any) -> int:
        raise BlockingIOError

    with CountingExecutor() as executor:
        cache = cached(tmp_path, executor)
        monkeypatch.setattr(cache_module.os, "preadv", would_block)
        assert asyncio.run(cache.read(CHUNK_ID, len(DATA), 7, 70)) == DATA[7:77]
        assert executor.calls == ["_pread"]
