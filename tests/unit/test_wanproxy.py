"""The benchmarks' WAN proxy: capped per connection, or one link all connections share."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bench.wanproxy import WanProxy

BANDWIDTH = 20e6  # bytes/s
PAYLOAD = 2_000_000  # 0.1 s at BANDWIDTH
CLIENTS = 3


@pytest.fixture
def sink() -> Iterator[int]:
    """A server that reads PAYLOAD bytes from each connection and answers one byte."""
    server = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            received = 0
            while received < PAYLOAD and (data := conn.recv(1 << 16)):
                received += len(data)
            conn.sendall(b"k")

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    stopping.set()
    server.close()


def _parallel_upload_seconds(port: int, cap: str) -> float:
    proxy = WanProxy("127.0.0.1", port, rtt_ms=0.0, bandwidth_bytes_per_s=BANDWIDTH, cap=cap)
    proxy_port = proxy.start()
    try:
        answers: list[bytes] = []

        def upload() -> None:
            # No half-close: the proxy, like HTTP, ends a connection when either side does.
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=30) as conn:
                conn.sendall(bytes(PAYLOAD))
                answers.append(conn.recv(1))

        threads = [threading.Thread(target=upload) for _ in range(CLIENTS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        seconds = time.monotonic() - started
        assert answers == [b"k"] * CLIENTS
        return seconds
    finally:
        proxy.stop()


def test_a_shared_link_carries_parallel_transfers_at_its_bandwidth_in_total(sink: int) -> None:
    # Each transfer alone needs 0.1 s; sharing one link, the three need 0.3 s together.
    assert _parallel_upload_seconds(sink, "link") >= 0.95 * CLIENTS * PAYLOAD / BANDWIDTH


def test_per_connection_caps_each_transfer(sink: int) -> None:
    assert _parallel_upload_seconds(sink, "per_connection") >= 0.95 * PAYLOAD / BANDWIDTH


def test_unknown_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="cap must be one of"):
        WanProxy("127.0.0.1", 1, cap="fast")
