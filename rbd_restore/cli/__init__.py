"""The ``rbd-restore`` command: one module per command group (main.py holds the root)."""

from rbd_restore.cli.main import app, main

__all__ = ["app", "main"]
