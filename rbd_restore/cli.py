"""The ``rbd-restore`` command: a Typer app; one place maps errors to exit codes."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from rbd_restore import __version__, cli_backup, cli_jobs
from rbd_restore.cli_dev import dev_app
from rbd_restore.cli_fetcher import fetcher_app
from rbd_restore.cli_profile import profile_app
from rbd_restore.errors import UserError

log = logging.getLogger("rbd_restore")

app = typer.Typer(
    name="rbd-restore",
    help="Instant restore of Ceph RBD volumes from backups kept in S3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(dev_app, name="dev")
app.add_typer(fetcher_app, name="fetcher")
app.add_typer(profile_app, name="profile")
cli_backup.register(app)
cli_jobs.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rbd-restore {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[str | None, typer.Option(
        "--config", "-c", help="Configuration file (default: $RBD_RESTORE_CONFIG).",
    )] = None,
    log_level: Annotated[str, typer.Option(
        "--log-level", help="debug, info, warning or error.",
    )] = "warning",
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.",
    )] = False,
) -> None:
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise UserError(f"unknown log level {log_level!r}: use debug, info, warning or error")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = {"config": config}


def main() -> None:
    """Console-script entry point: one line and an exit code for every known failure."""
    try:
        app(prog_name="rbd-restore")
    except UserError as exc:
        log.debug("command failed", exc_info=True)
        typer.echo(f"rbd-restore: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("rbd-restore: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        log.debug("unexpected failure", exc_info=True)
        typer.echo(f"rbd-restore: internal error: {type(exc).__name__}: "
                   f"{' '.join(str(exc).split())} (run with --log-level debug for details)",
                   err=True)
        sys.exit(70)


if __name__ == "__main__":
    main()
