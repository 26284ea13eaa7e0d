"""The qcow2 view of a manifest: a virtual read-only qcow2 (version 2) file.

Nothing is materialized up front but the chunk-to-cluster maps (one integer per
chunk of each layer). Header, L1 tables, snapshot table, refcount structures
and L2 tables are generated on demand for the bytes a reader asks for, so
memory grows with the number of chunks, not with the virtual disk.

A *layer* is one manifest: the active image, or an older backup exposed as a
qcow2 internal snapshot (restore with history). Layout, in host clusters:

    header | L1 tables | snapshot table | refcount table | refcount blocks |
    L2 tables | data

Data clusters are assigned per distinct chunk across all layers, in order of
first use: identical chunks share their clusters (refcount > 1). Zero chunks
stay unallocated. docs/qcow2-view.md is the specification.
"""

from __future__ import annotations

import bisect
import datetime as dt
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

from rbd_restore.errors import UsageError
from rbd_restore.repo.manifest import Manifest

QCOW_MAGIC = 0x514649FB
MAX_CLUSTER_SIZE = 2 << 20
COPIED = 1 << 63
REFCOUNT_BYTES = 2  # refcount_order 4: 16-bit big-endian refcounts
BIG_ENDIAN_HOST = struct.pack("=H", 1) == struct.pack(">H", 1)


@dataclass(frozen=True)
class MetadataBytes:
    """Bytes of the virtual file that do not come from a chunk."""

    data: bytes


@dataclass(frozen=True)
class ChunkSlice:
    """``length`` bytes of chunk ``chunk_id`` from ``offset``; past ``chunk_length`` it is zeros."""

    chunk_id: str
    chunk_length: int
    offset: int
    length: int
    unique: int  # position of the chunk's data clusters in the file, 0 = first


Segment = MetadataBytes | ChunkSlice


