"""One session's prefetch state, and the settings prefetch runs with.

Per session: the guest's boot as it is recorded, the relocation as it is
followed, the clients holding the image open, and whether the relocation should
wait while the fetcher learns a cold boot (:meth:`SessionPrefetch.learning`).
The coordinator (coordinator.py) acts on it: primes, stages, saves profiles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rbd_restore.config import FetcherSettings
from rbd_restore.errors import UsageError, UserError
from rbd_restore.prefetch.profiles import BootRecorder, VolumeKey
from rbd_restore.prefetch.relocation import RelocationFollower, SequentialDetector, window_bounds
from rbd_restore.qcow2.view import ChunkSlice, Qcow2View
from rbd_restore.units import parse_size

LEARN_STARTED_READS = 8  # data reads after which a guest counts as booting
# A sequential stream that began away from the disk's start (a guest reading a file
# straight through) is recorded in the boot profile while it covers less than this.
SHORT_STREAM_BYTES = 32 << 20


@dataclass(frozen=True)
class PrefetchSettings:
    slots: int
    boot_window_seconds: float = 120.0
    relocation_window_min: int = 8
    relocation_window_max: int = 64
    cold_head_bytes: int = 8 << 20
    prime: bool = True
    learn_wait_seconds: float = 5.0
    learn_quiet_seconds: float = 3.0

    @classmethod
    def from_config(cls, fc: FetcherSettings) -> PrefetchSettings:
        """From the ``[fetcher]`` settings, refusing values that would starve demand reads."""
        if fc.s3_concurrency < 2:
            raise UsageError("fetcher.s3_concurrency must be at least 2: one for demand, "
                             "one for prefetch")
        slots = fc.prefetch_slots or max(1, fc.s3_concurrency * 3 // 4)
        if not 1 <= slots < fc.s3_concurrency:
            raise UsageError("fetcher.prefetch_slots must be between 1 and s3_concurrency - 1, "
                             "so some S3 capacity is always kept for demand reads")
        for name in ("boot_window_seconds", "relocation_window_min", "relocation_window_max"):
            if getattr(fc, name) < 1:
                raise UsageError(f"fetcher.{name} must be at least 1")
        for name in ("learn_wait_seconds", "learn_quiet_seconds"):
            if getattr(fc, name) < 0:
                raise UsageError(f"fetcher.{name} must be at least 0")
        return cls(slots, float(fc.boot_window_seconds), fc.relocation_window_min,
                   fc.relocation_window_max,
                   parse_size(fc.cold_prefetch, "fetcher.cold_prefetch", zero_ok=True),
                   fc.prime_sessions != 0, float(fc.learn_wait_seconds),
                   float(fc.learn_quiet_seconds))


@dataclass
class ReadPlan:
    reader: str  # "guest", "relocation" or "metadata"
    slices: list[ChunkSlice]
    whole: list[int] = field(default_factory=list)  # uniques read in full


class SessionPrefetch:
    def __init__(self, session_id: str, view: Qcow2View, opened_at: float,
                 settings: PrefetchSettings, cache_bytes: int, memory_bytes: int) -> None:
        self.session_id = session_id
        self.view = view
        try:
            self.volume: VolumeKey | None = VolumeKey.of(view.manifest)
        except UserError:
            self.volume = None
        self.recorder = BootRecorder(opened_at, settings.boot_window_seconds)
        self.follower = RelocationFollower(len(view.unique_ids), settings.prime, *window_bounds(
            settings.relocation_window_min, settings.relocation_window_max,
            view.manifest.chunk_size, cache_bytes, memory_bytes))
        self.detector = SequentialDetector()
        self.short_stream = max(2, SHORT_STREAM_BYTES // view.manifest.chunk_size)
        self.profile_ids: set[str] = set()
        self.unique_of = {chunk_id: u for u, chunk_id in enumerate(view.unique_ids)}
        self.primed_by = ""
        self.demanded: set[int] = set()
        self.covered = 0
        self.guest_reads = 0  # guest data reads this fetcher served for the session
        self.guest_read_hits = 0  # of those, every byte from the cache
        self.saved = False
        self.settings = settings
        self.tracked_since = time.monotonic()
        self.last_data_read: float | None = None  # time.monotonic() of the latest
        self.learned = False
        self.data_reads = 0
        self.clients: list[Any] = []  # transports of connections that read the header
        self.start_deferred = False  # the relocation's first window waits for the learning

    def attach(self, transport: Any) -> None:
        """A client opened the image: librbd 16.2.15 reads the qcow2 header on a new
        connection on each open (no HEAD), and keeps that connection while the image is
        open (a VM, for as long as it runs)."""
        self.clients = [t for t in self.clients if not t.is_closing()]
        if transport is not None and transport not in self.clients:
            self.clients.append(transport)

    def attached(self) -> int:
        """Clients holding the image open now."""
        return sum(1 for t in self.clients if not t.is_closing())

    def learning(self) -> bool:
        """Whether the relocation should wait: the volume has no profile yet, the boot
        window is open, and a guest is booting (it read less than ``learn_quiet_seconds``
        ago) or may be about to: it has the image open but has not started reading (QEMU
        probes the first sector, then the kernel boots: 5-10 s under TCG on a busy host),
        or nothing has opened it yet and ``learn_wait_seconds`` are not over.

        An object the relocation copies is read from RADOS from then on, out of the
        fetcher's sight: a relocation that outruns a cold boot leaves a profile of the
        few chunks the guest read first (measured with Debian: 1 of 39 chunks, the
        relocation committed at 4.5 s, the boot read until 12 s). Waiting for the boot,
        the fetcher sees all of it; a restore with a profile copies it into the image
        before it is ready and relocates at once."""
        if self.learned or self.primed_by == "profile" or self.recorder.finished or (
                self.settings.learn_wait_seconds <= 0 and self.settings.learn_quiet_seconds <= 0):
            return False  # (both 0: learning turned off, the relocation at once)
        now = time.monotonic()
        if self.data_reads < LEARN_STARTED_READS:
            # Nothing yet, or QEMU's probe of the first sector before the kernel runs
            # (under TCG, 4 s before the guest's next read).
            since = self.last_data_read or self.tracked_since
            waiting = now - since < self.settings.learn_wait_seconds or self.attached() > 0
        else:
            waiting = now - (self.last_data_read or now) < self.settings.learn_quiet_seconds
        if not waiting or time.time() - self.recorder.opened_at > self.recorder.window_seconds:
            self.learned = True  # for good: the reads that follow may be the relocation's
        return not self.learned

    def as_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "primed_by": self.primed_by,
                "profile_chunks": len(self.profile_ids), "demand_chunks": len(self.demanded),
                "guest_reads": self.guest_reads, "guest_read_hits": self.guest_read_hits,
                "profile_covered_chunks": self.covered,
                "recorded_chunks": len(self.recorder.first_touch),
                "profile_saved": self.saved, "relocation_front": self.follower.front,
                "relocation_reads": self.follower.reads,
                "unique_chunks": len(self.view.unique_ids), "learning": self.learning(),
                "clients": self.attached()}
