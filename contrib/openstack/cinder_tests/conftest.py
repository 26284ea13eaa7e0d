"""Fixtures of the tests that import Cinder: they run in a pytest process of their own
(Cinder's eventlet never meets rbd-restore's fetcher), in Cinder's environment, with
rbd-restore itself run as a command by the project's interpreter
(RBD_RESTORE_PYTHON)."""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))  # tests.support
PROJECT_PYTHON = REPO / ".venv" / "bin" / "python"
# Before tests.support reads it: rbd-restore runs with the project's interpreter.
os.environ.setdefault("RBD_RESTORE_PYTHON", str(PROJECT_PYTHON))

from rbd_restore import devcluster  # noqa: E402
from tests.support.fetcher_proc import FetcherProcess  # noqa: E402
from tests.support.helpers import Cli  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "services: runs the Cinder services and RabbitMQ")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devcluster.ClusterInfo]:
    reuse = os.environ.get("RBD_RESTORE_TEST_CLUSTER_DIR")
    root = Path(reuse) if reuse else tmp_path_factory.mktemp("cluster") / "c"
    info = devcluster.up(root, osd_bytes=6 << 30).info
    try:
        yield info
    finally:
        if not reuse:
            devcluster.down(root, purge=True)


@pytest.fixture(scope="session")
def prefix() -> str:
    return f"cinder-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="session")
def fetcher(cluster: devcluster.ClusterInfo, prefix: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[FetcherProcess]:
    proc = FetcherProcess(cluster, tmp_path_factory.mktemp("fetcher") / "cache", prefix)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def rbd_restore_config(cluster: devcluster.ClusterInfo, prefix: str, fetcher: FetcherProcess,
                       tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The configuration Cinder's drivers give the rbd-restore command: the cluster's,
    with this session's repository prefix and fetcher."""
    text = Path(cluster.config).read_text()
    text = text.replace('prefix = ""', f'prefix = "{prefix}"')
    overrides = fetcher.env_overrides
    text = re.sub(r'(?m)^control_listen = "[^"]*"',
                  f'control_listen = "{overrides["RBD_RESTORE_FETCHER_CONTROL_LISTEN"]}"', text)
    text = re.sub(r'(?m)^listen = "[^"]*"',
                  f'listen = "{overrides["RBD_RESTORE_FETCHER_LISTEN"]}"', text)
    path = tmp_path_factory.mktemp("rbd-restore") / "cinder.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def cli(cluster: devcluster.ClusterInfo, prefix: str, fetcher: FetcherProcess) -> Cli:
    return Cli(cluster, prefix, fetcher.env_overrides)


@pytest.fixture(scope="session")
def rados_cluster(cluster: devcluster.ClusterInfo) -> Iterator[Any]:
    import rados

    handle = rados.Rados(conffile=str(cluster.ceph_conf), rados_id="admin",
                         conf={"keyring": str(cluster.keyring)})
    handle.connect(timeout=30)
    yield handle
    handle.shutdown()


@pytest.fixture(scope="session")
def cinder(cluster: devcluster.ClusterInfo, rbd_restore_config: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """RabbitMQ, MariaDB and the four Cinder services, started once for the session's
    tests."""
    from cinder_tests.services import Cinder, MariaDB, RabbitMQ

    root = tmp_path_factory.mktemp("openstack")
    rabbit = RabbitMQ(root / "rabbit")
    database = MariaDB(root / "mariadb")
    services = Cinder(root / "cinder", cluster, rabbit, database, rbd_restore_config,
                      str(REPO / ".venv" / "bin" / "rbd-restore"))
    try:
        rabbit.start()
        database.start()
        services.start()
        services.clouds_yaml(root / "clouds.yaml")
        yield services
    finally:
        services.stop()
        database.stop()
        rabbit.stop()
