"""Errors a user may see, and the one place that maps them to exit codes.

Every failure a user can cause or meet (bad input, a cluster or S3 endpoint that
is down, a corrupted object) is raised as a subclass of :class:`UserError` with a
one-line message. The CLI prints that line and exits with the class's code; the
traceback goes to the debug log only.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A failure explained to the user in one line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller passed in.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(UserError):
    """The command line or an argument is wrong."""

    exit_code = 2


class ConfigError(UserError):
    """The configuration file is missing, malformed or incomplete."""

    exit_code = 3


class NotFoundError(UserError):
    """A pool, image, backup or other named thing does not exist."""

    exit_code = 4


class AlreadyExistsError(UserError):
    """The target exists and the command refuses to overwrite it."""

    exit_code = 5


class UnavailableError(UserError):
    """A service (Ceph, S3, the fetcher) could not be reached, after retries."""

    exit_code = 6


class IntegrityError(UserError):
    """Stored data failed verification (checksum, truncated or tampered object)."""

    exit_code = 7


class UnknownKey(IntegrityError):
    """An object under a data key the configured credential does not open (yet: a key
    added since the repository was opened is found by reading the keys again)."""


class DevClusterError(UserError):
    """The embedded development cluster could not be started or stopped."""

    exit_code = 8


class PermissionDenied(UserError):
    """Ceph refused an operation to this Ceph user (its cephx capabilities)."""

    exit_code = 1


def ceph_permission_error(exc: BaseException, what: str = "") -> PermissionDenied | None:
    """The one-line error for librados/librbd's EPERM/EACCES, else None: those come from
    a cephx user without the capabilities docs/security.md gives its role."""
    if type(exc).__module__ not in ("rados", "rbd"):
        return None
    if getattr(exc, "errno", None) not in (errno.EPERM, errno.EACCES):
        return None
    target = f" on {what}" if what else ""
    return PermissionDenied(f"Ceph denied this user access{target} (its cephx capabilities "
                            "need 'profile rbd pool=POOL' for every pool it backs up or "
                            "restores into; docs/security.md)")
