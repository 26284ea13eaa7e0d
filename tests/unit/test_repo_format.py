"""One test per rule of docs/format.md that needs no cluster."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from rbd_restore.ceph import ImageRef
from rbd_restore.errors import IntegrityError, UsageError
from rbd_restore.repo import chunks, manifest
from rbd_restore.repo.layout import BACKUP_ID, KeyLayout
from rbd_restore.repo.repository import backup_id_of_snapshot, new_backup_id, snapshot_name

CID = "ab" * 32
OTHER = "cd" * 32


def sample(chunk_list: list[str | None], size: int | None = None) -> manifest.Manifest:
    chunk_size = 64 << 10
    return manifest.Manifest(
        backup_id=new_backup_id(), created="2026-11-25T17:00:00+00:00",
        source=manifest.Source("fsid", "volumes", "vm1", "1234abcd", "rbd-restore.x"),
        image_size=size if size is not None else len(chunk_list) * chunk_size,
        chunk_size=chunk_size, chunks=chunk_list)


@given(st.lists(st.sampled_from([CID, OTHER, None]), max_size=200),
       st.integers(min_value=0, max_value=(64 << 10) - 1))
def test_manifest_round_trips(chunk_list: list[str | None], short: int) -> None:
    size = max(0, len(chunk_list) * (64 << 10) - short) if chunk_list else 0
    original = sample(chunk_list, size)
    assert manifest.from_json(manifest.to_json(original)) == original


def test_zero_runs_are_encoded_as_counts() -> None:
    encoded = manifest.encode_chunk_list([None, None, CID, None, OTHER, OTHER, None, None, None])
    assert encoded == [2, CID, 1, OTHER, OTHER, 3]
    assert manifest.decode_chunk_list(encoded)[:3] == [None, None, CID]


def test_last_chunk_may_be_short() -> None:
    m = sample([CID, CID], size=(64 << 10) + 100)
    assert m.chunk_length(1) == 100
    assert m.allocated_bytes == (64 << 10) + 100


@pytest.mark.parametrize("edit", [
    lambda b: b.update(image_size=b["image_size"] + 1),
    lambda b: b["chunks"].reverse(),
    lambda b: b.update(parent=None if b["parent"] else new_backup_id()),
    lambda b: b["source"].update(pool="other"),
])
def test_tampered_manifest_fails_its_checksum(edit: object) -> None:
    body = json.loads(manifest.to_json(sample([CID, None, OTHER])))
    edit(body)  # type: ignore[operator]
    with pytest.raises(IntegrityError, match="checksum"):
        manifest.from_json(json.dumps(body).encode())


def test_truncated_manifest_is_refused() -> None:
    data = manifest.to_json(sample([CID, None, OTHER]))
    for cut in (1, len(data) // 2, len(data) - 3):
        with pytest.raises(IntegrityError):
            manifest.from_json(data[:cut])


def test_unknown_format_version_is_refused() -> None:
    body = json.loads(manifest.to_json(sample([CID])))
    body["format_version"] = 99
    with pytest.raises(IntegrityError, match="format_version 99"):
        manifest.from_json(json.dumps(body).encode())


def test_manifest_must_name_the_backup_it_is_stored_as() -> None:
    m = sample([CID])
    with pytest.raises(IntegrityError):
        manifest.from_json(manifest.to_json(m), expected_id=new_backup_id())


def test_chunk_is_named_by_sha256_of_plain_bytes_and_verified() -> None:
    data = b"hello" * 1000
    cid = chunks.chunk_id(data)
    stored = chunks.encode_chunk(data)
    assert chunks.decode_chunk(cid, stored, len(data)) == data
    with pytest.raises(IntegrityError, match="failed verification"):
        chunks.decode_chunk(cid, chunks.encode_chunk(b"x" + data[1:]))
    with pytest.raises(IntegrityError, match="zstd"):
        chunks.decode_chunk(cid, b"garbage")
    with pytest.raises(IntegrityError, match="bytes where"):
        chunks.decode_chunk(cid, stored, len(data) + 1)


@given(st.binary(min_size=1, max_size=600_000))
def test_raw_frames_are_zstd_frames_with_their_content_size(data: bytes) -> None:
    frame = chunks.raw_frame(data)
    assert zstandard.get_frame_parameters(frame).content_size == len(data)
    assert zstandard.ZstdDecompressor().decompress(frame) == data


def test_incompressible_chunks_are_stored_raw_and_the_rest_compressed() -> None:
    noise = random.Random(7).randbytes(4 << 20)
    stored = chunks.encode_chunk(noise)
    assert stored == chunks.raw_frame(noise)
    assert chunks.decode_chunk(chunks.chunk_id(noise), stored, len(noise)) == noise
    # Noise with a compressible stretch where one of the samples falls: compressed.
    mixed = noise[:2 << 20] + bytes(1 << 20) + noise[3 << 20:]
    stored = chunks.encode_chunk(mixed)
    assert len(stored) < len(mixed) * 0.8
    assert chunks.decode_chunk(chunks.chunk_id(mixed), stored, len(mixed)) == mixed


def test_zero_detection() -> None:
    assert chunks.is_zero(bytes(4 << 20))
    assert not chunks.is_zero(bytes(4095) + b"\x01")
    assert chunks.is_zero(b"")


@pytest.mark.parametrize("size", [64 << 10, 1 << 20, 4 << 20, 32 << 20])
def test_chunk_sizes_accepted(size: int) -> None:
    assert chunks.validate_chunk_size(size) == size


@pytest.mark.parametrize("size", [0, 3 << 20, 32 << 10, 64 << 20, (4 << 20) + 1])
def test_chunk_sizes_refused(size: int) -> None:
    with pytest.raises(UsageError, match="power of two"):
        chunks.validate_chunk_size(size)


def test_key_layout_is_a_function_of_ids() -> None:
    keys = KeyLayout("site-a")
    assert keys.chunk(CID) == f"site-a/chunks/ab/{CID}"
    assert keys.chunk_id_of(keys.chunk(CID)) == CID
    assert keys.chunk_id_of(f"site-a/chunks/cd/{CID}") is None
    bid = new_backup_id()
    assert keys.manifest(bid) == f"site-a/manifests/{bid}.json"
    assert keys.backup_id_of(keys.manifest(bid)) == bid
    assert KeyLayout("").lock("gc-x") == "locks/gc-x"


def test_backup_ids_and_snapshot_names() -> None:
    bid = new_backup_id()
    assert BACKUP_ID.match(bid)
    assert backup_id_of_snapshot(snapshot_name(bid)) == bid
    assert backup_id_of_snapshot("rbd-restore.nope") is None
    assert backup_id_of_snapshot("daily") is None


@pytest.mark.parametrize(("text", "pool", "name"), [
    ("volumes/vm1", "volumes", "vm1"), ("vm1", "rbd", "vm1"),
])
def test_image_ref_parse(text: str, pool: str, name: str) -> None:
    assert dataclasses.astuple(ImageRef.parse(text, "rbd")) == (pool, name)


@pytest.mark.parametrize("text", ["", "/", "volumes/", "a/b/c", "vol/im@snap", "vm1"])
def test_image_ref_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        ImageRef.parse(text)


def test_session_keys_follow_the_prefix() -> None:
    keys = KeyLayout("site-a")
    assert keys.session_open("0123456789abcdef") == "site-a/sessions/open/0123456789abcdef.json"
    assert keys.session_closed("0123456789abcdef").startswith(keys.sessions_closed_prefix)


def test_labels_round_trip_and_are_covered_by_the_checksum() -> None:
    labeled = dataclasses.replace(sample([CID]), labels={
        "openstack.volume_id": "0b6cbbf4-2a8b-4d4e-9d3c-6c1d7cf0b1a2",
        "openstack.volume_meta": json.dumps({"volume-glance-metadata": {"hw_machine_type":
                                                                        "q35"}})})
    data = manifest.to_json(labeled)
    assert manifest.from_json(data) == labeled
    body = json.loads(data)
    body["labels"]["openstack.volume_id"] = "someone-else"
    with pytest.raises(IntegrityError, match="checksum"):
        manifest.from_json(json.dumps(body).encode())


def test_a_manifest_without_labels_has_no_labels_field() -> None:
    """So manifests written before labels existed read and check alike."""
    assert "labels" not in json.loads(manifest.to_json(sample([CID])))


@pytest.mark.parametrize("labels", [{"Upper": "x"}, {"a b": "x"}, {"ok": 1}, ["x"],
                                    {"big": "x" * (257 << 10)}])
def test_labels_that_break_the_rules_are_refused(labels: object) -> None:
    with pytest.raises(ValueError):
        manifest.check_labels(labels)
