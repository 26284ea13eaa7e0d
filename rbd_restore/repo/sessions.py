"""Session records in the bucket (docs/format.md, "Sessions").

The fetcher writes ``sessions/open/<id>.json`` when it opens a session and
``sessions/closed/<id>`` when it closes one. The open records are also what
keeps a backup in use: ``backups delete``, ``gc`` and retention refuse to
remove a backup (head or history) that an open session serves, and say which
restore holds it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rbd_restore.errors import IntegrityError
from rbd_restore.repo.layout import BACKUP_ID, JOB_ID, SESSION_ID
from rbd_restore.repo.repository import Repository
from rbd_restore.repo.store import ObjectMissing

IMAGE_SPEC = re.compile(r"^[^/@\s]{1,256}(/[^/@\s]{1,256}){1,2}$")


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    backup_id: str
    created: int  # Unix seconds
    rate_limit: int = 0
    history: tuple[str, ...] = ()
    job_id: str = ""  # the instant restore that opened it, when one did
    image: str = ""  # POOL/IMAGE that restore creates

    @property
    def backups(self) -> tuple[str, ...]:
        """Every backup the session serves: the head and the history."""
        return (self.backup_id, *(h for h in self.history if h != self.backup_id))

    def holder(self) -> str:
        """Who holds the session, in words for an error message."""
        if self.job_id:
            return (f"instant restore job {self.job_id} of {self.image or 'an image'} "
                    f"(session {self.session_id})")
        return f"fetcher session {self.session_id}"

    def encode(self) -> bytes:
        body: dict[str, Any] = {"session_id": self.session_id, "backup_id": self.backup_id,
                                "created": self.created, "rate_limit": self.rate_limit,
                                "history": list(self.history)}
        if self.job_id:
            body["job_id"] = self.job_id
            body["image"] = self.image
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, data: bytes) -> SessionRecord:
        """Parse a record; ``ValueError`` for anything malformed."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("not JSON") from None
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        session_id, backup_id = raw.get("session_id"), raw.get("backup_id")
        created, rate = raw.get("created"), raw.get("rate_limit", 0)
        history = raw.get("history", [])
        job_id, image = raw.get("job_id", ""), raw.get("image", "")
        if not (isinstance(session_id, str) and SESSION_ID.match(session_id)
                and isinstance(backup_id, str) and BACKUP_ID.match(backup_id)
                and isinstance(created, int) and isinstance(rate, int)
                and isinstance(history, list)
                and all(isinstance(h, str) and BACKUP_ID.match(h) for h in history)
                and isinstance(job_id, str) and (not job_id or JOB_ID.match(job_id))
                and isinstance(image, str) and (not image or IMAGE_SPEC.match(image))):
            raise ValueError("fields missing or of the wrong form")
        return cls(session_id, backup_id, created, rate, tuple(history), job_id, image)


def session_context(session_id: str) -> str:
    """What a sealed open record is bound to (docs/format.md, "Encryption")."""
    return f"session:{session_id}"


_ANY_BACKUP_ID = re.compile(rb"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")


@dataclass(frozen=True)
class OpenSessions:
    records: list[SessionRecord]
    # Open records that do not parse, with every backup id their bytes mention: those
    # backups count as held, since nothing says they are not. None: a sealed record
    # that does not open, which may name any backup, so it holds them all.
    unreadable: dict[str, frozenset[str] | None]

    def holders(self, backup_id: str) -> list[str]:
        """Who holds ``backup_id``, in words; empty when nothing does."""
        held = [r.holder() for r in self.records if backup_id in r.backups]
        held += [f"an unreadable session record {key}"
                 for key, mentioned in self.unreadable.items()
                 if mentioned is None or backup_id in mentioned]
        return held


def open_sessions(repo: Repository, stable: bool = False) -> OpenSessions:
    """Every open session record. ``stable``: the listing is read until it agrees with
    itself, for callers that delete what no session holds."""
    prefix = repo.keys.sessions_open_prefix
    infos = repo.store.list_stable(prefix) if stable else list(repo.store.list_objects(prefix))
    records: list[SessionRecord] = []
    unreadable: dict[str, frozenset[str] | None] = {}
    for info in infos:
        try:
            data = repo.store.get(info.key)
        except ObjectMissing:
            continue  # closed meanwhile
        session_id = info.key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            data = repo.codec.open_object(session_context(session_id), data)
        except IntegrityError:
            unreadable[info.key] = None
            continue
        try:
            records.append(_decoded(session_id, data))
        except ValueError:
            unreadable[info.key] = frozenset(m.decode() for m in _ANY_BACKUP_ID.findall(data))
    return OpenSessions(records, unreadable)


def open_record(repo: Repository, session_id: str) -> SessionRecord | None:
    """The session's open record; None when the session is not open. Raises
    IntegrityError (a sealed record that does not open) or ValueError (malformed)."""
    try:
        data = repo.store.get(repo.keys.session_open(session_id))
    except ObjectMissing:
        return None
    return _decoded(session_id, repo.codec.open_object(session_context(session_id), data))


def _decoded(session_id: str, data: bytes) -> SessionRecord:
    record = SessionRecord.decode(data)
    if record.session_id != session_id:
        raise ValueError("names another session")
    return record
