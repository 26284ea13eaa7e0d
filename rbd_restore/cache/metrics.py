"""The fetcher's Prometheus metrics, in a registry of the service's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Label values known in advance are exported from the start at zero, so that rate() and
# alert rules see a series before the first event (an S3 error, a cache miss).
S3_ERROR_KINDS = ("throttled", "server", "connection", "damaged")
METHODS = ("GET", "HEAD")  # any other method is "other": HTTP lets a client make up any
READERS = ("guest", "relocation")
READ_RESULTS = ("hit", "wait", "miss")
PREFETCH_CLASSES = ("profile", "relocation")
PRIMED_BY = ("profile", "heuristic")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1,
                   0.2, 0.5, 1, 2, 5, 10, 30)


class FetcherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rbd_restore_fetcher_requests", "Data-plane requests",
                                ["method", "status"], registry=r)
        self.bytes_served = Counter("rbd_restore_fetcher_served_bytes",
                                    "Body bytes sent on the data plane", registry=r)
        self.read_seconds = Histogram("rbd_restore_fetcher_read_seconds",
                                      "Data-plane GET latency as the client sees it, from "
                                      "request to last byte", buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("rbd_restore_fetcher_cache_hits", "Chunk reads from the cache",
                                  registry=r)
        self.cache_misses = Counter("rbd_restore_fetcher_cache_misses",
                                    "Chunk reads that had to go to S3", registry=r)
        self.cache_bytes = Gauge("rbd_restore_fetcher_cache_bytes", "Bytes in the chunk cache",
                                 registry=r)
        self.cache_limit_bytes = Gauge("rbd_restore_fetcher_cache_limit_bytes",
                                       "The chunk cache's configured size", registry=r)
        self.cache_disk_free_bytes = Gauge("rbd_restore_fetcher_cache_disk_free_bytes",
                                           "Free bytes on the cache directory's filesystem, "
                                           "for this user", registry=r)
        self.cache_disk_size_bytes = Gauge("rbd_restore_fetcher_cache_disk_size_bytes",
                                           "Size of the cache directory's filesystem",
                                           registry=r)
        self.memory_cache_bytes = Gauge("rbd_restore_fetcher_memory_cache_bytes",
                                        "Bytes of relocation chunks staged in memory",
                                        registry=r)
        self.cache_write_errors = Counter("rbd_restore_fetcher_cache_write_errors",
                                          "Chunks served but not cached: the cache disk "
                                          "refused the write (full or failing)", registry=r)
        self.cache_evictions = Counter("rbd_restore_fetcher_cache_evictions",
                                       "Chunks evicted from the cache", registry=r)
        self.s3_gets = Counter("rbd_restore_fetcher_s3_gets", "Chunk GETs sent to S3",
                               registry=r)
        self.s3_bytes = Counter("rbd_restore_fetcher_s3_get_bytes",
                                "Compressed bytes received from S3", registry=r)
        self.s3_seconds = Histogram("rbd_restore_fetcher_s3_get_seconds",
                                    "S3 chunk GET latency", buckets=LATENCY_BUCKETS, registry=r)
        self.s3_retries = Counter("rbd_restore_fetcher_s3_retries",
                                  "S3 requests and chunk fetches retried (errors, bad "
                                  "checksums)", registry=r)
        self.s3_errors = Counter("rbd_restore_fetcher_s3_errors",
                                 "S3 requests that failed and were retried, by kind: "
                                 "throttled (503 SlowDown), server (5xx), connection "
                                 "(refused, reset, stalled, cut off) or damaged (did not "
                                 "match its checksum)", ["kind"], registry=r)
        self.checksum_failures = Counter("rbd_restore_fetcher_checksum_failures",
                                         "Chunks that failed their SHA-256 check", registry=r)
        self.reads = Counter("rbd_restore_fetcher_chunk_reads",
                             "Chunk pieces read by clients, by reader (guest or relocation) and "
                             "whether the chunk was cached (hit), being fetched (wait) or not "
                             "(miss)", ["reader", "result"], registry=r)
        self.demand_read_seconds = Histogram(
            "rbd_restore_fetcher_demand_read_seconds",
            "Guest data read latency, request to last byte: what the VM feels (qcow2 "
            "metadata reads at image open are left out)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.relocation_read_seconds = Histogram(
            "rbd_restore_fetcher_relocation_read_seconds",
            "Relocation read latency, request to last byte", buckets=LATENCY_BUCKETS,
            registry=r)
        self.relocation_held = Counter(
            "rbd_restore_fetcher_relocation_reads_held",
            "Relocation reads held back while guests read (fetcher/pacing.py)", registry=r)
        self.relocation_held_seconds = Counter(
            "rbd_restore_fetcher_relocation_held_seconds",
            "Seconds those reads were held, added up", registry=r)
        self.prefetch_bytes = Counter("rbd_restore_fetcher_prefetch_bytes",
                                      "Bytes staged by prefetch, by class", ["class"],
                                      registry=r)
        self.prefetch_used_bytes = Counter("rbd_restore_fetcher_prefetch_used_bytes",
                                           "Prefetched bytes a client then read", ["class"],
                                           registry=r)
        self.prefetch_wasted_bytes = Counter("rbd_restore_fetcher_prefetch_wasted_bytes",
                                             "Prefetched bytes evicted before any read",
                                             ["class"], registry=r)
        self.prefetch_queued = Gauge("rbd_restore_fetcher_prefetch_queued",
                                     "Chunks waiting in the prefetch queue", ["class"],
                                     registry=r)
        self.profile_sessions = Counter("rbd_restore_fetcher_profile_sessions",
                                        "Sessions opened, by how they were primed: profile "
                                        "or heuristic", ["primed_by"], registry=r)
        self.profile_chunks = Counter("rbd_restore_fetcher_profile_chunks",
                                      "Chunks queued from boot profiles", registry=r)
        self.demand_chunks = Counter("rbd_restore_fetcher_demand_chunks",
                                     "Distinct chunks each session's guest read", registry=r)
        self.profile_covered_chunks = Counter(
            "rbd_restore_fetcher_profile_covered_chunks",
            "Of those, chunks the session's profile listed (coverage = this / demand_chunks)",
            registry=r)
        self.profiles_saved = Counter("rbd_restore_fetcher_profiles_saved",
                                      "Boot profiles merged and saved to the bucket", registry=r)
        self.relocation_window = Gauge("rbd_restore_fetcher_relocation_window_chunks",
                                       "Chunks kept staged ahead of the relocation front",
                                       registry=r)
        self.sessions_open = Gauge("rbd_restore_fetcher_sessions_open",
                                   "Sessions created and not closed", registry=r)
        for kind in S3_ERROR_KINDS:
            self.s3_errors.labels(kind)
        for reader in READERS:
            for result in READ_RESULTS:
                self.reads.labels(reader, result)
        for klass in PREFETCH_CLASSES:
            for family in (self.prefetch_bytes, self.prefetch_used_bytes,
                           self.prefetch_wasted_bytes, self.prefetch_queued):
                family.labels(klass)
        for primed_by in PRIMED_BY:
            self.profile_sessions.labels(primed_by)
        # labels() checks its arguments and takes a lock on every call; the data plane
        # counts two labelled series per request, so each is looked up once.
        self._children: dict[tuple[str, ...], Counter] = {}

    def request_served(self, method: str, status: int) -> None:
        label = method if method in METHODS else "other"
        self._labelled(self.requests, "requests", label, str(status)).inc()

    def chunk_read(self, reader: str, result: str) -> None:
        self._labelled(self.reads, "reads", reader, result).inc()

    def _labelled(self, family: Counter, name: str, *values: str) -> Counter:
        key = (name, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child
