"""TLS where rbd-restore's own clients speak: the fetcher's control plane (only TLS
when configured) and S3 over https verified against a configured CA bundle."""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest
import rbd

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli
from tests.support.tls import Certificates, TlsProxy, make_certificates

MiB = 1 << 20


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls-other"), "other")


@pytest.fixture
def image(rados_cluster: Any) -> Any:
    name = f"tls-{uuid.uuid4().hex[:8]}"
    with rados_cluster.open_ioctx("volumes") as ioctx:
        rbd.RBD().create(ioctx, name, 8 * MiB, old_format=False)
        with rbd.Image(ioctx, name) as img:
            img.write(random.Random(2).randbytes(2 * MiB), MiB)
        yield name
        remove_image(ioctx, name)


def test_control_plane_serves_only_tls_when_configured(
        cluster: devcluster.ClusterInfo, image: str, certificates: Certificates,
        other_ca: Certificates, tmp_path: Path) -> None:
    prefix = f"tls-{uuid.uuid4().hex[:8]}/"
    fetcher = FetcherProcess(cluster, tmp_path / "cache", prefix, {
        "RBD_RESTORE_FETCHER_CONTROL_TLS_CERT": str(certificates.cert),
        "RBD_RESTORE_FETCHER_CONTROL_TLS_KEY": str(certificates.key)})
    fetcher.start()
    try:
        trusting = {**fetcher.env_overrides, "RBD_RESTORE_FETCHER_CONTROL_CA":
                    str(certificates.ca)}
        cli = Cli(cluster, prefix, trusting)
        backup = cli.json("backup", f"volumes/{image}")["backup_id"]
        created = cli.json("fetcher", "session", "create", backup)
        assert created["session_id"] in {
            s["session_id"] for s in cli.json("fetcher", "session", "list")["sessions"]}

        # The data plane stays plain HTTP for librbd.
        parts = urllib.parse.urlsplit(created["url"])
        data = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        data.request("GET", parts.path, headers={"Range": "bytes=0-3"})
        assert data.getresponse().read() == b"QFI\xfb"
        data.close()

        # Plain HTTP on the control port gets no answer, only a TLS alert or a close.
        host, port = fetcher.env_overrides["RBD_RESTORE_FETCHER_CONTROL_LISTEN"].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as plain:
            plain.sendall(b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = plain.recv(4096)
            except ConnectionResetError:
                answer = b""
        assert not answer.startswith(b"HTTP/")

        # A client that does not trust the certificate says so in one line.
        for env in ({"RBD_RESTORE_FETCHER_CONTROL_CA": str(other_ca.ca)}, {}):
            line = Cli(cluster, prefix, {**fetcher.env_overrides, **env}).fails(
                "fetcher", "session", "list")
            assert "does not trust" in line and "fetcher.control_ca" in line
        assert cli.run("fetcher", "session", "close", created["session_id"]).returncode == 0
    finally:
        fetcher.stop()


def test_s3_over_https_is_verified_against_the_ca_bundle(
        cluster: devcluster.ClusterInfo, image: str, certificates: Certificates,
        other_ca: Certificates) -> None:
    endpoint = urllib.parse.urlsplit(cluster.s3_endpoint)
    prefix = f"tls-s3-{uuid.uuid4().hex[:8]}/"
    with TlsProxy((endpoint.hostname or "", endpoint.port or 80), certificates) as proxy:
        https = {"RBD_RESTORE_S3_ENDPOINT": f"https://127.0.0.1:{proxy.port}"}
        cli = Cli(cluster, prefix, {**https, "RBD_RESTORE_S3_CA_BUNDLE": str(certificates.ca)})
        backup = cli.json("backup", f"volumes/{image}")["backup_id"]
        assert cli.json("backups", "verify", backup, "--deep")["ok"]
        for env in ({"RBD_RESTORE_S3_CA_BUNDLE": str(other_ca.ca)}, {}):
            line = Cli(cluster, prefix, {**https, **env}).fails("backups", "list")
            assert "does not trust" in line and "s3.ca_bundle" in line


def test_data_plane_over_tls_reaches_librbd_with_correct_bytes(
        cluster: devcluster.ClusterInfo, rados_cluster: Any, image: str,
        certificates: Certificates, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opt-in (fetcher.data_tls): librbd's https stream verifies the certificate with
    OpenSSL's default paths, so the CA must be trusted where librbd runs."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificates.ca))
    prefix = f"tls-data-{uuid.uuid4().hex[:8]}/"
    fetcher = FetcherProcess(cluster, tmp_path / "cache", prefix, {
        "RBD_RESTORE_FETCHER_CONTROL_TLS_CERT": str(certificates.cert),
        "RBD_RESTORE_FETCHER_CONTROL_TLS_KEY": str(certificates.key),
        "RBD_RESTORE_FETCHER_CONTROL_CA": str(certificates.ca),
        "RBD_RESTORE_FETCHER_DATA_TLS": "1"})
    fetcher.start()
    target = f"tls-dst-{uuid.uuid4().hex[:8]}"
    with rados_cluster.open_ioctx("volumes") as ioctx:
        try:
            cli = Cli(cluster, prefix, fetcher.env_overrides)
            backup = cli.json("backup", f"volumes/{image}")["backup_id"]
            url = cli.json("fetcher", "session", "create", backup)["url"]
            assert url.startswith("https://")
            spec = json.dumps({"type": "qcow", "stream": {"type": "http", "url": url}})
            rbd.RBD().migration_prepare_import(spec, ioctx, target)
            with rbd.Image(ioctx, target) as staged, rbd.Image(ioctx, image) as source:
                assert staged.read(0, 8 * MiB) == source.read(0, 8 * MiB)
        finally:
            with contextlib.suppress(rbd.ImageNotFound, rbd.InvalidArgument):
                rbd.RBD().migration_abort(ioctx, target)
            fetcher.stop()
