"""Boot profiles (merge, format, recorder, cold heuristic) and the relocation follower."""

from __future__ import annotations

import json
import struct

import pytest

from rbd_restore.errors import IntegrityError, UsageError
from rbd_restore.prefetch.profiles import (
    KEEP_BOOTS,
    BootRecorder,
    Profile,
    VolumeKey,
    heuristic_chunks,
    partition_starts,
)
from rbd_restore.prefetch.relocation import (
    RateMeter,
    RelocationFollower,
    SequentialDetector,
    window_bounds,
)
from rbd_restore.repo.manifest import Manifest, Source

VOLUME = VolumeKey("7f1e9a62-3a5c-4a1e-9f0e-2b8c6d4e5f60", "10a2b3c4d5e6")
MiB = 1 << 20


def manifest(chunks: list[str | None], chunk_size: int = 4 * MiB) -> Manifest:
    source = Source(VOLUME.fsid, "volumes", "vm", VOLUME.image_id, "snap")
    return Manifest("20261125T120000Z-0123abcd", "2026-11-25T12:00:00+00:00", source,
                    len(chunks) * chunk_size, chunk_size, chunks)


# Profiles


def test_merge_orders_by_first_read_and_forgets_after_keep_boots() -> None:
    profile = Profile(VOLUME, 4 * MiB).merged([(5, 10), (1, 20), (9, 30)])
    assert profile.chunks() == [5, 1, 9] and profile.boots == 1
    second = profile.merged([(9, 5), (2, 25)])
    # This boot's times win; chunk 5 and 1 stay (read within the last KEEP_BOOTS boots).
    assert second.chunks() == [9, 5, 1, 2]
    later = second
    for _ in range(KEEP_BOOTS - 1):
        later = later.merged([(9, 5)])
    # 5 and 1 were last read KEEP_BOOTS boots ago: gone; 2 (read a boot later) stays.
    assert later.chunks() == [9, 2]


def test_reads_in_the_same_millisecond_keep_their_order() -> None:
    recorder = BootRecorder(opened_at=1000.0, window_seconds=120)
    for chunk in (33, 23, 40, 2):  # one burst: all within the same millisecond
        recorder.record(chunk, 1000.0101)
    reads = recorder.finish()
    assert [c for c, _ in reads] == [33, 23, 40, 2]
    assert Profile(VOLUME, 4 * MiB).merged([(50, 3), *reads]).chunks() == [50, 33, 23, 40, 2]


def test_profile_round_trips_and_refuses_damage() -> None:
    profile = Profile(VOLUME, 4 * MiB).merged([(3, 0), (4, 12)], now=1764072000.0)
    again = Profile.from_json(profile.to_json(), VOLUME)
    assert again == profile and again.updated == "2025-11-25T12:00:00+00:00"
    body = json.loads(profile.to_json())
    for damage in ({"format_version": 2}, {"image_id": "other"}, {"chunks": [[1, 2]]},
                   {"chunks": [[-1, 0, 1]]}, {"chunk_size": "x"}):
        with pytest.raises(IntegrityError):
            Profile.from_json(json.dumps({**body, **damage}).encode(), VOLUME)
    with pytest.raises(IntegrityError):
        Profile.from_json(b"{truncated", VOLUME)


def test_volume_key_refuses_names_that_would_escape_the_key_layout() -> None:
    for fsid, image_id in (("../x", "10a2"), (VOLUME.fsid, "a/b"), ("", "10a2")):
        with pytest.raises(UsageError):
            VolumeKey(fsid, image_id)


def test_recorder_keeps_first_touches_until_the_window_ends() -> None:
    recorder = BootRecorder(opened_at=1000.0, window_seconds=120)
    assert recorder.record(7, 1000.5) and recorder.record(3, 1001.0)
    assert recorder.record(7, 1002.0)  # a second touch keeps the first time
    assert not recorder.record(9, 1121.0)  # past the window: recording stops
    assert not recorder.record(1, 1001.0)
    assert recorder.finish() == [(7, 500), (3, 1000)]


# Cold heuristic


def mbr(entries: list[tuple[int, int]]) -> bytearray:
    disk = bytearray(34 * 512)
    for slot, (kind, lba) in enumerate(entries):
        struct.pack_into("<4xB3xII", disk, 446 + 16 * slot, kind, lba, 1000)
    disk[510:512] = b"\x55\xaa"
    return disk


