"""ConnectionGuard: which connections are closed, in which order."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiohttp import web_protocol

from rbd_restore.fetcher.limits import TRUSTED_IDLE_SECONDS, ConnectionGuard


class Handler:
    """Stands for aiohttp's RequestHandler: what the guard touches of it."""

    def __init__(self) -> None:
        self.closed = False
        self._keepalive_timeout = 60.0

    def force_close(self) -> None:
        self.closed = True


def request_on(handler: Handler) -> Any:
    return SimpleNamespace(protocol=handler)


def test_untrusted_connections_close_after_their_time_trusted_ones_stay() -> None:
    guard = ConnectionGuard(untrusted_seconds=10, max_untrusted=100,
                            idle_seconds=TRUSTED_IDLE_SECONDS)
    idle, client = Handler(), Handler()
    assert guard.sweep([idle, client], now=0.0) == 0
    guard.trust(request_on(client))
    assert client._keepalive_timeout == TRUSTED_IDLE_SECONDS
    assert guard.sweep([idle, client], now=9.9) == 0
    assert guard.sweep([idle, client], now=10.0) == 1
    assert idle.closed and not client.closed


def test_beyond_the_cap_the_oldest_untrusted_go_first() -> None:
    guard = ConnectionGuard(untrusted_seconds=10, max_untrusted=2)
    old, middle = Handler(), Handler()
    guard.sweep([old, middle], now=0.0)
    new, trusted = Handler(), Handler()
    guard.trust(request_on(trusted))
    assert guard.sweep([old, middle, new, trusted], now=1.0) == 1
    assert old.closed and not middle.closed and not new.closed and not trusted.closed


def test_closed_connections_are_forgotten() -> None:
    guard = ConnectionGuard()
    gone = Handler()
    guard.trust(request_on(gone))
    guard.sweep([gone], now=0.0)
    guard.sweep([], now=1.0)
    assert not guard.trusted and not guard.first_seen


def test_aiohttp_still_has_the_per_connection_idle_time_the_guard_sets() -> None:
    assert "_keepalive_timeout" in web_protocol.RequestHandler.__slots__
