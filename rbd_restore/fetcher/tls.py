"""TLS for the control plane: the fetcher's server context and its clients' context.

The data plane stays plain HTTP: librbd 16.2.15 is its client, and
docs/security.md says what protects a session URL there.
"""

from __future__ import annotations

import ssl

from rbd_restore.errors import ConfigError


def server_context(cert: str, key: str) -> ssl.SSLContext | None:
    """The control plane's TLS context; None serves plain HTTP (a trusted network)."""
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"config fields fetcher.control_tls_cert/control_tls_key: cannot "
                          f"load {cert} with {key} ({exc})") from None
    return context


def client_context(base_url: str, ca_file: str) -> ssl.SSLContext | None:
    """A verifying context for an https control URL (the system's CAs, or ``ca_file``)."""
    if not base_url.startswith("https:"):
        return None
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"config field fetcher.control_ca: cannot load {ca_file} "
                          f"({exc})") from None
