"""Format 2 (docs/format.md, "Encryption"): sealing, keyed ids and MACs, without a cluster."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rbd_restore.config import RepositorySettings
from rbd_restore.errors import ConfigError, IntegrityError, UnknownKey
from rbd_restore.repo import crypto, keyring, manifest
from rbd_restore.repo.codec import AUTHENTICATED, ENCRYPTED, LEGACY, Codec
from rbd_restore.repo.repository import new_backup_id

REPOSITORY_ID = "0f" * 16


def codec(encryption: str = ENCRYPTED, *extra: crypto.DataKey) -> Codec:
    key = crypto.DataKey.generate(REPOSITORY_ID, "2026-12-05T00:00:00+00:00")
    keys = {k.key_id: k for k in (key, *extra)}
    return Codec(encryption, keys, key, REPOSITORY_ID)


def sample(chunk_ids: list[str | None]) -> manifest.Manifest:
    return manifest.Manifest(
        backup_id=new_backup_id(), created="2026-12-05T00:00:00+00:00",
        source=manifest.Source("fsid", "volumes", "vm1", "1234abcd", "rbd-restore.x"),
        image_size=len(chunk_ids) * (64 << 10), chunk_size=64 << 10, chunks=chunk_ids)


def test_encrypted_chunks_hide_their_content_and_round_trip() -> None:
    sealed = codec()
    plain = b"secret block " * 5000
    cid = sealed.chunk_id(plain)
    assert cid != hashlib.sha256(plain).hexdigest()  # the id says nothing of the content
    stored = sealed.encode_chunk(cid, plain)
    assert b"secret block" not in stored and stored[0] == crypto.SEALED
    assert sealed.decode_chunk(cid, stored, len(plain)) == plain
    # Another repository's key names the same content differently.
    assert codec().chunk_id(plain) != cid


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, (4 << 20) + 3])
def test_sealed_objects_are_plain_aes_gcm_behind_header_and_nonce(size: int) -> None:
    """What docs/format.md promises, checked with the one-shot AES-GCM of the
    cryptography package rather than the streaming encryptor seal() uses."""
    key = crypto.DataKey.generate(REPOSITORY_ID, "")
    plain = os.urandom(size)
    sealed = key.seal(b"chunk:abc", memoryview(plain))
    header, nonce = bytes(sealed[:9]), bytes(sealed[9:21])
    assert header == bytes([crypto.SEALED]) + bytes.fromhex(key.key_id)
    assert len(sealed) == 21 + size + 16
    one_shot = AESGCM(key.encryption_key)
    assert one_shot.decrypt(nonce, bytes(sealed[21:]), header + b"chunk:abc") == plain
    assert one_shot.encrypt(nonce, plain, header + b"chunk:abc") == bytes(sealed[21:])
    assert key.open(b"chunk:abc", sealed) == plain


def test_a_modified_moved_or_foreign_chunk_is_refused() -> None:
    sealed = codec()
    plain, other = os.urandom(70000), os.urandom(70000)
    cid, other_id = sealed.chunk_id(plain), sealed.chunk_id(other)
    stored = sealed.encode_chunk(cid, plain)
    flipped = bytearray(stored)
    flipped[40] ^= 1
    with pytest.raises(IntegrityError, match="does not authenticate"):
        sealed.decode_chunk(cid, bytes(flipped))
    with pytest.raises(IntegrityError, match="does not authenticate"):
        sealed.decode_chunk(other_id, stored)  # stored under another chunk's name
    with pytest.raises(UnknownKey):
        codec().decode_chunk(cid, stored)  # a key this client does not hold
    with pytest.raises(IntegrityError, match="no rbd-restore header"):
        sealed.decode_chunk(cid, b"\x28\xb5\x2f\xfd")
    # A plain chunk cannot stand in for a sealed one (downgrade), even a well-formed one.
    assert sealed.current is not None
    clear = Codec(AUTHENTICATED, sealed.keys, sealed.current, REPOSITORY_ID)
    with pytest.raises(IntegrityError, match="in the clear"):
        sealed.decode_chunk(cid, clear.encode_chunk(cid, plain))


def test_authenticated_chunks_stay_readable_and_verify_by_keyed_id() -> None:
    clear = codec(AUTHENTICATED)
    plain = b"visible " * 9000
    cid = clear.chunk_id(plain)
    stored = clear.encode_chunk(cid, plain)
    assert stored[0] == crypto.PLAIN
    assert clear.decode_chunk(cid, stored) == plain
    # Someone who can write the bucket but holds no key cannot make a chunk pass.
    forged = stored[:crypto.HEADER_BYTES] + LEGACY.encode_chunk(cid, b"chosen data" * 100)
    with pytest.raises(IntegrityError, match="keyed id"):
        clear.decode_chunk(cid, forged)


@pytest.mark.parametrize("encryption", [ENCRYPTED, AUTHENTICATED])
def test_manifests_are_authenticated_and_bound_to_their_backup(encryption: str) -> None:
    owner = codec(encryption)
    original = sample([owner.chunk_id(b"x" * 100), None])
    stored = owner.encode_manifest(original)
    read = owner.decode_manifest(stored, original.backup_id)
    assert dataclasses.replace(read, key_id="") == original
    assert read.key_id == owner.current_key_id
    with pytest.raises(IntegrityError):
        owner.decode_manifest(stored, new_backup_id())  # renamed to another backup
    if encryption == AUTHENTICATED:
        body = json.loads(stored)
        body["chunks"][0] = "00" * 32  # point a restore at chosen data
        # An attacker recomputing an unkeyed checksum gets nowhere: the MAC is keyed.
        body.pop("mac")
        body["checksum"] = "sha256:" + hashlib.sha256(json.dumps(
            body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        with pytest.raises(IntegrityError, match="MAC"):
            owner.decode_manifest(json.dumps(body).encode(), original.backup_id)
        downgraded = json.loads(stored)
        downgraded["encryption"] = ENCRYPTED
        with pytest.raises(IntegrityError):
            owner.decode_manifest(json.dumps(downgraded).encode(), original.backup_id)
    else:
        assert b"vm1" not in stored and b"volumes" not in stored
    with pytest.raises(IntegrityError):
        LEGACY.decode_manifest(stored, original.backup_id)  # format 1 reads none of it


def test_old_keys_stay_readable_after_rotation() -> None:
    old = codec()
    assert old.current is not None
    newer = crypto.DataKey.generate(REPOSITORY_ID, "2026-12-06T00:00:00+00:00")
    rotated = Codec(ENCRYPTED, {**old.keys, newer.key_id: newer}, newer, REPOSITORY_ID)
    before = sample([None])
    stored = old.encode_manifest(before)
    assert rotated.decode_manifest(stored, before.backup_id).key_id == old.current.key_id
    assert rotated.encode_manifest(before) != stored
    assert rotated.decode_manifest(rotated.encode_manifest(before),
                                   before.backup_id).key_id == newer.key_id


def test_sealed_profiles_and_sessions_are_bound_to_their_name() -> None:
    sealed = codec()
    blob = sealed.seal_object("session:0123456789abcdef", b'{"backup_id": "x"}')
    assert b"backup_id" not in blob
    assert sealed.open_object("session:0123456789abcdef", blob) == b'{"backup_id": "x"}'
    with pytest.raises(IntegrityError):
        sealed.open_object("session:fedcba9876543210", blob)
    assert codec(AUTHENTICATED).seal_object("profile:a/b", b"{}") == b"{}"


def test_wrapped_keys_open_only_with_their_credential() -> None:
    passphrase = crypto.Credential("passphrase", b"correct horse battery")
    kdf, blob = crypto.wrap(passphrase, b"key:1", b"payload")
    assert kdf["name"] == "scrypt"
    assert crypto.unwrap(passphrase.derive(kdf), b"key:1", blob) == b"payload"
    wrong = crypto.Credential("passphrase", b"wrong horse battery")
    with pytest.raises(crypto.Unopenable):
        crypto.unwrap(wrong.derive(kdf), b"key:1", blob)
    with pytest.raises(crypto.Unopenable):
        crypto.unwrap(passphrase.derive(kdf), b"key:2", blob)  # moved to another object
    key_file = crypto.Credential("key-file", os.urandom(32))
    with pytest.raises(crypto.Unopenable, match="scrypt"):
        key_file.derive(kdf)
    hostile = {**kdf, "n": 1 << 30}  # a bucket writer asking for 1 TiB of scrypt memory
    with pytest.raises(crypto.Unopenable, match="out of range"):
        passphrase.derive(hostile)


def test_credential_files_must_be_private_and_long_enough(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        keyring.load_credential(RepositorySettings(key_file=str(key_file)))
    key_file.chmod(0o600)
    loaded = keyring.load_credential(RepositorySettings(key_file=str(key_file)))
    assert loaded is not None and loaded.kind == "key-file"
    key_file.write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 32"):
        keyring.load_credential(RepositorySettings(key_file=str(key_file)))
    passphrase = tmp_path / "pass"
    passphrase.write_text("a passphrase of some length\nignored\n")
    passphrase.chmod(0o400)
    loaded = keyring.load_credential(RepositorySettings(passphrase_file=str(passphrase)))
    assert loaded is not None and loaded.material == b"a passphrase of some length"
    with pytest.raises(ConfigError, match="exclude"):
        keyring.load_credential(RepositorySettings(str(key_file), str(passphrase)))
    assert keyring.load_credential(RepositorySettings()) is None


def test_the_newest_key_is_current_even_within_one_second() -> None:
    repository_id = os.urandom(16).hex()
    first = crypto.DataKey("f" * 16, os.urandom(32), repository_id,
                           "2026-12-05T12:00:00.100000+00:00")
    added = crypto.DataKey("0" * 16, os.urandom(32), repository_id,
                           "2026-12-05T12:00:00.900000+00:00")
    # Chosen by time, not by the random key id that broke the tie in whole seconds.
    assert keyring.newest([first, added]) is added
    assert keyring.newest([added, first]) is added
    # Keys written before microseconds: a whole second sorts before its fractions.
    old = crypto.DataKey("e" * 16, os.urandom(32), repository_id, "2026-12-05T12:00:00+00:00")
    assert keyring.newest([first, old]) is first
    assert keyring.newest([old, crypto.DataKey("1" * 16, os.urandom(32), repository_id,
                                               "")]) is old
