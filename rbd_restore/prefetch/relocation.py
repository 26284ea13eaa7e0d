"""Following the relocation: keep the chunks ahead of its front staged.

``migration_execute`` copies the image object by object in ascending order,
a few objects in flight at once, skipping objects the destination already
holds. Through the qcow2 view that is a walk over the data clusters in
ascending order (clusters are laid out in order of first use), each read
covering whole clusters. The follower works in *unique* positions (the
index of a distinct chunk's clusters in the file):

- reads are grouped in streams (a few, least recently used replaced): a read
  within ``STREAM_SLACK`` of a stream's front continues it (the other objects
  in flight arrive a little out of order), anything else starts a new one. A
  stream with two reads or more is followed; so a single copy-up far ahead
  does not drag the window away, and a resumed relocation that starts where
  the last pass stopped is picked up on its second read. The session starts
  with one stream before the first object, because that is where the
  relocation will begin;
- chunks the session already read whole are in the destination (copied, or a
  guest write's copy-up), and the relocation will not ask for them again;
- the window ahead grows with the measured S3 rate and latency: what the
  relocation consumes while one fetch is in flight, plus the parallel fetches;
  it never holds more than the memory the relocation's chunks are staged in
  (:func:`window_bounds`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

STREAM_SLACK = 64  # uniques; reads this close to a stream's front belong to it
MAX_STREAMS = 4


@dataclass
class Stream:
    front: int
    reads: int
    used: int  # read counter at the last read: for least-recently-used replacement
    start: int = -1  # the unique it began at

    @property
    def span(self) -> int:
        """Uniques from where the stream began to its front."""
        return self.front - self.start


class RateMeter:
    """Exponentially weighted bytes per second and seconds per fetch."""

    def __init__(self, half_life: float = 2.0) -> None:
        self.half_life = half_life
        self.rate = 0.0
        self.latency = 0.0
        self.last = time.monotonic()

    def add(self, nbytes: int, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.last, 1e-3)
        keep = 0.5 ** (elapsed / self.half_life)
        self.rate = self.rate * keep + (1 - keep) * nbytes / elapsed
        self.latency = seconds if self.latency == 0 else 0.8 * self.latency + 0.2 * seconds
        self.last = now


class SequentialDetector:
    """Tells the relocation's reads from the guest's.

    librbd's qcow2 reader fetches whole clusters whatever the guest asked for,
    so size says nothing. Order does: the relocation copies object after
    object, so nearly every cluster it reads has a neighbour (the cluster
    before or after it in the file) among the last few requests. A guest's
    scattered reads rarely do; a guest reading a file straight through does,
    and is followed like the relocation (the coordinator still records such a
    stream's first chunks for the boot profile).
    """

    def __init__(self, recent: int = 8) -> None:
        self.recent: deque[int] = deque(maxlen=recent)

    def sequential(self, clusters: range) -> bool:
        """Whether a read of these data clusters (file order) continues a recent one."""
        found = any(c - 1 in self.recent or c + 1 in self.recent for c in clusters)
        self.recent.extend(clusters)
        return found


def window_bounds(window_min: int, window_max: int, chunk_bytes: int, cache_bytes: int,
                  memory_bytes: int) -> tuple[int, int]:
    """The window's bounds in chunks: the settings, at most a quarter of the disk cache,
    and at most what fits in memory when the relocation is staged there. A window
    larger than memory sent the overflow to the disk cache (a write and a read back
    per chunk) and held the fetcher's RSS above its budget while relocating."""
    limit = max(1, cache_bytes // (4 * chunk_bytes))
    if memory_bytes >= chunk_bytes:
        limit = min(limit, memory_bytes // chunk_bytes)
    return min(window_min, limit), min(window_max, limit)


class RelocationFollower:
    def __init__(self, unique_count: int, expect_start: bool, window_min: int,
                 window_max: int) -> None:
        self.unique_count = unique_count
        self.window_min = max(1, window_min)
        self.window_max = max(self.window_min, window_max)
        self.streams = [Stream(-1, 2, 0)] if expect_start else []
        self.held: set[int] = set()
        self.reads = 0

    def defer_start(self) -> bool:
        """Stop expecting the relocation at the first object (it will not start yet);
        whether it was expected."""
        primed = [s for s in self.streams if s.front == -1 and s.start == -1]
        for stream in primed:
            self.streams.remove(stream)
        return bool(primed)

    def expect_start(self) -> None:
        """The relocation starts at the first object now."""
        if not any(s.front == -1 for s in self.streams):
            self.streams.append(Stream(-1, 2, self.reads))

    @property
    def front(self) -> int:
        """Where the busiest stream (the relocation, as a rule) has got to."""
        return max(self.streams, key=lambda s: s.reads).front if self.streams else -1

    def window(self, meter: RateMeter, chunk_bytes: int, slots: int) -> int:
        """Chunks to keep staged ahead of each followed stream."""
        in_flight = meter.rate * meter.latency / max(1, chunk_bytes)
        wanted = slots + 2 * math.ceil(in_flight)
        return max(self.window_min, min(self.window_max, wanted))

    def observe(self, touched: list[int]) -> Stream | None:
        """A sequential read (the relocation, a file read straight through, a copy-up)
        touched these uniques; the stream it continued or began."""
        if not touched:
            return None
        self.reads += 1
        self.held.update(touched)
        furthest = max(touched)
        for stream in self.streams:
            if stream.front - STREAM_SLACK <= furthest <= stream.front + STREAM_SLACK:
                stream.front = max(stream.front, furthest)
                stream.reads += 1
                stream.used = self.reads
                return stream
        if len(self.streams) >= MAX_STREAMS:
            self.streams.remove(min(self.streams, key=lambda s: s.used))
        stream = Stream(furthest, 1, self.reads, min(touched))
        self.streams.append(stream)
        return stream

    def ahead(self, window: int) -> list[int]:
        """The uniques the windows ahead of the followed streams cover, minus what is held."""
        wanted: list[int] = []
        for stream in sorted(self.streams, key=lambda s: -s.reads):
            if stream.reads < 2:
                continue
            end = min(self.unique_count, stream.front + 1 + window)
            wanted.extend(u for u in range(stream.front + 1, end) if u not in self.held)
        return wanted
