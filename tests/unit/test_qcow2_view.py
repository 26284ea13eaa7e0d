"""The qcow2 view checked by qemu-img itself: `check` is clean, `convert` gives the image."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbd_restore.qcow2.view import ChunkSlice, MetadataBytes, Qcow2View
from rbd_restore.repo.manifest import Manifest, Source, chunk_count

KiB = 1 << 10


def build(image_size: int, chunk_size: int, pattern: list[int | None]) -> tuple[
        Manifest, dict[str, bytes], bytes]:
    """A manifest whose chunk i has content pattern[i] (None = zero), and the raw image."""
    count = chunk_count(image_size, chunk_size)
    store: dict[str, bytes] = {}
    ids: list[str | None] = []
    raw = bytearray()
    for index in range(count):
        length = min(chunk_size, image_size - index * chunk_size)
        seed = pattern[index % len(pattern)] if pattern else None
        if seed is None:
            ids.append(None)
            raw += bytes(length)
            continue
        data = (hashlib.sha256(str(seed).encode()).digest() * (length // 32 + 1))[:length]
        cid = hashlib.sha256(data).hexdigest()
        store[cid] = data
        ids.append(cid)
        raw += data
    manifest = Manifest(backup_id="20261125T000000Z-00000000", created="now",
                        source=Source("f", "p", "i", "id", "s"), image_size=image_size,
                        chunk_size=chunk_size, chunks=ids)
    return manifest, store, bytes(raw)


def materialize(view: Qcow2View, store: dict[str, bytes], path: Path,
                piece: int = 1 << 20) -> None:
    with open(path, "wb") as out:
        for start in range(0, view.size, piece):
            for seg in view.segments(start, min(view.size, start + piece)):
                if isinstance(seg, MetadataBytes):
                    out.write(seg.data)
                else:
                    assert isinstance(seg, ChunkSlice)
                    data = store[seg.chunk_id][seg.offset:seg.offset + seg.length]
                    out.write(data + bytes(seg.length - len(data)))
    assert path.stat().st_size == view.size


def qemu_check_and_convert(tmp: Path, view: Qcow2View, store: dict[str, bytes]) -> bytes:
    qcow = tmp / "v.qcow2"
    materialize(view, store, qcow)
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(qcow)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout
    raw = tmp / "v.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow), str(raw)],
                   check=True)
    return raw.read_bytes()


def sectors(raw: bytes) -> bytes:
    """QEMU rounds a virtual size down to whole 512-byte sectors."""
    return raw[: len(raw) // 512 * 512]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=1, max_value=40 * 64 * KiB + 3),
       st.lists(st.one_of(st.none(), st.integers(0, 5)), min_size=1, max_size=12))
def test_random_manifests_are_valid_qcow2(tmp_path: Path, image_size: int,
                                          pattern: list[int | None]) -> None:
    manifest, store, raw = build(image_size, 64 * KiB, pattern)
    view = Qcow2View(manifest)
    assert qemu_check_and_convert(tmp_path, view, store) == sectors(raw)


def test_four_mib_chunks_use_two_mib_clusters_and_share_duplicates(tmp_path: Path) -> None:
    manifest, store, raw = build(3 * (4 << 20) + 5000, 4 << 20, [1, None, 1, 2])
    view = Qcow2View(manifest)
    assert view.cluster_size == 2 << 20
    assert len(view.unique_ids) == 2  # chunk 0 and 2 share clusters; chunk 3 is short
    assert qemu_check_and_convert(tmp_path, view, store) == sectors(raw)


def test_tables_do_not_grow_with_the_virtual_disk() -> None:
    manifest = Manifest(backup_id="20261125T000000Z-00000000", created="now",
                        source=Source("f", "p", "i", "id", "s"), image_size=100 << 30,
                        chunk_size=4 << 20, chunks=["ab" * 32] + [None] * 25599)
    view = Qcow2View(manifest)
    # One chunk allocated in a 100 GiB disk: header, L1, refcounts, one L2 table, data.
    assert view.size <= 8 * view.cluster_size
    assert manifest.chunks.count(None) == 25599


def test_older_backups_become_internal_snapshots(tmp_path: Path) -> None:
    chunk = 64 * KiB
    older, store_a, raw_a = build(10 * chunk + 700, chunk, [1, None, 2])
    middle, store_b, raw_b = build(12 * chunk, chunk, [1, 3, None, 3])
    head, store_c, raw_c = build(12 * chunk + 5, chunk, [4, 1, None])
    older = dataclasses.replace(older, backup_id="20261101T000000Z-aaaaaaaa")
    middle = dataclasses.replace(middle, backup_id="20261102T000000Z-bbbbbbbb")
    store = {**store_a, **store_b, **store_c}
    view = Qcow2View(head, [older, middle])
    assert qemu_check_and_convert(tmp_path, view, store) == sectors(raw_c)
    qcow = tmp_path / "v.qcow2"
    listing = subprocess.run(["qemu-img", "snapshot", "-l", str(qcow)], capture_output=True,
                             text=True, check=True).stdout
    for backup, raw in ((older, raw_a), (middle, raw_b)):
        name = f"rbd-restore.{backup.backup_id}"
        assert name in listing
        out = tmp_path / f"{name}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-l",
                        f"snapshot.name={name}", str(qcow), str(out)], check=True)
        got = out.read_bytes()
        # qemu-img reads a snapshot at the active image's size; the rest is zeros.
        assert got[:len(sectors(raw))] == sectors(raw)
        assert not any(got[len(sectors(raw)):])
