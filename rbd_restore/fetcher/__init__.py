"""The fetcher daemon: backups served as qcow2 files over HTTP (docs/fetcher-api.md)."""
