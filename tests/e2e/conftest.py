"""Fixtures of the QEMU tests: the guest, a backed-up guest disk served by a fetcher,
and a target image name cleaned up afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbd_restore import devcluster
from rbd_restore.ceph import remove_image
from tests.support.fetcher_proc import FetcherProcess
from tests.support.helpers import Cli
from tests.support.vm import build_guest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def guest() -> tuple[Path, dict[str, Any]]:
    return build_guest()


@pytest.fixture(scope="module")
def site(cluster: devcluster.ClusterInfo, rados_cluster: Any, guest: tuple[Path, dict[str, Any]],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The guest disk backed up (and the original deleted), with a fetcher serving it."""
    guest_dir, info = guest
    prefix = f"e2e-{uuid.uuid4().hex[:8]}/"
    work = tmp_path_factory.mktemp("e2e")
    fetcher = FetcherProcess(cluster, work / "cache", prefix)
    fetcher.start()
    cli = Cli(cluster, prefix, fetcher.env_overrides)
    source = f"guest-src-{uuid.uuid4().hex[:6]}"
    subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "import", "--no-progress",
                    str(guest_dir / "root.img"), f"volumes/{source}"], check=True)
    backup = cli.json("backup", f"volumes/{source}")
    with rados_cluster.open_ioctx("volumes") as ioctx:
        remove_image(ioctx, source)
    try:
        yield {"cli": cli, "fetcher": fetcher, "backup": backup, "info": info,
               "guest": guest_dir, "work": work}
    finally:
        fetcher.stop()


@pytest.fixture
def target(rados_cluster: Any) -> Iterator[str]:
    import rbd

    name = f"restored-{uuid.uuid4().hex[:8]}"
    yield name
    # A killed QEMU's watch lingers until the OSD times it out (30 s): retry until then.
    deadline = time.monotonic() + 90
    with rados_cluster.open_ioctx("volumes") as ioctx:
        while True:
            try:
                with contextlib.suppress(rbd.InvalidArgument, rbd.ImageNotFound):
                    rbd.RBD().migration_abort(ioctx, name)
                remove_image(ioctx, name)
                return
            except rbd.ImageBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
