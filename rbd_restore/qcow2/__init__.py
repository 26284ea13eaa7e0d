"""A backup seen as a read-only qcow2 file, synthesized from its manifest (docs/qcow2-view.md)."""
