"""Listening sockets handed over by systemd (socket activation, sd_listen_fds(3)).

Why the fetcher wants them: librbd 16.2.15 answers a dropped connection by
reconnecting and sending its unanswered requests again, but fails every
queued guest read if that reconnect is refused. A socket owned by systemd
(or any parent that keeps it open) outlives the fetcher process: while the
fetcher restarts, new connections wait in the socket's backlog instead of
being refused, and the guest sees a pause, not an I/O error.

Protocol: ``LISTEN_PID`` is this process's pid, ``LISTEN_FDS`` the number of
sockets, passed as fds 3, 4, ...; ``LISTEN_FDNAMES`` (colon-separated) may name
them ``data``, ``control`` or ``metrics``. Otherwise (no names, or systemd's
default of the unit's name for each) they are taken in that order. A listener
not passed is bound from the configuration as usual.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from rbd_restore.errors import UsageError

FIRST_FD = 3
LISTENERS = ("data", "control", "metrics")


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The listening sockets passed to this process, by listener name; the variables
    are removed so that child processes do not take them for their own."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        raise UsageError("LISTEN_FDS is not a number") from None
    names = [n for n in env.get("LISTEN_FDNAMES", "").split(":") if n]
    if not all(n in LISTENERS for n in names):
        names = []  # a unit's default names: the order decides
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(variable, None)
    if not 0 <= count <= len(LISTENERS):
        raise UsageError(f"LISTEN_FDS={count}: the fetcher takes at most {len(LISTENERS)} "
                         "sockets (data, control, metrics)")
    if names and len(names) != count:
        raise UsageError("LISTEN_FDNAMES names a different number of sockets than LISTEN_FDS")
    found: dict[str, socket.socket] = {}
    for index in range(count):
        name = names[index] if names else LISTENERS[index]
        if name in found:
            raise UsageError(f"LISTEN_FDNAMES names the {name} socket twice")
        sock = socket.socket(fileno=FIRST_FD + index)
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise UsageError(f"socket {name} passed by the service manager is not listening")
        sock.set_inheritable(False)
        sock.setblocking(False)
        found[name] = sock
    return found
