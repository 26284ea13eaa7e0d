"""HTTP byte ranges (RFC 9110, section 14), as the data plane answers them.

The header's last-byte-pos is inclusive; the returned :class:`ByteRange` is a
half-open ``[start, end)`` slice. Only a single range is served: a multi-range
request gets an explicit 416 rather than a multipart reply, which librbd and
QEMU never ask for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"^\s*bytes\s*=\s*(.*)$", re.IGNORECASE)
_ONE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


class RangeNotSatisfiable(ValueError):
    """Answer 416 with ``Content-Range: bytes */SIZE``."""


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one range asked for, clipped to ``size``; None means the whole file (200).

    A header that is not a byte-range (another unit, garbage) is ignored, as the
    RFC says; a valid range that does not overlap the file, or several ranges,
    raise :class:`RangeNotSatisfiable`.
    """
    if header is None:
        return None
    spec = _SPEC.match(header)
    if spec is None:
        return None
    parts = spec.group(1).split(",")
    if len(parts) != 1:
        raise RangeNotSatisfiable("multiple ranges are not served")
    one = _ONE.match(parts[0])
    if one is None or (not one.group(1) and not one.group(2)):
        return None
    first, last = one.group(1), one.group(2)
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable("empty suffix range")
        return ByteRange(max(0, size - suffix), size)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, file has {size} bytes")
    end = size if not last else min(size, int(last) + 1)
    return ByteRange(start, end)
