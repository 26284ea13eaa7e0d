"""Bounded fan-out of blocking work (librbd I/O, S3 requests) over threads."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")


def run_bounded(work: Callable[[T], None], items: Iterable[T], workers: int,
                name: str = "worker") -> None:
    """Run ``work`` on every item with ``workers`` threads.

    At most ``2 * workers`` items are in flight, so memory stays bounded however
    many items there are. The first failure stops further submissions; it is
    raised once the items already running have finished.
    """
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending: set[Future[None]] = set()
        try:
            for item in items:
                while len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                pending.add(pool.submit(work, item))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
