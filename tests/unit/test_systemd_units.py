"""contrib/systemd: every unit is valid for systemd 252 (Debian 12) and every service
is sandboxed (systemd-analyze security rates it "OK", exposure at most 2.0 of 10)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
INSTALLED_COMMAND = "/opt/rbd-restore/.venv/bin/rbd-restore"
SERVICES = sorted(p.name for p in UNITS.glob("*.service"))
MOST_EXPOSURE = 20  # systemd-analyze's threshold is in tenths


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing: scripts/install.sh installs Debian's systemd"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units with ExecStart pointed at this checkout's command, which verify checks."""
    here = tmp_path_factory.mktemp("units")
    command = str(Path(sys.executable).parent / "rbd-restore")
    for unit in UNITS.iterdir():
        (here / unit.name).write_text(unit.read_text().replace(INSTALLED_COMMAND, command))
    return here


def test_every_service_runs_the_installed_command_as_its_own_user() -> None:
    for name in SERVICES:
        text = (UNITS / name).read_text()
        assert f"ExecStart={INSTALLED_COMMAND} " in text, name
        assert "User=rbd-restore\n" in text and "UMask=0077\n" in text, name


@pytest.mark.parametrize("name", sorted(p.name for p in UNITS.iterdir()))
def test_unit_verifies(units: Path, name: str) -> None:
    result = analyze("verify", str(units / name))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("name", SERVICES)
def test_service_is_sandboxed(units: Path, name: str) -> None:
    result = analyze("security", "--offline=true", f"--threshold={MOST_EXPOSURE}",
                     str(units / name))
    assert result.returncode == 0, result.stdout.splitlines()[-1:]
