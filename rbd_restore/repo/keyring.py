"""A repository's ``config`` and ``keys/`` objects: init, open, add, list, remove.

``config`` says that the prefix holds a format-2 repository, its id and its
encryption. Each ``keys/<object-id>`` wraps one data key under one credential;
the wrapped payload repeats the repository id and encryption, so editing
``config`` (say, to turn encryption off) is caught by every client that opens
a key. A client configured with a credential refuses a prefix without
``config``: an unauthenticated format-1 repository could be anyone's.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbd_restore.config import RepositorySettings, S3Settings
from rbd_restore.errors import ConfigError, IntegrityError, UsageError, UserError
from rbd_restore.repo.codec import ENCRYPTED, ENCRYPTION_MODES, LEGACY, Codec
from rbd_restore.repo.crypto import (
    MIN_KEY_FILE_BYTES,
    Credential,
    DataKey,
    Unopenable,
    unwrap,
    wrap,
)
from rbd_restore.repo.layout import KEY_OBJECT_ID, KeyLayout
from rbd_restore.repo.repository import Repository
from rbd_restore.repo.store import ObjectMissing, ObjectStore

log = logging.getLogger(__name__)

CONFIG_VERSION = 2
MAX_KEY_OBJECTS = 64  # each may cost an scrypt on open; more is a mistake or an attack


class NotInitialised(UserError):
    """The prefix holds no repository this client may use."""


@dataclass(frozen=True)
class KeyObject:
    object_id: str
    body: dict[str, Any]
    key: DataKey | None  # None: the configured credential does not open it
    problem: str = ""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _key_created() -> str:
    # To the microsecond: the newest key is the current one, and a key added in the
    # second the repository was made (a first backup, then `key add`) tied with the
    # first one in whole seconds, leaving the choice to the random key ids.
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _instant(created: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(created)
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.UTC)
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def newest(keys: list[DataKey]) -> DataKey:
    """The current key: the most recently created (keys written before 2026-12-05 say
    whole seconds, which sort before any later instant of the same second)."""
    return max(keys, key=lambda k: (_instant(k.created), k.key_id))


def _where(store: ObjectStore, layout: KeyLayout) -> str:
    return f"s3://{store.bucket}/{layout.prefix}"


def _context(object_id: str) -> bytes:
    return f"key:{object_id}".encode()


def _write_key(store: ObjectStore, layout: KeyLayout, credential: Credential, key: DataKey,
               encryption: str, kdf: dict[str, object] | None = None) -> dict[str, object]:
    """Store ``key`` wrapped for ``credential``; returns the KDF parameters used."""
    object_id = secrets.token_hex(8)
    payload = json.dumps({"repository_id": key.repository_id, "encryption": encryption,
                          "key_id": key.key_id, "key": key.secret.hex(),
                          "created": key.created}).encode()
    kdf, blob = wrap(credential, _context(object_id), payload, kdf)
    body = {"format_version": CONFIG_VERSION, "id": object_id, "kdf": kdf, "wrapped": blob,
            "created": _now(), "host": socket.gethostname(), "credential": credential.kind}
    store.put(layout.key(object_id), json.dumps(body).encode())
    return kdf


def load_credential(settings: RepositorySettings) -> Credential | None:
    """The configured key file or passphrase file, read and checked; None when neither
    is set (format-1 repositories only)."""
    if settings.key_file and settings.passphrase_file:
        raise ConfigError("config fields repository.key_file and passphrase_file exclude "
                          "each other: set one")
    path_text = settings.key_file or settings.passphrase_file
    if not path_text:
        return None
    field = "repository.key_file" if settings.key_file else "repository.passphrase_file"
    path = Path(path_text)
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            material = handle.read(1 << 16)
    except OSError as exc:
        raise ConfigError(f"{field} {path} cannot be read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{field} {path} is open to other users: chmod 600 {path}")
    if settings.key_file:
        if len(material) < MIN_KEY_FILE_BYTES:
            raise ConfigError(f"{field} {path} holds {len(material)} bytes; a key file holds "
                              f"at least {MIN_KEY_FILE_BYTES} random bytes "
                              f"(head -c 32 /dev/urandom > {path})")
        return Credential("key-file", material, str(path))
    lines = material.splitlines()
    passphrase = lines[0].strip() if lines else b""
    if len(passphrase) < 8:
        raise ConfigError(f"{field} {path}: the passphrase on its first line is shorter "
                          "than 8 characters")
    return Credential("passphrase", passphrase, str(path))


def read_config(store: ObjectStore, layout: KeyLayout) -> dict[str, Any] | None:
    try:
        raw = json.loads(store.get(layout.config))
    except ObjectMissing:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{_where(store, layout)}config is damaged (not JSON)") from None
    if (not isinstance(raw, dict) or raw.get("format_version") != CONFIG_VERSION
            or raw.get("encryption") not in ENCRYPTION_MODES
            or not isinstance(raw.get("repository_id"), str)
            or len(raw["repository_id"]) != 32):
        raise IntegrityError(f"{_where(store, layout)}config is not a format-2 repository "
                             "config this rbd-restore reads")
    return raw


def init(store: ObjectStore, layout: KeyLayout, credential: Credential,
         encryption: str = ENCRYPTED) -> Codec:
    """Create a format-2 repository in an empty prefix; the key goes in before
    ``config``, so a config never exists without a key."""
    where = _where(store, layout)
    if read_config(store, layout) is not None:
        raise UsageError(f"{where} already holds a repository")
    if next(iter(store.list_objects(layout.manifests_prefix)), None) is not None:
        raise UsageError(f"{where} holds format-1 backups; initialise a new prefix")
    repository_id = secrets.token_hex(16)
    key = DataKey.generate(repository_id, _key_created())
    _write_key(store, layout, credential, key, encryption)
    config = {"format_version": CONFIG_VERSION, "repository_id": repository_id,
              "encryption": encryption, "created": _now()}
    store.put(layout.config, json.dumps(config).encode())
    if (read_config(store, layout) or {}).get("repository_id") != repository_id:
        raise UserError(f"another init of {where} ran at the same time; run it again")
    return Codec(encryption, {key.key_id: key}, key, repository_id)


def key_objects(store: ObjectStore, layout: KeyLayout, config: dict[str, Any],
                credential: Credential) -> list[KeyObject]:
    """Every key object, opened where the credential can."""
    infos = list(store.list_objects(layout.keys_prefix))[:MAX_KEY_OBJECTS]
    keks: dict[str, Any] = {}
    found: list[KeyObject] = []
    for info in infos:
        object_id = info.key.rsplit("/", 1)[-1]
        if not KEY_OBJECT_ID.match(object_id):
            continue
        try:
            body = json.loads(store.get(info.key))
            payload = json.loads(_unwrap_cached(credential, body, object_id, keks))
            if (payload["repository_id"], payload["encryption"]) != (
                    config["repository_id"], config["encryption"]):
                raise Unopenable("belongs to another repository or says another encryption")
            key = DataKey(str(payload["key_id"]), bytes.fromhex(payload["key"]),
                          config["repository_id"], str(payload.get("created", "")))
            found.append(KeyObject(object_id, body, key))
        except ObjectMissing:
            continue
        except Unopenable as exc:
            found.append(KeyObject(object_id, body, None, str(exc)))
        except (ValueError, KeyError, TypeError, AttributeError):
            found.append(KeyObject(object_id, {}, None, "is damaged"))
    return found


def _unwrap_cached(credential: Credential, body: dict[str, Any], object_id: str,
                   keks: dict[str, Any]) -> bytes:
    # One KDF run per distinct salt: keys added under one credential share theirs, so a
    # passphrase costs one scrypt however many keys it opens.
    kdf = body["kdf"]
    cache_key = json.dumps(kdf, sort_keys=True)
    if cache_key not in keks:
        keks[cache_key] = credential.derive(kdf)
    return unwrap(keks[cache_key], _context(object_id), str(body["wrapped"]))


def open_codec(store: ObjectStore, layout: KeyLayout, credential: Credential | None,
               create: bool = False) -> Codec:
    """The codec of the repository under ``layout``, or a one-line error saying why
    this client may not use it. ``create``: an empty prefix becomes an encrypted
    repository (the first backup into it)."""
    where = _where(store, layout)
    config = read_config(store, layout)
    if config is None:
        empty = next(iter(store.list_objects(layout.manifests_prefix)), None) is None
        if credential is None:
            if create and empty:
                raise NotInitialised(f"{where} holds no repository: set repository.key_file "
                                     "or passphrase_file, and the first backup creates an "
                                     "encrypted one (or run `rbd-restore init`)")
            return LEGACY
        if empty:
            if create:
                codec = init(store, layout, credential)
                log.info("initialised an encrypted repository at %s (%s)", where,
                            codec.describe())
                return codec
            raise NotInitialised(f"{where} holds no repository: run `rbd-restore init`")
        raise NotInitialised(f"{where} is a format-1 repository (unauthenticated): a client "
                             "with a repository key refuses it; unset repository.key_file "
                             "and passphrase_file to use it")
    if credential is None:
        raise ConfigError(f"{where} is a format-2 repository: set repository.key_file or "
                          "repository.passphrase_file")
    opened = [k.key for k in key_objects(store, layout, config, credential) if k.key]
    if not opened:
        raise NotInitialised(f"no key of {where} opens with the {credential.kind} "
                             f"{credential.source}")
    keys = {k.key_id: k for k in opened}
    current = newest(opened)
    return Codec(config["encryption"], keys, current, config["repository_id"])


def add_key(store: ObjectStore, layout: KeyLayout, codec: Codec, credential: Credential,
            new_credential: Credential | None = None) -> DataKey:
    """A new data key, the one new backups go under, wrapped for ``new_credential``
    (default: the configured one). A new credential also gets every data key the
    configured one opens, so it reads every backup."""
    config = read_config(store, layout)
    if config is None or not codec.current:
        raise UsageError(f"{_where(store, layout)} is not a format-2 repository")
    key = DataKey.generate(codec.repository_id, _key_created())
    if new_credential is None:
        shared = next((k.body["kdf"] for k in key_objects(store, layout, config, credential)
                       if k.key), None)
        _write_key(store, layout, credential, key, codec.encryption, shared)
        return key
    kdf = _write_key(store, layout, new_credential, key, codec.encryption)
    for old in codec.keys.values():
        _write_key(store, layout, new_credential, old, codec.encryption, kdf)
    return key


def remove_key(store: ObjectStore, layout: KeyLayout, credential: Credential,
               object_id: str, in_use: dict[str, int], force: bool = False) -> None:
    """Delete one key object. Refused when it is the last object holding a data key
    that backups (``in_use``: key id -> backups) still need, or the last one the
    configured credential opens, unless ``force``."""
    where = _where(store, layout)
    config = read_config(store, layout)
    if config is None:
        raise UsageError(f"{where} is not a format-2 repository")
    objects = key_objects(store, layout, config, credential)
    target = next((k for k in objects if k.object_id == object_id), None)
    if target is None:
        raise UsageError(f"{where} has no key object {object_id:.40}")
    if not force:
        others = [k for k in objects if k.object_id != object_id]
        if target.key is None:
            raise UsageError(f"key object {object_id} does not open with the configured "
                             "credential, so what it holds is unknown (--force)")
        if not any(k.key for k in others):
            raise UsageError(f"key object {object_id} is the last one the configured "
                             "credential opens; add another first (or --force)")
        if not any(k.key and k.key.key_id == target.key.key_id for k in others):
            backups = in_use.get(target.key.key_id, 0)
            if backups:
                raise UsageError(f"key object {object_id} holds the only copy of data key "
                                 f"{target.key.key_id}, which {backups} backups are under; "
                                 "forget them and run gc first (or --force)")
    store.delete(layout.key(object_id))


def open_repository(s3: S3Settings, settings: RepositorySettings, max_connections: int = 32,
                    create: bool = False) -> Repository:
    """The repository the configuration names, with the codec its keys give."""
    store = ObjectStore(s3, max_connections=max_connections)
    credential = load_credential(settings)  # a bad key file fails at once
    # The keys are read when first needed: a backup checks its image first, and creates
    # no repository for a command that fails anyway.
    return Repository(store, s3.prefix, functools.partial(
        open_codec, store, KeyLayout(s3.prefix), credential, create))
