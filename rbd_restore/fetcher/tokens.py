"""Session tokens: the backup reference, signed with HMAC-SHA256 under the fetcher's secret.

``token = base64url(payload) + "." + base64url(HMAC-SHA256(secret, base64url(payload)))``
with ``payload`` a compact JSON object ``{"b": backup_id, "s": session_id, "t": created,
"v": 1}`` (``created`` in Unix seconds). A token older than the fetcher's
``session_max_age`` is refused, which is what lets the closed-session list be
pruned of entries older than that.
Any replica holding the same secret verifies a token without shared state; the
secret itself is never part of a token, a URL or a log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass

from rbd_restore.repo.layout import BACKUP_ID, SESSION_ID

MAX_HISTORY = 16
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,1024}\.[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True)
class SessionClaim:
    session_id: str
    backup_id: str
    created: int
    rate_limit: int = 0  # bytes/s for relocation-sized reads; 0 = unlimited
    history: tuple[str, ...] = ()  # older backups exposed as snapshots, oldest first


def new_session_id() -> str:
    return secrets.token_hex(8)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())


def sign(secret: bytes, claim: SessionClaim) -> str:
    fields: dict[str, object] = {"v": 1, "s": claim.session_id, "b": claim.backup_id,
                                 "t": claim.created}
    if claim.rate_limit:
        fields["r"] = claim.rate_limit
    if claim.history:
        fields["h"] = list(claim.history)
    body = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    payload = _b64(body.encode())
    return f"{payload}.{_mac(secret, payload)}"


def verify(secret: bytes, token: str, now: float, max_age: float) -> SessionClaim | None:
    """The claim of a well-formed, unexpired token signed with ``secret``, else None."""
    if not _TOKEN.match(token):
        return None
    payload, mac = token.split(".")
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        return None
    try:
        body = json.loads(_unb64(payload))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or body.get("v") != 1:
        return None
    session_id, backup_id = body.get("s"), body.get("b")
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        return None
    if not isinstance(backup_id, str) or not BACKUP_ID.match(backup_id):
        return None
    created = body.get("t")
    if not isinstance(created, int) or isinstance(created, bool) or now - created > max_age:
        return None
    rate = body.get("r", 0)
    if not isinstance(rate, int) or isinstance(rate, bool) or rate < 0:
        return None
    history = body.get("h", [])
    if not isinstance(history, list) or len(history) > MAX_HISTORY or not all(
            isinstance(h, str) and BACKUP_ID.match(h) for h in history):
        return None
    return SessionClaim(session_id, backup_id, created, rate, tuple(history))
