"""Checking and cleaning a repository: ``backups verify`` and ``gc``."""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rbd_restore.errors import IntegrityError, UserError
from rbd_restore.parallel import run_bounded
from rbd_restore.repo.locks import gc_lock, reading
from rbd_restore.repo.manifest import Manifest
from rbd_restore.repo.repository import Repository
from rbd_restore.repo.store import ObjectMissing

DEFAULT_GC_GRACE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class ChunkProblem:
    chunk_id: str
    index: int
    offset: int
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"chunk_id": self.chunk_id, "index": self.index, "offset": self.offset,
                "reason": self.reason}


Progress = Callable[[int, int], None]


def verify_backup(repo: Repository, backup_id: str, deep: bool, workers: int = 16,
                  progress: Progress | None = None) -> list[ChunkProblem]:
    """Every missing chunk (and with ``deep``, every chunk that fails its hash)."""
    if deep:
        with reading(repo.store, repo.keys, backup_id, "verify"):
            return _verify(repo, repo.load_manifest(backup_id), deep, workers, progress)
    return _verify(repo, repo.load_manifest(backup_id), deep, workers, progress)


class _Counter:
    """Bytes done of a total, reported from worker threads."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if self.progress is None:
            return
        with self.lock:
            self.done += nbytes
            self.progress(self.done, self.total)


def _verify(repo: Repository, manifest: Manifest, deep: bool, workers: int,
            progress: Progress | None = None) -> list[ChunkProblem]:
    first_use: dict[str, int] = {}
    for index, cid in manifest.allocated():
        first_use.setdefault(cid, index)
    problems: list[ChunkProblem] = []
    lock = threading.Lock()
    counter = _Counter(sum(manifest.chunk_length(i) for i in first_use.values()), progress)

    def check(cid: str) -> None:
        index = first_use[cid]
        counter.add(manifest.chunk_length(index))
        reason = None
        try:
            if deep:
                repo.get_chunk(cid, manifest.chunk_length(index))
            elif not repo.has_chunk(cid):
                reason = "missing"
        except ObjectMissing:
            reason = "missing"
        except IntegrityError as exc:
            reason = exc.message
        if reason:
            with lock:
                problems.append(ChunkProblem(cid, index, index * manifest.chunk_size, reason))

    run_bounded(check, list(first_use), workers, "verify")
    return sorted(problems, key=lambda p: p.index)


@dataclass(frozen=True)
class GcResult:
    manifests: int
    chunks_seen: int
    chunks_deleted: int
    bytes_freed: int
    chunks_too_young: int
    unreadable_manifests: list[str]  # backups whose manifests failed validation

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def collect_garbage(repo: Repository, grace: dt.timedelta = DEFAULT_GC_GRACE,
                    dry_run: bool = False, progress: Progress | None = None) -> GcResult:
    """Delete chunks that no manifest references and that are older than ``grace``.

    Runs under the gc lock (no backup may run meanwhile). A manifest that fails
    validation is reported and every chunk id its bytes mention is kept. Ages
    are measured by S3's clock, so a host whose clock runs fast frees nothing
    early.
    """
    with gc_lock(repo.store, repo.keys) as clock:
        scan = repo.scan_manifests(stable=True)
        referenced: set[str] = set()
        for manifest in scan.manifests:
            referenced |= manifest.unique_chunk_ids()
        for bad in scan.unreadable:
            if bad.mentioned is None:
                # A sealed manifest that does not open names no chunk anyone can read,
                # so nothing could be kept for it: delete nothing rather than its data.
                raise UserError(f"gc deletes nothing: backup {bad.backup_id} does not "
                                f"open ({bad.reason}); restore its key, or remove it with "
                                "`backups delete --force`")
            referenced |= bad.mentioned
        cutoff = clock.now() - grace
        doomed: list[str] = []
        seen = young = freed = 0
        for info in repo.store.list_objects(repo.keys.chunks_prefix):
            cid = repo.keys.chunk_id_of(info.key)
            seen += 1
            if progress is not None and seen % 1000 == 0:
                progress(seen, 0)  # chunks listed so far; the total is not known
            if cid is None or cid in referenced:
                continue
            if info.last_modified > cutoff:
                young += 1
                continue
            doomed.append(info.key)
            freed += info.size
        if not dry_run:
            repo.store.delete_many(doomed)
    return GcResult(len(scan.manifests), seen, len(doomed), freed, young,
                    [bad.backup_id for bad in scan.unreadable])


@dataclass(frozen=True)
class SampleResult:
    chunks_total: int
    chunks_checked: int
    problems: list[ChunkProblem]
    unreadable_manifests: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"chunks_total": self.chunks_total, "chunks_checked": self.chunks_checked,
                "ok": not self.problems and not self.unreadable_manifests,
                "problems": [p.as_json() for p in self.problems],
                "unreadable_manifests": self.unreadable_manifests}


def verify_sample(repo: Repository, percent: float, workers: int = 16,
                  rng: random.Random | None = None,
                  progress: Progress | None = None) -> SampleResult:
    """Download and hash ``percent`` of the distinct chunks every backup references (at
    least one): a scheduled scrub whose runs, over time, cover the whole repository."""
    scan = repo.scan_manifests()
    lengths: dict[str, tuple[int, int, int]] = {}  # chunk -> (length, index, offset)
    for manifest in scan.manifests:
        for index, cid in manifest.allocated():
            lengths.setdefault(cid, (manifest.chunk_length(index), index,
                                     index * manifest.chunk_size))
    every_chunk = sorted(lengths)
    count = min(len(every_chunk), max(1, round(len(every_chunk) * percent / 100)))
    sample = (rng or random.SystemRandom()).sample(every_chunk, count) if every_chunk else []
    problems: list[ChunkProblem] = []
    lock = threading.Lock()
    counter = _Counter(sum(lengths[cid][0] for cid in sample), progress)

    def check(cid: str) -> None:
        length, index, offset = lengths[cid]
        counter.add(length)
        try:
            repo.get_chunk(cid, length)
            return
        except ObjectMissing:
            reason = "missing"
        except IntegrityError as exc:
            reason = exc.message
        with lock:
            problems.append(ChunkProblem(cid, index, offset, reason))

    run_bounded(check, sample, workers, "scrub")
    return SampleResult(len(every_chunk), len(sample), problems,
                        [bad.backup_id for bad in scan.unreadable])