def test_partition_starts_from_mbr_and_gpt() -> None:
    assert partition_starts(bytes(mbr([(0x83, 2048), (0x82, 4196352)]))) == [
        2048 * 512, 4196352 * 512]
    gpt = mbr([(0xEE, 1)])
    gpt[512:520] = b"EFI PART"
    struct.pack_into("<QII", gpt, 512 + 72, 2, 128, 128)
    struct.pack_into("<16s16sQ", gpt, 1024, b"t" * 16, b"u" * 16, 34 * 512 // 512 + 2014)
    struct.pack_into("<16s16sQ", gpt, 1024 + 128, b"t" * 16, b"v" * 16, 1050624)
    assert partition_starts(bytes(gpt)) == [2048 * 512, 1050624 * 512]
    assert partition_starts(bytes(512)) == []  # no signature: no table
    assert partition_starts(b"") == []


def test_heuristic_covers_disk_head_partition_heads_and_last_chunk() -> None:
    chunks: list[str | None] = [f"{n:064x}" for n in range(64)]
    chunks[2] = None  # zero: nothing to fetch
    m = manifest(chunks)
    assert heuristic_chunks(m, 12 * MiB, [100 * MiB]) == [0, 1, 25, 26, 27, 63]
    assert heuristic_chunks(m, 0, [100 * MiB]) == []


# Relocation follower


def test_detector_tells_an_object_walk_from_scattered_reads() -> None:
    walk = SequentialDetector()
    # Objects of two clusters, issued in order; one pair of arrivals swapped.
    arrivals = [0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11, 12, 13]
    verdicts = [walk.sequential(range(c, c + 1)) for c in arrivals]
    assert verdicts[0] is False and verdicts[1:].count(False) <= 1
    scattered = SequentialDetector()
    reads = [500, 17, 9000, 230, 4411, 77, 6020, 1310]
    assert not any(scattered.sequential(range(c, c + 1)) for c in reads)


def test_follower_stages_from_the_start_then_follows_the_relocation() -> None:
    follower = RelocationFollower(1000, True, 8, 64)
    assert follower.ahead(8) == list(range(0, 8))  # the relocation starts at object 0
    for unique in (1, 0, 3, 2):  # in flight together: arrive out of order
        follower.observe([unique])
    assert follower.front == 3
    assert follower.ahead(8) == list(range(4, 12))


def test_single_copy_up_far_ahead_does_not_drag_the_window() -> None:
    follower = RelocationFollower(1000, True, 8, 64)
    follower.observe([0])
    follower.observe([500])  # a guest write's copy-up
    follower.observe([1])
    assert follower.front == 1
    assert follower.ahead(4) == [2, 3, 4, 5]
    assert 500 in follower.held


def test_resumed_relocation_is_picked_up_on_its_second_read() -> None:
    follower = RelocationFollower(1000, False, 8, 64)
    assert follower.ahead(8) == []  # not primed: nothing expected yet
    follower.observe([700])
    assert follower.ahead(4) == []
    follower.observe([702])
    follower.observe([703])
    assert follower.ahead(4) == [704, 705, 706, 707]


def test_window_skips_held_chunks_and_grows_with_the_s3_rate() -> None:
    follower = RelocationFollower(100, True, 4, 32)
    follower.observe([0])
    follower.observe([5, 6])  # copy-ups ahead, close enough to belong to the walk
    assert 5 not in follower.ahead(8) and 6 not in follower.ahead(8)
    meter = RateMeter()
    assert follower.window(meter, 4 * MiB, 2) == 4
    for step in range(1, 40):
        meter.add(40 * MiB, 0.5, now=meter.last + 0.1)  # 400 MB/s, 0.5 s per fetch
        del step
    assert follower.window(meter, 4 * MiB, 2) == 32
    assert follower.ahead(200)[-1] == 99  # never past the last chunk


def test_window_fits_in_the_memory_the_relocation_is_staged_in() -> None:
    # 64 MiB of memory holds 16 chunks of 4 MiB: more would spill to the disk cache.
    assert window_bounds(8, 64, 4 * MiB, 8 << 30, 64 * MiB) == (8, 16)
    # Memory smaller than the minimum: the minimum shrinks with it.
    assert window_bounds(8, 64, 32 * MiB, 8 << 30, 64 * MiB) == (2, 2)
    # No memory staging (memory_cache = 0): a quarter of the disk cache bounds it.
    assert window_bounds(8, 64, 4 * MiB, 128 * MiB, 0) == (8, 8)
    assert window_bounds(8, 64, 4 * MiB, 8 << 30, 0) == (8, 64)


def test_observe_names_the_stream_and_how_far_it_reached() -> None:
    follower = RelocationFollower(1000, True, 8, 64)
    relocation = follower.observe([0])
    assert relocation is not None and relocation.span == 1  # the primed stream, from -1
    file_read = follower.observe([600])
    assert file_read is not None and file_read is not relocation and file_read.span == 0
    for unique in (601, 602, 603):
        assert follower.observe([unique]) is file_read
    assert file_read.span == 3
    assert follower.observe([]) is None
