"""latest.md: a run of one benchmark replaces its own sections and keeps the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common

MACHINE = {"cpu": "CPU", "cores": 2, "memory_gib": 1.0, "kernel": "k", "ceph": "ceph 16"}


def _run(results: Path, stamp: str, *reports: common.Report) -> Path:
    path = results / f"{stamp}.json"
    path.write_text(json.dumps({"created": stamp, "machine": MACHINE,
                                "reports": [r.as_json() for r in reports]}))
    return path


def test_a_single_benchmark_keeps_the_other_sections(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    boot = common.Report("Boot", [common.Row("local", "seconds", 5.0, "s")])
    crypto = common.Report("Encryption", [common.Row("backup", "throughput", 100.0, "MiB/s")])
    common.write_latest(_run(tmp_path, "20261201T000000Z", boot, crypto))
    newer = common.Report("Encryption", [common.Row("backup", "throughput", 200.0, "MiB/s")])
    common.write_latest(_run(tmp_path, "20261205T000000Z", newer))
    text = (tmp_path / "latest.md").read_text()
    assert text.count("### Boot") == 1 and text.count("### Encryption") == 1
    boot_section, crypto_section = text.split("### Boot")[1].split("### Encryption")
    assert "Run 20261201T000000Z" in boot_section and "5.00 s" in boot_section
    assert "Run 20261205T000000Z" in crypto_section and "200.00 MiB/s" in crypto_section
    assert "100.00" not in text
