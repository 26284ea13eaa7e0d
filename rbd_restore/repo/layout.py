"""S3 key layout of a repository: a pure function of ids (docs/format.md, "Keys").

Every key lives under the configured prefix. Nothing else decides where an
object goes, so the layout can be reimplemented from the document alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHUNK_ID = re.compile(r"^[0-9a-f]{64}$")
BACKUP_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
SESSION_ID = re.compile(r"^[0-9a-f]{16}$")
# Instant-restore jobs are named in session records, so their ids are settled here too.
JOB_ID = re.compile(r"^r[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
KEY_OBJECT_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class KeyLayout:
    prefix: str = ""

    def _root(self) -> str:
        if not self.prefix:
            return ""
        return self.prefix if self.prefix.endswith("/") else self.prefix + "/"

    def chunk(self, chunk_id: str) -> str:
        return f"{self._root()}chunks/{chunk_id[:2]}/{chunk_id}"

    @property
    def chunks_prefix(self) -> str:
        return f"{self._root()}chunks/"

    def chunk_id_of(self, key: str) -> str | None:
        name = key.rsplit("/", 1)[-1]
        return name if CHUNK_ID.match(name) and key == self.chunk(name) else None

    def manifest(self, backup_id: str) -> str:
        return f"{self._root()}manifests/{backup_id}.json"

    @property
    def manifests_prefix(self) -> str:
        return f"{self._root()}manifests/"

    def backup_id_of(self, key: str) -> str | None:
        name = key.rsplit("/", 1)[-1].removesuffix(".json")
        return name if BACKUP_ID.match(name) and key == self.manifest(name) else None

    def session_open(self, session_id: str) -> str:
        return f"{self.sessions_open_prefix}{session_id}.json"

    @property
    def sessions_open_prefix(self) -> str:
        return f"{self._root()}sessions/open/"

    def session_closed(self, session_id: str) -> str:
        return f"{self.sessions_closed_prefix}{session_id}"

    @property
    def sessions_closed_prefix(self) -> str:
        return f"{self._root()}sessions/closed/"

    def profile(self, fsid: str, image_id: str) -> str:
        return f"{self.profiles_prefix}{fsid}/{image_id}.json"

    @property
    def profiles_prefix(self) -> str:
        return f"{self._root()}profiles/"

    @property
    def config(self) -> str:
        return f"{self._root()}config"

    def key(self, object_id: str) -> str:
        return f"{self.keys_prefix}{object_id}"

    @property
    def keys_prefix(self) -> str:
        return f"{self._root()}keys/"

    def lock(self, name: str) -> str:
        return f"{self._root()}locks/{name}"

    @property
    def locks_prefix(self) -> str:
        return f"{self._root()}locks/"
