"""The test guest under QEMU (TCG) on an rbd: drive, stopped by its own pid."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def build_guest() -> tuple[Path, dict[str, Any]]:
    """Build (or reuse the cached) guest; return its directory and guest.json."""
    subprocess.run([sys.executable, str(REPO / "scripts" / "build-guest.py")], check=True,
                   capture_output=True)
    guest = REPO / ".cache" / "guest"
    return guest, json.loads((guest / "guest.json").read_text())


# no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can
# miss its ticks and panic ("IO-APIC + timer doesn't work!"); sixteen QEMUs at once
# on two cores did (bench.mass, 2026-12-05). Virtual machines' kernels skip it.
KERNEL_ARGS = "console=ttyS0 quiet panic=-1 no_timer_check"
STOP_SECONDS = 15


@dataclass
class Vm:
    guest: Path
    drive: str
    console: Path
    hold_seconds: int = 0
    writes: int = 0  # 1 MiB files the guest writes, syncs and reads back (guest init)
    write_every: int = 1
    qmp: Path | None = None  # a QMP socket, for block statistics (bench/timelines.py)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        append = KERNEL_ARGS
        if self.hold_seconds:
            append += f" rbdrestore.hold={self.hold_seconds}"
        if self.writes:
            append += f" rbdrestore.writes={self.writes} rbdrestore.every={self.write_every}"
        self.console.unlink(missing_ok=True)
        monitor = ["-qmp", f"unix:{self.qmp},server=on,wait=off"] if self.qmp else []
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-display", "none",
             "-no-reboot", "-monitor", "none", "-serial", f"file:{self.console}",
             "-kernel", str(self.guest / "vmlinuz"), "-initrd", str(self.guest / "initrd.img"),
             "-append", append,
             "-drive", f"file={self.drive},format=raw,if=virtio,cache=writeback", *monitor],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def output(self) -> str:
        try:
            return self.console.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str, timeout: float = 180) -> float:
        """Seconds until ``text`` appears on the console; fails if QEMU exits first."""
        started = time.monotonic()
        while text not in self.output():
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"QEMU exited before {text!r}: {err[-500:]}\n"
                                     f"{self.output()[-1500:]}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"no {text!r} after {timeout} s:\n{self.output()[-1500:]}")
            time.sleep(0.1)
        return time.monotonic() - started

    def wait_exit(self, timeout: float = 120) -> None:
        assert self.proc is not None
        self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """End QEMU by its pid: SIGTERM first, so it closes the image as it exits. A
        killed QEMU's watch lingers until the OSD times it out (30 s) and keeps the
        image busy for whoever removes it next; SIGKILL only if QEMU is still there
        after STOP_SECONDS (an image whose reads hang cannot close)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def sums(self, tag: str = "SUM") -> dict[str, str]:
        """``{file: sha256}`` the guest printed: ``SUM`` for its data set, ``WRITE-SUM``
        for files it wrote, ``READBACK-SUM`` for the same read back from the disk."""
        found = {}
        for line in self.output().splitlines():
            if line.startswith(f"RBD-RESTORE-GUEST-{tag} "):
                fields = line.split()
                if len(fields) == 3:
                    found[fields[2]] = fields[1]
                else:  # sha256sum printed nothing: the guest could not read the file
                    found[f"unreadable-{len(found)}"] = line
        return found
