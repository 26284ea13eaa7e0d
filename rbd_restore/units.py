"""Byte sizes and listen addresses as users write them (``4M``, ``8G``, ``65536``;
``127.0.0.1:8080``, ``[::1]:8080``)."""

from __future__ import annotations

from rbd_restore.errors import UsageError

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str, zero_ok: bool = False) -> int:
    """Parse a size with an optional binary suffix (K, M, G, T; ``KiB`` and ``KB`` too);
    ``zero_ok`` for settings where 0 turns something off."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = cleaned, ""
    if cleaned and cleaned[-1] in _SUFFIXES:
        number, suffix = cleaned[:-1], cleaned[-1]
    if not number.isdigit():
        raise UsageError(f"{what}: {text!r} is not a size (examples: 65536, 64K, 4M, 8G)")
    value = int(number) * _SUFFIXES[suffix]
    if value <= 0 and not zero_ok:
        raise UsageError(f"{what}: must be greater than zero")
    return value


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def split_hostport(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{what}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
