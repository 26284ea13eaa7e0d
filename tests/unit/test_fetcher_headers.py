"""The data plane's padded header block (rbd_restore/fetcher/headers.py)."""

from __future__ import annotations

import pytest

from rbd_restore.fetcher.headers import (
    BEAST_HEADER_LIMIT,
    BUFFER_DOUBLES_PAST,
    HEADER_BLOCK_BYTES,
    PADDING_HEADER,
    SERVER,
    header_block_length,
    padded,
)


def test_the_target_lies_where_beasts_buffer_doubles_and_below_its_header_limit() -> None:
    assert BUFFER_DOUBLES_PAST < HEADER_BLOCK_BYTES < BEAST_HEADER_LIMIT


@pytest.mark.parametrize("status", [200, 206])
@pytest.mark.parametrize("length", [1, 2 << 20, 10**19])
def test_padding_makes_the_block_exactly_the_target(status: int, length: int) -> None:
    headers = {"Accept-Ranges": "bytes", "ETag": '"20261202T000000Z-abcdef"',
               "Content-Range": f"bytes 0-{length - 1}/{length}",
               "Content-Length": str(length), "Server": SERVER}
    result = padded(status, headers)
    assert header_block_length(status, result) == HEADER_BLOCK_BYTES
    assert set(result) - set(headers) == {PADDING_HEADER}
    assert set(result[PADDING_HEADER]) == {"p"}


def test_headers_already_long_enough_are_left_alone() -> None:
    headers = {"X-Long": "x" * HEADER_BLOCK_BYTES, "Server": SERVER}
    assert padded(200, headers) == headers