def _clusters(nbytes: int, cluster_size: int) -> int:
    return -(-nbytes // cluster_size)


def _be(values: array[int]) -> bytes:
    if not BIG_ENDIAN_HOST:
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


@dataclass
class _Layer:
    manifest: Manifest
    unique_of_chunk: array[int]
    l1_size: int
    l2_tables: list[int]  # L1 indices that have an L2 table, ascending
    l1_start: int = 0  # host cluster
    l1_clusters: int = 0
    l2_start: int = 0

    def l2_slot(self, table: int) -> int | None:
        at = bisect.bisect_left(self.l2_tables, table)
        return at if at < len(self.l2_tables) and self.l2_tables[at] == table else None


SECTOR = 512


def check_importable(manifest: Manifest) -> None:
    """Refuse a backup librbd's import-only migration cannot stage: librbd 16.2.15 fails
    ``migration_prepare_import`` (EINVAL) on a qcow2 file whose size is not a whole
    number of 512-byte sectors, while RBD images may have any size in bytes."""
    if manifest.image_size % SECTOR:
        raise UsageError(f"backup {manifest.backup_id} is of a volume of "
                         f"{manifest.image_size} bytes, not a multiple of {SECTOR}: librbd "
                         "cannot stage it for an instant restore; use --mode full")


class Qcow2View:
    def __init__(self, manifest: Manifest, snapshots: Sequence[Manifest] = ()) -> None:
        """``manifest`` is the active image; ``snapshots`` (oldest first) become snapshots."""
        for older in snapshots:
            if older.chunk_size != manifest.chunk_size:
                raise ValueError(f"backup {older.backup_id} has another chunk size")
        self.manifest = manifest
        self.cluster_size = min(MAX_CLUSTER_SIZE, manifest.chunk_size)
        self.cluster_bits = self.cluster_size.bit_length() - 1
        self.clusters_per_chunk = manifest.chunk_size // self.cluster_size
        self.l2_entries = self.cluster_size // 8

        self.unique_ids: list[str] = []
        self.unique_lengths = array("q")
        self.unique_refs = array("q")
        seen: dict[str, int] = {}
        self.layers = [self._layer(m, seen) for m in (manifest, *snapshots)]
        self.snapshots = self.layers[1:]
        self.unique_clusters = array("q", (_clusters(n, self.cluster_size)
                                           for n in self.unique_lengths))
        self.unique_first = array("q", [0]) * len(self.unique_ids)
        data_clusters = 0
        for unique, count in enumerate(self.unique_clusters):
            self.unique_first[unique] = data_clusters
            data_clusters += count

        host = 1
        for layer in self.layers:
            layer.l1_start = host
            layer.l1_clusters = max(1, _clusters(layer.l1_size * 8, self.cluster_size))
            host += layer.l1_clusters
        self.snapshot_table = self._snapshot_table_bytes() if self.snapshots else b""
        self.snapshot_table_start = host
        host += _clusters(len(self.snapshot_table), self.cluster_size)
        l2_count = sum(len(layer.l2_tables) for layer in self.layers)
        fixed = host + l2_count + data_clusters
        per_block = self.cluster_size // REFCOUNT_BYTES
        table_clusters, blocks = 1, 1
        while True:  # the refcount structures count themselves: iterate to a fixed point
            need_blocks = _clusters(fixed + table_clusters + blocks, per_block)
            need_table = _clusters(need_blocks * 8, self.cluster_size)
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        self.refcount_table_start = host
        self.refcount_table_clusters = table_clusters
        self.refcount_blocks_start = host + table_clusters
        self.refcount_blocks = blocks
        host = self.refcount_blocks_start + blocks
        self.l2_start = host
        for layer in self.layers:
            layer.l2_start = host
            host += len(layer.l2_tables)
        self.data_start = host
        self.total_clusters = self.data_start + data_clusters
        self.size = self.total_clusters * self.cluster_size
        self._regions = [0, self.layers[0].l1_start, self.snapshot_table_start,
                         self.refcount_table_start, self.refcount_blocks_start, self.l2_start]
        self._l2_table = lru_cache(maxsize=8)(self._build_l2_table)
        self._refcount_block = lru_cache(maxsize=4)(self._build_refcount_block)

    def _layer(self, manifest: Manifest, seen: dict[str, int]) -> _Layer:
        virtual_clusters = _clusters(manifest.image_size, self.cluster_size)
        l1_size = _clusters(virtual_clusters, self.l2_entries)
        unique_of_chunk = array("q", [-1]) * len(manifest.chunks)
        used: set[int] = set()
        for index, cid in manifest.allocated():
            unique = seen.get(cid)
            if unique is None:
                unique = seen[cid] = len(self.unique_ids)
                self.unique_ids.append(cid)
                self.unique_lengths.append(manifest.chunk_length(index))
                self.unique_refs.append(0)
            unique_of_chunk[index] = unique
            self.unique_refs[unique] += 1
            used.add(index * self.clusters_per_chunk // self.l2_entries)
        return _Layer(manifest, unique_of_chunk, l1_size, sorted(used))

    @cached_property
    def head_chunk_of_unique(self) -> array[int]:
        """For each unique, the first chunk index of the active image using it, or -1
        (used only by older backups): how reads of the file map back to the disk."""
        first = array("q", [-1]) * len(self.unique_ids)
        for index in range(len(self.layers[0].unique_of_chunk) - 1, -1, -1):
            unique = self.layers[0].unique_of_chunk[index]
            if unique >= 0:
                first[unique] = index
        return first

    def unique_of_head_chunk(self, index: int) -> int:
        """The unique holding chunk ``index`` of the active image, or -1 (zero or outside)."""
        chunks = self.layers[0].unique_of_chunk
        return chunks[index] if 0 <= index < len(chunks) else -1

    # Metadata, generated on demand

    def header(self) -> bytes:
        return struct.pack(
            ">IIQIIQIIQQIIQ", QCOW_MAGIC, 2, 0, 0, self.cluster_bits, self.manifest.image_size,
            0, self.layers[0].l1_size, self.layers[0].l1_start * self.cluster_size,
            self.refcount_table_start * self.cluster_size, self.refcount_table_clusters,
            len(self.snapshots),
            self.snapshot_table_start * self.cluster_size if self.snapshots else 0)

    def _snapshot_table_bytes(self) -> bytes:
        out = bytearray()
        for number, layer in enumerate(self.snapshots, start=1):
            m = layer.manifest
            ident = str(number).encode()
            name = f"rbd-restore.{m.backup_id}".encode()
            try:
                stamp = dt.datetime.fromisoformat(m.created).timestamp()
            except ValueError:
                stamp = 0.0
            entry = struct.pack(">QIHHIIQII", layer.l1_start * self.cluster_size, layer.l1_size,
                                len(ident), len(name), int(stamp), 0, 0, 0, 16)
            entry += struct.pack(">QQ", 0, m.image_size)  # extra: vm state, disk size
            entry += ident + name
            out += entry + bytes(-len(entry) % 8)
        return bytes(out)

    def _l1_cluster(self, layer: _Layer, index: int) -> bytes:
        entries = array("Q", [0]) * self.l2_entries
        first = index * self.l2_entries
        for table in layer.l2_tables:
            if first <= table < first + self.l2_entries:
                slot = layer.l2_slot(table)
                assert slot is not None
                entries[table - first] = ((layer.l2_start + slot) * self.cluster_size) | COPIED
        return _be(entries)

    def _refcount_table_cluster(self, index: int) -> bytes:
        per = self.cluster_size // 8
        entries = array("Q", [0]) * per
        for i in range(per):
            block = index * per + i
            if block >= self.refcount_blocks:
                break
            entries[i] = (self.refcount_blocks_start + block) * self.cluster_size
        return _be(entries)

    def _build_refcount_block(self, block: int) -> bytes:
        per = self.cluster_size // REFCOUNT_BYTES
        counts = array("H", [0]) * per
        first = block * per
        for host in range(first, min(self.data_start, first + per)):
            counts[host - first] = 1
        for unique in range(len(self.unique_ids)):
            start = self.data_start + self.unique_first[unique]
            end = start + self.unique_clusters[unique]
            if end <= first or start >= first + per:
                continue
            refs = min(self.unique_refs[unique], 0xFFFF)
            for host in range(max(start, first), min(end, first + per)):
                counts[host - first] = refs
        return _be(counts)

    def _build_l2_table(self, layer_no: int, table: int) -> bytes:
        layer = self.layers[layer_no]
        entries = array("Q", [0]) * self.l2_entries
        first_virtual = table * self.l2_entries
        first_chunk = first_virtual // self.clusters_per_chunk
        last_chunk = min(len(layer.unique_of_chunk),
                         -(-(first_virtual + self.l2_entries) // self.clusters_per_chunk))
        for chunk in range(first_chunk, last_chunk):
            unique = layer.unique_of_chunk[chunk]
            if unique < 0:
                continue
            copied = COPIED if self.unique_refs[unique] == 1 else 0
            host_first = self.data_start + self.unique_first[unique]
            for sub in range(self.unique_clusters[unique]):
                slot = chunk * self.clusters_per_chunk + sub - first_virtual
                if 0 <= slot < self.l2_entries:
                    entries[slot] = ((host_first + sub) * self.cluster_size) | copied
        return _be(entries)

    def _metadata_cluster(self, host: int) -> bytes:
        region = bisect.bisect_right(self._regions, host) - 1
        if region == 0:
            head = self.header()
            return head + bytes(self.cluster_size - len(head))
        if region == 1:
            for layer in self.layers:
                if layer.l1_start <= host < layer.l1_start + layer.l1_clusters:
                    return self._l1_cluster(layer, host - layer.l1_start)
        if region == 2:
            offset = (host - self.snapshot_table_start) * self.cluster_size
            piece = self.snapshot_table[offset:offset + self.cluster_size]
            return piece + bytes(self.cluster_size - len(piece))
        if region == 3:
            return self._refcount_table_cluster(host - self.refcount_table_start)
        if region == 4:
            return self._refcount_block(host - self.refcount_blocks_start)
        for layer_no, layer in enumerate(self.layers):
            if layer.l2_start <= host < layer.l2_start + len(layer.l2_tables):
                return self._l2_table(layer_no, layer.l2_tables[host - layer.l2_start])
        raise AssertionError(f"host cluster {host} is not metadata")

    # Reads

    def segments(self, start: int, end: int) -> Iterator[Segment]:
        """What bytes ``[start, end)`` of the virtual file are made of, in order."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range [{start}, {end}) outside a file of {self.size} bytes")
        position = start
        while position < end:
            host, within = divmod(position, self.cluster_size)
            if host < self.data_start:
                take = min(end - position, self.cluster_size - within)
                yield MetadataBytes(self._metadata_cluster(host)[within:within + take])
                position += take
                continue
            data_cluster = host - self.data_start
            unique = bisect.bisect_right(self.unique_first, data_cluster) - 1
            chunk_offset = (data_cluster - self.unique_first[unique]) * self.cluster_size + within
            take = min(end - position,
                       self.unique_clusters[unique] * self.cluster_size - chunk_offset)
            yield ChunkSlice(self.unique_ids[unique], self.unique_lengths[unique], chunk_offset,
                             take, unique)
            position += take
