"""Machine-readable output shared by the commands."""

from __future__ import annotations

import json
from typing import Any

import typer


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))
