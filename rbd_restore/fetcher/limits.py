"""Connection limits: idle keep-alive only where librbd needs it, bounded request sizes.

librbd 16.2.15 keeps one connection per open image for the image's lifetime
and may leave it idle for hours, so a data-plane connection that has carried a
request with a valid session token keeps its 24 h idle time. Every other
connection (one that has sent nothing, half a header, or only requests that
failed) is *untrusted*: it is closed after ``untrusted_seconds``, and when more
than ``max_untrusted`` are open the oldest are closed first. A client opening
hundreds of idle connections therefore costs a booting VM nothing: its own
connection becomes trusted with its first read and is never among those cut.
Control-plane and metrics clients reconnect as any HTTP client does; their
listeners keep idle connections for ``SHORT_IDLE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

TRUSTED_IDLE_SECONDS = 24 * 3600  # librbd keeps one connection per open image
SHORT_IDLE_SECONDS = 60  # control plane and metrics, and aiohttp's header deadline there
SWEEP_SECONDS = 1.0
MAX_LINE_BYTES = 8190  # request line: the data plane's token is at most ~1.1 KiB
MAX_HEADER_BYTES = 8190  # one header field
CONTROL_BODY_BYTES = 64 << 10  # a session request is a few hundred bytes of JSON


@dataclass
class ConnectionGuard:
    """Closes a listener's untrusted connections; ``trust`` marks one as librbd's."""

    untrusted_seconds: float = 10.0
    max_untrusted: int = 256
    # aiohttp's handlers take no weak references: both are pruned at every sweep.
    first_seen: dict[Any, float] = field(default_factory=dict)
    trusted: set[Any] = field(default_factory=set)
    closed: int = 0

    idle_seconds: float = SHORT_IDLE_SECONDS  # a trusted connection's idle time

    def trust(self, request: web.Request) -> None:
        """The request was a legitimate one (a valid token): its connection stays."""
        handler = request.protocol
        if handler is not None and handler not in self.trusted:
            self.trusted.add(handler)
            # aiohttp has one idle time per listener; this one is per connection.
            handler._keepalive_timeout = self.idle_seconds

    def sweep(self, handlers: Iterable[Any], now: float) -> int:
        """Close the untrusted connections past their time or beyond the cap; how many."""
        in_order = list(handlers)  # aiohttp lists them in the order they were accepted
        current = set(in_order)
        self.trusted &= current
        for gone in self.first_seen.keys() - current:
            del self.first_seen[gone]
        untrusted: list[tuple[float, Any]] = []
        for handler in in_order:
            if handler in self.trusted:
                continue
            seen = self.first_seen.setdefault(handler, now)
            untrusted.append((seen, handler))
        untrusted.sort(key=lambda pair: pair[0])
        over = max(0, len(untrusted) - self.max_untrusted)
        doomed = [h for i, (seen, h) in enumerate(untrusted)
                  if i < over or now - seen >= self.untrusted_seconds]
        for handler in doomed:
            handler.force_close()
            self.first_seen.pop(handler, None)
        self.closed += len(doomed)
        return len(doomed)

    async def run(self, server: web.Server) -> None:
        while True:
            closed = self.sweep(server.connections, time.monotonic())
            if closed:
                log.info("closed untrusted connections", extra={"count": closed})
            await asyncio.sleep(SWEEP_SECONDS)


def close_after_reply(response: web.StreamResponse) -> web.StreamResponse:
    """A reply to a request without a valid token ends its connection."""
    response.force_close()
    return response


def raise_open_file_limit() -> int:
    """Open files up to the hard limit: every open image holds a connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft
