"""Prefetch for the fetcher: each session's reads tied to profiles and the relocation.

For each session the fetcher serves, the coordinator
- primes the cache when the session opens: the volume's boot profile in
  first-read order, or the heuristic when it has none, then the relocation's
  first window (the relocation starts at the first object);
- sorts each read: one that continues a recent one in file order is the
  relocation (or a copy-up, or a guest reading a file straight through),
  anything else is the guest;
- records the guest's first touches and saves them as the volume's profile
  when the boot window ends or the session closes;
- keeps the relocation window staged, and demotes chunks the relocation has
  copied that no open session's profile lists (to the disk cache when another
  session's relocation still has them ahead: restores of volumes made from one
  image share most chunks, and each is fetched from S3 once).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

from rbd_restore.cache.chunk_cache import ChunkCache
from rbd_restore.cache.metrics import FetcherMetrics
from rbd_restore.errors import UserError
from rbd_restore.prefetch.profiles import ProfileStore, heuristic_chunks, partition_starts
from rbd_restore.prefetch.relocation import RateMeter
from rbd_restore.prefetch.scheduler import PrefetchClass, PrefetchScheduler
from rbd_restore.prefetch.session import PrefetchSettings, ReadPlan, SessionPrefetch
from rbd_restore.qcow2.view import ChunkSlice, Qcow2View, Segment

log = logging.getLogger(__name__)
T = TypeVar("T")
Blocking = Callable[..., Awaitable[Any]]

PARTITION_TABLE_BYTES = 34 * 512  # MBR, GPT header and 128 GPT entries
SESSIONS_TRACKED = 4096


class Prefetcher:
    def __init__(self, cache: ChunkCache, profiles: ProfileStore, metrics: FetcherMetrics,
                 settings: PrefetchSettings, blocking: Blocking, executor: Executor) -> None:
        self.cache = cache
        self.profiles = profiles
        self.metrics = metrics
        self.settings = settings
        self.blocking = blocking
        self.executor = executor
        self.scheduler = PrefetchScheduler(self._stage, settings.slots, cache.__contains__)
        for klass in PrefetchClass:  # read when scraped: exact, and nothing per chunk
            metrics.prefetch_queued.labels(klass.label).set_function(
                functools.partial(self.scheduler.pending, klass))
        self.meter = RateMeter()
        self.sessions: OrderedDict[str, SessionPrefetch] = OrderedDict()
        self.tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.scheduler.stop()

    def fetched(self, nbytes: int, seconds: float) -> None:
        self.meter.add(nbytes, seconds)

    async def _stage(self, chunk_id: str, length: int, klass: PrefetchClass) -> None:
        await self.cache.stage(chunk_id, length, klass.label, self.executor,
                               in_memory=klass is PrefetchClass.RELOCATION)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # Sessions

    def session(self, session_id: str, opened_at: float, view: Qcow2View) -> SessionPrefetch:
        """The session's state; the first call primes the cache for it."""
        state = self.sessions.get(session_id)
        if state is not None:
            self.sessions.move_to_end(session_id)
            return state
        state = SessionPrefetch(session_id, view, opened_at, self.settings,
                                self.cache.max_bytes, self.cache.memory_bytes)
        self.sessions[session_id] = state
        if len(self.sessions) > SESSIONS_TRACKED:
            self.sessions.popitem(last=False)
        if self.settings.prime:
            self._spawn(self._prime(state))
        self._spawn(self._save_after_window(state))
        return state

    def describe(self, session_id: str) -> dict[str, Any] | None:
        state = self.sessions.get(session_id)
        if state is None:
            return None
        staged = sum(1 for chunk_id in state.profile_ids if chunk_id in self.cache)
        described = {**state.as_json(), "profile_staged": staged}
        self._after_learning(state)  # job runners poll this until the learning ends
        return described

    def _after_learning(self, state: SessionPrefetch) -> None:
        if state.start_deferred and not state.learning():
            state.start_deferred = False
            state.follower.expect_start()
            self._follow(state)

    async def close(self, session_id: str) -> None:
        state = self.sessions.pop(session_id, None)
        if state is None:
            return
        self.scheduler.withdraw(PrefetchClass.PROFILE, state.profile_ids)
        await self._save(state)

    async def _prime(self, state: SessionPrefetch) -> None:
        view = state.view
        profile = None
        if state.volume is not None:
            try:
                profile = await self.blocking(self.profiles.load, state.volume)
            except UserError as exc:
                log.warning("profile not loaded", extra={"session": state.session_id,
                                                         "reason": exc.message})
        if profile and profile.entries and profile.chunk_size == view.manifest.chunk_size:
            chunks, state.primed_by = profile.chunks(), "profile"
        else:
            chunks, state.primed_by = await self._heuristic(view), "heuristic"
        uniques = [u for u in map(view.unique_of_head_chunk, chunks) if u >= 0]
        state.profile_ids = {view.unique_ids[u] for u in uniques}
        self.scheduler.submit(PrefetchClass.PROFILE,
                              [(view.unique_ids[u], view.unique_lengths[u]) for u in uniques])
        self.metrics.profile_sessions.labels(state.primed_by).inc()
        if profile is not None:
            self.metrics.profile_chunks.inc(len(uniques))
        # A relocation that waits for the boot would find its first window staged a
        # minute ago and dropped (16 restores at once: 40 MiB fetched twice).
        state.start_deferred = state.learning() and state.follower.defer_start()
        self._follow(state)

    async def _heuristic(self, view: Qcow2View) -> list[int]:
        starts: list[int] = []
        first = view.unique_of_head_chunk(0)
        if first >= 0:
            try:
                head = await self.cache.read(view.unique_ids[first], view.unique_lengths[first],
                                             0, PARTITION_TABLE_BYTES)
                starts = partition_starts(bytes(head))
            except UserError:
                pass  # the guest's own read will meet the failure and report it
        return heuristic_chunks(view.manifest, self.settings.cold_head_bytes, starts)

    async def _save_after_window(self, state: SessionPrefetch) -> None:
        await asyncio.sleep(max(0.0, state.recorder.opened_at + state.recorder.window_seconds
                                - time.time()))
        await self._save(state)

    async def _save(self, state: SessionPrefetch) -> None:
        if state.saved:
            return
        state.saved = True
        reads = state.recorder.finish()
        if not reads or state.volume is None:
            return  # a session the guest never read from (relocation only) teaches nothing
        try:
            profile = await self.blocking(self.profiles.record_boot, state.volume,
                                          state.view.manifest.chunk_size, reads)
        except UserError as exc:
            log.warning("profile not saved", extra={"session": state.session_id,
                                                    "reason": exc.message})
            return
        self.metrics.profiles_saved.inc()
        log.info("profile saved", extra={"session": state.session_id, "chunks_read": len(reads),
                                         "profile_chunks": len(profile.entries),
                                         "boots": profile.boots})

    # Reads

    def plan(self, state: SessionPrefetch, start: int, end: int,
             segments: list[Segment]) -> ReadPlan:
        """Sort a read, and learn from it: record the guest, follow the relocation."""
        view = state.view
        slices = [s for s in segments if isinstance(s, ChunkSlice)]
        if not slices:
            return ReadPlan("metadata", [])  # header, tables: built in memory, never fetched
        size = view.cluster_size
        clusters = range(max(0, start // size - view.data_start),
                         (end - 1) // size - view.data_start + 1)
        learning = state.learning()  # before this read: no relocation runs yet
        self._after_learning(state)
        state.last_data_read = time.monotonic()
        state.data_reads += 1
        if state.detector.sequential(clusters):
            if learning:  # a guest reading files straight through: its boot all the same
                self._record(state, slices)
            stream = state.follower.observe([s.unique for s in slices])
            self._follow(state)
            if (stream is not None and stream.start >= 0 and stream.span < state.short_stream
                    and not state.learned):
                # The first chunks of a file read straight through are boot reads the
                # follower can only stage once the stream has begun. The relocation
                # continues the stream primed at the disk's start (start -1), whose
                # window already covers a guest reading there: neither is recorded.
                # After a wait for the boot (learned), streams are the relocation's: the
                # guest's reads already started streams of their own, so the relocation
                # starts a new one rather than the primed one.
                self._record(state, slices)
            # Chunks read to their end are in the destination now.
            whole = [s.unique for s in slices
                     if s.offset + s.length >= view.unique_clusters[s.unique] * size]
            return ReadPlan("relocation", slices, whole)
        self._record(state, slices)
        for piece in slices:
            unique = piece.unique
            if unique not in state.demanded:
                state.demanded.add(unique)
                self.metrics.demand_chunks.inc()
                if piece.chunk_id in state.profile_ids:
                    state.covered += 1
                    self.metrics.profile_covered_chunks.inc()
        return ReadPlan("guest", slices)

    def _record(self, state: SessionPrefetch, slices: list[ChunkSlice]) -> None:
        now = time.time()
        for piece in slices:
            chunk = state.view.head_chunk_of_unique[piece.unique]
            if chunk >= 0 and not state.recorder.record(chunk, now) and not state.saved:
                self._spawn(self._save(state))

    def served(self, state: SessionPrefetch, plan: ReadPlan) -> None:
        """After a relocation read: what it copied goes first when space runs out.

        A chunk other objects of the image share (deduplicated) stays: the
        relocation will read it again for each of them.
        """
        if plan.reader != "relocation":
            return
        refs = state.view.unique_refs
        for piece in plan.slices:
            if piece.unique in plan.whole and refs[piece.unique] == 1 and not any(
                    piece.chunk_id in s.profile_ids for s in self.sessions.values()):
                self.cache.demote(piece.chunk_id, self._wanted_elsewhere(state, piece.chunk_id))

    def _wanted_elsewhere(self, state: SessionPrefetch, chunk_id: str) -> bool:
        """Whether another open session's relocation has the chunk still ahead of it
        (restores of volumes made from one image share most of their chunks)."""
        for other in self.sessions.values():
            if other is not state:
                unique = other.unique_of.get(chunk_id)
                if unique is not None and unique > other.follower.front:
                    return True
        return False

    def _follow(self, state: SessionPrefetch) -> None:
        view = state.view
        window = state.follower.window(self.meter, view.manifest.chunk_size,
                                       self.scheduler.slots)
        self.metrics.relocation_window.set(window)
        ahead = state.follower.ahead(window)
        if ahead:
            self.scheduler.submit(PrefetchClass.RELOCATION,
                                  [(view.unique_ids[u], view.unique_lengths[u]) for u in ahead])
