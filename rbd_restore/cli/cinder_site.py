"""What the ``rbd-restore cinder`` commands share: rbd-restore's configuration, cinder.conf
read once, the Cinder API opened once."""

from __future__ import annotations

import typer

from rbd_restore.ceph import Cluster
from rbd_restore.cli.context import load_config
from rbd_restore.config import Config
from rbd_restore.openstack import conf as cinder_conf
from rbd_restore.openstack import volumes as ops
from rbd_restore.openstack.cloud import CinderApi


class Site:
    """What the cinder commands share: rbd-restore's config, cinder.conf, the API."""

    def __init__(self, ctx: typer.Context) -> None:
        options = ctx.find_object(dict) or {}
        self.cfg = load_config(ctx)
        self.files: list[str] = options.get("cinder_config") or []
        self.dirs: list[str] | None = options.get("cinder_config_dir")
        self.cloud: str | None = options.get("os_cloud")
        self.keyring: str | None = options.get("keyring")
        self._conf: cinder_conf.CinderConf | None = None
        self._api: CinderApi | None = None

    @property
    def conf(self) -> cinder_conf.CinderConf:
        if self._conf is None:
            self._conf = cinder_conf.load(self.files, self.dirs)
        return self._conf

    @property
    def api(self) -> CinderApi:
        if self._api is None:
            self._api = CinderApi(self.cloud)
        return self._api

    def ceph(self, backend: cinder_conf.CinderBackend) -> Config:
        return ops.ceph_config(self.cfg, backend, self.keyring)

    def cluster(self, backend: cinder_conf.CinderBackend) -> Cluster:
        return Cluster(self.ceph(backend).ceph)
