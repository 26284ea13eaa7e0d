"""Deleting a backup, never one still in use (docs/format.md, "Ordering").

A backup is in use while an open session serves it (an instant restore that is
not committed or aborted yet, as head or as history) or while a full restore or
a deep verify reads it. Deleting it then would leave the staged image, and any
VM on it, without data once ``gc`` frees its chunks. The race with a session
opening meanwhile is closed by a delete intent written before the sessions are
listed (rbd_restore.repo.locks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rbd_restore.errors import UserError
from rbd_restore.repo.locks import S3Clock, delete_intent, readers
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.repository import Repository
from rbd_restore.repo.retention import Policy, plan
from rbd_restore.repo.sessions import open_sessions


class BackupInUse(UserError):
    """The backup is read by a restore that has not finished."""


@dataclass(frozen=True)
class DeleteResult:
    manifest: Manifest
    forced_past: list[str]  # holders it was deleted in spite of (--force)


def _holders(repo: Repository, backup_id: str, clock: S3Clock) -> list[str]:
    """Who uses ``backup_id`` now, in words."""
    found = open_sessions(repo, stable=True).holders(backup_id)
    found += [f"a full restore or deep verify on {reader}"
              for reader in readers(repo.store, repo.keys, backup_id, clock)]
    return found


def delete_backup(repo: Repository, backup_id: str, force: bool = False) -> DeleteResult:
    """Remove the backup's manifest (``gc`` frees its chunks later); refused while the
    backup is in use unless ``force``."""
    manifest = repo.load_manifest(backup_id)
    with delete_intent(repo.store, repo.keys, backup_id) as clock:
        using = _holders(repo, backup_id, clock)
        if using and not force:
            more = f" and {len(using) - 1} more" if len(using) > 1 else ""
            raise BackupInUse(f"backup {backup_id} is in use by {using[0]}{more}: finish or "
                              "abort that restore first (--force deletes it anyway, and the "
                              "restore then fails once gc frees the chunks)")
        repo.remove_manifest(backup_id)
    return DeleteResult(manifest, using)


@dataclass(frozen=True)
class ForgetResult:
    kept: list[tuple[Manifest, list[str]]]  # each with the rules that keep it
    removed: list[Manifest]
    held: list[tuple[Manifest, list[str]]]  # would go, but a restore reads it
    unreadable: list[str]  # manifests that fail validation: never judged, never removed

    def as_json(self) -> dict[str, Any]:
        def row(m: Manifest) -> dict[str, Any]:
            return {"backup_id": m.backup_id, "created": m.created, "image": m.source.spec}

        return {"kept": [{**row(m), "rules": rules} for m, rules in self.kept],
                "removed": [row(m) for m in self.removed],
                "held": [{**row(m), "held_by": who} for m, who in self.held],
                "unreadable": self.unreadable}


def forget(repo: Repository, policy: Policy, image: tuple[str, str] | None = None,
           dry_run: bool = False) -> ForgetResult:
    """Remove the backups ``policy`` does not keep (gc frees their chunks later), never
    one that an unfinished restore reads; ``image``: only backups of (pool, image)."""
    scan = repo.scan_manifests(stable=True)
    chosen = [m for m in scan.manifests
              if image is None or (m.source.pool, m.source.image) == image]
    sessions = open_sessions(repo, stable=True)
    kept: list[tuple[Manifest, list[str]]] = []
    removed: list[Manifest] = []
    held: list[tuple[Manifest, list[str]]] = []
    for decision in plan(policy, chosen).values():
        kept += [(m, decision.reasons[m.backup_id]) for m in decision.keep]
        for manifest in decision.remove:
            using = sessions.holders(manifest.backup_id)
            if not using and not dry_run:
                try:
                    delete_backup(repo, manifest.backup_id)
                except BackupInUse as exc:  # a restore began meanwhile
                    using = [exc.message]
            if using:
                held.append((manifest, using))
            else:
                removed.append(manifest)
    return ForgetResult(kept, removed, held, [bad.backup_id for bad in scan.unreadable])
