import pytest

from rbd_restore.errors import UsageError
from rbd_restore.units import format_size, parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("65536", 65536), ("64K", 65536), ("4M", 4 << 20), ("4MiB", 4 << 20), ("8g", 8 << 30),
    ("1T", 1 << 40), ("2MB", 2 << 20),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text, "size") == value


@pytest.mark.parametrize("text", ["", "M", "-4M", "4X", "1.5G", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text, "size")


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(3 << 20) == "3.0 MiB"
