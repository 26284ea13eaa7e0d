"""Verified chunk fetches from S3 for the fetcher, with its retry policy.

botocore already retries each request with backoff. On top of that, a chunk
that cannot be fetched is retried with a capped backoff for up to
``stall_seconds`` (librbd waits without a timeout: a stalled read is better
than a failed one), and a chunk that fails to open or verify against its id is
fetched again a few times, then refused. Bytes that failed their hash never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor

from rbd_restore.cache.metrics import FetcherMetrics
from rbd_restore.errors import IntegrityError, UnavailableError
from rbd_restore.repo.repository import Repository
from rbd_restore.repo.store import ObjectMissing

log = logging.getLogger(__name__)

CHECKSUM_ATTEMPTS = 3


class DecodeGate:
    """At most ``slots`` chunks opened, decompressed and verified at once, demand first.

    The GETs need many threads (each waits on S3's latency), the decoding is CPU-bound:
    twelve threads decoding at once on two cores cost 2.03 CPU-s per GiB where the
    same work one at a time costs 1.70, and two at a time 1.77-1.84 (measured
    2026-12-05, GET + open + decompress + verify of 1 GiB, bench/fetcher.py's floor
    run with threads). A demand read's chunk waits for one decode at most: waiting
    demand is let in before any prefetch."""

    def __init__(self, slots: int) -> None:
        self.free = max(1, slots)
        self.demand_waiting = 0
        self.waiting = 0
        self.lock = threading.Lock()
        # One condition per kind, so a freed slot wakes the one thread that may take it:
        # waking every waiter (up to the prefetch threads) for each decode cost context
        # switches worth ~0.1 CPU-s per GiB served cold.
        self.demand_turn = threading.Condition(self.lock)
        self.prefetch_turn = threading.Condition(self.lock)

    @contextlib.contextmanager
    def held(self, demand: bool) -> Iterator[None]:
        with self.lock:
            self.demand_waiting += demand
            self.waiting += 1
            try:
                while self.free == 0 or (not demand and self.demand_waiting):
                    (self.demand_turn if demand else self.prefetch_turn).wait()
            finally:
                self.demand_waiting -= demand
                self.waiting -= 1
            self.free -= 1
        try:
            yield
        finally:
            with self.lock:
                self.free += 1
                if self.demand_waiting:
                    self.demand_turn.notify()
                else:
                    self.prefetch_turn.notify()


class S3ChunkSource:
    def __init__(self, repo: Repository, executor: Executor, metrics: FetcherMetrics,
                 stall_seconds: float) -> None:
        self.repo = repo
        self.executor = executor
        self.metrics = metrics
        self.stall_seconds = stall_seconds
        self.on_fetched: Callable[[int, float], None] | None = None  # (bytes, seconds)
        self.gate = DecodeGate(len(os.sched_getaffinity(0)))  # the cores it may use

    def _get_and_decode(self, chunk_id: str, length: int, demand: bool) -> tuple[int, bytes]:
        """(stored size, verified bytes), in one trip to a worker thread: a second trip
        costs a wake-up of the event loop and of a worker per chunk."""
        started = time.monotonic()
        stored = self.repo.store.get(self.repo.keys.chunk(chunk_id))
        seconds = time.monotonic() - started
        self.metrics.s3_gets.inc()
        self.metrics.s3_bytes.inc(len(stored))
        self.metrics.s3_seconds.observe(seconds)
        with self.gate.held(demand):
            return len(stored), self.repo.codec.decode_chunk(chunk_id, stored, length)

    async def fetch(self, chunk_id: str, length: int, executor: Executor | None = None) -> bytes:
        """The chunk's verified bytes; a demand fetch unless ``executor`` (prefetch's) is
        given."""
        demand = executor is None
        loop = asyncio.get_running_loop()
        executor = executor or self.executor
        started = time.monotonic()
        deadline = time.monotonic() + self.stall_seconds
        bad_checksums = 0
        delay = 0.2
        while True:
            try:
                stored_bytes, data = await loop.run_in_executor(
                    executor, self._get_and_decode, chunk_id, length, demand)
                if self.on_fetched is not None:
                    self.on_fetched(stored_bytes, time.monotonic() - started)
                return data
            except ObjectMissing:
                log.error("chunk %s is missing from the bucket", chunk_id)
                raise
            except IntegrityError as exc:
                bad_checksums += 1
                self.metrics.checksum_failures.inc()
                log.error("chunk %s failed verification (attempt %d): %s", chunk_id,
                          bad_checksums, exc.message)
                if bad_checksums >= CHECKSUM_ATTEMPTS:
                    raise
            except UnavailableError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("chunk %s: %s; retrying in %.1f s", chunk_id, exc.message, delay)
            self.metrics.s3_retries.inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
