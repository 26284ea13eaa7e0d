"""Verified chunks close to the reader: the S3 source, the local cache, their metrics.

Below prefetch and the fetcher's HTTP layer, above the repository format.
"""
