"""Verified chunk fetches from S3 for the fetcher, with its retry policy.

botocore already retries each request with backoff. On top of that, a chunk
that cannot be fetched is retried with a capped backoff for up to
``stall_seconds`` (librbd waits without a timeout: a stalled read is better
than a failed one), and a chunk that fails to open or verify against its id is
fetched again a few times, then refused. Bytes that failed their hash never leave this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from rbd_restore.cache.metrics import FetcherMetrics
from rbd_restore.errors import IntegrityError, UnavailableError
from rbd_restore.repo.repository import Repository
from rbd_restore.repo.store import ObjectMissing

log = logging.getLogger(__name__)

CHECKSUM_ATTEMPTS = 3


class S3ChunkSource:
    def __init__(self, repo: Repository, executor: Executor, metrics: FetcherMetrics,
                 stall_seconds: float) -> None:
        self.repo = repo
        self.executor = executor
        self.metrics = metrics
        self.stall_seconds = stall_seconds
        self.on_fetched: Callable[[int, float], None] | None = None  # (bytes, seconds)

    def _get(self, chunk_id: str) -> bytes:
        started = time.monotonic()
        stored = self.repo.store.get(self.repo.keys.chunk(chunk_id))
        seconds = time.monotonic() - started
        self.metrics.s3_gets.inc()
        self.metrics.s3_bytes.inc(len(stored))
        self.metrics.s3_seconds.observe(seconds)
        return stored

    async def fetch(self, chunk_id: str, length: int, executor: Executor | None = None) -> bytes:
        loop = asyncio.get_running_loop()
        executor = executor or self.executor
        started = time.monotonic()
        deadline = time.monotonic() + self.stall_seconds
        bad_checksums = 0
        delay = 0.2
        while True:
            try:
                stored = await loop.run_in_executor(executor, self._get, chunk_id)
                data = await loop.run_in_executor(
                    executor, self.repo.codec.decode_chunk, chunk_id, stored, length)
                if self.on_fetched is not None:
                    self.on_fetched(len(stored), time.monotonic() - started)
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
