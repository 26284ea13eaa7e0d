"""`make faults`: a soak that injects faults into the real cluster, S3 and QEMU, and
checks every byte (docs/reliability.md)."""
