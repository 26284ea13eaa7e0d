"""HTTP byte ranges (RFC 9110, section 14), as the data plane answers them.

The header's last-byte-pos is inclusive; the returned :class:`ByteRange` is a
half-open ``[start, end)`` slice. Only a single range is served: a multi-range
request gets an explicit 416 rather than a multipart reply, which librbd and
QEMU never ask for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 9110 digits are ASCII (DIGIT = %x30-39); Python's \d would take any Unicode digit.
_SPEC = re.compile(r"^[ \t]*bytes[ \t]*=[ \t]*(.*)$", re.IGNORECASE | re.ASCII)
_ONE = re.compile(r"^[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*$", re.ASCII)
# A position of more digits than this lies beyond any file (2**64 has 20 digits), and
# int() refuses strings of over 4,300 digits: such numbers are "past any end".
MAX_DIGITS = 20
PAST_ANY_END = 1 << 64


def _position(digits: str) -> int:
    stripped = digits.lstrip("0") or "0"
    return PAST_ANY_END if len(stripped) > MAX_DIGITS else int(stripped)


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
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable("empty suffix range")
        return ByteRange(max(0, size - suffix), size)
    start = _position(first)
    if last and _position(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, file has {size} bytes")
    end = size if not last else min(size, _position(last) + 1)
    return ByteRange(start, end)
