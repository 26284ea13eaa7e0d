"""The decode gate: CPU-bound chunk decoding limited to the cores, demand first."""

from __future__ import annotations

import threading
import time

from rbd_restore.cache.source import DecodeGate


def _wait_until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_no_more_than_its_slots_decode_at_once() -> None:
    gate = DecodeGate(2)
    inside = 0
    most = 0
    lock = threading.Lock()

    def decode() -> None:
        nonlocal inside, most
        with gate.held(demand=False):
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.005)
            with lock:
                inside -= 1

    threads = [threading.Thread(target=decode) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 2


def test_a_waiting_demand_decode_goes_before_waiting_prefetch() -> None:
    gate = DecodeGate(1)
    order: list[str] = []
    release = threading.Event()

    def holder() -> None:
        with gate.held(demand=False):
            release.wait()

    def waiter(name: str, demand: bool) -> None:
        with gate.held(demand):
            order.append(name)

    first = threading.Thread(target=holder)
    first.start()
    _wait_until(lambda: gate.free == 0)
    prefetch = [threading.Thread(target=waiter, args=(f"prefetch-{i}", False)) for i in range(3)]
    for thread in prefetch:
        thread.start()
    _wait_until(lambda: gate.waiting == 3)
    demand = threading.Thread(target=waiter, args=("demand", True))
    demand.start()
    _wait_until(lambda: gate.demand_waiting == 1)
    release.set()
    for thread in (first, demand, *prefetch):
        thread.join()
    assert order[0] == "demand"
    assert sorted(order[1:]) == ["prefetch-0", "prefetch-1", "prefetch-2"]
