"""When a cold session holds the relocation back so the fetcher sees the guest's boot."""

from __future__ import annotations

import time

from rbd_restore.prefetch.session import PrefetchSettings, SessionPrefetch
from rbd_restore.qcow2.view import Qcow2View
from tests.unit.test_qcow2_view import build


class Connection:
    """What the session keeps of a client's connection: whether it is closing."""

    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed


def session(wait: float, quiet: float) -> SessionPrefetch:
    manifest, _, _ = build(8 << 20, 1 << 20, [1, 2, 3])
    settings = PrefetchSettings(slots=4, learn_wait_seconds=wait, learn_quiet_seconds=quiet)
    state = SessionPrefetch("s", Qcow2View(manifest), time.time(), settings, 1 << 30, 1 << 26)
    state.primed_by = "heuristic"
    return state


def test_a_client_with_the_image_open_holds_learning_past_the_wait() -> None:
    state = session(wait=5, quiet=3)
    state.tracked_since -= 60  # long past learn_wait_seconds
    vm = Connection()
    state.attach(vm)
    assert state.attached() == 1 and state.learning()
    vm.closed = True
    assert state.attached() == 0 and not state.learning()
    assert not state.learning()  # latched


def test_nobody_attached_and_the_wait_over_ends_learning() -> None:
    state = session(wait=5, quiet=3)
    assert state.learning()
    state.tracked_since -= 6
    assert not state.learning()


def test_learning_is_off_when_both_settings_are_zero() -> None:
    state = session(wait=0, quiet=0)
    state.attach(Connection())
    assert not state.learning()


def test_a_volume_with_a_profile_does_not_learn() -> None:
    state = session(wait=5, quiet=3)
    state.primed_by = "profile"
    assert not state.learning()


def test_a_learning_session_stages_no_relocation_window_until_the_learning_ends() -> None:
    state = session(wait=5, quiet=3)
    assert state.follower.ahead(2) == [0, 1]  # primed: the relocation starts at once
    assert state.follower.defer_start()
    assert state.follower.ahead(2) == []  # a relocation waiting for the boot
    state.follower.expect_start()
    assert state.follower.ahead(2) == [0, 1]
    state.follower.expect_start()  # once
    assert len(state.follower.streams) == 1
