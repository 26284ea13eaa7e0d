"""Shared fixtures: one embedded Ceph + RGW cluster for the whole test session.

The cluster is started through the same code as ``rbd-restore dev up``. Set
``RBD_RESTORE_TEST_CLUSTER_DIR`` to reuse (and keep) a cluster between runs
while developing; otherwise a fresh one is made in a temporary directory and
purged at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbd_restore import config as config_mod
from rbd_restore import devcluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devcluster.ClusterInfo]:
    reuse = os.environ.get("RBD_RESTORE_TEST_CLUSTER_DIR")
    root = Path(reuse) if reuse else tmp_path_factory.mktemp("cluster") / "c"
    result = devcluster.up(root, osd_bytes=6 << 30)
    try:
        yield result.info
    finally:
        if not reuse:
            devcluster.down(root, purge=True)


@pytest.fixture(scope="session")
def rbd_config(cluster: devcluster.ClusterInfo) -> config_mod.Config:
    return config_mod.load(str(cluster.config))


@pytest.fixture(scope="session")
def rados_cluster(cluster: devcluster.ClusterInfo) -> Iterator[Any]:
    import rados

    handle = rados.Rados(conffile=str(cluster.ceph_conf), rados_id="admin",
                         conf={"keyring": str(cluster.keyring)})
    handle.connect(timeout=30)
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture(scope="session")
def s3_client(cluster: devcluster.ClusterInfo) -> Any:
    import boto3
    import botocore.config

    return boto3.client(
        "s3", endpoint_url=cluster.s3_endpoint, aws_access_key_id=cluster.s3_access_key,
        aws_secret_access_key=cluster.s3_secret_key, region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name no other test (or earlier run on a reused cluster) uses."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"t-{base}-{uuid.uuid4().hex[:8]}"
