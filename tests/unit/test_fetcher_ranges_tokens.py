from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbd_restore.fetcher import tokens
from rbd_restore.fetcher.ranges import ByteRange, RangeNotSatisfiable, parse_range

SIZE = 1000


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-99", ByteRange(0, 100)),
    ("bytes=990-", ByteRange(990, 1000)),
    ("bytes=990-5000", ByteRange(990, 1000)),
    ("bytes=-10", ByteRange(990, 1000)),
    ("bytes=-5000", ByteRange(0, 1000)),
    ("Bytes = 5 - 5", ByteRange(5, 6)),
    (None, None),
    ("items=0-1", None),
    ("bytes=x-y", None),
    ("bytes=9-3", None),
    ("bytes=-", None),
])
def test_parse_range(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, SIZE) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=0-1,5-6",
                                    "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, SIZE)


def test_huge_numbers_are_positions_past_any_end() -> None:
    digits = "9" * 5000  # int() refuses over 4,300 digits
    with pytest.raises(RangeNotSatisfiable):
        parse_range(f"bytes={digits}-", SIZE)
    assert parse_range(f"bytes=10-{digits}", SIZE) == ByteRange(10, SIZE)
    assert parse_range(f"bytes=-{digits}", SIZE) == ByteRange(0, SIZE)
    assert parse_range(f"bytes={'0' * 5000}5-9", SIZE) == ByteRange(5, 10)


@pytest.mark.parametrize("header", ["bytes=\u0661-\u0662", "bytes=\uff11-\uff12",
                                    "bytes=1\u0660-20", "bytes=-\u0665"])
def test_only_ascii_digits_are_numbers(header: str) -> None:
    assert parse_range(header, SIZE) is None  # not a byte range: ignored, as the RFC says


def test_content_range_is_inclusive() -> None:
    assert ByteRange(0, 100).content_range(SIZE) == "bytes 0-99/1000"


@given(st.one_of(st.text(max_size=40),
                 st.from_regex(r"\Abytes=[0-9]{0,30}-[0-9]{0,30}\Z")),
       st.integers(min_value=0, max_value=10_000))
def test_parse_range_never_leaves_the_file(header: str, size: int) -> None:
    try:
        parsed = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if parsed is not None:
        assert 0 <= parsed.start < parsed.end <= size


SECRET = b"s" * 32
NOW = 1_800_000_000
DAY = 86400
CLAIM = tokens.SessionClaim(tokens.new_session_id(), "20261125T172233Z-8e1e51c5", NOW)


def verify(secret: bytes, token: str, now: float = NOW) -> tokens.SessionClaim | None:
    return tokens.verify(secret, token, now, 30 * DAY)


def test_token_round_trip_and_secret_not_inside() -> None:
    token = tokens.sign(SECRET, CLAIM)
    assert verify(SECRET, token) == CLAIM
    assert "s" * 32 not in token
    assert verify(b"other" * 8, token) is None


def test_tampered_tokens_are_refused() -> None:
    token = tokens.sign(SECRET, CLAIM)
    payload, mac = token.split(".")
    other = tokens.sign(SECRET, tokens.SessionClaim(CLAIM.session_id,
                                                    "20261125T172233Z-00000000", NOW))
    assert verify(SECRET, other.split(".")[0] + "." + mac) is None
    assert verify(SECRET, payload + "." + mac[:-1] + ("A" if mac[-1] != "A" else "B")) \
        is None


@given(st.text(max_size=200))
def test_random_tokens_are_refused(token: str) -> None:
    assert verify(SECRET, token) is None


def test_expired_tokens_are_refused() -> None:
    token = tokens.sign(SECRET, CLAIM)
    assert verify(SECRET, token, NOW + 29 * DAY) == CLAIM
    assert verify(SECRET, token, NOW + 31 * DAY) is None
