"""Daemons started by the embedded cluster, tracked by their own pid files.

Ceph's monitor and RGW remove their pid files on exit while the OSD and mgr
leave stale ones, so the launcher records each pid itself together with the
process start time from ``/proc``: a pid reused by an unrelated process is never
mistaken for a daemon of ours, and ``down`` signals exactly what ``up`` started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_ticks: int

    def render(self) -> str:
        return f"{self.pid} {self.start_ticks}\n"

    @classmethod
    def parse(cls, text: str) -> ProcessRecord | None:
        parts = text.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return None
        return cls(int(parts[0]), int(parts[1]))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def start_ticks_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_running(record: ProcessRecord) -> bool:
    _reap(record.pid)
    fields = _stat_fields(record.pid)
    if fields is None:
        return False
    state, start = fields[0], int(fields[19])
    return start == record.start_ticks and state not in ("Z", "X")


def _reap(pid: int) -> None:
    """Collect the exit status when the daemon is our own child (tests start them in-process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass(frozen=True)
class DaemonSpec:
    name: str
    argv: list[str]
    pidfile: Path
    outfile: Path

    def record(self) -> ProcessRecord | None:
        try:
            return ProcessRecord.parse(self.pidfile.read_text())
        except FileNotFoundError:
            return None

    def running(self) -> bool:
        record = self.record()
        return record is not None and is_running(record)

    def start(self) -> ProcessRecord:
        self.outfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.outfile, "ab") as out:
            # A new session keeps the daemon alive after the CLI that started it
            # exits, and away from the terminal's signals.
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        ticks = start_ticks_of(proc.pid)
        record = ProcessRecord(proc.pid, ticks if ticks is not None else -1)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.write_text(record.render())
        return record

    def exited_early(self) -> bool:
        """True when we started the daemon and it is gone already."""
        record = self.record()
        return record is not None and not is_running(record)


def stop_all(specs: list[DaemonSpec], timeout: float = 30.0) -> list[str]:
    """SIGTERM every running daemon, wait for all to exit, SIGKILL stragglers.

    Returns the names of the daemons that had to be killed.
    """
    running: dict[str, ProcessRecord] = {}
    for spec in specs:
        record = spec.record()
        if record is not None and is_running(record):
            running[spec.name] = record
            os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        running = {n: r for n, r in running.items() if is_running(r)}
        if running:
            time.sleep(0.05)
    for record in running.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGKILL)
    kill_deadline = time.monotonic() + 10
    while any(is_running(r) for r in running.values()) and time.monotonic() < kill_deadline:
        time.sleep(0.05)
    for spec in specs:
        spec.pidfile.unlink(missing_ok=True)
    return sorted(running)
