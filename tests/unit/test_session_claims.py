"""Which tokens the fetcher serves (rbd_restore/fetcher/sessions.py): verified once,
aged on every use."""

from __future__ import annotations

import time
from typing import Any

import pytest

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


def test_a_token_keeps_its_claim_until_it_expires(clock: list[float]) -> None:
    sessions_book = book()
    token = tokens.sign(SECRET, claim(clock[0]))
    first = sessions_book.claim_of(token)
    assert first is not None and sessions_book.claim_of(token) is first
    clock[0] += DAY + 1
    assert sessions_book.claim_of(token) is None  # remembered, yet refused once too old
    assert sessions_book.claim_of(token) is None


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
