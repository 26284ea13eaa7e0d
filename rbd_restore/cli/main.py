"""The ``rbd-restore`` command: a Typer app; one place maps errors to exit codes."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from rbd_restore import __version__
from rbd_restore.cli import backup as cli_backup
from rbd_restore.cli import jobs as cli_jobs
from rbd_restore.cli import keys as cli_keys
from rbd_restore.cli.cinder import cinder_app
from rbd_restore.cli.dev import dev_app
from rbd_restore.cli.fetcher import fetcher_app
from rbd_restore.cli.profile import profile_app
from rbd_restore.cli.retention import forget
from rbd_restore.errors import UserError, ceph_permission_error

log = logging.getLogger("rbd_restore")

app = typer.Typer(
    name="rbd-restore",
    help="Instant restore of Ceph RBD volumes from backups kept in S3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(cinder_app, name="cinder")
app.add_typer(dev_app, name="dev")
app.add_typer(fetcher_app, name="fetcher")
app.add_typer(profile_app, name="profile")
cli_backup.register(app)
app.command("forget")(forget)
cli_jobs.register(app)
cli_keys.register(app)


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


# The command-line parser's own errors (unknown option, missing argument). Typer
# vendors click in recent releases and uses the click package in older ones: find the
# base class through the one Typer exports rather than importing either by name.
_ParserError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """Console-script entry point: one line and an exit code for every known failure."""
    try:
        # Not standalone: Typer would draw a framed, multi-line box for a usage error.
        outcome = app(prog_name="rbd-restore", standalone_mode=False)
    except typer.Abort:
        typer.echo("rbd-restore: aborted", err=True)
        sys.exit(1)
    except _ParserError as exc:
        _usage_error(exc)
    except UserError as exc:
        log.debug("command failed", exc_info=True)
        typer.echo(f"rbd-restore: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("rbd-restore: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        log.debug("unexpected failure", exc_info=True)
        denied = ceph_permission_error(exc)
        if denied is not None:
            typer.echo(f"rbd-restore: error: {denied.message}", err=True)
            sys.exit(denied.exit_code)
        typer.echo(f"rbd-restore: internal error: {type(exc).__name__}: "
                   f"{' '.join(str(exc).split())} (run with --log-level debug for details)",
                   err=True)
        sys.exit(70)
    # --help, --version and typer.Exit come back as an exit code; commands return None.
    sys.exit(outcome if isinstance(outcome, int) else 0)


def _usage_error(exc: Exception) -> None:
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help is the answer
        exc.show()  # type: ignore[attr-defined]
        sys.exit(2)
    message = exc.format_message()  # type: ignore[attr-defined]
    context = getattr(exc, "ctx", None)
    command = context.command_path if context is not None else "rbd-restore"
    typer.echo(f"rbd-restore: error: {' '.join(message.split()).rstrip('.')} "
               f"(see '{command} --help')", err=True)
    sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
