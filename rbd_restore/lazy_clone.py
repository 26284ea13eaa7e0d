"""The staging image: librbd's import-only migration from a fetcher session URL.

``prepare`` creates the destination image with a ``qcow`` source over an
``http`` stream; it is usable at once, and every read of an object not yet
copied goes to the fetcher. ``execute`` relocates everything (resumable: copied
objects are skipped), ``commit`` drops the link to the source, ``abort``
deletes the destination and every write made to it, so it refuses while the
image has watchers (a VM may be using it).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rbd_restore.errors import AlreadyExistsError, NotFoundError, UnavailableError, UserError

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]

STATE_NAMES = {
    "RBD_IMAGE_MIGRATION_STATE_ERROR": "error",
    "RBD_IMAGE_MIGRATION_STATE_PREPARING": "preparing",
    "RBD_IMAGE_MIGRATION_STATE_PREPARED": "prepared",
    "RBD_IMAGE_MIGRATION_STATE_EXECUTING": "executing",
    "RBD_IMAGE_MIGRATION_STATE_EXECUTED": "executed",
    "RBD_IMAGE_MIGRATION_STATE_ABORTING": "aborting",
}


class ImageInUse(UserError):
    """The image has watchers: a VM or another client has it open."""


def source_spec(url: str) -> str:
    """The migration source: the backup as qcow2 over HTTP (see docs/fetcher-api.md)."""
    return json.dumps({"type": "qcow", "stream": {"type": "http", "url": url}})


# librbd's own errors when it cannot reach the URL at all (16.2.15: errno 111 for a
# refused connection, ImageNotFound for a name that does not resolve).
UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                      errno.ENETUNREACH, errno.ETIMEDOUT}


def prepare(ioctx: Any, name: str, url: str, options: dict[str, Any] | None = None) -> None:
    """``options``: the new image's layout (image_layout.create_options)."""
    import rbd

    options = dict(options or {})
    if isinstance(options.get("data_pool"), str):
        # The 16.2 binding hands this one to librbd unconverted: bytes, or a TypeError.
        options["data_pool"] = options["data_pool"].encode()
    try:
        rbd.RBD().migration_prepare_import(source_spec(url), ioctx, name, **options)
    except rbd.ImageExists:
        raise AlreadyExistsError(f"image {name} already exists; restore never overwrites") \
            from None
    except rbd.Error as exc:  # librbd's message holds the source spec: never echo it
        code = getattr(exc, "errno", None)
        if isinstance(exc, rbd.IOError | rbd.ConnectionShutdown | rbd.Timeout |
                      rbd.ImageNotFound) or code in UNREACHABLE_ERRNOS:
            # librbd opens the source (HEAD) while preparing. The session's path holds
            # its token: only the fetcher's origin is named.
            reason = os.strerror(code) if code in UNREACHABLE_ERRNOS else type(exc).__name__
            raise UnavailableError(
                f"librbd could not open the backup at the fetcher {_origin(url)} ({reason}); "
                "fetcher.public_url must reach this fetcher from every host that runs "
                "librbd") from None
        raise UserError(f"librbd refused to stage image {name} "
                        f"({type(exc).__name__}, errno {code if code is not None else '?'})") \
            from None


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


@dataclass(frozen=True)
class MigrationState:
    state: str
    description: str

    @property
    def finished_copying(self) -> bool:
        return self.state == "executed"


def state(ioctx: Any, name: str) -> MigrationState | None:
    """The migration state in the image header; None when the image is not migrating."""
    import rbd

    names = {getattr(rbd, const): text for const, text in STATE_NAMES.items()
             if hasattr(rbd, const)}
    try:
        status = rbd.RBD().migration_status(ioctx, name)
    except rbd.ImageNotFound:
        raise NotFoundError(f"image {name} does not exist") from None
    except rbd.InvalidArgument:
        return None
    except rbd.Error as exc:  # librbd opens the source: a fetcher that is down, for one
        raise UnavailableError(f"image {name}: migration status unavailable: "
                               f"{' '.join(str(exc).split())[:160]}") from None
    return MigrationState(names.get(status["state"], "unknown"),
                          str(status.get("state_description", "")))


def execute(ioctx: Any, name: str, progress: Progress | None = None,
            cancelled: Callable[[], bool] | None = None) -> None:
    """Copy every object not yet in the destination; safe to run again after a failure.

    ``cancelled`` is asked at each object: when it answers True, librbd starts no
    more copies (only where the copy runs in this process; one forwarded to the
    VM holding the image's lock runs on to its end there)."""
    import rbd

    def on_progress(done: int, total: int) -> int:
        if progress:
            progress(done, total)
        return -errno.ECANCELED if cancelled is not None and cancelled() else 0

    rbd.RBD().migration_execute(ioctx, name, on_progress=on_progress)


