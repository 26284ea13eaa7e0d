"""The backup repository in S3: chunks, manifests and locks (docs/format.md)."""
