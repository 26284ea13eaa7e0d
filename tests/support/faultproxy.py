"""An HTTP proxy between S3 clients and RGW that injects faults, for tests and `make faults`.

It understands just enough HTTP/1.1 to find request and reply boundaries
(Content-Length, chunked replies, HEAD, ``Expect: 100-continue``), so each
request/reply exchange can be given one fault, drawn at a set rate:

- ``slowdown``: answered here with ``503 SlowDown`` (RGW never sees it);
- ``error``: answered here with ``500 InternalError``;
- ``reset``: the reply's head and part of its body, then a TCP reset;
- ``stall``: the reply's head and part of its body, then silence for
  ``stall_seconds`` (longer than the client's read timeout), then a close;
- ``truncate``: the reply's head, part of its body, then a clean close;
- ``corrupt_reply``: one byte of the reply body flipped;
- ``corrupt_request``: one byte of the request body flipped on its way to RGW.

``outage()`` refuses every request until ``restore()``. ``refuse_sigv2`` answers
requests signed with Signature Version 2 (in the query string or the header)
as AWS S3 and SigV4-only stores do. ``etags_as_sse_kms`` gives every reply
the ETag that AWS S3 gives an object under SSE-KMS: not its MD5, with
``x-amz-server-side-encryption: aws:kms`` beside it (``etags_not_md5`` the
same ETags without the header: a store that lost the body). ``bucket_region``
answers every request signed for another region as AWS S3 answers for a bucket
that lives elsewhere: 400 ``AuthorizationHeaderMalformed`` with the bucket's
``<Region>`` and ``x-amz-bucket-region`` (RGW itself accepts any signing
region); ``wrong_region`` counts them. Counters say what was injected; every
request line is kept (``request_lines``), to check what a URL gave away. Runs
its own event loop on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

FAULTS = ("slowdown", "error", "reset", "stall", "truncate", "corrupt_reply",
          "corrupt_request")
_SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
             b"Content-Length: 113\r\n\r\n<?xml version=\"1.0\" encoding=\"UTF-8\"?>"
             b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>\n")
_ERROR = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
          b"Content-Length: 110\r\n\r\n<?xml version=\"1.0\" encoding=\"UTF-8\"?>"
          b"<Error><Code>InternalError</Code><Message>Injected</Message></Error>\n   ")
_SIGV2_BODY = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InvalidRequest</Code>"
               b"<Message>The authorization mechanism you have provided is not supported. "
               b"Please use AWS4-HMAC-SHA256.</Message></Error>")
_SIGV2_REFUSED = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\n"
                  b"Content-Length: " + str(len(_SIGV2_BODY)).encode() + b"\r\n\r\n" + _SIGV2_BODY)


def _wrong_region_reply(signed_for: bytes, bucket_region: str, head_request: bool) -> bytes:
    region = bucket_region.encode()
    body = b"" if head_request else (
        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AuthorizationHeaderMalformed"
        b"</Code><Message>The authorization header is malformed; the region '" + signed_for
        + b"' is wrong; expecting '" + region + b"'</Message><Region>" + region
        + b"</Region></Error>")
    return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\n"
            b"x-amz-bucket-region: " + region + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def signing_region(head: bytes) -> bytes | None:
    """The region a SigV4 request was signed for (its credential scope), if any."""
    found = re.search(rb"Credential=[^/,]+/\d{8}/([^/,]+)/s3/aws4_request",
                      _header(head, b"authorization") or b"")
    return found.group(1) if found else None


def signed_with_sigv2(head: bytes) -> bool:
    """A request authenticated by Signature Version 2: ``Authorization: AWS key:sig``,
    or a presigned URL with ``AWSAccessKeyId`` and ``Signature`` in its query."""
    target = head.split(b"\r\n", 1)[0].split(b" ")[1] if b" " in head else b""
    query = target.partition(b"?")[2].split(b"&")
    presigned = any(p.startswith(b"AWSAccessKeyId=") for p in query) and any(
        p.startswith(b"Signature=") for p in query)
    return presigned or (_header(head, b"authorization") or b"").startswith(b"AWS ")


@dataclass
class FaultPlan:
    """Which faults, how often (per exchange), and how they behave."""

    rate: float = 0.0
    faults: tuple[str, ...] = FAULTS
    stall_seconds: float = 4.0
    seed: int = 1
    # Only exchanges whose request line contains one of these (e.g. "/chunks/").
    only: tuple[str, ...] = ()
    # Exchanges that get a fault whatever ``rate`` draws, counted from 1 among those the
    # plan can fault (matching ``only``; with a body, if corrupting requests is all it
    # does): a test that asserts how many faults it saw must not depend on the draw.
    at: tuple[int, ...] = ()


@dataclass
class _Message:
    head: bytes
    body: bytes
    chunked_raw: bytes = b""  # a chunked body, relayed as it came

    @property
    def raw(self) -> bytes:
        return self.head + (self.chunked_raw or self.body)


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def _read_body(reader: asyncio.StreamReader, head: bytes, no_body: bool) -> _Message:
    if no_body:
        return _Message(head, b"")
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        raw = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            raw += chunk
            if size == 0:
                return _Message(head, b"", bytes(raw))
    length = int(_header(head, b"content-length") or b"0")
    return _Message(head, await reader.readexactly(length) if length else b"")


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, plan: FaultPlan | None = None
                 ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.plan = plan or FaultPlan()
        self.rng = random.Random(self.plan.seed)
        self.injected: Counter[str] = Counter()
        self.exchanges = 0
        self.eligible = 0  # exchanges the plan could fault (FaultPlan.at counts these)
        self.down = False
        self.down_after: int | None = None  # exchanges after which outage() begins
        self.refuse_sigv2 = False
        self.etags_as_sse_kms = False
        self.etags_not_md5 = False
        self.bucket_region: str | None = None
        self.wrong_region = 0
        self.request_lines: list[bytes] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    def outage(self) -> None:
        """Every request from now on is refused (connection reset), until restore()."""
        self.down = True

    def restore(self) -> None:
        self.down = False

    def _draw(self, request_line: bytes, has_body: bool) -> str | None:
        with self._lock:
            self.exchanges += 1
            if self.down_after is not None and self.exchanges > self.down_after:
                self.down = True
                return "outage"
            plan = self.plan
            if plan.only and not any(p.encode() in request_line for p in plan.only):
                return None
            choices = [f for f in plan.faults if f != "corrupt_request" or has_body]
            if not choices:
                return None
            self.eligible += 1
            if self.eligible not in plan.at and self.rng.random() >= plan.rate:
                return None
            fault = self.rng.choice(choices)
            self.injected[fault] += 1
            return fault

    async def _exchange(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                        up: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]
                        ) -> bool:
        """One request and its reply; False when the client connection must end."""
        try:
            head = await _read_head(client_r)
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        if self.down:
            _reset(client_w)
            return False
        expect = (_header(head, b"expect") or b"").lower() == b"100-continue"
        if expect:  # answer it here, and send RGW the whole request at once
            client_w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            head = b"\r\n".join(line for line in head.split(b"\r\n")
                                if not line.lower().startswith(b"expect:"))
        request = await _read_body(client_r, head, no_body=False)
        request_line = head.split(b"\r\n", 1)[0]
        self.request_lines.append(request_line)
        if self.refuse_sigv2 and signed_with_sigv2(head):
            client_w.write(_SIGV2_REFUSED)
            await client_w.drain()
            return True
        signed_for = signing_region(head)
        if self.bucket_region and signed_for and signed_for != self.bucket_region.encode():
            self.wrong_region += 1
            client_w.write(_wrong_region_reply(signed_for, self.bucket_region,
                                               request_line.startswith(b"HEAD ")))
            await client_w.drain()
            return True
        fault = self._draw(request_line, bool(request.body))
        if fault == "outage":
            _reset(client_w)
            return False
        if fault in ("slowdown", "error"):
            client_w.write(_SLOWDOWN if fault == "slowdown" else _ERROR)
            await client_w.drain()
            return True
        body = request.body
        if fault == "corrupt_request":
            body = _flip(body, self.rng)
        connection = up[0]
        if connection is None:
            connection = up[0] = await asyncio.open_connection(*self.upstream)
        up_r, up_w = connection
        up_w.write(request.head + (request.chunked_raw or body))
        await up_w.drain()
        reply_head = await _read_head(up_r)
        no_body = request_line.startswith(b"HEAD ") or reply_head.split(b" ")[1] in (
            b"204", b"304")
        reply = await _read_body(up_r, reply_head, no_body)
        if self.etags_as_sse_kms or self.etags_not_md5:
            reply.head = _etag_not_md5(reply.head, sse_kms=self.etags_as_sse_kms)
        if fault == "corrupt_reply" and reply.body:
            client_w.write(reply.head + _flip(reply.body, self.rng))
        elif fault in ("reset", "stall", "truncate") and len(reply.body) > 1:
            cut = self.rng.randrange(1, len(reply.body))
            client_w.write(reply.head + reply.body[:cut])
            await client_w.drain()
            if fault == "stall":
                await asyncio.sleep(self.plan.stall_seconds)
            if fault == "reset":
                _reset(client_w)
            else:
                client_w.close()
            return False
        else:
            client_w.write(reply.raw)
        await client_w.drain()
        return (_header(reply_head, b"connection") or b"").lower() != b"close"

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        up: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = [None]
        try:
            while await self._exchange(client_r, client_w, up):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                client_w.close()
            if up[0] is not None:
                with contextlib.suppress(Exception):
                    up[0][1].close()

    def start(self) -> None:
        ready = threading.Event()

        async def main() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            async with self._server:
                await self._server.serve_forever()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(main())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is not None and server is not None:
            def shutdown() -> None:  # in the loop's thread: all_tasks is not thread-safe
                server.close()
                for task in asyncio.all_tasks(loop):
                    task.cancel()

            # Once the server is closed the loop may end and close before a second
            # call_soon_threadsafe (it raised "Event loop is closed" in a test): one call.
            with contextlib.suppress(RuntimeError):  # ended already
                loop.call_soon_threadsafe(shutdown)
        if self._thread is not None:
            self._thread.join(timeout=10)

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultProxy]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def _etag_not_md5(head: bytes, sse_kms: bool) -> bytes:
    lines = head.split(b"\r\n")
    for i, line in enumerate(lines):
        name, _, value = line.partition(b":")
        if i and name.strip().lower() == b"etag":
            not_md5 = hashlib.md5(b"kms" + value.strip()).hexdigest().encode()
            lines[i] = b'ETag: "' + not_md5 + b'"'
            if sse_kms:
                lines.insert(i + 1, b"x-amz-server-side-encryption: aws:kms")
            break
    return b"\r\n".join(lines)


def _flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, as a peer that crashed or a middlebox that gave up would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def through(proxy: FaultProxy, read_timeout: int = 2, max_attempts: int = 8
            ) -> dict[str, str]:
    """Environment for the tools to reach S3 through ``proxy``, with a read timeout
    shorter than its stalls."""
    return {"RBD_RESTORE_S3_ENDPOINT": proxy.endpoint,
            "RBD_RESTORE_S3_READ_TIMEOUT": str(read_timeout),
            "RBD_RESTORE_S3_MAX_ATTEMPTS": str(max_attempts)}
