"""The fetcher's chunk cache: verified chunks in files on local disk, LRU, bounded.

A chunk enters the cache only after its SHA-256 matched; files are written to a
temporary name and renamed, so a killed fetcher never leaves a partial chunk
under a real name. After a restart each cached file is hashed again the first
time it is used. However many requests want a chunk at once, it is fetched
once (single flight).

Demand reads and prefetch (``stage``) run on separate executors so a client's
read never queues behind prefetch work for a thread. Chunks staged for the
relocation are kept in memory (up to ``memory_bytes``) instead: each is read
once, soon, by the relocation, and writing them to disk only to read them back
and throw them away cost the fetcher a third of its CPU and the host a disk's
worth of writes per restore. The cache remembers which
chunks prefetch brought in and not yet served, to count them used or wasted,
and takes eviction hints: a demoted chunk is the next to go.

The directory is 0700 and every file 0600 whatever the umask: cached chunks
are restored volumes' data, for the fetcher's user alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from rbd_restore.cache.metrics import FetcherMetrics
from rbd_restore.errors import ConfigError
from rbd_restore.repo.layout import CHUNK_ID

log = logging.getLogger(__name__)

MAX_SPILLING = 8  # chunks on their way from memory to disk at once; more are dropped
HOT_SECONDS = 30.0  # a chunk staged in memory this long ago and not read yet may be dropped
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600

Fetch = Callable[[str, int, Executor], Awaitable[bytes]]
"""Fetch and verify chunk ``chunk_id`` of ``length`` bytes, blocking work on the executor."""


class ChunkCache:
    def __init__(self, directory: Path, max_bytes: int, fetch: Fetch, executor: Executor,
                 metrics: FetcherMetrics, memory_bytes: int = 0,
                 spill: Executor | None = None,
                 id_hashers: Callable[[], list[Any]] | None = None) -> None:
        """``spill``: where chunks leaving memory are written to disk; None drops them.
        ``id_hashers``: fresh hash objects, one per key a chunk id may be under, that
        check a file cached before a restart (default: SHA-256, format 1)."""
        self.id_hashers = id_hashers or (lambda: [hashlib.sha256()])
        self.directory = directory
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.hot: OrderedDict[str, bytes] = OrderedDict()  # verified, in memory, oldest first
        self.hot_since: dict[str, float] = {}
        self.hot_done: set[str] = set()  # read to the end: the first to leave memory
        self.hot_wanted: set[str] = set()  # of those, chunks another session will read
        self.hot_total = 0
        self.spill = spill
        self.spilling: dict[str, bytes] = {}  # on their way to disk, still served
        self.background: set[asyncio.Task[None]] = set()
        self.fetch = fetch
        self.executor = executor
        self.metrics = metrics
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.total = 0
        self.verified: set[str] = set()
        self.in_flight: dict[str, asyncio.Future[bytes | None]] = {}
        self.staged_unused: dict[str, str] = {}  # chunk id -> prefetch class that fetched it
        self._load()

    def _load(self) -> None:
        try:
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            self.directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
            entries = list(os.scandir(self.directory))
        except OSError as exc:  # a file in the way, no permission, a read-only disk
            raise ConfigError(f"cache directory {self.directory} cannot be used: "
                              f"{exc.strerror or exc}") from None
        # An older fetcher (or a hand-made directory) may have left it open to others.
        try:
            os.chmod(self.directory, DIRECTORY_MODE)
        except OSError as exc:
            log.warning("cache directory %s cannot be made private: %s", self.directory,
                        exc.strerror)
        found: list[tuple[float, str, int]] = []
        for entry in entries:
            if CHUNK_ID.match(entry.name):
                stat = entry.stat()
                if stat.st_mode & 0o077:
                    os.chmod(entry.path, FILE_MODE)
                found.append((stat.st_mtime, entry.name, stat.st_size))
            elif entry.name.endswith(".tmp"):
                os.unlink(entry.path)
        for _, name, size in sorted(found):
            self.entries[name] = size
            self.total += size
        self._evict(keep=None)
        self.metrics.cache_bytes.set(self.total)

    def path(self, chunk_id: str) -> Path:
        return self.directory / chunk_id

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self.entries or chunk_id in self.hot or chunk_id in self.spilling

    def state(self, chunk_id: str) -> str:
        """``hit`` (cached), ``wait`` (being fetched) or ``miss``, for metrics."""
        if chunk_id in self:
            return "hit"
        return "wait" if chunk_id in self.in_flight else "miss"

    def demote(self, chunk_id: str, wanted_later: bool = False) -> None:
        """The reader is done with the chunk: the next to leave memory (for the disk
        cache, or dropped), or the next eviction victim on disk. ``wanted_later``:
        another session will read it (restores of volumes sharing chunks): it leaves
        memory for the disk cache, whatever ``spill`` says, and keeps its place there."""
        if chunk_id in self.hot:
            self.hot_done.add(chunk_id)
            if wanted_later:
                self.hot_wanted.add(chunk_id)
            self.hot.move_to_end(chunk_id, last=False)
        elif chunk_id in self.entries and not wanted_later:
            self.entries.move_to_end(chunk_id, last=False)

    def _leave_memory(self, chunk_id: str) -> None:
        data = self.hot[chunk_id]
        wanted = chunk_id in self.hot_wanted
        self._drop_hot(chunk_id, wasted=False)
        spill = self.spill or (self.executor if wanted else None)
        if spill is None or len(data) > self.max_bytes or (
                len(self.spilling) >= MAX_SPILLING and not wanted):
            return
        self.spilling[chunk_id] = data
        task = asyncio.ensure_future(self._spill(chunk_id, data, spill, wanted))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _spill(self, chunk_id: str, data: bytes, executor: Executor,
                     wanted: bool = False) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._write, chunk_id,
                                                             data)
            self.entries[chunk_id] = len(data)
            if not wanted:
                self.entries.move_to_end(chunk_id, last=False)  # first out: in Ceph now
            self.total += len(data)
            self.verified.add(chunk_id)
            self._evict(keep=chunk_id)
        except OSError as exc:  # a full or failing cache disk costs hits, not reads
            log.warning("chunk %s not written to the cache: %s", chunk_id, exc.strerror)
        finally:
            del self.spilling[chunk_id]

    async def stage(self, chunk_id: str, length: int, label: str, executor: Executor,
                    in_memory: bool = False) -> None:
        """Make the chunk present for a later read, on prefetch's own executor; in
        memory when asked and there is room, else on disk."""
        if chunk_id in self or chunk_id in self.in_flight:
            return
        self.staged_unused[chunk_id] = label  # a read from now on counts it used
        try:
            await self._ensure(chunk_id, length, executor, count_hit=False,
                               in_memory=in_memory)
        except BaseException:
            self.staged_unused.pop(chunk_id, None)
            raise
        self.metrics.prefetch_bytes.labels(label).inc(length)
        if chunk_id not in self:  # too big to keep
            self.staged_unused.pop(chunk_id, None)

    async def read(self, chunk_id: str, chunk_length: int, offset: int, length: int,
                   in_memory: bool = False) -> bytes | memoryview:
        """``length`` bytes of a verified chunk from ``offset``; zeros past its end.
        ``in_memory``: a chunk that must be fetched is kept in memory when there is room.
        A part of a chunk in memory is a view of it, not a copy: the relocation reads
        each chunk as two 2 MiB clusters, and copying each cost a GiB of memcpy (and
        the page faults of fresh buffers) per GiB served."""
        label = self.staged_unused.pop(chunk_id, None)
        if label is not None:
            self.metrics.prefetch_used_bytes.labels(label).inc(chunk_length)
        for _ in range(3):
            fetched = await self._ensure(chunk_id, chunk_length, self.executor,
                                         in_memory=in_memory)
            data: bytes | memoryview
            if fetched is not None:
                data = (fetched if offset == 0 and length == len(fetched)
                        else memoryview(fetched)[offset:offset + length])
            else:
                try:
                    data = await asyncio.get_running_loop().run_in_executor(
                        self.executor, self._pread, chunk_id, offset, length)
                except OSError as exc:  # evicted meanwhile, or the disk failed: fetch again
                    if not isinstance(exc, FileNotFoundError):
                        log.warning("cached chunk %s unreadable (%s); fetching it again",
                                    chunk_id, exc.strerror or exc)
                    self._forget(chunk_id)
                    continue
            return bytes(data) + bytes(length - len(data)) if len(data) < length else data
        raise RuntimeError(f"chunk {chunk_id} kept disappearing from the cache")

    def _pread(self, chunk_id: str, offset: int, length: int) -> bytes:
        fd = os.open(self.path(chunk_id), os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    async def _ensure(self, chunk_id: str, length: int, executor: Executor,
                      count_hit: bool = True, in_memory: bool = False) -> bytes | None:
        """Make the chunk present and verified; return its bytes when they are at hand."""
        hot = self.hot.get(chunk_id)
        if hot is None:
            hot = self.spilling.get(chunk_id)
        if hot is not None:
            if count_hit:
                self.metrics.cache_hits.inc()
            return hot
        if chunk_id in self.entries and chunk_id in self.verified:
            self.entries.move_to_end(chunk_id)
            if count_hit:
                self.metrics.cache_hits.inc()
            return None
        pending = self.in_flight.get(chunk_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.in_flight[chunk_id] = future
        try:
            data = await self._load_or_fetch(chunk_id, length, executor, in_memory)
            future.set_result(data)
            return data
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters get it; no "never retrieved" warning
            raise
        finally:
            del self.in_flight[chunk_id]

    async def _load_or_fetch(self, chunk_id: str, length: int, executor: Executor,
                             in_memory: bool = False) -> bytes | None:
        loop = asyncio.get_running_loop()
        if chunk_id in self.entries:  # cached before a restart: hash it once
            ok = await loop.run_in_executor(executor, self._file_matches, chunk_id)
            if ok:
                self.verified.add(chunk_id)
                self.entries.move_to_end(chunk_id)
                self.metrics.cache_hits.inc()
                return None
            log.error("cached chunk %s failed verification; fetching it again", chunk_id)
            self.metrics.checksum_failures.inc()
            self._forget(chunk_id)
        self.metrics.cache_misses.inc()
        data = await self.fetch(chunk_id, length, executor)
        if in_memory and self._room_in_memory(len(data)):
            self.hot[chunk_id] = data
            self.hot_since[chunk_id] = time.monotonic()
            self.hot_total += len(data)
        elif len(data) <= self.max_bytes:
            try:
                await loop.run_in_executor(executor, self._write, chunk_id, data)
            except OSError as exc:
                # A full or failing cache disk costs hits, never a read: the verified
                # bytes are in hand, and this reader gets them.
                self.metrics.cache_write_errors.inc()
                log.warning("chunk %s not cached: %s", chunk_id, exc.strerror or exc)
                return data
            self.entries[chunk_id] = len(data)
            self.total += len(data)
            self.verified.add(chunk_id)
            self._evict(keep=chunk_id)
            self.metrics.cache_bytes.set(self.total)
        return data

    def _room_in_memory(self, nbytes: int) -> bool:
        """Whether ``nbytes`` fit in memory. Chunks read to the end leave first; then
        chunks staged long ago and never read (a relocation that stopped, a session
        that closed)."""
        while self.hot and self.hot_total + nbytes > self.memory_bytes:
            oldest = next(iter(self.hot))
            if oldest in self.hot_done:
                self._leave_memory(oldest)
            elif time.monotonic() - self.hot_since[oldest] >= HOT_SECONDS:
                self._drop_hot(oldest)
            else:
                break
        return self.hot_total + nbytes <= self.memory_bytes

    def _drop_hot(self, chunk_id: str, wasted: bool = True) -> None:
        size = len(self.hot.pop(chunk_id))
        self.hot_total -= size
        del self.hot_since[chunk_id]
        self.hot_done.discard(chunk_id)
        self.hot_wanted.discard(chunk_id)
        label = self.staged_unused.pop(chunk_id, None) if wasted else None
        if label is not None:  # staged, never read
            self.metrics.prefetch_wasted_bytes.labels(label).inc(size)

    def _file_matches(self, chunk_id: str) -> bool:
        digests = self.id_hashers()
        try:
            with open(self.path(chunk_id), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    for digest in digests:
                        digest.update(block)
        except OSError:  # gone, or the disk fails: not a match, fetched again
            return False
        return any(hmac.compare_digest(d.hexdigest(), chunk_id) for d in digests)

    def _write(self, chunk_id: str, data: bytes) -> None:
        tmp = self.directory / f"{chunk_id}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with open(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(chunk_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _forget(self, chunk_id: str) -> None:
        size = self.entries.pop(chunk_id, None)
        if size is not None:
            self.total -= size
        self.verified.discard(chunk_id)
        with contextlib.suppress(OSError):
            os.unlink(self.path(chunk_id))


    def _evict(self, keep: str | None) -> None:
        while self.total > self.max_bytes and self.entries:
            victim = next(iter(self.entries))
            if victim == keep:
                if len(self.entries) == 1:
                    break
                self.entries.move_to_end(victim)
                continue
            label = self.staged_unused.pop(victim, None)
            if label is not None:
                self.metrics.prefetch_wasted_bytes.labels(label).inc(self.entries[victim])
            self._forget(victim)
            self.metrics.cache_evictions.inc()
