"""The fetcher's control plane: create, list and close sessions (bearer tokens).

``/v1/sessions`` as docs/fetcher-api.md specifies. A new session is handed to
``prime`` at once, so the cache starts filling before any client opens the
image (unless session URLs name a load balancer: the replica serving the
reads primes it then). Each bearer token has a role: the control token may do everything; a
runner token may close sessions and read their state (a job runner never opens
one); a monitor token may only read, and never sees a session's URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from rbd_restore.cache.metrics import FetcherMetrics
from rbd_restore.errors import NotFoundError, UnavailableError, UsageError, UserError
from rbd_restore.fetcher.sessions import SessionBook
from rbd_restore.prefetch.coordinator import Prefetcher
from rbd_restore.prefetch.profiles import ProfileStore, VolumeKey
from rbd_restore.repo.locks import RepositoryBusy
from rbd_restore.repo.manifest import Manifest

log = logging.getLogger(__name__)
BOOT_SET_MAX = 4096  # chunks: 16 GiB of 4 MiB chunks, far more than any boot reads

Blocking = Callable[..., Awaitable[Any]]
Prime = Callable[[str, int, Manifest, tuple[str, ...]], Awaitable[None]]
"""(session id, created, the backup's manifest, history) -> cache primed for it."""


ADMIN = frozenset({"create", "close", "read", "urls"})
RUNNER = frozenset({"close", "read"})
MONITOR = frozenset({"read"})
NEEDED = {"POST": "create", "DELETE": "close", "GET": "read"}


class ControlPlane:
    def __init__(self, tokens: dict[bytes, frozenset[str]], book: SessionBook, prefetch: Prefetcher,
                 metrics: FetcherMetrics, blocking: Blocking, prime: Prime | None,
                 trust: Callable[[web.Request], None] = lambda _request: None) -> None:
        self.tokens = tokens
        self.book = book
        self.prefetch = prefetch
        self.metrics = metrics
        self.blocking = blocking
        self.prime = prime
        self.trust = trust
        self.background: set[asyncio.Task[None]] = set()

    def app(self, max_body_bytes: int = 1 << 20) -> web.Application:
        control = web.Application(middlewares=[self.guard], client_max_size=max_body_bytes)
        control.router.add_post("/v1/sessions", self.create_session)
        control.router.add_get("/v1/sessions", self.list_sessions)
        control.router.add_delete("/v1/sessions/{session_id}", self.close_session)
        control.router.add_get("/v1/sessions/{session_id}/prefetch", self.session_prefetch)
        return control

    @web.middleware
    async def guard(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        allowed: frozenset[str] = frozenset()
        for token, scopes in self.tokens.items():  # every token compared: constant time
            if hmac.compare_digest(given, b"Bearer " + token):
                allowed = scopes
        if not allowed:
            response = web.json_response({"error": "missing or wrong bearer token"},
                                         status=401)
            response.force_close()
            return response
        self.trust(request)
        request["scopes"] = allowed
        needed = NEEDED.get(request.method, "create")
        if needed not in allowed:
            return web.json_response({"error": f"this token may not {needed} sessions "
                                      "(it belongs to a narrower role)"}, status=403)
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except UserError as exc:
            status = {UsageError: 400, NotFoundError: 404, UnavailableError: 503,
                      RepositoryBusy: 409}.get(
                type(exc), 404 if isinstance(exc, NotFoundError) else 500)
            return web.json_response({"error": exc.message}, status=status)

    async def create_session(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise UsageError("body must be JSON: {\"backup_id\": ...}") from None
        backup_id = body.get("backup_id") if isinstance(body, dict) else None
        if not isinstance(backup_id, str):
            raise UsageError("body must be JSON: {\"backup_id\": ...}")
        numbers = {}
        for field in ("rate_limit_bytes_per_s", "history"):
            value = body.get(field, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"{field} must be a whole number >= 0")
            numbers[field] = value
        holder = {}
        for field in ("job_id", "image"):
            value = body.get(field, "")
            if not isinstance(value, str):
                raise UsageError(f"{field} must be a string")
            holder[field] = value
        manifest = await self.blocking(self.book.repo.load_manifest, backup_id)
        # The boot profile is read beside the session's own S3 round trips: a restore
        # waits for both before it is ready.
        (session, sizes, manifest), boot = await asyncio.gather(
            self.blocking(self.book.create, backup_id, numbers["rate_limit_bytes_per_s"],
                          numbers["history"], holder["job_id"], holder["image"], manifest),
            self.blocking(self._boot_offsets, manifest))
        log.info("session created", extra={"session": session.session_id,
                                            "backup": backup_id})
        if self.prime is not None:
            self._spawn(self.prime(session.session_id, session.created, manifest,
                                   tuple(sizes["snapshots"])))
        self._spawn(self._count_sessions())
        return web.json_response({**session.as_json(), **sizes, "boot_offsets": boot},
                                 status=201)

    def _boot_offsets(self, manifest: Manifest) -> list[int]:
        """The volume's boot profile as disk offsets, first read first: what the restore
        copies into the image before a VM opens it. Blocks (S3)."""
        try:
            profile = ProfileStore(self.book.repo).load(VolumeKey.of(manifest))
        except UserError as exc:  # a damaged or unreadable profile: restore without one
            log.warning("no boot set", extra={"backup": manifest.backup_id,
                                              "reason": exc.message})
            return []
        if profile is None:
            return []
        return [chunk * profile.chunk_size for chunk in profile.chunks()[:BOOT_SET_MAX]]

    async def list_sessions(self, request: web.Request) -> web.Response:
        sessions = await self.blocking(self.book.list)
        self.metrics.sessions_open.set(len(sessions))
        listed = [s.as_json() for s in sessions]
        if "urls" not in request["scopes"]:  # a URL opens its backup: not for readers
            for entry in listed:
                del entry["url"]
        return web.json_response({"sessions": listed})

    async def close_session(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        await self.blocking(self.book.close, session_id)
        log.info("session closed", extra={"session": session_id})
        await self.prefetch.close(session_id)  # the boot's profile is saved before the reply
        self._spawn(self._count_sessions())
        return web.json_response({"closed": session_id})

    async def session_prefetch(self, request: web.Request) -> web.Response:
        described = self.prefetch.describe(request.match_info["session_id"])
        if described is None:
            raise NotFoundError("no prefetch state for this session on this fetcher")
        return web.json_response(described)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _count_sessions(self) -> None:
        """For the gauge only: off the reply's path (a listing of the bucket)."""
        with contextlib.suppress(UserError):
            self.metrics.sessions_open.set(await self.blocking(self.book.count_open))
