"""A throw-away CA and server certificate (openssl), and a TLS-terminating proxy, for
tests of the control plane's TLS and of verified https to S3 (RGW behind the proxy)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: Path, name: str = "ca") -> Certificates:
    """A CA and a certificate it signed for 127.0.0.1 and localhost (P-256, 2 days)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / f"{name}.pem", directory / f"{name}.key"
    cert, key = directory / f"{name}-server.pem", directory / f"{name}-server.key"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = ["openssl", "req", "-x509", *ec, "-days", "2", "-subj", f"/CN=rbd-restore {name}"]
    subprocess.run([*run, "-keyout", str(ca_key), "-out", str(ca)], check=True,
                   capture_output=True)
    csr = directory / f"{name}-server.csr"
    subprocess.run(["openssl", "req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", str(key),
                    "-out", str(csr)], check=True, capture_output=True)
    extensions = directory / f"{name}-server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey",
                    str(ca_key), "-CAcreateserial", "-days", "2", "-extfile", str(extensions),
                    "-out", str(cert)], check=True, capture_output=True)
    key.chmod(0o600)
    return Certificates(ca, cert, key)


class TlsProxy:
    """Accepts TLS on 127.0.0.1 and forwards the plain bytes to ``upstream``."""

    def __init__(self, upstream: tuple[str, int], certificates: Certificates) -> None:
        self.upstream = upstream
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certificates.cert), str(certificates.key))
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context),
            self.loop).result(10)
        self.server = server
        self.port = server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while block := await reader.read(1 << 16):
                writer.write(block)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
                writer.close()
