"""The drivers driven directly with Cinder's own objects against the real cluster, on
whichever Cinder this interpreter has (Debian's Zed, or PyPI's current release):
the backup driver writes an rbd-restore backup of an RBD volume; the volume driver
stages a new volume from it, refuses to delete it while it relocates, commits."""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbd_restore import devcluster
from tests.support.helpers import Cli, export_digest

MiB = 1 << 20
GiB = 1 << 30
RBD_RESTORE = Path(__file__).resolve().parents[3] / ".venv" / "bin" / "rbd-restore"


@pytest.fixture(scope="module")
def cinder_env(cluster: devcluster.ClusterInfo, rbd_restore_config: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Cinder's configuration, database (its own migrations, sqlite) and objects."""
    from cinder import context, objects, rpc
    from cinder.common import config as _options  # noqa: F401 - registered before parsing
    from cinder.db import migration
    from cinder.volume.drivers import rbd as _rbd  # noqa: F401 - likewise
    from oslo_config import cfg
    from oslo_messaging import conffixture

    work = tmp_path_factory.mktemp("cinder-objects")
    conf = cfg.CONF
    conf([], project="cinder", default_config_files=[])
    conf.set_override("connection", f"sqlite:///{work / 'cinder.sqlite'}", group="database")
    messaging = conffixture.ConfFixture(conf)
    messaging.setUp()
    messaging.transport_url = "fake:/"
    rpc.init(conf)
    migration.db_sync()
    objects.register_all()
    yield {"ctx": context.get_admin_context(), "conf": conf, "objects": objects,
           "config": rbd_restore_config}


def volume_driver(cluster: devcluster.ClusterInfo, env: dict[str, Any]) -> Any:
    from cinder import db
    from cinder.volume import configuration
    from cinder.volume.drivers import rbd
    from rbd_restore_cinder import cli as rr_cli
    from rbd_restore_cinder.volume import RBDRestoreDriver

    group = f"ceph-{uuid.uuid4().hex[:6]}"
    conf = env["conf"]
    conf.register_opts(rbd.RBD_OPTS + rr_cli.OPTS, group=group)
    for name, value in (("rbd_pool", "volumes"), ("rbd_ceph_conf", str(cluster.ceph_conf)),
                        ("rbd_user", "admin"), ("rbd_restore_config", str(env["config"])),
                        ("rbd_restore_command", str(RBD_RESTORE)),
                        ("rados_connection_retries", 1), ("rados_connection_interval", 1)):
        conf.set_override(name, value, group=group)
    driver = RBDRestoreDriver(configuration=configuration.Configuration(
        rbd.RBD_OPTS, config_group=group), db=db, host="test")
    driver.do_setup(env["ctx"])
    driver.check_for_setup_error()
    return driver


def backed_up(cluster: devcluster.ClusterInfo, env: dict[str, Any], source: Any) -> Any:
    """A Cinder backup of ``source`` written by the backup driver through os-brick."""
    import rbd
    from os_brick.initiator import linuxrbd
    from rbd_restore_cinder.backup import RBDRestoreBackupDriver

    env["conf"].set_override("rbd_restore_config", str(env["config"]))
    env["conf"].set_override("rbd_restore_command", str(RBD_RESTORE))
    backup = env["objects"].Backup(env["ctx"], volume_id=source.id, status="creating",
                                   user_id="u1", project_id="p1", size=1,
                                   service="rbd_restore_cinder.backup.RBDRestoreBackupDriver")
    backup.create()
    with linuxrbd.RBDClient("admin", "volumes", conffile=str(cluster.ceph_conf)) as client:
        wrapper = linuxrbd.RBDVolumeIOWrapper(linuxrbd.RBDImageMetadata(
            rbd.Image(client.ioctx, source.name), "volumes", "admin", str(cluster.ceph_conf)))
        backup.update(RBDRestoreBackupDriver(env["ctx"]).backup(backup, wrapper))
        wrapper.close()
    return backup


def make_volume(env: dict[str, Any], size: int = 1) -> Any:
    volume = env["objects"].Volume(env["ctx"], size=size, status="creating",
                                   host="test@ceph#ceph", display_name="v", project_id="p1",
                                   user_id="u1", availability_zone="nova")
    volume.create()
    return volume


def test_backup_driver_then_instant_volume_from_backup(
        cluster: devcluster.ClusterInfo, cli: Cli, cinder_env: dict[str, Any],
        rados_cluster: Any) -> None:
    import rbd
    from cinder import exception

    env = cinder_env
    driver = volume_driver(cluster, env)
    source = make_volume(env)
    driver.create_volume(source)
    with rados_cluster.open_ioctx("volumes") as ioctx, rbd.Image(ioctx, source.name) as image:
        image.write(random.Random(5).randbytes(9 * MiB), 3 * MiB)
    want = export_digest(cluster, f"volumes/{source.name}")

    backup = backed_up(cluster, env, source)
    backup.status = "available"
    backup.save()
    stored = json.loads(backup.service_metadata)["rbd_restore_backup_id"]
    labels = cli.json("backups", "show", stored)["labels"]
    assert labels["openstack.volume_id"] == source.id
    assert labels["openstack.cinder_backup_id"] == backup.id

    target = make_volume(env, size=2)
    update = driver.create_volume_from_backup(target, backup)
    assert isinstance(update, dict)
    with rados_cluster.open_ioctx("volumes") as ioctx:
        assert rbd.RBD().migration_status(ioctx, target.name)["state"] == \
            rbd.RBD_IMAGE_MIGRATION_STATE_PREPARED
        with rbd.Image(ioctx, target.name, read_only=True) as image:
            assert image.size() == 2 * GiB  # grown to the volume's size
    with pytest.raises(exception.VolumeIsBusy):
        driver.delete_volume(target)  # still relocating: refused, not deleted

    jobs = [j["id"] for j in cli.json("status")["jobs"]
            if j["image"] == f"volumes/{target.name}"]
    run = cli.run("jobs", "run", jobs[0], "--once", timeout=300)
    assert run.returncode == 0, run.stderr[-1000:]
    committed = subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "export",
                                f"volumes/{target.name}", "-"], capture_output=True,
                               check=True).stdout
    import hashlib

    assert hashlib.sha256(committed[:GiB]).hexdigest() == want
    assert committed[GiB:] == bytes(GiB)
    driver.delete_volume(target)  # committed: an ordinary volume, deleted as any
    driver.delete_volume(source)


