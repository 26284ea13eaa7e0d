"""The prefetch scheduler with the real chunk cache and a slow fake S3 (unit level only)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from rbd_restore.cache.chunk_cache import ChunkCache
from rbd_restore.cache.metrics import FetcherMetrics
from rbd_restore.prefetch.coordinator import Prefetcher
from rbd_restore.prefetch.profiles import ProfileStore
from rbd_restore.prefetch.scheduler import PrefetchClass, PrefetchScheduler
from rbd_restore.prefetch.session import PrefetchSettings

FETCH_SECONDS = 0.25
SLOTS = 3


def chunk(n: int) -> tuple[str, bytes]:
    data = n.to_bytes(4, "big") * 1024
    return hashlib.sha256(data).hexdigest(), data


class SlowS3:
    """Every GET takes FETCH_SECONDS; records order and concurrency."""

    def __init__(self) -> None:
        self.by_id = dict(chunk(n) for n in range(200))
        self.fetched: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.in_flight_at_start: dict[str, int] = {}  # GETs running as each began, itself too

    async def fetch(self, chunk_id: str, length: int, executor: Executor) -> bytes:
        self.fetched.append(chunk_id)
        self.in_flight += 1
        self.in_flight_at_start[chunk_id] = self.in_flight
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(FETCH_SECONDS)
            return self.by_id[chunk_id]
        finally:
            self.in_flight -= 1


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.s3 = SlowS3()
        self.demand_pool = ThreadPoolExecutor(4)
        self.prefetch_pool = ThreadPoolExecutor(SLOTS)
        self.metrics = FetcherMetrics()
        self.cache = ChunkCache(tmp_path, 1 << 30, self.s3.fetch, self.demand_pool, self.metrics)
        self.scheduler = PrefetchScheduler(self.stage, SLOTS, self.cache.__contains__)
        self.staged: list[tuple[str, PrefetchClass]] = []

    async def stage(self, chunk_id: str, length: int, klass: PrefetchClass) -> None:
        self.staged.append((chunk_id, klass))
        await self.cache.stage(chunk_id, length, klass.label, self.prefetch_pool)

    def close(self) -> None:
        self.demand_pool.shutdown()
        self.prefetch_pool.shutdown()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.close()


def ids(numbers: range) -> list[tuple[str, int]]:
    return [(chunk(n)[0], 4096) for n in numbers]


async def until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_demand_read_never_waits_behind_prefetch(rig: Rig) -> None:
    wanted, data = chunk(150)

    async def scenario() -> int:
        rig.scheduler.start()
        rig.scheduler.submit(PrefetchClass.RELOCATION, ids(range(0, 60)))
        rig.scheduler.submit(PrefetchClass.PROFILE, ids(range(60, 120)))
        await until(lambda: rig.s3.in_flight == SLOTS)
        begun_before = len(rig.s3.fetched)
        got = await rig.cache.read(wanted, len(data), 0, len(data))
        assert got == data
        await rig.scheduler.stop()
        return begun_before

    begun_before = asyncio.run(scenario())
    # One GET of its own, at once: the next to begin, beside the prefetches' GETs still
    # running, not a place behind 120 queued prefetches (measured by order, not time).
    assert rig.s3.fetched.index(wanted) == begun_before
    assert rig.s3.in_flight_at_start[wanted] == SLOTS + 1
    assert rig.s3.most_in_flight <= SLOTS + 1


def test_prefetch_never_takes_more_than_its_slots(rig: Rig) -> None:
    async def scenario() -> None:
        rig.scheduler.start()
        rig.scheduler.submit(PrefetchClass.PROFILE, ids(range(0, 20)))
        await until(lambda: all(c in rig.cache for c, _ in ids(range(0, 20))))
        await rig.scheduler.stop()

    asyncio.run(scenario())
    assert rig.s3.most_in_flight == SLOTS
    assert sorted(rig.s3.fetched) == sorted(c for c, _ in ids(range(0, 20)))


def test_chunk_being_prefetched_is_awaited_not_fetched_twice(rig: Rig) -> None:
    async def scenario() -> None:
        rig.scheduler.start()
        wanted, data = chunk(7)
        rig.scheduler.submit(PrefetchClass.PROFILE, [(wanted, len(data))])
        await until(lambda: rig.s3.in_flight == 1)
        assert rig.cache.state(wanted) == "wait"
        assert await rig.cache.read(wanted, len(data), 10, 100) == data[10:110]
        await rig.scheduler.stop()

    asyncio.run(scenario())
    assert rig.s3.fetched == [chunk(7)[0]]
    assert rig.metrics.prefetch_used_bytes.labels("profile")._value.get() == 4096


def test_queued_chunk_a_demand_read_took_is_not_fetched_again(rig: Rig) -> None:
    async def scenario() -> None:
        rig.scheduler.start()
        rig.scheduler.submit(PrefetchClass.RELOCATION, ids(range(0, 12)))
        await until(lambda: rig.s3.in_flight == SLOTS)
        last, data = chunk(11)  # still queued: demand fetches it at once
        assert await rig.cache.read(last, len(data), 0, 16) == data[:16]
        await until(lambda: rig.scheduler.pending(PrefetchClass.RELOCATION) == 0
                    and not rig.scheduler.running)
        await rig.scheduler.stop()

    asyncio.run(scenario())
    assert rig.s3.fetched.count(chunk(11)[0]) == 1
    assert len(rig.s3.fetched) == 12


def test_profile_work_goes_before_relocation_work(rig: Rig) -> None:
    async def scenario() -> None:
        rig.scheduler.submit(PrefetchClass.RELOCATION, ids(range(0, 6)))
        rig.scheduler.submit(PrefetchClass.PROFILE, ids(range(10, 16)))
        # Asked again at the higher priority: moves up, is not staged twice.
        rig.scheduler.submit(PrefetchClass.PROFILE, ids(range(5, 6)))
        rig.scheduler.start()
        await until(lambda: len(rig.staged) == 12 and not rig.scheduler.running)
        await rig.scheduler.stop()

    asyncio.run(scenario())
    classes = [k for _, k in rig.staged]
    assert classes == [PrefetchClass.PROFILE] * 7 + [PrefetchClass.RELOCATION] * 5
    assert rig.staged[6][0] == chunk(5)[0]


def test_unread_prefetch_evicted_counts_as_wasted(tmp_path: Path) -> None:
    s3 = SlowS3()
    metrics = FetcherMetrics()
    with ThreadPoolExecutor(2) as pool:
        cache = ChunkCache(tmp_path, 3 * 4096, s3.fetch, pool, metrics)

        async def scenario() -> None:
            for cid, length in ids(range(0, 3)):
                await cache.stage(cid, length, "relocation", pool)
            cache.demote(chunk(2)[0])  # copied by the relocation: first to go
            await cache.read(*ids(range(5, 6))[0], 0, 1)

        asyncio.run(scenario())
    assert chunk(2)[0] not in cache and chunk(0)[0] in cache
    assert metrics.prefetch_wasted_bytes.labels("relocation")._value.get() == 4096


def test_relocation_chunks_staged_in_memory_leave_it_when_room_is_needed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = SlowS3()
    metrics = FetcherMetrics()
    with ThreadPoolExecutor(2) as pool:
        cache = ChunkCache(tmp_path, 1 << 30, s3.fetch, pool, metrics, memory_bytes=2 * 4096,
                           spill=pool)
        first, second, third, fourth, fifth = ids(range(0, 5))

        async def scenario() -> None:
            await cache.stage(*first, "relocation", pool, in_memory=True)
            await cache.stage(*second, "relocation", pool, in_memory=True)
            assert cache.hot_total == 2 * 4096 and not list(tmp_path.iterdir())
            assert await cache.read(first[0], 4096, 8, 4) == chunk(0)[1][8:12]
            cache.demote(first[0])  # read to the end by the relocation
            assert first[0] in cache.hot  # no disk write while memory has room
            await cache.stage(*third, "relocation", pool, in_memory=True)
            # Room was needed: the read chunk went to the disk cache, behind the reader.
            await asyncio.gather(*cache.background)
            assert first[0] not in cache.hot and (tmp_path / first[0]).exists()
            assert third[0] in cache.hot
            # Full of unread, fresh chunks: a fourth goes to disk...
            await cache.stage(*fourth, "relocation", pool, in_memory=True)
            assert (tmp_path / fourth[0]).exists() and fourth[0] not in cache.hot
            # ...and one staged too long ago and never read makes room for a fifth.
            monkeypatch.setattr("rbd_restore.cache.chunk_cache.HOT_SECONDS", 0.0)
            await cache.stage(*fifth, "relocation", pool, in_memory=True)
            assert fifth[0] in cache.hot and second[0] not in cache

        asyncio.run(scenario())
    assert metrics.prefetch_wasted_bytes.labels("relocation")._value.get() == 4096
    assert metrics.prefetch_used_bytes.labels("relocation")._value.get() == 4096
    assert s3.fetched.count(first[0]) == 1


def test_part_of_a_chunk_in_memory_is_served_from_it_without_a_copy(tmp_path: Path) -> None:
    s3 = SlowS3()
    with ThreadPoolExecutor(2) as pool:
        cache = ChunkCache(tmp_path, 1 << 30, s3.fetch, pool, FetcherMetrics(),
                           memory_bytes=4 * 4096)
        (wanted, length), data = ids(range(7, 8))[0], chunk(7)[1]

        async def scenario() -> None:
            await cache.stage(wanted, length, "relocation", pool, in_memory=True)
            half = await cache.read(wanted, length, 2048, 2048)
            assert isinstance(half, memoryview) and half.obj is cache.hot[wanted]
            assert half == data[2048:]
            assert await cache.read(wanted, length, 0, length) is cache.hot[wanted]
            past_end = await cache.read(wanted, length, 4000, 200)
            assert past_end == data[4000:] + bytes(104)

        asyncio.run(scenario())


def test_a_submit_wakes_one_idle_worker_per_chunk_it_queued(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The relocation submits about one chunk per read: waking every idle worker to find
    it cost the event loop a dozen task switches each time."""
    staged: list[str] = []
    looks = 0

    async def stage(chunk_id: str, length: int, klass: PrefetchClass) -> None:
        staged.append(chunk_id)
        await asyncio.sleep(0)

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def scenario() -> int:
        nonlocal looks
        scheduler = PrefetchScheduler(stage, 12, lambda _: False)
        original = scheduler._next

        def counted() -> tuple[str, int, PrefetchClass] | None:
            nonlocal looks
            looks += 1
            return original()

        monkeypatch.setattr(scheduler, "_next", counted)
        scheduler.start()
        await settle()
        looks = 0
        scheduler.submit(PrefetchClass.RELOCATION, [("one", 1)])
        await until(lambda: staged == ["one"])
        await settle()
        for_one = looks
        # More chunks than idle workers, and some while all are busy: all are staged.
        scheduler.submit(PrefetchClass.RELOCATION, [(f"a{n}", 1) for n in range(30)])
        scheduler.submit(PrefetchClass.PROFILE, [(f"b{n}", 1) for n in range(5)])
        await until(lambda: len(staged) == 36)
        await scheduler.stop()
        return for_one

    assert asyncio.run(scenario()) <= 2  # the one woken worker: the chunk, then nothing
    assert sorted(staged[1:]) == sorted([f"a{n}" for n in range(30)] +
                                        [f"b{n}" for n in range(5)])


def test_the_queued_gauge_reads_the_queue_when_scraped(rig: Rig) -> None:
    """It was set only when a chunk finished staging: a queue filled since showed the
    count of some earlier moment, and an idle fetcher the last one for good."""
    prefetcher = Prefetcher(rig.cache, ProfileStore(cast(Any, None)), rig.metrics,
                            PrefetchSettings(slots=SLOTS), cast(Any, None), rig.prefetch_pool)
    prefetcher.scheduler.submit(PrefetchClass.RELOCATION, ids(range(0, 30)))
    prefetcher.scheduler.submit(PrefetchClass.PROFILE, ids(range(30, 35)))

    def queued(klass: str) -> float | None:
        return rig.metrics.registry.get_sample_value("rbd_restore_fetcher_prefetch_queued",
                                                     {"class": klass})

    assert (queued("relocation"), queued("profile")) == (30, 5)
    prefetcher.scheduler.withdraw(PrefetchClass.RELOCATION, [c for c, _ in ids(range(0, 10))])
    assert queued("relocation") == 20
