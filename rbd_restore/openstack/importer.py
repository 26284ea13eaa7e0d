"""``rbd-restore cinder import-backup``: a backup written by Cinder's S3 (chunked) driver
becomes an rbd-restore backup, which restores instantly.

The chain is rebuilt oldest first (chunked.py), every 32 KiB block checked against
the SHA-256 Cinder recorded for it, cut into chunks that are stored like any
backup's (deduplicated against everything in the repository), and described by
a manifest whose labels say where it came from. Nothing is stored as a backup
unless every block verified: a failure leaves only chunks, which gc removes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from rbd_restore.errors import IntegrityError
from rbd_restore.openstack.chunked import SHA_BLOCK, ChunkedReader, overlay, volume_bytes
from rbd_restore.repo import chunks as chunk_codec
from rbd_restore.repo.locks import backup_lock
from rbd_restore.repo.manifest import Manifest, Source, Stats
from rbd_restore.repo.repository import Repository, new_backup_id
from rbd_restore.repo.store import ObjectStore

CHUNK = chunk_codec.DEFAULT_CHUNK_SIZE
GIB = 1 << 30


def _labels_from_volume_meta(raw: str) -> dict[str, str]:
    """Bootable flag and image metadata from Cinder's volume_meta (backup/driver.py)."""
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    labels: dict[str, str] = {}
    base = meta.get("volume-base-metadata") or {}
    if isinstance(base, dict) and "bootable" in base:
        labels["openstack.bootable"] = "true" if base["bootable"] in (True, "true") else "false"
    glance = meta.get("volume-glance-metadata") or {}
    if isinstance(glance, dict) and glance:
        labels["openstack.volume_image_metadata"] = json.dumps(
            {str(k): str(v) for k, v in glance.items()}, sort_keys=True)
    return labels


def import_backup(repo: Repository, cinder_bucket: ObjectStore, cinder_backup_id: str,
                  volume_id: str, extra_labels: dict[str, str] | None = None,
                  workers: int = 8) -> Manifest:
    reader = ChunkedReader(cinder_bucket)
    chain = reader.chain(cinder_backup_id, volume_id)
    newest = chain[-1]
    size = max((o.offset + o.length for o in chain[0].objects), default=0)
    hashes = reader.sha256s(newest)
    if len(hashes) != -(-size // SHA_BLOCK):
        raise IntegrityError(f"Cinder backup {cinder_backup_id}: {len(hashes)} block hashes "
                             f"for a volume of {size} bytes")
    backup_id = new_backup_id()
    started = dt.datetime.now(dt.UTC)
    chunk_ids: list[str | None] = []
    uploaded = [0, 0]  # bytes, chunks
    lock = threading.Lock()

    def store(cid: str, data: bytes) -> None:
        if repo.has_chunk(cid):
            return
        stored = repo.codec.encode_chunk(cid, data)
        repo.put_chunk(cid, stored)
        with lock:
            uploaded[0] += len(stored)
            uploaded[1] += 1

    with backup_lock(repo.store, repo.keys, backup_id), \
            ThreadPoolExecutor(workers, thread_name_prefix="import") as pool:
        pending: deque[Future[None]] = deque()
        seen: set[str] = set()
        for index, block in enumerate(volume_bytes(reader, overlay(chain), size, CHUNK)):
            base = index * CHUNK
            for at in range(0, len(block), SHA_BLOCK):
                if hashlib.sha256(block[at:at + SHA_BLOCK]).hexdigest() != \
                        hashes[(base + at) // SHA_BLOCK]:
                    raise IntegrityError(
                        f"Cinder backup {cinder_backup_id}: the 32 KiB block at offset "
                        f"{base + at} fails the SHA-256 Cinder recorded")
            if chunk_codec.is_zero(block):
                chunk_ids.append(None)
                continue
            cid = repo.codec.chunk_id(block)
            chunk_ids.append(cid)
            if cid not in seen:
                seen.add(cid)
                pending.append(pool.submit(store, cid, block))
            while len(pending) > 2 * workers or (pending and pending[0].done()):
                pending.popleft().result()
        for future in pending:
            future.result()
        labels = {"openstack.cinder_backup_id": cinder_backup_id,
                  "openstack.volume_id": volume_id,
                  "openstack.size_gb": str(max(1, -(-size // GIB))),
                  "openstack.name": str(newest.metadata.get("backup_name") or ""),
                  "openstack.imported_from": f"s3://{cinder_bucket.bucket}/{newest.prefix}",
                  **_labels_from_volume_meta(newest.volume_meta),
                  **({"openstack.volume_meta": newest.volume_meta} if newest.volume_meta
                     else {}),
                  **(extra_labels or {})}
        nonzero = sum(1 for c in chunk_ids if c is not None)
        manifest = Manifest(
            backup_id=backup_id, created=started.isoformat(),
            # The volume stands in for an RBD source: boot profiles group by it.
            source=Source(fsid=volume_id, pool="cinder-backup", image=f"volume-{volume_id}",
                          image_id="cinder", snapshot=""),
            image_size=size, chunk_size=CHUNK, chunks=chunk_ids, parent=None,
            stats=Stats(bytes_read=size, bytes_uploaded=uploaded[0], chunks_new=uploaded[1],
                        chunks_reused=nonzero - uploaded[1],
                        seconds=(dt.datetime.now(dt.UTC) - started).total_seconds()),
            labels=labels)
        repo.save_manifest(manifest)
    return manifest


def summary(manifest: Manifest) -> dict[str, Any]:
    return {"backup_id": manifest.backup_id, "image_size": manifest.image_size,
            "cinder_backup_id": manifest.labels.get("openstack.cinder_backup_id"),
            "volume_id": manifest.labels.get("openstack.volume_id"),
            "bytes_uploaded": manifest.stats.bytes_uploaded,
            "chunks_new": manifest.stats.chunks_new,
            "chunks_reused": manifest.stats.chunks_reused,
            "seconds": round(manifest.stats.seconds, 3)}
