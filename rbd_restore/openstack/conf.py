"""cinder.conf read the way Cinder reads it (oslo.config), for the RBD backends in it.

Cinder registers its RBD options in ``[backend_defaults]`` and grafts them onto
each section named in ``enabled_backends``; a backend's value comes from its
section, else from ``[backend_defaults]``, else the option's default, never
from ``[DEFAULT]`` (cinder/volume/configuration.py). Without
``enabled_backends`` (the legacy layout) the options live in ``[DEFAULT]``.
``cinder.conf.d`` overlays and ``$var`` substitution behave as in Cinder
because oslo.config does them. Only the options rbd-restore needs are
registered; the rest of the file is ignored, as oslo.config does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbd_restore.config import CephSettings, S3Settings
from rbd_restore.errors import ConfigError, NotFoundError

DEFAULT_FILES = ("/etc/cinder/cinder.conf",)
DEFAULT_DIRS = ("/etc/cinder/cinder.conf.d",)
LEGACY = "DEFAULT"
RBD_DRIVERS = ("cinder.volume.drivers.rbd.RBDDriver",
               "rbd_restore_cinder.volume.RBDRestoreDriver")


@dataclass(frozen=True)
class CinderBackend:
    """One volume backend section, resolved."""

    name: str  # the section in enabled_backends (the part after @ in a volume's host)
    volume_driver: str
    backend_name: str  # volume_backend_name: what volume types select
    pool: str
    ceph_conf: str
    user: str  # rbd_user, without "client."
    keyring: str
    cluster_name: str
    chunk_size_mib: int

    @property
    def is_rbd(self) -> bool:
        return self.volume_driver in RBD_DRIVERS or self.volume_driver.endswith(".RBDDriver")

    def ceph_settings(self) -> CephSettings:
        conf = self.ceph_conf or f"/etc/ceph/{self.cluster_name}.conf"
        return CephSettings(conf=conf, keyring=self.keyring,
                            client_name=f"client.{self.user or 'admin'}",
                            cluster_name=self.cluster_name)

    def as_json(self) -> dict[str, Any]:
        return {"backend": self.name, "volume_backend_name": self.backend_name,
                "volume_driver": self.volume_driver, "rbd": self.is_rbd, "pool": self.pool,
                "ceph_conf": self.ceph_settings().conf, "rbd_user": self.user,
                "keyring": self.keyring or None, "cluster": self.cluster_name,
                "chunk_size_mib": self.chunk_size_mib}


@dataclass(frozen=True)
class CinderS3:
    """Cinder's S3 backup driver's bucket ([DEFAULT] backup_s3_*), for import-backup."""

    endpoint: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    bucket: str
    sse_customer_key: bool

    def settings(self) -> S3Settings:
        return S3Settings(endpoint=self.endpoint, access_key=self.access_key,
                          secret_key=self.secret_key, bucket=self.bucket)


@dataclass(frozen=True)
class CinderConf:
    backends: dict[str, CinderBackend]
    volume_name_template: str
    files: tuple[str, ...]
    backup_s3: CinderS3 | None = None

    def backend(self, name: str) -> CinderBackend:
        if name not in self.backends:
            known = ", ".join(sorted(self.backends)) or "none"
            raise NotFoundError(f"no volume backend {name!r} in {', '.join(self.files)} "
                                f"(enabled_backends: {known})")
        return self.backends[name]

    def backend_of_host(self, host: str) -> CinderBackend:
        """The backend of a volume's ``os-vol-host-attr:host``: ``host@backend#pool``,
        or ``host#pool`` in the legacy layout."""
        node = host.partition("#")[0]
        _, at, name = node.partition("@")
        return self.backend(name if at else LEGACY)

    def image_name(self, volume_id: str, name_id: str | None = None) -> str:
        """The RBD image of a volume: ``volume_name_template % (name_id or id)``."""
        try:
            return self.volume_name_template % (name_id or volume_id)
        except (TypeError, ValueError):
            raise ConfigError(f"volume_name_template {self.volume_name_template!r} is not "
                              "a %s template") from None