def test_the_backup_driver_restores_a_volume_whatever_the_export_says_on_stderr(
        cluster: devcluster.ClusterInfo, cinder_env: dict[str, Any], rados_cluster: Any,
        tmp_path: Path) -> None:
    """`openstack volume backup restore` streams `backups export` into the volume. The
    export's stderr was a pipe nobody read until the end: past 64 KiB of it (a debug
    log level, warnings) the export stopped, and the restore with it, for good."""
    import threading

    import rbd
    from os_brick.initiator import linuxrbd
    from rbd_restore_cinder.backup import RBDRestoreBackupDriver

    env = cinder_env
    driver = volume_driver(cluster, env)
    source, target = make_volume(env), make_volume(env)
    driver.create_volume(source)
    driver.create_volume(target)
    with rados_cluster.open_ioctx("volumes") as ioctx, rbd.Image(ioctx, source.name) as image:
        image.write(random.Random(6).randbytes(6 * MiB), 1 * MiB)
    want = export_digest(cluster, f"volumes/{source.name}")
    chatty = tmp_path / "rbd-restore"
    chatty.write_text(f"#!/bin/sh\nhead -c 262144 /dev/zero | tr '\\0' w >&2\n"
                      f'exec {RBD_RESTORE} "$@"\n')
    chatty.chmod(0o755)
    backup = backed_up(cluster, env, source)
    backup.save()

    env["conf"].set_override("rbd_restore_command", str(chatty))
    failures: list[BaseException] = []
    with linuxrbd.RBDClient("admin", "volumes", conffile=str(cluster.ceph_conf)) as client:
        wrapper = linuxrbd.RBDVolumeIOWrapper(linuxrbd.RBDImageMetadata(
            rbd.Image(client.ioctx, target.name), "volumes", "admin", str(cluster.ceph_conf)))

        def restore() -> None:
            try:
                RBDRestoreBackupDriver(env["ctx"]).restore(backup, target.id, wrapper, True)
            except BaseException as exc:
                failures.append(exc)

        worker = threading.Thread(target=restore, daemon=True)
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "the restore is stuck"
        wrapper.close()
    assert failures == []
    assert export_digest(cluster, f"volumes/{target.name}") == want
    driver.delete_volume(target)
    driver.delete_volume(source)


def test_a_backup_of_another_driver_takes_cinders_generic_path(
        cluster: devcluster.ClusterInfo, cinder_env: dict[str, Any]) -> None:
    env = cinder_env
    driver = volume_driver(cluster, env)
    backup = env["objects"].Backup(env["ctx"], volume_id=str(uuid.uuid4()), status="available",
                                   user_id="u1", project_id="p1", size=1,
                                   service="cinder.backup.drivers.s3.S3BackupDriver",
                                   service_metadata="volume_x/20261204/az_nova_backup_y")
    backup.create()
    with pytest.raises(NotImplementedError):
        driver.create_volume_from_backup(make_volume(env), backup)
