"""`rbd-restore status --watch` as an operator sees it: a real terminal (tmux, 80x24)
showing a live instant restore, redrawn as the guest reads, ended by Ctrl-C."""

from __future__ import annotations

import random
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rbd

from rbd_restore import devcluster
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli

MiB = 1 << 20


class Terminal:
    """A tmux server of its own (own socket), ended by its own server."""

    def __init__(self, name: str) -> None:
        self.socket = f"rr-{name}"

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    def start(self, command: list[str], env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()
                           if k.startswith("RBD_RESTORE_"))
        # The pane stays after the command ends so that its exit status can be read.
        self.tmux("new-session", "-d", "-x", "80", "-y", "24",
                  f"env {exports} {shlex.join(command)}; echo EXIT=$?; sleep 600")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def wait_for(self, condition: Callable[[str], bool], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if condition(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the terminal never showed it:\n{text}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       check=False, timeout=30)


@pytest.fixture
def terminal(unique_name: str) -> Iterator[Terminal]:
    term = Terminal(unique_name[-40:])
    yield term
    term.close()


def test_watch_shows_a_live_restore_in_80_columns(
        cluster: devcluster.ClusterInfo, ioctx: Any, images: list[str], tmp_path: Path,
        unique_name: str, terminal: Terminal) -> None:
    name, target = f"sw-src-{uuid.uuid4().hex[:8]}", f"sw-dst-{uuid.uuid4().hex[:8]}"
    images += [target, name]
    rbd.RBD().create(ioctx, name, 64 * MiB, old_format=False)
    with rbd.Image(ioctx, name) as image:
        image.write(random.Random(5).randbytes(16 * MiB), 8 * MiB)
    fetcher = FetcherProcess(cluster, tmp_path / "cache", f"{unique_name}/", {})
    fetcher.start()
    try:
        cli = Cli(cluster, f"{unique_name}/", fetcher.env_overrides)
        backup = cli.json("backup", f"volumes/{name}")["backup_id"]
        # The relocation waits: the job stays live while the "guest" reads.
        job = cli.json("restore", backup, f"volumes/{target}", "--mode", "instant",
                       "--relocate-after", "3600")["job_id"]
        terminal.start(cli.command("status", job, "--watch", "--interval", "0.3"), cli.env())
        first = terminal.wait_for(lambda s: job in s and "reads 0" in s)
        assert "waiting" in first and "relocation starts in" in first
        assert all(len(line) <= 80 for line in first.splitlines())

        # The guest's reads reach the fetcher; scattered, as a booting guest's are (reads
        # in file order would be taken for the relocation's).
        offsets = list(range(8 * MiB, 24 * MiB, MiB))
        random.Random(7).shuffle(offsets)
        with rbd.Image(ioctx, target) as image:
            for offset in offsets:
                image.read(offset, 4096)
        seen = cli.json("status", job)["jobs"][0]
        assert seen["guest_reads"] > 0 and seen["phase"] == "waiting"
        terminal.wait_for(lambda s: f"reads {seen['guest_reads']}" in s)

        terminal.tmux("send-keys", "C-c")
        terminal.wait_for(lambda s: "EXIT=0" in s, timeout=20)
        assert "Traceback" not in terminal.screen()
        cli.json("abort", job)
    finally:
        fetcher.stop()
