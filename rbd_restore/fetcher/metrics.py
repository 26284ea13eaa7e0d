"""The fetcher's Prometheus metrics, in a registry of the service's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10,
                   30)


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
        self.cache_evictions = Counter("rbd_restore_fetcher_cache_evictions",
                                       "Chunks evicted from the cache", registry=r)
        self.s3_gets = Counter("rbd_restore_fetcher_s3_gets", "Chunk GETs sent to S3",
                               registry=r)
        self.s3_bytes = Counter("rbd_restore_fetcher_s3_get_bytes",
                                "Compressed bytes received from S3", registry=r)
        self.s3_seconds = Histogram("rbd_restore_fetcher_s3_get_seconds",
                                    "S3 chunk GET latency", buckets=LATENCY_BUCKETS, registry=r)
        self.s3_retries = Counter("rbd_restore_fetcher_s3_retries",
                                  "Chunk fetches retried after an S3 error or bad checksum",
                                  registry=r)
        self.checksum_failures = Counter("rbd_restore_fetcher_checksum_failures",
                                         "Chunks that failed their SHA-256 check", registry=r)
        self.sessions_open = Gauge("rbd_restore_fetcher_sessions_open",
                                   "Sessions created and not closed", registry=r)
