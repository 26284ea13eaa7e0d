"""Sockets handed over by a service manager (sd_listen_fds): which listener is which."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from rbd_restore.errors import UsageError
from rbd_restore.fetcher.activation import inherited_sockets


@pytest.fixture
def passed() -> Iterator[list[socket.socket]]:
    """Two listening sockets at fds 3 and 4, as systemd passes them."""
    made = []
    saved = [os.dup(fd) if _open(fd) else None for fd in (3, 4)]
    for fd in (3, 4):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        os.dup2(sock.fileno(), fd)
        made.append(sock)
    yield made
    for fd, old in zip((3, 4), saved, strict=True):
        if old is None:
            os.close(fd) if _open(fd) else None
        else:
            os.dup2(old, fd)
            os.close(old)
    for sock in made:
        sock.close()


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def env(count: int, names: str = "") -> dict[str, str]:
    return {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(count), "LISTEN_FDNAMES": names}


def port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def test_not_for_this_process_means_none() -> None:
    assert inherited_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) == {}
    assert inherited_sockets({}) == {}


def test_named_sockets_go_to_their_listeners(passed: list[socket.socket]) -> None:
    variables = env(2, "metrics:data")
    found = inherited_sockets(variables)
    assert port(found["metrics"]) == port(passed[0]) and port(found["data"]) == port(passed[1])
    assert "LISTEN_FDS" not in variables  # not handed on to children


def test_a_units_default_names_mean_the_order_decides(passed: list[socket.socket]) -> None:
    found = inherited_sockets(env(2, "fetcher.socket:fetcher.socket"))
    assert port(found["data"]) == port(passed[0]) and port(found["control"]) == port(passed[1])


@pytest.mark.parametrize(("variables", "message"), [
    ({"LISTEN_FDS": "x"}, "not a number"),
    ({"LISTEN_FDS": "4"}, "at most 3"),
    ({"LISTEN_FDNAMES": "data"}, "different number"),
    ({"LISTEN_FDNAMES": "data:data"}, "twice"),
])
def test_bad_handover_is_one_clear_error(passed: list[socket.socket],
                                         variables: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        inherited_sockets({**env(2), **variables})
