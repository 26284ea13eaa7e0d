"""Staging image: import-only migration from a fetcher session URL (prepare, execute,
commit, abort). Lands with the instant-restore issue."""
