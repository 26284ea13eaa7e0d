"""The fetcher's allocator settings: glibc takes them, and a 4 MiB buffer freed and
allocated again no longer costs page faults."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import resource, sys
from rbd_restore.allocator import reuse_large_buffers
if sys.argv[1] == "tuned":
    assert reuse_large_buffers()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # let glibc settle whatever it adapts
    bytearray(b"x" * (4 << 20))
before = faults()
for _ in range(64):
    bytearray(b"x" * (4 << 20))
print(faults() - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def test_freed_large_buffers_are_reused_without_page_faults() -> None:
    # 64 rounds of two 4 MiB buffers: 2 x 64 x 1024 faults when each is a fresh mapping.
    assert _faults("default") > 10_000  # what the settings are for, on this glibc
    assert _faults("tuned") < 200
