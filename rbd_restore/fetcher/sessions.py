"""Fetcher sessions: one signed URL per restore, closable for every replica at once.

Open sessions are recorded as ``sessions/open/<id>.json`` and closed ones as
``sessions/closed/<id>`` in the repository's bucket (docs/format.md), so a
restarted fetcher or another replica with the same secret knows them without
shared state of its own. Each replica refreshes its view of the closed list
every few seconds and also asks the bucket directly on a HEAD. librbd 16.2.15
sends none (it opens a qcow2 source by reading its header), so for librbd a
session closed on another replica ends within the refresh interval; asking the
bucket on every image open would add an S3 round trip to each, and a restore
opens its image five times before it is ready.

A token expires ``max_age`` after its session opened, except while that
session is still held by an instant restore: librbd keeps the URL it was staged
with in the image until the commit, and a relocation can outlive any age (a rate
limit, a huge volume, a failed job waiting for an operator). Such a token is
served while its open record, naming the restore, is in the bucket.

The methods that touch the bucket block; the server calls them in its executor.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from rbd_restore.errors import (
    IntegrityError,
    NotFoundError,
    UnavailableError,
    UsageError,
    UserError,
)
from rbd_restore.fetcher import tokens
from rbd_restore.qcow2.view import check_importable
from rbd_restore.repo.layout import JOB_ID, SESSION_ID
from rbd_restore.repo.locks import RepositoryBusy, being_deleted, read_clock
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.repository import Repository
from rbd_restore.repo.sessions import (
    IMAGE_SPEC,
    SessionRecord,
    open_record,
    open_sessions,
    session_context,
)

log = logging.getLogger(__name__)
V = TypeVar("V")


@dataclass(frozen=True)
class Session:
    session_id: str
    backup_id: str
    created: int
    url: str

    def as_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "backup_id": self.backup_id, "url": self.url,
                "created": dt.datetime.fromtimestamp(self.created, dt.UTC).isoformat()}


VERIFIED_TOKENS = 4096  # valid tokens whose claims are kept, most recently used
HELD_SECONDS = 300.0  # how long "held by a restore" is believed before asking again
NOT_HELD_SECONDS = 60.0  # and "not held": an old leaked URL costs one S3 GET a minute


class SessionBook:
    """Creates, lists and closes sessions; answers whether a token may be served."""

    def __init__(self, repo: Repository, secret: bytes, data_url: str,
                 max_age_seconds: float) -> None:
        self.repo = repo
        self.secret = secret
        self.data_url = data_url
        self.max_age = max_age_seconds
        self.closed: set[str] = set()
        # librbd sends the token with every read (500 per GiB relocated): its HMAC,
        # base64 and JSON are checked once; its age on every use.
        self.verified: OrderedDict[str, tokens.SessionClaim] = OrderedDict()
        # Sessions past max_age: whether a restore still holds them, and when that was read.
        self.holds: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    def url_for(self, claim: tokens.SessionClaim) -> str:
        return f"{self.data_url}/v1/s/{tokens.sign(self.secret, claim)}/disk.qcow2"

    def history_of(self, head: Manifest, count: int) -> tuple[str, ...]:
        """The ``count`` newest backups of the same volume before ``head``, oldest first,
        followed by ``head`` itself (so the restored image's next backup is incremental)."""
        if count <= 0:
            return ()
        if count >= tokens.MAX_HISTORY:
            raise UsageError(f"history is limited to {tokens.MAX_HISTORY - 1} backups")
        older = sorted((m for m in self.repo.scan_manifests().manifests
                        if m.created_at < head.created_at and m.chunk_size == head.chunk_size
                        and (m.source.fsid, m.source.image_id) == (head.source.fsid,
                                                                   head.source.image_id)),
                       key=lambda m: m.created_at)
        return (*(m.backup_id for m in older[-count:]), head.backup_id)

    def create(self, backup_id: str, rate_limit: int = 0, history: int = 0,
               job_id: str = "", image: str = "",
               manifest: Manifest | None = None) -> tuple[Session, dict[str, Any], Manifest]:
        """A new session, the backup's sizes and its manifest (read once here, so the
        caller can build the session's view without reading it again; or given, read
        by the caller). ``job_id`` and ``image`` name the restore that holds it, for
        whoever would delete the backup."""
        if job_id and not JOB_ID.match(job_id):
            raise UsageError(f"{job_id!r:.40} is not a job id")
        if image and not IMAGE_SPEC.match(image):
            raise UsageError(f"{image!r:.80} is not POOL/IMAGE")
        if manifest is None or manifest.backup_id != backup_id:
            manifest = self.repo.load_manifest(backup_id)
        check_importable(manifest)
        claim = tokens.SessionClaim(tokens.new_session_id(), backup_id, int(time.time()),
                                    rate_limit, self.history_of(manifest, history))
        record = SessionRecord(claim.session_id, backup_id, claim.created, rate_limit,
                               claim.history, job_id, image)
        key = self.repo.keys.session_open(claim.session_id)
        sealed = self.repo.codec.seal_object(session_context(claim.session_id), record.encode())
        clock = read_clock(self.repo.store, key, sealed)
        self._check_not_deleted(record, clock, key)
        sizes = {"image_size": manifest.image_size, "allocated_bytes": manifest.allocated_bytes,
                 "allocation_marks": manifest.allocation_marks(),
                 "snapshots": list(claim.history),
                 "layout": manifest.layout.as_json() if manifest.layout else None}
        session = Session(claim.session_id, backup_id, claim.created, self.url_for(claim))
        return session, sizes, manifest

    def _check_not_deleted(self, record: SessionRecord, clock: Any, key: str) -> None:
        """The other half of ``backups delete``'s protocol (rbd_restore.repo.deletion):
        after the open record is written, a deletion under way or finished meanwhile
        makes this session give way."""
        try:
            # Both reads only have to follow the open record's write: side by side, they
            # keep an S3 round trip off every restore's time to ready.
            with ThreadPoolExecutor(1) as beside:
                locks = beside.submit(being_deleted, self.repo.store, self.repo.keys,
                                      record.backups, clock)
                gone = [b for b in record.backups
                        if not self.repo.store.exists(self.repo.keys.manifest(b))]
                deleting = locks.result()
            if deleting:
                raise RepositoryBusy(f"backup {deleting[0]} is being deleted")
            if gone:
                raise NotFoundError(f"backup {gone[0]} was deleted meanwhile")
        except BaseException:
            with contextlib.suppress(UserError):
                self.repo.store.delete(key)
            raise

    def list(self) -> list[Session]:
        sessions = []
        for record in open_sessions(self.repo).records:
            claim = tokens.SessionClaim(record.session_id, record.backup_id, record.created,
                                        record.rate_limit, record.history)
            if time.time() - claim.created <= self.max_age or record.job_id:
                sessions.append(Session(claim.session_id, claim.backup_id, claim.created,
                                        self.url_for(claim)))
        return sorted(sessions, key=lambda s: s.created)

    def count_open(self) -> int:
        """Open session records (a listing, without reading each one)."""
        return sum(1 for _ in self.repo.store.list_objects(self.repo.keys.sessions_open_prefix))

    def close(self, session_id: str) -> None:
        if not SESSION_ID.match(session_id):
            raise UsageError(f"{session_id!r:.40} is not a session id")
        key = self.repo.keys.session_open(session_id)
        if not self.repo.store.exists(key):
            raise NotFoundError(f"session {session_id} is not open")
        # Closed marker first: from this write on, no replica serves the URL.
        self.repo.store.put(self.repo.keys.session_closed(session_id),
                            json.dumps({"closed": int(time.time())}).encode())
        self.closed.add(session_id)
        self.repo.store.delete(key)

    def claim_of(self, token: str) -> tokens.SessionClaim | None:
        """The claim of an authentic token, whatever its age: one past ``max_age``
        (``aged``) is served only while ``held`` says a restore holds its session."""
        claim = self.verified.get(token)
        if claim is not None:
            self.verified.move_to_end(token)
            return claim
        claim = tokens.verify(self.secret, token, time.time(), math.inf)
        if claim is not None:
            _remember(self.verified, token, claim)
        return claim

    def aged(self, claim: tokens.SessionClaim) -> bool:
        return time.time() - claim.created > self.max_age

    def known_hold(self, session_id: str) -> bool | None:
        """What ``held`` answered lately (no I/O: safe on the event loop); None: ask it."""
        known = self.holds.get(session_id)
        if known is None:
            return None
        held, at = known
        if time.monotonic() - at > (HELD_SECONDS if held else NOT_HELD_SECONDS):
            return None
        return held

    def held(self, session_id: str) -> bool:
        """Whether the session's open record is in the bucket and names the instant
        restore that holds it (blocking). A closed session has no open record."""
        try:
            record = open_record(self.repo, session_id)
            held = record is not None and bool(record.job_id)
        except (IntegrityError, ValueError) as exc:  # damaged: nothing says it is held
            log.warning("open session record unreadable", extra={"session": session_id,
                                                                 "reason": str(exc)[:200]})
            held = False
        except UnavailableError:
            # S3 down while the answer was due again: a session held before still is
            # (closing it is seen through the closed list); never asked, the read fails.
            if self.holds.get(session_id, (False, 0.0))[0]:
                held = True
            else:
                raise
        _remember(self.holds, session_id, (held, time.monotonic()))
        return held

    def is_closed_cached(self, session_id: str) -> bool:
        """From the closed list as last refreshed (no I/O: safe on the event loop)."""
        return session_id in self.closed

    def is_closed_in_bucket(self, session_id: str) -> bool:
        """Asks the bucket directly (blocking): used when a client opens the file."""
        if session_id in self.closed:
            return True
        if self.repo.store.exists(self.repo.keys.session_closed(session_id)):
            self.closed.add(session_id)
            return True
        return False

    def refresh_closed(self) -> None:
        """Reload the closed list (blocking); prune entries whose tokens have expired anyway."""
        prefix = self.repo.keys.sessions_closed_prefix
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.max_age)
        closed, expired = set(), []
        for info in self.repo.store.list_objects(prefix):
            if info.last_modified < cutoff:
                expired.append(info.key)
            else:
                closed.add(info.key.removeprefix(prefix))
        if expired:
            self.repo.store.delete_many(expired)
        # Keep what this replica closed itself even if a listing lags behind it.
        self.closed |= closed


def _remember(cache: OrderedDict[str, V], key: str, value: V) -> None:
    """Keep ``value`` as the most recently used; beyond VERIFIED_TOKENS entries the
    least recently used is forgotten."""
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > VERIFIED_TOKENS:
        cache.popitem(last=False)