def _backend_opts(defaults: bool) -> list[Any]:
    """The RBD options; a backend section's own copies default to None, so that an
    unset one falls back to [backend_defaults] as in Cinder."""
    from oslo_config import cfg

    def d(value: Any) -> Any:
        return value if defaults else None

    return [cfg.StrOpt("volume_driver", default=d("cinder.volume.drivers.lvm.LVMVolumeDriver")),
            cfg.StrOpt("volume_backend_name", default=d(None)),
            cfg.StrOpt("rbd_pool", default=d("rbd")),
            cfg.StrOpt("rbd_ceph_conf", default=d("")),
            cfg.StrOpt("rbd_user", default=d(None)),
            cfg.StrOpt("rbd_keyring_conf", default=d("")),
            cfg.StrOpt("rbd_cluster_name", default=d("ceph")),
            cfg.IntOpt("rbd_store_chunk_size", default=d(4))]


def load(files: list[str] | None = None, dirs: list[str] | None = None) -> CinderConf:
    """Read cinder.conf: ``files`` and ``dirs`` (``cinder.conf.d``) in that order, or
    Cinder's own defaults, /etc/cinder/cinder.conf and /etc/cinder/cinder.conf.d."""
    try:
        from oslo_config import cfg
    except ImportError:
        raise ConfigError("reading cinder.conf needs oslo.config: install "
                          "rbd-restore[openstack]") from None
    files = list(files) if files else [f for f in DEFAULT_FILES if os.path.exists(f)]
    dirs = list(dirs) if dirs is not None else [d for d in DEFAULT_DIRS if os.path.isdir(d)]
    if not files and not dirs:
        raise ConfigError("no cinder.conf: pass --cinder-config (default "
                          "/etc/cinder/cinder.conf)")
    for path in files:
        if not Path(path).is_file():
            raise ConfigError(f"cinder config {path} does not exist")
    conf = cfg.ConfigOpts()
    conf.register_opts([cfg.ListOpt("enabled_backends", default=None),
                        cfg.StrOpt("volume_name_template", default="volume-%s"),
                        cfg.StrOpt("backup_s3_endpoint_url", default=None),
                        cfg.StrOpt("backup_s3_store_access_key", default=None, secret=True),
                        cfg.StrOpt("backup_s3_store_secret_key", default=None, secret=True),
                        cfg.StrOpt("backup_s3_store_bucket", default="volumebackups"),
                        cfg.StrOpt("backup_s3_sse_customer_key", default=None, secret=True),
                        *_backend_opts(defaults=True)])
    conf.register_opts(_backend_opts(defaults=True), group="backend_defaults")
    try:
        conf(args=[], project="cinder", prog="cinder", default_config_files=files,
             default_config_dirs=dirs, validate_default_values=True)
    except (cfg.Error, ValueError) as exc:
        raise ConfigError(f"cinder config: {' '.join(str(exc).split())}") from None
    backends: dict[str, CinderBackend] = {}
    try:
        if conf.enabled_backends:
            for name in conf.enabled_backends:
                conf.register_opts(_backend_opts(defaults=False), group=name)
                backends[name] = _resolve(name, conf[name], conf.backend_defaults)
        else:
            backends[LEGACY] = _resolve(LEGACY, conf, None)
        template = str(conf.volume_name_template)
        s3 = None
        if conf.backup_s3_endpoint_url:
            s3 = CinderS3(str(conf.backup_s3_endpoint_url),
                          str(conf.backup_s3_store_access_key or ""),
                          str(conf.backup_s3_store_secret_key or ""),
                          str(conf.backup_s3_store_bucket),
                          bool(conf.backup_s3_sse_customer_key))
    except (cfg.Error, ValueError) as exc:
        raise ConfigError(f"cinder config: {' '.join(str(exc).split())}") from None
    return CinderConf(backends, template, tuple(files + dirs), s3)


def _resolve(name: str, section: Any, defaults: Any) -> CinderBackend:
    def value(option: str) -> Any:
        own = getattr(section, option)
        return own if own is not None or defaults is None else getattr(defaults, option)

    return CinderBackend(
        name=name, volume_driver=str(value("volume_driver")),
        backend_name=str(value("volume_backend_name") or name), pool=str(value("rbd_pool")),
        ceph_conf=str(value("rbd_ceph_conf") or ""), user=str(value("rbd_user") or ""),
        keyring=str(value("rbd_keyring_conf") or ""),
        cluster_name=str(value("rbd_cluster_name") or "ceph"),
        chunk_size_mib=int(value("rbd_store_chunk_size")))
