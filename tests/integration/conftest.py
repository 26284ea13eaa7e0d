"""Fixtures of the tests against the real cluster: a CLI with a repository prefix of its
own, the volumes pool, and images removed after the test."""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.helpers import Cli, export_digest, mon_command, new_image

MiB = 1 << 20


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


@pytest.fixture
def scratch_pool(rados_cluster: Any) -> Iterator[str]:
    """An RBD pool of the test's own, deleted with everything in it after the test."""
    import rbd

    name = f"scratch-{uuid.uuid4().hex[:8]}"
    mon_command(rados_cluster, "osd pool create", pool=name, pg_num=8, pgp_num=8)
    with rados_cluster.open_ioctx(name) as ioctx:
        rbd.RBD().pool_init(ioctx, False)
    yield name
    mon_command(rados_cluster, "osd pool delete", pool=name, pool2=name,
                yes_i_really_really_mean_it=True)


@pytest.fixture
def source(cli: Cli, ioctx: Any, images: list[str],
           cluster: devcluster.ClusterInfo) -> dict[str, str]:
    """A 24 MiB image in volumes with 20 MiB of random data, backed up: its name, the
    backup id and the digest of its content."""
    import rbd

    name = new_image(ioctx, images, 24 * MiB)
    with rbd.Image(ioctx, name) as image:
        image.write(random.Random(name).randbytes(20 * MiB), 2 * MiB)
    return {"name": name, "backup_id": cli.json("backup", f"volumes/{name}")["backup_id"],
            "digest": export_digest(cluster, f"volumes/{name}")}
