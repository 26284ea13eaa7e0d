"""The prefetch scheduler: which chunk the fetcher stages next, and with how much of S3.

Three classes in strict priority. *Demand* reads (a client waits on them) never
enter this queue: they fetch at once on their own threads, and the scheduler
runs at most ``slots`` prefetches, a number kept below the fetcher's S3
concurrency, so the rest of S3 is always free for demand. *Profile* work (the
chunks a previous boot read) is taken before *relocation* work (the chunks
ahead of the relocation front). A chunk a demand read needs while it is still
queued is fetched by the demand read itself and dropped from the queue when
its turn comes; one already being staged is awaited by the cache's single
flight, never fetched twice.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)


class PrefetchClass(enum.IntEnum):
    """Lower value, higher priority. Demand is not queued and outranks both."""

    PROFILE = 1
    RELOCATION = 2

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {klass: klass.name.lower() for klass in PrefetchClass}
_CLASSES = tuple(PrefetchClass)  # iterating an enum class costs a generator each time

Stage = Callable[[str, int, PrefetchClass], Awaitable[None]]
"""Make chunk ``chunk_id`` (``length`` bytes) present in the cache; raises on failure."""


class PrefetchScheduler:
    def __init__(self, stage: Stage, slots: int, is_present: Callable[[str], bool]) -> None:
        if slots < 1:
            raise ValueError("the scheduler needs at least one slot")
        self.stage = stage
        self.slots = slots
        self.is_present = is_present
        self.queues: dict[PrefetchClass, OrderedDict[str, int]] = {
            klass: OrderedDict() for klass in PrefetchClass}
        self.running: dict[str, PrefetchClass] = {}
        # One waiter per idle worker: a submit wakes as many as it queued chunks, not
        # all twelve to find one chunk (the relocation submits about one per read).
        self.idle: deque[asyncio.Future[None]] = deque()
        self.workers: list[asyncio.Task[None]] = []
        self.failures = 0

    def start(self) -> None:
        if not self.workers:
            self.workers = [asyncio.ensure_future(self._work()) for _ in range(self.slots)]

    async def stop(self) -> None:
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        self.workers = []

    def submit(self, klass: PrefetchClass, chunks: Iterable[tuple[str, int]]) -> int:
        """Queue ``(chunk_id, length)`` pairs in order; returns how many were queued.

        Chunks already cached, being staged, or queued at the same or a higher
        priority are skipped; one queued at a lower priority moves up.
        """
        queued = 0
        for chunk_id, length in chunks:
            if chunk_id in self.running or self.is_present(chunk_id):
                continue
            if any(chunk_id in self.queues[c] for c in _CLASSES if c <= klass):
                continue
            for lower in _CLASSES:
                if lower > klass:
                    self.queues[lower].pop(chunk_id, None)
            self.queues[klass][chunk_id] = length
            queued += 1
        self._wake(queued)
        return queued

    def _wake(self, count: int) -> None:
        while count and self.idle:
            waiter = self.idle.popleft()
            if not waiter.done():  # a cancelled worker's waiter is skipped
                waiter.set_result(None)
                count -= 1

    def withdraw(self, klass: PrefetchClass, chunk_ids: Iterable[str]) -> None:
        """Drop queued work that is no longer wanted (not what is already running)."""
        queue = self.queues[klass]
        for chunk_id in chunk_ids:
            queue.pop(chunk_id, None)

    def pending(self, klass: PrefetchClass) -> int:
        return len(self.queues[klass])

    def _next(self) -> tuple[str, int, PrefetchClass] | None:
        for klass in _CLASSES:
            queue = self.queues[klass]
            while queue:
                chunk_id, length = queue.popitem(last=False)
                if chunk_id not in self.running and not self.is_present(chunk_id):
                    return chunk_id, length, klass
        return None

    async def _work(self) -> None:
        while True:
            item = self._next()
            if item is None:
                waiter = asyncio.get_running_loop().create_future()
                self.idle.append(waiter)
                await waiter
                continue
            chunk_id, length, klass = item
            self.running[chunk_id] = klass
            try:
                await self.stage(chunk_id, length, klass)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the demand read that needs it will meet and report it
                self.failures += 1
                log.info("prefetch failed", extra={"chunk": chunk_id, "class": klass.label,
                                                   "reason": str(exc)[:200]})
            finally:
                del self.running[chunk_id]
