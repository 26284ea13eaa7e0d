"""Holding relocation reads back: per-session rate limits, and guests' reads first.

When many restores run at once, the relocations (each librbd copying its image
``rbd_concurrent_management_ops`` objects at a time, each copy written to the
OSDs) and the guests' reads compete for the same cores and the same S3 link.
The fetcher can only hold back what it serves, so :class:`DemandFirst` holds a
relocation read while any guest read is being served or one ended less than
``quiet`` seconds ago (a second: most of a booting guest's reads are served by
librbd without reaching the fetcher, so its reads here come in bursts). Held
reads pass one at a time, each after at most ``max_wait`` seconds: while
guests read the relocations still move (a read per 0.25 s), and at full speed
again once they stop.

Only connections that have carried nothing but relocation reads are held (the
job runner's librbd, relocating while no VM holds the image). When a VM holds
the lock, the relocation runs in its librbd on the guest's own connection,
pipelined with the guest's reads: holding it would hold the guest too. A
connection counts as relocation-only after ``RELOCATION_ONLY_AFTER`` reads in
a row were the relocation's, so that a guest whose first reads happen to be
sequential is not taken for one.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

RELOCATION_ONLY_AFTER = 8
GUEST = -1  # a connection that has carried a guest read: never held


class RatePacer:
    """Relocation-sized reads of a session paced to its rate limit (bytes/s).

    Guest reads are usually smaller and pass; note that when a VM holds the
    image lock the relocation shares its connection, so pacing also delays the
    guest reads queued behind it."""

    def __init__(self, sessions_tracked: int) -> None:
        self.sessions_tracked = sessions_tracked
        self.paced_until: OrderedDict[str, float] = OrderedDict()

    async def pace(self, session_id: str, rate: int, nbytes: int) -> None:
        now = time.monotonic()
        start = max(now, self.paced_until.pop(session_id, now))
        self.paced_until[session_id] = start + nbytes / rate
        if len(self.paced_until) > self.sessions_tracked:
            self.paced_until.popitem(last=False)
        if start > now:
            await asyncio.sleep(start - now)


class DemandFirst:
    def __init__(self, on_held: Callable[[float], None] = lambda _seconds: None,
                 quiet: float = 1.0, max_wait: float = 0.25) -> None:
        """``on_held(seconds)`` after each relocation read held back."""
        self.on_held = on_held
        self.quiet = quiet
        self.max_wait = max_wait
        self.guest_reads = 0  # being served now
        self.last_guest_read = float("-inf")  # when the last one ended (monotonic)
        self.runs: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.gate = asyncio.Lock()

    @contextmanager
    def guest_read(self, connection: Any) -> Iterator[None]:
        """Around serving a guest read on ``connection`` (a transport)."""
        if connection is not None:
            self.runs[connection] = GUEST
        self.guest_reads += 1
        try:
            yield
        finally:
            self.guest_reads -= 1
            self.last_guest_read = time.monotonic()

    def _busy(self) -> float:
        """Seconds to wait before guests are quiet (0: quiet now)."""
        if self.guest_reads:
            return self.quiet
        return max(0.0, self.last_guest_read + self.quiet - time.monotonic())

    async def relocation_read(self, connection: Any) -> None:
        """Before serving a relocation read on ``connection``: wait for the guests."""
        if connection is None:
            return
        run = self.runs.get(connection, 0)
        if run == GUEST:
            return
        self.runs[connection] = run + 1
        if run + 1 < RELOCATION_ONLY_AFTER or not self._busy():
            return
        started = time.monotonic()
        async with self.gate:
            deadline = time.monotonic() + self.max_wait
            while (wait := self._busy()) and (left := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(wait, left))
        self.on_held(time.monotonic() - started)
