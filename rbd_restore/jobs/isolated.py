"""librbd calls on a staged image, each in a child process of its own.

librbd 16.2.15 crashes (SIGSEGV in its io_context_pool) on some failures of a
migration source: measured, ``migration execute`` of a staged image whose
session answers 404 to its HEAD. In the runner's own process such a crash
would end every job it runs, and the fetcher's too when it hosts the runner.
Here it costs one attempt of one job: the child dies, the parent raises
:class:`LibrbdCrashed`, the runner retries.

The child (``python -m rbd_restore.jobs.isolated OP POOL IMAGE``, Ceph settings
in ``RBD_RESTORE_ISOLATED_CEPH`` as JSON) writes ``progress DONE TOTAL`` lines
and, last, one ``result <json>`` line. SIGTERM asks it to stop a relocation at
the next object.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from rbd_restore import lazy_clone
from rbd_restore.config import CephSettings
from rbd_restore.errors import NotFoundError, UnavailableError, UserError

SETTINGS_ENV = "RBD_RESTORE_ISOLATED_CEPH"
CONCURRENCY_ENV = "RBD_RESTORE_ISOLATED_CONCURRENCY"
# librbd's messages quote the source spec; its URL opens the backup: never repeat it.
_URL = re.compile(r"https?://[^\s\"']+")
STOP_GRACE_SECONDS = 20.0
OPERATIONS = ("state", "execute", "commit")
# A relocation in this process (no VM holds the image) is background work: the
# guests' reads, QEMU and the fetcher come first on a busy host.
RELOCATION_NICENESS = 10

Progress = Callable[[int, int], None]


class LibrbdCrashed(UserError):
    """The child process running a librbd call died of a signal."""


_ERRORS: dict[str, type[UserError]] = {
    "NotFoundError": NotFoundError, "UnavailableError": UnavailableError,
    "ImageInUse": lazy_clone.ImageInUse, "LibrbdCrashed": LibrbdCrashed}


def call(settings: CephSettings, op: str, pool: str, image: str,
         progress: Progress | None = None, cancelled: Callable[[], bool] | None = None,
         concurrency: int | None = None) -> Any:
    """Run ``op`` on ``pool/image`` in a child; its result, or its error re-raised.
    ``concurrency``: for ``execute``, objects copied in parallel, set as the image's
    ``conf_rbd_concurrent_management_ops`` (so a VM holding the lock uses it too)."""
    if op not in OPERATIONS:
        raise ValueError(op)
    env = {**os.environ, SETTINGS_ENV: json.dumps(dataclasses.asdict(settings)),
           CONCURRENCY_ENV: str(concurrency or "")}
    child = subprocess.Popen([sys.executable, "-m", "rbd_restore.jobs.isolated", op, pool,
                              image], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    result: Any = None
    stop_sent = 0.0
    for line in _lines(child.stdout, lambda: cancelled is not None and cancelled()):
        if line is None:  # cancelled: ask once, then insist
            if not stop_sent:
                child.send_signal(signal.SIGTERM)
                stop_sent = time.monotonic()
            elif time.monotonic() - stop_sent > STOP_GRACE_SECONDS:
                child.kill()
            continue
        kind, _, rest = line.partition(" ")
        if kind == "progress" and progress is not None:
            done, total = (int(n) for n in rest.split())
            progress(done, total)
        elif kind == "result":
            result = json.loads(rest)
    code = child.wait()
    if code < 0:
        name = signal.Signals(-code).name
        raise LibrbdCrashed(f"librbd crashed ({name}) during {op} of {pool}/{image}")
    if not isinstance(result, dict):
        raise UserError(f"{op} of {pool}/{image} ended without a result (exit {code})")
    if "error" in result:
        raise _ERRORS.get(result.get("kind", ""), UserError)(str(result["error"]))
    return result.get("value")


def _lines(stream: IO[str], cancelled: Callable[[], bool]) -> Any:
    """The child's lines; None every half second while ``cancelled()`` holds."""
    while True:
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            line = stream.readline()
            if not line:
                return
            yield line.rstrip("\n")
        elif cancelled():
            yield None


def _child(op: str, pool: str, image: str) -> int:
    from rbd_restore.ceph import Cluster

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def report(done: int, total: int) -> None:
        print(f"progress {done} {total}", flush=True)

    try:
        settings = CephSettings(**json.loads(os.environ[SETTINGS_ENV]))
        with Cluster(settings) as cluster, cluster.ioctx(pool) as ioctx:
            value: Any = None
            if op == "state":
                found = lazy_clone.state(ioctx, image)
                value = None if found is None else dataclasses.asdict(found)
            elif op == "execute":
                os.nice(RELOCATION_NICENESS)
                if os.environ.get(CONCURRENCY_ENV):
                    lazy_clone.set_concurrency(ioctx, image, int(os.environ[CONCURRENCY_ENV]))
                lazy_clone.execute(ioctx, image, report, cancelled=stop.is_set)
            else:
                lazy_clone.commit(ioctx, image)
        print("result " + json.dumps({"value": value}), flush=True)
        return 0
    except UserError as exc:
        error = {"error": exc.message, "kind": type(exc).__name__}
    except Exception as exc:  # librbd's own errors: class, errno and message
        text = _URL.sub("<session URL>", " ".join(str(exc).split()))
        error = {"error": f"{type(exc).__name__}: {text}"[:300]}
    print("result " + json.dumps(error), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:4]))
