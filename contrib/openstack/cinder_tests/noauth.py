"""A paste filter for the test bed's cinder-api: requests without a token get noauth's.

Cinder's noauth middleware answers a request that carries no token with a 204 and a
token to use, a login step. keystoneauth's version discovery of /v3/ (needed for
microversion 3.47, `openstack volume create --backup`) sends no token and takes the
204 for a broken endpoint; with Keystone the same request is authorised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

TOKEN = "admin:admin"


class DefaultToken:
    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ.setdefault("HTTP_X_AUTH_TOKEN", TOKEN)
        return self.app(environ, start_response)

    @classmethod
    def factory(cls, global_conf: dict[str, str], **local_conf: str) -> type[DefaultToken]:
        return cls
