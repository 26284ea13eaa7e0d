"""Instant-restore jobs: durable records in RADOS and the runner that finishes them."""
