"""A TCP proxy that puts a WAN between S3 clients and RGW, for the benchmarks.

Every byte is delayed by half the round-trip time in each direction (a delay
line, so pipelined requests overlap as they would on a real link) and
throughput is capped per direction: for each connection on its own
(``per_connection``), or for all connections together (``link``: one link of
that bandwidth that parallel transfers share, in the order they queue on it).
Every compared system talks to RGW through the same proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque

CAPS = ("per_connection", "link")


class WanProxy:
    def __init__(self, upstream_host: str, upstream_port: int, rtt_ms: float = 20.0,
                 bandwidth_bytes_per_s: float = 100e6, cap: str = "per_connection") -> None:
        if cap not in CAPS:
            raise ValueError(f"cap must be one of {CAPS}, not {cap!r}")
        self.upstream = (upstream_host, upstream_port)
        self.one_way = rtt_ms / 2000.0
        self.bandwidth = bandwidth_bytes_per_s
        self.shared = cap == "link"
        # When each direction of the shared link is next free (event-loop thread only).
        self.link_free = {"up": [0.0], "down": [0.0]}
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        # When this pipe's link is next free: the shared one, or one of its own.
        free_at = self.link_free[direction] if self.shared else [0.0]
        queue: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        done = False

        async def receive() -> None:
            nonlocal done
            while data := await reader.read(256 * 1024):
                queue.append((time.monotonic() + self.one_way, data))
                arrived.set()
            done = True
            arrived.set()

        async def send() -> None:
            while True:
                while not queue:
                    if done:
                        return
                    arrived.clear()
                    await arrived.wait()
                due, data = queue.popleft()
                free_at[0] = max(due, free_at[0]) + len(data) / self.bandwidth
                delay = free_at[0] - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        receiver = asyncio.ensure_future(receive())
        try:
            await send()
        except (ConnectionError, OSError):
            pass
        finally:
            receiver.cancel()
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, up_w, "up"),
                             self._pipe(up_r, client_w, "down"),
                             return_exceptions=True)

    def start(self) -> int:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            pending = asyncio.all_tasks(loop)  # connections still open at stop()
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="wan-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        return self.port

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)


def main() -> None:
    """``python -m bench.wanproxy HOST PORT [RTT_MS] [BYTES_PER_S] [per_connection|link]``:
    prints the port."""
    import sys

    host, port = sys.argv[1], int(sys.argv[2])
    rtt = float(sys.argv[3]) if len(sys.argv) > 3 else 20.0
    bandwidth = float(sys.argv[4]) if len(sys.argv) > 4 else 100e6
    cap = sys.argv[5] if len(sys.argv) > 5 else "per_connection"
    proxy = WanProxy(host, port, rtt, bandwidth, cap)
    print(proxy.start(), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
