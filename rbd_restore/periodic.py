"""Run a small task every few seconds on a thread while a block of code runs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def every(seconds: float, task: Callable[[], None], name: str) -> Iterator[None]:
    """Call ``task`` every ``seconds`` until the block ends; the block never waits on it
    except to let a running call finish. ``task`` handles its own errors."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            task()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
