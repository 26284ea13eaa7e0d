"""Reply headers of the data plane, sized for librbd's HTTP client.

librbd 16.2.15 reads replies with Boost.Beast into one buffer per connection.
Beast asks the socket for ``max(512, free space)`` bytes at a time, and the
buffer only grows while a reply's header is still incomplete; a body is
consumed as it arrives. With ordinary headers (about 250 bytes) the buffer
stays at 512 bytes, and librbd receives every body 512 bytes per ``recvmsg``:
measured, 250,656 calls for a 128 MiB relocation, and librbd's one I/O thread
spent 2.8 CPU-seconds per 512 MiB, capping the relocation at about 170 MiB/s
with every chunk cached.

A padding header brings the header block of the first successful reply on a
connection (the ``HEAD`` librbd sends when it opens the image) to
:data:`HEADER_BLOCK_BYTES`: just under Beast's 8 KiB header limit and past the
point where the buffer must double, so it grows to 16 KiB and keeps that
capacity for the connection's life. Measured with it: about 12,500 calls for
the same 128 MiB, 0.9 CPU-seconds per 512 MiB, warm relocation about 300
MiB/s. docs/fetcher-api.md describes the header.
"""

from __future__ import annotations

from http import HTTPStatus

PADDING_HEADER = "X-Rbd-Restore-Padding"
SERVER = "rbd-restore-fetcher"
BEAST_HEADER_LIMIT = 8192  # boost::beast::http::basic_parser's default header_limit
# Beast doubles its buffer when fewer than 512 bytes are free and the header is not
# complete: a block longer than 8192 - 512 bytes makes an 8 KiB buffer grow to 16 KiB.
BUFFER_DOUBLES_PAST = BEAST_HEADER_LIMIT - 512
HEADER_BLOCK_BYTES = 7936  # between the two, with room on both sides
_DATE_LINE = len("Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n")  # IMF-fixdate: fixed length


def header_block_length(status: int, headers: dict[str, str]) -> int:
    """Bytes aiohttp sends for this status line, these headers and its own ``Date``."""
    status_line = len(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n")
    fields = sum(len(name) + len(value) + 4 for name, value in headers.items())
    return status_line + fields + _DATE_LINE + 2  # the empty line ending the block


def padded(status: int, headers: dict[str, str]) -> dict[str, str]:
    """``headers`` (which must hold ``Content-Length`` and ``Server``, so aiohttp adds
    only ``Date``) with a padding header that makes the block
    :data:`HEADER_BLOCK_BYTES` long; unchanged when they are already that long."""
    missing = HEADER_BLOCK_BYTES - header_block_length(status, headers)
    overhead = len(PADDING_HEADER) + 4
    if missing <= overhead:
        return headers
    return {**headers, PADDING_HEADER: "p" * (missing - overhead)}
