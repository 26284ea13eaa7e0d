"""The fetcher daemon: data plane, control plane and metrics on three listeners.

Data plane (no authentication but the signed token in the path):
``HEAD``/``GET /v1/s/<token>/disk.qcow2``. Control plane (bearer token,
control.py): ``/v1/sessions``. Metrics: ``/metrics``. docs/fetcher-api.md is
the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rbd_restore.cache.chunk_cache import ChunkCache
from rbd_restore.cache.metrics import FetcherMetrics
from rbd_restore.cache.source import S3ChunkSource
from rbd_restore.config import Config, require
from rbd_restore.errors import (
    IntegrityError,
    NotFoundError,
    UnavailableError,
    UserError,
)
from rbd_restore.fetcher.activation import LISTENERS, inherited_sockets
from rbd_restore.fetcher.control import ADMIN, MONITOR, RUNNER, ControlPlane
from rbd_restore.fetcher.headers import SERVER, padded
from rbd_restore.fetcher.limits import (
    CONTROL_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_LINE_BYTES,
    SHORT_IDLE_SECONDS,
    TRUSTED_IDLE_SECONDS,
    ConnectionGuard,
    close_after_reply,
    raise_open_file_limit,
)
from rbd_restore.fetcher.pacing import DemandFirst, RatePacer
from rbd_restore.fetcher.ranges import ByteRange, RangeNotSatisfiable, parse_range
from rbd_restore.fetcher.sessions import SessionBook
from rbd_restore.fetcher.tls import server_context
from rbd_restore.fetcher.views import ViewCache
from rbd_restore.prefetch.coordinator import Prefetcher
from rbd_restore.prefetch.profiles import ProfileStore
from rbd_restore.prefetch.session import PrefetchSettings
from rbd_restore.qcow2.view import ChunkSlice, MetadataBytes, Segment
from rbd_restore.repo import keyring
from rbd_restore.repo.manifest import Manifest
from rbd_restore.units import parse_size, split_hostport

log = logging.getLogger(__name__)
T = TypeVar("T")

WINDOW = 64 << 20  # a reply is assembled at most this much at a time
CLOSED_REFRESH_SECONDS = 2.0
SESSIONS_TRACKED = 4096  # sessions whose pacing state is kept (LRU)
SWITCH_INTERVAL = 0.0005


@dataclass(frozen=True)
class Listeners:
    data: str
    control: str
    metrics: str


class FetcherService:
    def __init__(self, cfg: Config, cache_dir: Path | None = None,
                 cache_size: int | None = None, listen: str | None = None) -> None:
        fc = cfg.fetcher
        # Sockets from the service manager outlive this process: a restart is then a
        # pause for librbd, never a refused connection (activation.py).
        self.inherited = inherited_sockets()
        addresses = {name: _address(sock) for name, sock in self.inherited.items()}
        self.listeners = Listeners(addresses.get("data", listen or fc.listen),
                                   addresses.get("control", fc.control_listen),
                                   addresses.get("metrics", fc.metrics_listen))
        for name, value in (("fetcher.listen", self.listeners.data),
                            ("fetcher.control_listen", self.listeners.control),
                            ("fetcher.metrics_listen", self.listeners.metrics)):
            split_hostport(value, name)
        tokens = {require(fc.control_token, "fetcher.control_token").encode(): ADMIN}
        tokens.update({t.encode(): scopes for t, scopes in
                       ((fc.runner_token, RUNNER), (fc.monitor_token, MONITOR)) if t})
        secret = require(fc.secret, "fetcher.secret").encode()
        scheme = "https" if fc.data_tls else "http"
        data_url = (fc.public_url.rstrip("/") if fc.public_url
                    else f"{scheme}://{self.listeners.data}")
        self.metrics = FetcherMetrics()
        prefetch = PrefetchSettings.from_config(fc)
        self.executor = ThreadPoolExecutor(fc.s3_concurrency + 4, thread_name_prefix="fetcher")
        self.prefetch_executor = ThreadPoolExecutor(prefetch.slots, thread_name_prefix="prefetch")
        # Keys are read when first needed: the first backup may create the repository.
        self.repo = keyring.open_repository(cfg.s3, cfg.repository, fc.s3_concurrency + 8)
        self.repo.store.on_retry = self._count_s3_retry
        self.source = S3ChunkSource(self.repo, self.executor, self.metrics, fc.s3_stall_seconds)
        self.cache = ChunkCache(cache_dir or Path(fc.cache_dir),
                                cache_size or parse_size(fc.cache_size, "fetcher.cache_size"),
                                self.source.fetch, self.executor, self.metrics,
                                parse_size(fc.memory_cache, "fetcher.memory_cache",
                                           zero_ok=True),
                                self.prefetch_executor if fc.cache_relocated else None,
                                lambda: self.repo.codec.id_hashers())
        self.book = SessionBook(self.repo, secret, data_url,
                                fc.session_max_age_days * 86400.0)
        self.prefetch = Prefetcher(self.cache, ProfileStore(self.repo), self.metrics, prefetch,
                                   self.blocking, self.prefetch_executor)
        self.source.on_fetched = self.prefetch.fetched
        self.views = ViewCache(self.repo, self.blocking)
        self.pacer = RatePacer(SESSIONS_TRACKED)
        self.demand_first = DemandFirst(self._count_held)
        self.pad_headers = fc.pad_headers != 0
        self.padded_connections: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self.control_tls = server_context(fc.control_tls_cert, fc.control_tls_key)
        self.data_tls = fc.data_tls == 1
        self.guards = {name: ConnectionGuard(fc.untrusted_seconds, fc.max_untrusted_connections,
                                             idle_seconds=TRUSTED_IDLE_SECONDS if name == "data"
                                             else SHORT_IDLE_SECONDS)
                       for name in LISTENERS}
        # Behind a load balancer the replica that creates a session is seldom the one its
        # reads are sent to: that one primes it when librbd opens the image (HEAD).
        own_url = data_url == f"{scheme}://{self.listeners.data}"
        self.control = ControlPlane(tokens, self.book, self.prefetch, self.metrics, self.blocking,
                                    self._prime if own_url else None,
                                    self.guards["control"].trust)

    def _count_held(self, seconds: float) -> None:
        self.metrics.relocation_held.inc()
        self.metrics.relocation_held_seconds.inc(seconds)

    def _count_s3_retry(self, kind: str) -> None:
        self.metrics.s3_retries.inc()
        self.metrics.s3_errors.labels(kind).inc()

    async def blocking(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, call, *args)

    # Data plane

    async def handle_data(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        response = await self._data(request)
        self.metrics.request_served(request.method, response.status)
        if request.method == "GET" and response.status in (200, 206):
            seconds = time.monotonic() - started
            self.metrics.read_seconds.observe(seconds)
            reader = request.get("reader")
            if reader == "relocation":
                self.metrics.relocation_read_seconds.observe(seconds)
            elif reader == "guest":
                self.metrics.demand_read_seconds.observe(seconds)
        return response

    async def _data(self, request: web.Request) -> web.StreamResponse:
        parts = request.rel_url.raw_path.split("/")
        if len(parts) != 5 or parts[:3] != ["", "v1", "s"] or parts[4] != "disk.qcow2":
            return close_after_reply(_plain(404, "not found"))
        if request.method not in ("GET", "HEAD"):
            return close_after_reply(_plain(405, "only GET and HEAD", {"Allow": "GET, HEAD"}))
        claim = self.book.claim_of(parts[3])
        if claim is None or self.book.is_closed_cached(claim.session_id):
            return close_after_reply(_plain(404, "not found"))
        try:
            if self.book.aged(claim) and not await self._still_held(claim.session_id):
                return close_after_reply(_plain(404, "not found"))
        except UserError as exc:  # S3 unreachable: librbd retries a 503, not a 404
            return self._failed(exc, claim.session_id)
        self.guards["data"].trust(request)
        try:
            if request.method == "HEAD" and await self.blocking(
                    self.book.is_closed_in_bucket, claim.session_id):
                return _plain(404, "not found")
            view = await self.views.get(claim.backup_id, claim.history)
        except NotFoundError:
            return _plain(404, "not found")
        except UserError as exc:
            return self._failed(exc, claim.session_id)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "ETag": f'"{claim.backup_id}"', "Server": SERVER}
        if request.method == "HEAD":
            self.prefetch.session(claim.session_id, claim.created, view)  # primes a new one
            response = web.StreamResponse(status=200, headers=self._sized(
                request, 200, {**headers, "Content-Length": str(view.size)}))
            await response.prepare(request)
            await response.write_eof()
            return response
        try:
            wanted = parse_range(request.headers.get("Range"), view.size)
        except RangeNotSatisfiable:
            return _plain(416, "range not satisfiable", {"Content-Range": f"bytes */{view.size}"})
        status = 206 if wanted is not None else 200
        wanted = wanted or ByteRange(0, view.size)
        if status == 206:
            headers["Content-Range"] = wanted.content_range(view.size)
        first_end = min(wanted.end, wanted.start + WINDOW)
        segments = list(view.segments(wanted.start, first_end))
        prefetch = self.prefetch.session(claim.session_id, claim.created, view)
        if wanted.start == 0:  # the qcow2 header: librbd's first read on every image open
            prefetch.attach(request.transport)
        plan = self.prefetch.plan(prefetch, wanted.start, wanted.end, segments)
        request["reader"] = plan.reader
        states = [self.cache.state(piece.chunk_id) for piece in plan.slices]
        for state in states:
            self.metrics.chunk_read(plan.reader, state)
        if plan.reader == "guest" and plan.slices:
            prefetch.guest_reads += 1
            prefetch.guest_read_hits += all(state == "hit" for state in states)
        # The relocation reads a chunk's clusters once, one after the other: a chunk it
        # asks for before prefetch staged it is kept in memory like the staged ones.
        in_memory = plan.reader == "relocation"
        if in_memory:
            if claim.rate_limit:
                await self.pacer.pace(claim.session_id, claim.rate_limit, wanted.length)
            await self.demand_first.relocation_read(request.transport)
        with (self.demand_first.guest_read(request.transport) if plan.reader == "guest"
              else contextlib.nullcontext()):
            try:
                first = await self._assemble(segments, in_memory)
            except UserError as exc:
                return self._failed(exc, claim.session_id)
            response = web.StreamResponse(status=status, headers=self._sized(
                request, status, {**headers, "Content-Length": str(wanted.length)}))
            await response.prepare(request)
            await response.write(first)
        self.metrics.bytes_served.inc(len(first))
        position = first_end
        while position < wanted.end:  # only whole-file or huge ranges get here
            end = min(wanted.end, position + WINDOW)
            # A failure here drops the connection: the status line is already sent.
            block = await self._assemble(list(view.segments(position, end)))
            await response.write(block)
            self.metrics.bytes_served.inc(len(block))
            position = end
        await response.write_eof()
        self.prefetch.served(prefetch, plan)
        return response

    async def _still_held(self, session_id: str) -> bool:
        """A token past its age is served while an instant restore holds its session."""
        known = self.book.known_hold(session_id)
        if known is not None:
            return known
        return await self.blocking(self.book.held, session_id)

    def _sized(self, request: web.Request, status: int,
               headers: dict[str, str]) -> dict[str, str]:
        """Padded headers for the first successful reply on a connection (headers.py):
        librbd's receive buffer keeps the size it grew to for the connection's life."""
        connection = request.transport
        if not self.pad_headers or connection is None or connection in self.padded_connections:
            return headers
        self.padded_connections.add(connection)
        return padded(status, headers)

    async def _assemble(self, segments: list[Segment],
                        in_memory: bool = False) -> bytes | memoryview:
        if len(segments) == 1:  # a cluster of one chunk: sent from the chunk itself
            return await self._segment_bytes(segments[0], in_memory)
        pieces: list[Awaitable[bytes | memoryview]] = [self._segment_bytes(s, in_memory)
                                                       for s in segments]
        return b"".join(await asyncio.gather(*pieces))

    async def _segment_bytes(self, segment: Segment, in_memory: bool) -> bytes | memoryview:
        if isinstance(segment, MetadataBytes):
            return segment.data
        assert isinstance(segment, ChunkSlice)
        return await self.cache.read(segment.chunk_id, segment.chunk_length, segment.offset,
                                     segment.length, in_memory)

    def _failed(self, exc: UserError, session_id: str) -> web.Response:
        status = 503 if isinstance(exc, UnavailableError) else 500
        log.error("read failed", extra={"session": session_id, "status": status,
                                        "reason": exc.message})
        if not isinstance(exc, IntegrityError | UnavailableError):
            log.debug("unexpected failure", exc_info=exc)
        return _plain(status, "chunk unavailable" if status == 503 else "chunk failed "
                      "verification or is missing")

    async def _prime(self, session_id: str, created: int, manifest: Manifest,
                     history: tuple[str, ...]) -> None:
        """Prefetch for a new session, from the manifest its creation already read."""
        try:
            view = await self.views.get(manifest.backup_id, history, manifest)
        except UserError as exc:
            log.warning("session not primed", extra={"session": session_id,
                                                     "reason": exc.message})
            return
        self.prefetch.session(session_id, created, view)

    async def handle_health(self, request: web.Request) -> web.Response:
        """For load balancers' checks: the process accepts and answers on its data plane."""
        return _plain(200, "ok")

    async def handle_metrics(self, request: web.Request) -> web.Response:
        self.guards["metrics"].trust(request)
        self.metrics.cache_bytes.set(self.cache.total)
        self.metrics.memory_cache_bytes.set(self.cache.hot_total)
        self.metrics.cache_limit_bytes.set(self.cache.max_bytes)
        with contextlib.suppress(OSError):  # a vanished disk: the gauges keep their last
            disk = os.statvfs(self.cache.directory)
            self.metrics.cache_disk_free_bytes.set(disk.f_bavail * disk.f_frsize)
            self.metrics.cache_disk_size_bytes.set(disk.f_blocks * disk.f_frsize)
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # Serving

    def apps(self) -> tuple[web.Application, web.Application, web.Application]:
        data = web.Application()
        data.router.add_get("/v1/health", self.handle_health)
        data.router.add_route("*", "/{tail:.*}", self.handle_data)
        control = self.control.app(CONTROL_BODY_BYTES)
        metrics = web.Application()
        metrics.router.add_get("/metrics", self.handle_metrics)
        return data, control, metrics

    async def refresh_closed_forever(self) -> None:
        while True:
            with contextlib.suppress(UserError):
                await self.blocking(self.book.refresh_closed)
            await asyncio.sleep(CLOSED_REFRESH_SECONDS)

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        # Prefetch threads run Python (botocore) between their C calls; with the default
        # 5 ms switch interval the event loop, and every guest read, waits that long for
        # the GIL behind them.
        sys.setswitchinterval(SWITCH_INTERVAL)
        raise_open_file_limit()
        await self.blocking(self.repo.store.check_bucket)
        await self.blocking(self.book.refresh_closed)
        runners: list[web.AppRunner] = []
        guarding: list[asyncio.Future[None]] = []
        for app, name, listen in zip(self.apps(), LISTENERS,
                                     (self.listeners.data, self.listeners.control,
                                      self.listeners.metrics), strict=True):
            # Short idle time (and header deadline) for all; guard.trust lengthens it.
            runner = web.AppRunner(app, access_log=None, keepalive_timeout=SHORT_IDLE_SECONDS,
                                   max_line_size=MAX_LINE_BYTES,
                                   max_field_size=MAX_HEADER_BYTES, handle_signals=False)
            await runner.setup()
            assert runner.server is not None
            guarding.append(asyncio.ensure_future(self.guards[name].run(runner.server)))
            site: web.BaseSite
            tls = self.control_tls if name == "control" or (
                name == "data" and self.data_tls) else None
            if name in self.inherited:
                site = web.SockSite(runner, self.inherited[name], ssl_context=tls)
            else:
                host, port = split_hostport(listen, "listen")
                site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls)
            try:
                await site.start()
            except OSError as exc:
                raise UnavailableError(f"cannot listen on {listen}: {exc.strerror}") from None
            runners.append(runner)
        refresher = asyncio.ensure_future(self.refresh_closed_forever())
        self.prefetch.start()
        log.info("fetcher serving", extra={"data": self.listeners.data,
                                           "control": self.listeners.control,
                                           "metrics": self.listeners.metrics})
        if ready:
            ready()
        try:
            await asyncio.Event().wait()
        finally:
            refresher.cancel()
            for task in guarding:
                task.cancel()
            await self.prefetch.stop()
            for runner in runners:
                await runner.cleanup()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.prefetch_executor.shutdown(wait=False, cancel_futures=True)


def _address(sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _plain(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=headers)
