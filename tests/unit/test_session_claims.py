"""Which tokens the fetcher serves (rbd_restore/fetcher/sessions.py): verified once,
aged on every use; an aged one only while a restore holds its session."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from rbd_restore.errors import UnavailableError
from rbd_restore.fetcher import sessions, tokens
from rbd_restore.fetcher.sessions import SessionBook

SECRET = b"s" * 32
DAY = 86400.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1_800_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


def book() -> SessionBook:
    repo: Any = None  # claims never touch the bucket
    return SessionBook(repo, SECRET, "http://fetcher", DAY)


def claim(created: float) -> tokens.SessionClaim:
    return tokens.SessionClaim("0123456789abcdef", "20261206T120000Z-0123abcd", int(created))


def test_a_token_keeps_its_claim_and_ages_on_every_use(clock: list[float]) -> None:
    sessions_book = book()
    token = tokens.sign(SECRET, claim(clock[0]))
    first = sessions_book.claim_of(token)
    assert first is not None and sessions_book.claim_of(token) is first
    assert not sessions_book.aged(first)
    clock[0] += DAY + 1
    assert sessions_book.claim_of(token) is first  # remembered, and now aged
    assert sessions_book.aged(first)
    fresh = SessionBook(None, SECRET, "http://fetcher", DAY)  # type: ignore[arg-type]
    aged = fresh.claim_of(token)  # verified for the first time when already aged
    assert aged == first and fresh.aged(aged)


def test_what_the_bucket_said_about_an_aged_session_is_asked_again_in_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: ticks[0])
    sessions_book = book()
    assert sessions_book.known_hold("0123456789abcdef") is None  # never asked: ask
    sessions_book.holds["0123456789abcdef"] = (True, ticks[0])
    sessions_book.holds["fedcba9876543210"] = (False, ticks[0])
    assert sessions_book.known_hold("0123456789abcdef") is True
    assert sessions_book.known_hold("fedcba9876543210") is False
    ticks[0] += sessions.NOT_HELD_SECONDS + 1  # "not held" is asked again sooner
    assert sessions_book.known_hold("0123456789abcdef") is True
    assert sessions_book.known_hold("fedcba9876543210") is None
    ticks[0] += sessions.HELD_SECONDS
    assert sessions_book.known_hold("0123456789abcdef") is None


def test_forged_and_foreign_tokens_are_refused_every_time(clock: list[float]) -> None:
    sessions_book = book()
    foreign = tokens.sign(b"another-secret" * 3, claim(clock[0]))
    forged = tokens.sign(SECRET, claim(clock[0]))[:-2] + "AA"
    for token in (foreign, forged, foreign, forged, "not-a-token"):
        assert sessions_book.claim_of(token) is None
    assert not sessions_book.verified


def test_the_remembered_claims_are_bounded(clock: list[float],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "VERIFIED_TOKENS", 3)
    sessions_book = book()
    signed = [tokens.sign(SECRET, claim(clock[0] - i)) for i in range(5)]
    for token in signed:
        assert sessions_book.claim_of(token) is not None
    assert list(sessions_book.verified) == signed[2:]


def test_an_aged_session_held_before_stays_served_while_s3_cannot_say(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing it is seen through the closed list; an S3 outage at the moment the answer
    is due again must not fail the reads of a staged image the cache could serve."""
    answers: list[Any] = [SimpleNamespace(job_id="r20261206T120000Z-0a1b2c"),
                          UnavailableError("S3 unreachable"), None]

    def open_record(repo: Any, session_id: str) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(sessions, "open_record", open_record)
    sessions_book = book()
    assert sessions_book.held("0123456789abcdef")
    assert sessions_book.held("0123456789abcdef")  # S3 down: still held
    assert not sessions_book.held("0123456789abcdef")  # S3 back: the record is gone
    answers.append(UnavailableError("S3 unreachable"))
    with pytest.raises(UnavailableError):
        sessions_book.held("fedcba9876543210")  # never known: the read fails, 503
