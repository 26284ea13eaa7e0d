"""A client for the fetcher's control plane (used by the CLI and the job runner)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from rbd_restore.config import FetcherSettings, require
from rbd_restore.errors import NotFoundError, UnavailableError, UsageError, UserError
from rbd_restore.fetcher.tls import client_context


class ControlClient:
    def __init__(self, settings: FetcherSettings, timeout: float = 60) -> None:
        self.base = settings.control_base
        self.token = require(settings.control_token, "fetcher.control_token")
        self.timeout = timeout
        self.tls = client_context(self.base, settings.control_ca)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self.tls) as reply:
                return json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = str(json.loads(exc.read()).get("error", exc.reason))
            except (ValueError, AttributeError):
                message = str(exc.reason)
            kind: type[UserError] = {400: UsageError, 404: NotFoundError,
                                     503: UnavailableError}.get(exc.code, UserError)
            raise kind(f"fetcher: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise UnavailableError(f"fetcher control plane at {self.base} presented a "
                                       "certificate this host does not trust (set "
                                       "fetcher.control_ca to the CA that signed it)") from None
            raise UnavailableError(f"fetcher control plane at {self.base} is unreachable "
                                   f"({reason})") from None

    def create(self, backup_id: str, rate_limit_bytes_per_s: int = 0,
               history: int = 0, job_id: str = "", image: str = "") -> dict[str, Any]:
        """A session on the backup; ``job_id`` and ``image`` name the restore that
        holds it (shown to whoever tries to delete the backup meanwhile)."""
        body: dict[str, Any] = {"backup_id": backup_id}
        if job_id:
            body["job_id"] = job_id
            body["image"] = image
        if rate_limit_bytes_per_s:
            body["rate_limit_bytes_per_s"] = rate_limit_bytes_per_s
        if history:
            body["history"] = history
        result: dict[str, Any] = self._call("POST", "/v1/sessions", body)
        return result

    def list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/sessions")["sessions"]
        return result

    def close(self, session_id: str) -> None:
        self._call("DELETE", f"/v1/sessions/{session_id}")

    def prefetch(self, session_id: str) -> dict[str, Any]:
        """What this fetcher did for a session: the guest's reads, prefetch, relocation."""
        result: dict[str, Any] = self._call("GET", f"/v1/sessions/{session_id}/prefetch")
        return result
