"""The qcow2 view of a manifest: a virtual read-only qcow2 (version 2) file.

Nothing is materialized up front but the chunk-to-cluster map (one integer per
chunk of the image). Header, L1, refcount table, refcount blocks and L2 tables
are generated on demand for the bytes a reader asks for, so memory grows with
the number of chunks, not with the virtual disk. Layout, in host clusters:

    header | L1 table | refcount table | refcount blocks | L2 tables | data

Data clusters are assigned per distinct chunk, in order of first use: identical
chunks share their clusters (refcount > 1). Zero chunks stay unallocated.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from rbd_restore.repo.manifest import Manifest

QCOW_MAGIC = 0x514649FB
MAX_CLUSTER_SIZE = 2 << 20
L2_COPIED = 1 << 63
REFCOUNT_BYTES = 2  # refcount_order 4: 16-bit big-endian refcounts
HEADER_LENGTH = 72


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


class Qcow2View:
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.cluster_size = min(MAX_CLUSTER_SIZE, manifest.chunk_size)
        self.cluster_bits = self.cluster_size.bit_length() - 1
        self.clusters_per_chunk = manifest.chunk_size // self.cluster_size
        self.l2_entries = self.cluster_size // 8
        virtual_clusters = _clusters(manifest.image_size, self.cluster_size)
        self.l1_size = _clusters(virtual_clusters, self.l2_entries)

        # Distinct chunks in order of first use; per chunk index, its unique number or -1.
        self.unique_ids: list[str] = []
        self.unique_lengths = array("q")
        self.unique_refs = array("q")
        self.unique_of_chunk = array("q", [-1]) * len(manifest.chunks)
        seen: dict[str, int] = {}
        l2_used = bytearray(self.l1_size)
        for index, cid in manifest.allocated():
            unique = seen.get(cid)
            if unique is None:
                unique = seen[cid] = len(self.unique_ids)
                self.unique_ids.append(cid)
                self.unique_lengths.append(manifest.chunk_length(index))
                self.unique_refs.append(0)
            self.unique_of_chunk[index] = unique
            self.unique_refs[unique] += 1
            first_cluster = index * self.clusters_per_chunk
            l2_used[first_cluster // self.l2_entries] = 1
        # A chunk spans clusters_per_chunk clusters; the last chunk may need fewer.
        self.unique_clusters = array("q", (_clusters(n, self.cluster_size)
                                           for n in self.unique_lengths))
        self.unique_first = array("q", [0]) * len(self.unique_ids)
        total = 0
        for unique, count in enumerate(self.unique_clusters):
            self.unique_first[unique] = total
            total += count
        data_clusters = total

        self.l2_tables = [t for t in range(self.l1_size) if l2_used[t]]
        self.l2_slot = {t: slot for slot, t in enumerate(self.l2_tables)}
        self.l1_clusters = max(1, _clusters(self.l1_size * 8, self.cluster_size))
        fixed = 1 + self.l1_clusters + len(self.l2_tables) + data_clusters
        per_block = self.cluster_size // REFCOUNT_BYTES
        table_clusters, blocks = 1, 1
        while True:  # the refcount structures count themselves: iterate to a fixed point
            all_clusters = fixed + table_clusters + blocks
            need_blocks = _clusters(all_clusters, per_block)
            need_table = _clusters(need_blocks * 8, self.cluster_size)
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        self.refcount_table_clusters = table_clusters
        self.refcount_blocks = blocks

        self.l1_start = 1
        self.refcount_table_start = self.l1_start + self.l1_clusters
        self.refcount_blocks_start = self.refcount_table_start + table_clusters
        self.l2_start = self.refcount_blocks_start + blocks
        self.data_start = self.l2_start + len(self.l2_tables)
        self.total_clusters = self.data_start + data_clusters
        self.size = self.total_clusters * self.cluster_size
        self._l2_table = lru_cache(maxsize=8)(self._build_l2_table)
        self._refcount_block = lru_cache(maxsize=4)(self._build_refcount_block)

    # Host offsets

    def data_cluster_of(self, virtual_cluster: int) -> int:
        """Host cluster number holding virtual cluster ``virtual_cluster``, or 0."""
        chunk, sub = divmod(virtual_cluster, self.clusters_per_chunk)
        if chunk >= len(self.unique_of_chunk):
            return 0
        unique = self.unique_of_chunk[chunk]
        if unique < 0 or sub >= self.unique_clusters[unique]:
            return 0
        return self.data_start + self.unique_first[unique] + sub

    # Metadata, generated on demand

    def header(self) -> bytes:
        return struct.pack(
            ">IIQIIQIIQQIIQ", QCOW_MAGIC, 2, 0, 0, self.cluster_bits, self.manifest.image_size,
            0, self.l1_size, self.l1_start * self.cluster_size,
            self.refcount_table_start * self.cluster_size, self.refcount_table_clusters, 0, 0)

    def _be_u64(self, values: array[int]) -> bytes:
        copy = array("Q", values)
        if struct.pack("=H", 1) != struct.pack(">H", 1):
            copy.byteswap()
        return copy.tobytes()

    def _l1_cluster(self, index: int) -> bytes:
        per = self.l2_entries
        entries = array("Q", [0]) * per
        for i in range(per):
            table = index * per + i
            if table >= self.l1_size:
                break
            slot = self.l2_slot.get(table)
            if slot is not None:
                entries[i] = ((self.l2_start + slot) * self.cluster_size) | L2_COPIED
        return self._be_u64(entries)

    def _refcount_table_cluster(self, index: int) -> bytes:
        per = self.cluster_size // 8
        entries = array("Q", [0]) * per
        for i in range(per):
            block = index * per + i
            if block >= self.refcount_blocks:
                break
            entries[i] = (self.refcount_blocks_start + block) * self.cluster_size
        return self._be_u64(entries)

    def _build_refcount_block(self, block: int) -> bytes:
        per = self.cluster_size // REFCOUNT_BYTES
        counts = array("H", [0]) * per
        first = block * per
        meta_end = min(self.data_start, first + per)
        for host in range(first, meta_end):
            counts[host - first] = 1
        for unique in range(len(self.unique_ids)):
            start = self.data_start + self.unique_first[unique]
            end = start + self.unique_clusters[unique]
            if end <= first or start >= first + per:
                continue
            refs = min(self.unique_refs[unique], 0xFFFF)
            for host in range(max(start, first), min(end, first + per)):
                counts[host - first] = refs
        if struct.pack("=H", 1) != struct.pack(">H", 1):
            counts.byteswap()
        return counts.tobytes()

    def _build_l2_table(self, table: int) -> bytes:
        entries = array("Q", [0]) * self.l2_entries
        first_virtual = table * self.l2_entries
        first_chunk = first_virtual // self.clusters_per_chunk
        last_chunk = min(len(self.unique_of_chunk),
                         -(-(first_virtual + self.l2_entries) // self.clusters_per_chunk))
        for chunk in range(first_chunk, last_chunk):
            unique = self.unique_of_chunk[chunk]
            if unique < 0:
                continue
            copied = L2_COPIED if self.unique_refs[unique] == 1 else 0
            host_first = self.data_start + self.unique_first[unique]
            for sub in range(self.unique_clusters[unique]):
                virtual = chunk * self.clusters_per_chunk + sub
                slot = virtual - first_virtual
                if 0 <= slot < self.l2_entries:
                    entries[slot] = ((host_first + sub) * self.cluster_size) | copied
        return self._be_u64(entries)

    def _metadata_cluster(self, host: int) -> bytes:
        if host == 0:
            head = self.header()
            return head + bytes(self.cluster_size - len(head))
        if host < self.refcount_table_start:
            return self._l1_cluster(host - self.l1_start)
        if host < self.refcount_blocks_start:
            return self._refcount_table_cluster(host - self.refcount_table_start)
        if host < self.l2_start:
            return self._refcount_block(host - self.refcount_blocks_start)
        return self._l2_table(self.l2_tables[host - self.l2_start])

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
            unique, offset = self._unique_at(host - self.data_start)
            chunk_offset = offset * self.cluster_size + within
            run_end = (self.unique_clusters[unique] * self.cluster_size) - chunk_offset
            take = min(end - position, run_end)
            yield ChunkSlice(self.unique_ids[unique], self.unique_lengths[unique], chunk_offset,
                             take, unique)
            position += take

    def _unique_at(self, data_cluster: int) -> tuple[int, int]:
        lo, hi = 0, len(self.unique_first) - 1
        while lo < hi:  # the last unique whose first cluster is <= data_cluster
            mid = (lo + hi + 1) // 2
            if self.unique_first[mid] <= data_cluster:
                lo = mid
            else:
                hi = mid - 1
        return lo, data_cluster - self.unique_first[lo]
