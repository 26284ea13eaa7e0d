"""Guests' reads first: relocation reads on relocation-only connections wait for them."""

from __future__ import annotations

import asyncio
import time

from rbd_restore.fetcher.pacing import RELOCATION_ONLY_AFTER, DemandFirst

# A read the pacer lets through at once takes microseconds; one it holds, at least QUIET.
# The gap between them is wide so a busy machine's scheduling cannot close it.
QUIET = 0.25
UNHELD = 0.1


class Connection:
    """Stands for a transport: the pacer only keys weak references on it."""


async def _relocation_reads(pacer: DemandFirst, connection: Connection, count: int) -> float:
    started = time.monotonic()
    for _ in range(count):
        await pacer.relocation_read(connection)
    return time.monotonic() - started


def test_a_relocation_only_connection_waits_while_a_guest_reads() -> None:
    async def scenario() -> tuple[float, float, list[float]]:
        held: list[float] = []
        pacer = DemandFirst(held.append, quiet=QUIET, max_wait=5.0)
        runner, vm = Connection(), Connection()
        # Its first reads pass: a guest's first reads may look like a relocation's too.
        early = await _relocation_reads(pacer, runner, RELOCATION_ONLY_AFTER - 1)
        guest_done = asyncio.Event()

        async def guest() -> None:
            with pacer.guest_read(vm):
                await asyncio.sleep(0.3)
            guest_done.set()

        reading = asyncio.ensure_future(guest())
        await asyncio.sleep(0.01)
        waited = await _relocation_reads(pacer, runner, 1)
        assert guest_done.is_set()  # served after the guest's read, and a quiet spell
        await reading
        return early, waited, held

    early, waited, held = asyncio.run(scenario())
    assert early < UNHELD
    # The guest's 0.3 s read began 0.01 s before the relocation's; then a quiet spell.
    assert 0.29 + QUIET <= waited < 1.5
    assert len(held) == 1 and held[0] >= 0.3


def test_a_connection_a_guest_uses_is_never_held() -> None:
    async def scenario() -> float:
        pacer = DemandFirst(quiet=QUIET, max_wait=5.0)
        vm, other = Connection(), Connection()
        with pacer.guest_read(vm):
            pass
        with pacer.guest_read(other):  # another guest reading all along
            # The relocation forwarded to the VM's librbd shares its connection:
            # holding it would hold the guest's own reads queued behind it.
            return await _relocation_reads(pacer, vm, 3 * RELOCATION_ONLY_AFTER)

    assert asyncio.run(scenario()) < UNHELD


def test_held_reads_pass_one_at_a_time_after_max_wait_while_guests_never_pause() -> None:
    async def scenario() -> list[float]:
        pacer = DemandFirst(quiet=0.05, max_wait=0.1)
        runner, vm = Connection(), Connection()
        await _relocation_reads(pacer, runner, RELOCATION_ONLY_AFTER)
        with pacer.guest_read(vm):
            started = time.monotonic()

            async def one() -> float:
                await pacer.relocation_read(runner)
                return time.monotonic() - started

            return sorted(await asyncio.gather(*(one() for _ in range(3))))

    passed = asyncio.run(scenario())
    gaps = [b - a for a, b in zip([0.0, *passed], passed, strict=False)]
    assert all(gap >= 0.095 for gap in gaps) and passed[-1] < 1.0, passed
