"""cinder.conf read as Cinder reads it: one test per rule (rbd_restore/openstack/conf.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbd_restore.errors import ConfigError, NotFoundError
from rbd_restore.openstack import conf as cinder_conf

MULTI = """
[DEFAULT]
enabled_backends = ceph-ssd, ceph-hdd, lvm
rbd_pool = wrong-default-section
state_path = /var/lib/cinder
volume_name_template = vol-%s
transport_url = rabbit://openstack:AK%weird$pass@127.0.0.1:5672/

[backend_defaults]
rbd_user = cinder
rbd_ceph_conf = /etc/ceph/ceph.conf

[ceph-ssd]
volume_driver = cinder.volume.drivers.rbd.RBDDriver
volume_backend_name = ssd
rbd_pool = volumes-ssd
rbd_store_chunk_size = 8

[ceph-hdd]
volume_driver = rbd_restore_cinder.volume.RBDRestoreDriver
rbd_pool = volumes-hdd
rbd_user = cinder-hdd
rbd_cluster_name = backup
rbd_ceph_conf =

[lvm]
volume_driver = cinder.volume.drivers.lvm.LVMVolumeDriver
"""


def write(tmp_path: Path, text: str, name: str = "cinder.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_backend_section_then_backend_defaults_never_default(tmp_path: Path) -> None:
    conf = cinder_conf.load([write(tmp_path, MULTI)], [])
    ssd, hdd = conf.backend("ceph-ssd"), conf.backend("ceph-hdd")
    assert (ssd.pool, ssd.user, ssd.backend_name, ssd.chunk_size_mib) == (
        "volumes-ssd", "cinder", "ssd", 8)
    assert ssd.ceph_settings().conf == "/etc/ceph/ceph.conf"
    assert ssd.ceph_settings().client_name == "client.cinder"  # rbd_user has no client.
    assert (hdd.pool, hdd.user, hdd.backend_name) == ("volumes-hdd", "cinder-hdd", "ceph-hdd")
    # An empty rbd_ceph_conf means librados' default for the cluster's name.
    assert hdd.ceph_settings().conf == "/etc/ceph/backup.conf"
    assert hdd.is_rbd and ssd.is_rbd and not conf.backend("lvm").is_rbd
    assert all(b.pool != "wrong-default-section" for b in conf.backends.values())


def test_a_backend_without_a_value_anywhere_takes_cinders_default(tmp_path: Path) -> None:
    text = "[DEFAULT]\nenabled_backends = ceph\n[ceph]\nvolume_driver = " \
           "cinder.volume.drivers.rbd.RBDDriver\n"
    backend = cinder_conf.load([write(tmp_path, text)], []).backend("ceph")
    assert (backend.pool, backend.user, backend.cluster_name, backend.chunk_size_mib) == (
        "rbd", "", "ceph", 4)
    assert backend.ceph_settings().client_name == "client.admin"


def test_cinder_conf_d_overlays_the_file(tmp_path: Path) -> None:
    main = write(tmp_path, MULTI)
    overlay = tmp_path / "cinder.conf.d"
    overlay.mkdir()
    (overlay / "50-pools.conf").write_text("[ceph-ssd]\nrbd_pool = volumes-nvme\n")
    conf = cinder_conf.load([main], [str(overlay)])
    assert conf.backend("ceph-ssd").pool == "volumes-nvme"


def test_legacy_layout_reads_default(tmp_path: Path) -> None:
    text = "[DEFAULT]\nvolume_driver = cinder.volume.drivers.rbd.RBDDriver\nrbd_pool = vols\n"
    conf = cinder_conf.load([write(tmp_path, text)], [])
    assert conf.backend_of_host("node1#vols").pool == "vols"


def test_hosts_names_and_templates(tmp_path: Path) -> None:
    conf = cinder_conf.load([write(tmp_path, MULTI)], [])
    assert conf.backend_of_host("ctl1@ceph-ssd#volumes-ssd").name == "ceph-ssd"
    assert conf.backend_of_host("ctl1@ceph-hdd").name == "ceph-hdd"
    with pytest.raises(NotFoundError, match="no volume backend 'gone'"):
        conf.backend_of_host("ctl1@gone#x")
    # After a migration whose rename failed, the image follows name_id, not the id.
    assert conf.image_name("1111", None) == "vol-1111"
    assert conf.image_name("1111", "2222") == "vol-2222"


@pytest.mark.parametrize(("text", "message"), [
    ("[DEFAULT]\nenabled_backends = a\n[a]\nrbd_store_chunk_size = four\n", "rbd_store_chunk"),
    ("not an ini file\n", "cinder config"),
])
def test_bad_files_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cinder_conf.load([write(tmp_path, text)], [])


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        cinder_conf.load([str(tmp_path / "nope.conf")], [])
