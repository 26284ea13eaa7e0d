"""Fixtures of the tests against the real cluster: a CLI with a repository prefix of its
own, the volumes pool, and images removed after the test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.helpers import Cli


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def cli(cluster: devcluster.ClusterInfo, unique_name: str) -> Cli:
    return Cli(cluster, prefix=f"{unique_name}/", extra_env={})


@pytest.fixture
def ioctx(rados_cluster: Any) -> Iterator[Any]:
    with rados_cluster.open_ioctx("volumes") as handle:
        yield handle


@pytest.fixture
def images(ioctx: Any) -> Iterator[list[str]]:
    """Names registered here are removed (with their snapshots) after the test, aborting
    a migration a test left behind."""
    import rbd

    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(rbd.Error):
            rbd.RBD().migration_abort(ioctx, name)
        with contextlib.suppress(rbd.ImageBusy, rbd.InvalidArgument):
            remove_image(ioctx, name)