def image_id(ioctx: Any, name: str) -> str:
    """The image's id (stable across renames), without opening it (nor its source)."""
    import rbd

    for entry in rbd.RBD().list2(ioctx):
        if entry["name"] == name:
            return str(entry["id"])
    raise NotFoundError(f"image {name} does not exist")


def current_name(ioctx: Any, image_id: str) -> str | None:
    """The name the image with this id has now; None when it is gone."""
    import rbd

    for entry in rbd.RBD().list2(ioctx):
        if entry["id"] == image_id:
            return str(entry["name"])
    return None


def set_concurrency(ioctx: Any, name: str, objects: int) -> None:
    """Objects copied in parallel by ``execute``, in whichever client runs it."""
    import rbd

    with rbd.Image(ioctx, name) as image:
        image.metadata_set("conf_rbd_concurrent_management_ops", str(objects))


def commit(ioctx: Any, name: str) -> None:
    import rbd

    rbd.RBD().migration_commit(ioctx, name)


def watchers(ioctx: Any, name: str) -> list[str]:
    import rbd

    try:
        with rbd.Image(ioctx, name, read_only=True) as image:
            return [str(w.get("addr", w)) for w in image.watchers_list()]
    except rbd.ImageNotFound:
        raise NotFoundError(f"image {name} does not exist") from None
    except rbd.Error as exc:  # librbd opens the source with the image
        raise UnavailableError(
            f"image {name} cannot be opened: its source (the fetcher session) is "
            f"unreachable ({' '.join(str(exc).split())[:80]}); start a fetcher with the same "
            "secret and try again") from None


def abort(ioctx: Any, name: str) -> None:
    """Delete the staging image, refusing while anything has it open."""
    import rbd

    clients = watchers(ioctx, name)
    if clients:
        raise ImageInUse(
            f"image {name} is open by {len(clients)} client(s) ({clients[0]}): abort would "
            "delete the image and every write made to it; stop the VM first")
    try:
        rbd.RBD().migration_abort(ioctx, name)
    except rbd.ImageBusy:
        raise ImageInUse(f"image {name} became busy; abort refused") from None


COPY_ON_READ = "conf_rbd_clone_copy_on_read"
HYDRATE_IN_FLIGHT = 8


def hydrate(ioctx: Any, name: str, offsets: list[int], seconds: float) -> int:
    """Copy the objects holding ``offsets`` (the boot profile, in first-read order) into
    the staged image before a VM opens it; how many objects were asked for.

    With copy-on-read, a read of an object not yet relocated copies the whole object
    into the destination (measured with librbd 16.2.15 on import-only migrations);
    the guest then reads it from RADOS instead of through librbd's qcow2 reader and
    the fetcher. Copy-on-read happens only in the exclusive lock's holder, so the
    lock is taken here and released before the image is handed over; the setting is
    switched on for this client only (image metadata read at open, removed before
    return), so a VM's own reads never copy up. Stops at ``seconds``, or at a failed
    read (logged): what is left of the profile the fetcher still stages in memory."""
    import rbd

    if not offsets or seconds <= 0:
        return 0
    deadline = time.monotonic() + seconds
    with rbd.Image(ioctx, name) as image:
        image.metadata_set(COPY_ON_READ, "true")
    try:
        with rbd.Image(ioctx, name) as image:
            object_size = 1 << image.stat()["order"]
            objects = list(dict.fromkeys(o // object_size for o in offsets
                                         if 0 <= o < image.size()))
            image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            try:
                done = threading.Semaphore(0)
                failed: list[int] = []

                def finished(completion: Any, _data: bytes | None) -> None:
                    if completion.get_return_value() < 0:
                        failed.append(completion.get_return_value())
                    done.release()

                asked = answered = 0
                for number in objects:
                    if asked - answered >= HYDRATE_IN_FLIGHT:
                        done.acquire()
                        answered += 1
                    if time.monotonic() > deadline or failed:
                        break
                    image.aio_read(number * object_size, 4096, finished)
                    asked += 1
                for _ in range(asked - answered):
                    done.acquire()
                image.flush()
            finally:
                image.lock_release()
    finally:
        with rbd.Image(ioctx, name) as image:
            image.metadata_remove(COPY_ON_READ)
    if failed:  # the VM reads what is missing through the fetcher, as without a profile
        log.warning("copying the boot profile into %s stopped (errno %d)", name, -failed[0])
    return asked
