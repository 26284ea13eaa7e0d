"""The benchmark's pictures: they render from a report's series, and the ones
docs/performance.md shows are in docs/."""

from __future__ import annotations

import re
from pathlib import Path

from bench.timelines import BOOT_KINDS, draw

DOCS = Path(__file__).resolve().parents[2] / "docs"
PNG = b"\x89PNG\r\n\x1a\n"


def test_pictures_render_from_series(tmp_path: Path) -> None:
    boots = {kind: [(0.0, 0.0), (1.0 + i, 50.0 * (1 << 20))]
             for i, kind in enumerate(BOOT_KINDS)}
    markers = {kind: 1.0 + i for i, kind in enumerate(BOOT_KINDS)}
    relocations = {"ours": [(0.0, 0.0), (10.0, 1.0)], "ceph": [(0.0, 0.0), (11.0, 1.0)]}
    draw(boots, markers, relocations, 1024, out=tmp_path)
    for name in ("bench-boot-reads.png", "bench-relocation.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)


def test_performance_md_shows_pictures_that_exist() -> None:
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (DOCS / "performance.md").read_text())
    assert {"bench-boot-reads.png", "bench-relocation.png"} <= set(shown)
    for name in shown:
        assert (DOCS / name).read_bytes().startswith(PNG), name
