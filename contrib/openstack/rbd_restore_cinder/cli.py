"""The rbd-restore command, run from inside Cinder's services.

Cinder's services are eventlet-patched (Zed) and rbd-restore's fetcher is
asyncio: they never share a process. The drivers run ``rbd-restore`` as a
command with its own configuration file and read its ``--json`` output.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from oslo_config import cfg

OPTS = [
    cfg.StrOpt("rbd_restore_command", default="rbd-restore",
               help="The rbd-restore command (in its own virtualenv, e.g. "
                    "/opt/rbd-restore/.venv/bin/rbd-restore)."),
    cfg.StrOpt("rbd_restore_config", default="/etc/rbd-restore/cinder.toml",
               help="rbd-restore's configuration for Cinder: the [ceph] user of the "
                    "backends, the backup bucket [s3], the fetcher's control plane."),
    cfg.IntOpt("rbd_restore_timeout", default=3600,
               help="Seconds a backup or restore command may run."),
]


class RbdRestoreError(Exception):
    """rbd-restore failed; ``code`` is its exit status, ``message`` its one line."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def run(configuration: Any, *args: str) -> Any:
    """Run ``rbd-restore ARGS --json`` and return its JSON output."""
    command = [configuration.rbd_restore_command, "--config", configuration.rbd_restore_config,
               *args, "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=configuration.rbd_restore_timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RbdRestoreError(-1, f"rbd-restore could not run: {exc}") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        message = lines[-1] if lines else f"exit {done.returncode}"
        raise RbdRestoreError(done.returncode, message.removeprefix("rbd-restore: error: "))
    return json.loads(done.stdout)


def command(configuration: Any, *args: str) -> list[str]:
    """The command line for a streaming call (no --json)."""
    return [configuration.rbd_restore_command, "--config", configuration.rbd_restore_config,
            *args]
