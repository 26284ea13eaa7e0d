"""The rbd-restore configuration: one TOML file, every field overridable by env.

The file is found from ``--config`` or ``RBD_RESTORE_CONFIG``. A field
``section.key`` is overridden by the environment variable
``RBD_RESTORE_<SECTION>_<KEY>`` (upper case). S3 credentials fall back to the
standard ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` variables. The fields
are documented in ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rbd_restore.errors import ConfigError

CONFIG_ENV = "RBD_RESTORE_CONFIG"
ENV_PREFIX = "RBD_RESTORE_"
_REGION = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")  # as botocore checks
_BUCKET = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")  # as botocore checks (RGW allows more than AWS)


@dataclass(frozen=True)
class CephSettings:
    conf: str = "/etc/ceph/ceph.conf"
    keyring: str = ""
    client_name: str = "client.admin"
    cluster_name: str = "ceph"  # librados clustername: names default keyring paths

    @property
    def rados_id(self) -> str:
        """The id librados wants: the client name without its ``client.`` type."""
        return self.client_name.removeprefix("client.")


@dataclass(frozen=True)
class S3Settings:
    endpoint: str = ""
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    region: str = "us-east-1"
    bucket: str = ""
    prefix: str = ""
    max_attempts: int = 8
    sign_payload: int = 0  # 1: SigV4-sign request bodies (every stored object verifies itself)
    content_md5: int = 1  # 0: no Content-MD5 on uploads (RGW then stores a damaged body)
    ca_bundle: str = ""  # CA certificates that verify an https endpoint; "": the system's
    connect_timeout: int = 5  # seconds
    read_timeout: int = 60  # seconds without a byte before a request is retried


@dataclass(frozen=True)
class RepositorySettings:
    key_file: str = ""  # at least 32 random bytes that open the repository's keys
    passphrase_file: str = ""  # or a passphrase on the first line (scrypt)


@dataclass(frozen=True)
class PoolSettings:
    backup_default: str = "volumes"
    restore_default: str = "volumes"


@dataclass(frozen=True)
class FetcherSettings:
    listen: str = "127.0.0.1:8470"
    public_url: str = ""
    control_listen: str = "127.0.0.1:8471"
    control_url: str = ""
    control_token: str = field(default="", repr=False)
    runner_token: str = field(default="", repr=False)  # may close sessions and read state
    monitor_token: str = field(default="", repr=False)  # may read state only
    control_tls_cert: str = ""  # PEM certificate chain: the control plane serves only TLS
    control_tls_key: str = ""  # its private key (PEM)
    control_ca: str = ""  # clients: CA certificates that verify the control plane
    data_tls: int = 0  # 1: the data plane serves TLS too, with the control plane's certificate
    secret: str = field(default="", repr=False)
    metrics_listen: str = "127.0.0.1:8472"
    cache_dir: str = "/var/cache/rbd-restore"
    cache_size: str = "20G"
    memory_cache: str = "64M"  # relocation chunks staged in memory; "0": on disk
    cache_relocated: int = 0  # 1: chunks the relocation copied go to the disk cache
    s3_concurrency: int = 16
    s3_stall_seconds: int = 600
    session_max_age_days: int = 30
    prefetch_slots: int = 0  # 0: three quarters of s3_concurrency; the rest is kept for demand
    boot_window_seconds: int = 120
    # restore: ready waits up to this long copying the boot profile into the image; 0: never
    boot_set_seconds: int = 1
    # a restore without a profile: the relocation waits this long for a guest to start
    # reading (8 reads; measured from the latest read: QEMU probes the disk first),
    learn_wait_seconds: int = 5
    # then until its reads stop this long (or the boot window ends); 0 and 0: never
    learn_quiet_seconds: int = 3
    relocation_window_min: int = 8
    relocation_window_max: int = 64
    cold_prefetch: str = "8M"
    prime_sessions: int = 1  # 0: no profile, heuristic or first window when a session opens
    pad_headers: int = 1  # 0: no padding header (fetcher/headers.py says why it is there)
    untrusted_seconds: int = 10  # a connection without a valid request is closed after this
    max_untrusted_connections: int = 256  # per listener; the oldest beyond it are closed

    @property
    def data_url(self) -> str:
        """Base URL librbd uses: the public URL, or the listen address."""
        scheme = "https" if self.data_tls else "http"
        return (self.public_url or f"{scheme}://{self.listen}").rstrip("/")

    @property
    def control_base(self) -> str:
        scheme = "https" if self.control_tls_cert else "http"
        return (self.control_url or f"{scheme}://{self.control_listen}").rstrip("/")


@dataclass(frozen=True)
class Config:
    ceph: CephSettings = field(default_factory=CephSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    pools: PoolSettings = field(default_factory=PoolSettings)
    repository: RepositorySettings = field(default_factory=RepositorySettings)
    fetcher: FetcherSettings = field(default_factory=FetcherSettings)
    source: str = ""


_SECTIONS: dict[str, type[Any]] = {
    "ceph": CephSettings,
    "s3": S3Settings,
    "pools": PoolSettings,
    "repository": RepositorySettings,
    "fetcher": FetcherSettings,
}


def _coerce(name: str, value: Any, wanted: type[Any]) -> Any:
    if wanted is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"config field {name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config field {name}: expected an integer, got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"config field {name}: expected a string, got {type(value).__name__}")
    return value


def _section_from(name: str, cls: type[Any], raw: Mapping[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"config field {name}.{key}: unknown field")
    values: dict[str, Any] = {}
    for key, spec in known.items():
        env_name = f"{ENV_PREFIX}{name}_{key}".upper()
        if env_name in os.environ:
            values[key] = _coerce(f"{name}.{key} (from {env_name})", os.environ[env_name],
                                  _type_of(spec))
        elif key in raw:
            values[key] = _coerce(f"{name}.{key}", raw[key], _type_of(spec))
    return cls(**values)


def _type_of(spec: dataclasses.Field[Any]) -> type[Any]:
    return int if spec.type in (int, "int") else str


def from_mapping(raw: Mapping[str, Any], source: str = "") -> Config:
    """Build a validated :class:`Config` from parsed TOML plus the environment."""
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise ConfigError(f"config field {key}: unknown section")
        if not isinstance(value, dict):
            raise ConfigError(f"config field {key}: expected a table")
    sections = {name: _section_from(name, cls, raw.get(name, {}))
                for name, cls in _SECTIONS.items()}
    s3: S3Settings = sections["s3"]
    if not s3.access_key and os.environ.get("AWS_ACCESS_KEY_ID"):
        s3 = dataclasses.replace(s3, access_key=os.environ["AWS_ACCESS_KEY_ID"])
    if not s3.secret_key and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        s3 = dataclasses.replace(s3, secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
    if bool(s3.access_key) != bool(s3.secret_key):
        raise ConfigError("config fields s3.access_key and s3.secret_key go together: set "
                          "both, or neither to use the AWS credential chain")
    if s3.bucket and not _BUCKET.fullmatch(s3.bucket):
        raise ConfigError(f"config field s3.bucket: {s3.bucket!r:.70} is no bucket name "
                          "(letters, digits, '.', '-' and '_')")
    if s3.max_attempts < 1:
        raise ConfigError("config field s3.max_attempts: must be at least 1")
    for name in ("sign_payload", "content_md5"):
        if getattr(s3, name) not in (0, 1):
            raise ConfigError(f"config field s3.{name}: must be 0 or 1")
    for name in ("connect_timeout", "read_timeout"):
        if getattr(s3, name) < 1:
            raise ConfigError(f"config field s3.{name}: must be at least 1 second")
    _check_url("s3.endpoint", s3.endpoint, "an S3 endpoint", "http://127.0.0.1:7480")
    if s3.region and not _REGION.fullmatch(s3.region):
        raise ConfigError(f"config field s3.region: {s3.region!r:.70} is no region name "
                          "(letters, digits and '-', e.g. us-east-1)")
    fetcher: FetcherSettings = sections["fetcher"]
    _check_url("fetcher.public_url", fetcher.public_url, "the fetcher's data plane",
               "http://fetcher.example:8470")
    _check_url("fetcher.control_url", fetcher.control_url, "the fetcher's control plane",
               "http://127.0.0.1:8471")
    for name in ("untrusted_seconds", "max_untrusted_connections"):
        if getattr(fetcher, name) < 1:
            raise ConfigError(f"config field fetcher.{name}: must be at least 1")
    if bool(fetcher.control_tls_cert) != bool(fetcher.control_tls_key):
        raise ConfigError("config fields fetcher.control_tls_cert and control_tls_key "
                          "go together: set both or neither")
    if fetcher.data_tls not in (0, 1):
        raise ConfigError("config field fetcher.data_tls: must be 0 or 1")
    if fetcher.data_tls and not fetcher.control_tls_cert:
        raise ConfigError("config field fetcher.data_tls needs fetcher.control_tls_cert and "
                          "control_tls_key: the data plane serves the same certificate")
    tokens = [t for t in (fetcher.control_token, fetcher.runner_token, fetcher.monitor_token)
              if t]
    if len(set(tokens)) != len(tokens):
        raise ConfigError("config fields fetcher.control_token, runner_token and "
                          "monitor_token must all differ: each names a role")
    return Config(ceph=sections["ceph"], s3=s3, pools=sections["pools"],
                  repository=sections["repository"], fetcher=sections["fetcher"],
                  source=source)


def _check_url(name: str, url: str, what: str, example: str) -> None:
    """An http(s) URL with a host (or unset); refused here by name rather than by
    botocore or urllib as an internal error, or as "unreachable" after every retry."""
    if not url:
        return
    shown = re.sub(r"//[^/]*@", "//…@", url)  # a password in it is never echoed
    refused = ConfigError(f"config field {name}: {shown!r:.100} is no http(s) URL of {what} "
                          f"(e.g. {example}; credentials go in their own fields)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError:
        raise refused from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or parts.username is not None or port == 0):
        raise refused


def check_ca_bundle(path: str) -> None:
    """``s3.ca_bundle``, when set, names a readable file of PEM certificates: else every
    https request would fail as if S3 were unreachable, retried with backoff. Checked
    where S3 is used, not when the file is read (commands without S3 never need it)."""
    if not path:
        return
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise ConfigError(f"config field s3.ca_bundle: {path} does not exist") from None
    except OSError as exc:  # ssl.SSLError is one: not PEM, or no certificate in it
        reason = exc.strerror or "holds no PEM certificate"
        raise ConfigError(f"config field s3.ca_bundle: {path} cannot be used: "
                          f"{reason}") from None


def config_path(explicit: str | None) -> Path:
    chosen = explicit or os.environ.get(CONFIG_ENV)
    if not chosen:
        raise ConfigError(f"no configuration file: pass --config or set {CONFIG_ENV}")
    return Path(chosen)


def load(explicit: str | None = None) -> Config:
    """Read the configuration file named by ``--config`` or the environment."""
    path = config_path(explicit)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    _check_private(path, mode, raw)
    return from_mapping(raw, source=str(path))


SECRET_FIELDS = (("s3", "access_key"), ("s3", "secret_key"), ("fetcher", "secret"),
                 ("fetcher", "control_token"), ("fetcher", "runner_token"),
                 ("fetcher", "monitor_token"))


def _check_private(path: Path, mode: int, raw: Mapping[str, Any]) -> None:
    """Refuse a file every user can change, or read when it holds a secret: it would
    hand them the bucket, or sessions to every backup."""
    if mode & stat.S_IWOTH:
        raise ConfigError(f"config file {path} can be changed by every user: chmod o-w {path}")
    held = [f"{section}.{key}" for section, key in SECRET_FIELDS
            if isinstance(raw.get(section), dict) and raw[section].get(key)]
    if held and mode & stat.S_IROTH:
        raise ConfigError(f"config file {path} holds {held[0]} and every user can read it: "
                          f"chmod o-r {path}")


def require(value: str, name: str) -> str:
    """Return a setting that a command cannot work without, or say which is missing."""
    if not value:
        env_name = f"{ENV_PREFIX}{name.replace('.', '_')}".upper()
        raise ConfigError(f"config field {name} is not set (in the config file or {env_name})")
    return value


def render_toml(sections: Mapping[str, Mapping[str, str | int]]) -> str:
    """Write a config file; JSON string escapes are valid TOML basic strings."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            rendered = str(value) if isinstance(value, int) else json.dumps(value)
            lines.append(f"{key} = {rendered}")
        lines.append("")
    return "\n".join(lines)
