"""Encrypted and authenticated repositories against the real RGW (docs/format.md,
"Format 2"). The bucket is read with boto3 and decoded by an implementation of the
spec written here, not by the package."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
from pathlib import Path
from typing import Any

import boto3
import rbd
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rbd_restore import devcluster
from rbd_restore.repo.repository import snapshot_name
from tests.support.helpers import Cli, export_digest, new_image

MiB = 1 << 20
BLOCK = 4096


def bucket(cluster: devcluster.ClusterInfo) -> Any:
    return boto3.client("s3", endpoint_url=cluster.s3_endpoint,
                        aws_access_key_id=cluster.s3_access_key,
                        aws_secret_access_key=cluster.s3_secret_key, region_name="us-east-1")


def objects(s3: Any, bucket_name: str, prefix: str) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket_name, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = s3.get_object(Bucket=bucket_name,
                                               Key=item["Key"])["Body"].read()
    return found


def key_file(cluster: devcluster.ClusterInfo) -> Path:
    import tomllib

    return Path(tomllib.loads(cluster.config.read_text())["repository"]["key_file"])


class SpecReader:
    """docs/format.md, "Format 2", for a key-file credential: nothing from rbd_restore."""

    def __init__(self, stored: dict[str, bytes], prefix: str, key_file_bytes: bytes) -> None:
        self.stored, self.prefix = stored, prefix
        config = json.loads(stored[prefix + "config"])
        assert config["format_version"] == 2
        self.encryption = config["encryption"]
        salt = bytes.fromhex(config["repository_id"])
        self.keys: dict[bytes, dict[str, Any]] = {}
        for name, body in stored.items():
            if not name.startswith(prefix + "keys/"):
                continue
            wrapper = json.loads(body)
            kdf = wrapper["kdf"]
            assert kdf["name"] == "hkdf-sha256"
            kek = self.hkdf(key_file_bytes, bytes.fromhex(kdf["salt"]), b"rbd-restore key file")
            blob = bytes.fromhex(wrapper["wrapped"])
            payload = json.loads(AESGCM(kek).decrypt(
                blob[:12], blob[12:], b"key:" + wrapper["id"].encode()))
            assert payload["repository_id"] == config["repository_id"]
            secret = bytes.fromhex(payload["key"])
            self.keys[bytes.fromhex(payload["key_id"])] = {
                name: self.hkdf(secret, salt, b"rbd-restore " + name.encode())
                for name in ("chunk-id", "encrypt", "mac")}

    @staticmethod
    def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)

    def open(self, body: bytes, context: bytes) -> tuple[dict[str, bytes], bytes]:
        header, keys = body[:9], self.keys[body[1:9]]
        if body[0] == 0:
            return keys, body[9:]
        assert body[0] == 1
        return keys, AESGCM(keys["encrypt"]).decrypt(body[9:21], body[21:], header + context)

    def manifest(self, backup_id: str) -> dict[str, Any]:
        body = self.stored[f"{self.prefix}manifests/{backup_id}.json"]
        if self.encryption == "aes-256-gcm":
            _, body = self.open(body, b"manifest:" + backup_id.encode())
        manifest: dict[str, Any] = json.loads(body)
        mac = manifest.pop("mac")
        keys = self.keys[bytes.fromhex(manifest["key_id"])]
        canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        assert mac == "hmac-sha256:" + hmac.new(keys["mac"], canonical, "sha256").hexdigest()
        return manifest

    def image(self, backup_id: str) -> bytes:
        manifest = self.manifest(backup_id)
        size, chunk_size = manifest["image_size"], manifest["chunk_size"]
        out = bytearray()
        for entry in manifest["chunks"]:
            if isinstance(entry, int):
                out += bytes(entry * chunk_size)
                continue
            keys, frame = self.open(self.stored[f"{self.prefix}chunks/{entry[:2]}/{entry}"],
                                    b"chunk:" + entry.encode())
            plain = zstandard.ZstdDecompressor().decompress(frame)
            assert hmac.new(keys["chunk-id"], plain, "sha256").hexdigest() == entry
            out += plain
        return bytes(out[:size])


def write_known_image(ioctx: Any, images: list[str], seed: int) -> tuple[str, list[bytes]]:
    """An image of distinct 4 KiB blocks, half random and half readable text."""
    rng = random.Random(seed)
    name = new_image(ioctx, images, 24 * MiB)
    blocks: list[bytes] = []
    with rbd.Image(ioctx, name) as image:
        for index in range(0, 24 * MiB // BLOCK, 3):
            if index % 2:
                block = rng.randbytes(BLOCK)
            else:
                block = (f"block {index} of a known image; " * 200).encode()[:BLOCK]
            image.write(block, index * BLOCK)
            blocks.append(block)
    return name, blocks


def test_encrypted_bucket_reveals_no_block_and_reads_by_the_spec(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str]) -> None:
    name, blocks = write_known_image(ioctx, images, 1)
    backup_id = cli.json("backup", f"volumes/{name}")["backup_id"]
    stored = objects(bucket(cluster), cluster.bucket, cli.prefix)
    assert json.loads(stored[cli.prefix + "config"])["encryption"] == "aes-256-gcm"
    everything = b"".join(stored.values())
    assert not [b for b in blocks if b in everything]  # no 4 KiB block in the clear
    assert b"volumes" not in everything and name.encode() not in everything
    reader = SpecReader(stored, cli.prefix, key_file(cluster).read_bytes())
    image = reader.image(backup_id)
    chunk_ids = {k.rsplit("/", 1)[-1] for k in stored if "/chunks/" in k}
    plain_hashes = {hashlib.sha256(image[i:i + 4 * MiB]).hexdigest()
                    for i in range(0, len(image), 4 * MiB)}
    assert chunk_ids and not chunk_ids & plain_hashes  # ids are not content hashes
    snapshot = f"volumes/{name}@{snapshot_name(backup_id)}"
    assert hashlib.sha256(image).hexdigest() == export_digest(cluster, snapshot)


def test_a_modified_manifest_or_chunk_is_refused_and_never_written(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str]) -> None:
    name, _ = write_known_image(ioctx, images, 2)
    backup_id = cli.json("backup", f"volumes/{name}")["backup_id"]
    s3 = bucket(cluster)
    stored = objects(s3, cluster.bucket, cli.prefix)
    manifest_key = f"{cli.prefix}manifests/{backup_id}.json"
    chunk_keys = sorted(k for k in stored if "/chunks/" in k)

    def put(key: str, body: bytes) -> None:
        s3.put_object(Bucket=cluster.bucket, Key=key, Body=body)

    def refused(target: str) -> str:
        images.append(target)
        result = cli.run("restore", backup_id, f"volumes/{target}", "--mode", "full")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 7 and len(lines) == 1, result.stderr
        assert target not in rbd.RBD().list(ioctx)
        assert not [i for i in rbd.RBD().list(ioctx) if i.startswith(f"{target}.partial")]
        return lines[0]

    flipped = bytearray(stored[manifest_key])
    flipped[len(flipped) // 2] ^= 0x20
    put(manifest_key, bytes(flipped))
    assert "does not authenticate" in refused(f"{name}-m")
    put(manifest_key, stored[manifest_key])

    damaged = bytearray(stored[chunk_keys[0]])
    damaged[-5] ^= 1
    put(chunk_keys[0], bytes(damaged))
    assert "does not authenticate" in refused(f"{name}-c")
    put(chunk_keys[0], stored[chunk_keys[1]])  # another chunk's body, whole and sealed
    assert "does not authenticate" in refused(f"{name}-s")
    put(chunk_keys[0], stored[chunk_keys[0]])
    restored = f"{name}-ok"
    images.append(restored)
    cli.json("restore", backup_id, f"volumes/{restored}", "--mode", "full")
    assert export_digest(cluster, f"volumes/{restored}") == export_digest(
        cluster, f"volumes/{name}@{snapshot_name(backup_id)}")


def test_plaintext_repository_is_keyed_and_its_manifests_cannot_be_forged(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str]) -> None:
    assert cli.json("init", "--plaintext")["encryption"] == "none"
    assert "already holds a repository" in cli.fails("init")
    name, _ = write_known_image(ioctx, images, 3)
    backup_id = cli.json("backup", f"volumes/{name}")["backup_id"]
    s3 = bucket(cluster)
    stored = objects(s3, cluster.bucket, cli.prefix)
    manifest_key = f"{cli.prefix}manifests/{backup_id}.json"
    body = json.loads(stored[manifest_key])
    assert body["encryption"] == "none" and body["mac"].startswith("hmac-sha256:")
    reader = SpecReader(stored, cli.prefix, key_file(cluster).read_bytes())
    assert hashlib.sha256(reader.image(backup_id)).hexdigest() == export_digest(
        cluster, f"volumes/{name}@{snapshot_name(backup_id)}")
    # A bucket writer points the manifest at other data and recomputes every checksum
    # it can: without the key, the MAC does not follow.
    body.pop("mac")
    body["chunks"][0] = body["chunks"][-1]
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["mac"] = "hmac-sha256:" + hashlib.sha256(canonical).hexdigest()
    s3.put_object(Bucket=cluster.bucket, Key=manifest_key, Body=json.dumps(body).encode())
    target = f"{name}-forged"
    images.append(target)
    assert "fails its MAC" in cli.fails("restore", backup_id, f"volumes/{target}",
                                        "--mode", "full")
    assert target not in rbd.RBD().list(ioctx)


def test_keys_rotate_and_a_client_reads_only_what_its_credential_opens(
        cluster: devcluster.ClusterInfo, cli: Cli, ioctx: Any, images: list[str],
        tmp_path: Path) -> None:
    name, _ = write_known_image(ioctx, images, 4)
    spec = f"volumes/{name}"
    first = cli.json("backup", spec)
    added = cli.json("key", "add")
    second = cli.json("backup", spec)
    # The parent is under the old key: the first backup under the new key reads it all.
    assert second["chunks_new"] == first["chunks_new"] and second["chunks_reused"] == 0
    listed = cli.json("key", "list")["keys"]
    assert {k["key_id"]: k["backups"] for k in listed} == {
        k["key_id"]: 1 for k in listed} and len(listed) == 2
    assert [k["key_id"] for k in listed if k["current"]] == [added["key_id"]]
    old_object = next(k["object"] for k in listed if not k["current"])
    assert "backups are under" in cli.fails("key", "remove", old_object)

    passphrase = tmp_path / "passphrase"
    passphrase.write_text("a long operator passphrase\n")
    passphrase.chmod(0o600)
    cli.json("key", "add", "--passphrase-file", str(passphrase))
    with_passphrase = {"RBD_RESTORE_REPOSITORY_KEY_FILE": "",
                       "RBD_RESTORE_REPOSITORY_PASSPHRASE_FILE": str(passphrase)}
    for backup in (first, second):
        target = f"{name}-{backup['backup_id'][-4:]}"
        images.append(target)
        cli.json("restore", backup["backup_id"], f"volumes/{target}", "--mode", "full",
                 env=with_passphrase)
        # The image did not change between the backups (a backup removes the older
        # snapshot), so both restores equal it.
        assert export_digest(cluster, f"volumes/{target}") == export_digest(cluster, spec)

    stranger = tmp_path / "stranger.key"
    stranger.write_bytes(os.urandom(32))
    stranger.chmod(0o600)
    line = cli.fails("backups", "list", env={"RBD_RESTORE_REPOSITORY_KEY_FILE": str(stranger)})
    assert "no key of" in line and "opens" in line
    line = cli.fails("backups", "list", env={"RBD_RESTORE_REPOSITORY_KEY_FILE": ""})
    assert "format-2 repository" in line


def test_format_1_stays_readable_without_a_key_and_is_refused_with_one(
        cluster: devcluster.ClusterInfo, ioctx: Any, images: list[str],
        unique_name: str) -> None:
    from rbd_restore.backup import run_backup
    from rbd_restore.ceph import Cluster, ImageRef
    from rbd_restore.config import load
    from rbd_restore.repo.repository import Repository
    from rbd_restore.repo.store import ObjectStore

    prefix = f"{unique_name}-v1/"
    cfg = load(str(cluster.config))
    name, _ = write_known_image(ioctx, images, 5)
    legacy = Repository(ObjectStore(cfg.s3), prefix)  # format 1, as before format 2 existed
    with Cluster(cfg.ceph) as ceph:
        backup_id = run_backup(ceph, legacy, ImageRef("volumes", name), 4 * MiB,
                               full=True, workers=4).manifest.backup_id
    without_key = Cli(cluster, prefix, {"RBD_RESTORE_REPOSITORY_KEY_FILE": ""})
    assert [b["backup_id"] for b in without_key.json("backups", "list")["backups"]] == [
        backup_id]
    restored = f"{name}-v1"
    images.append(restored)
    without_key.json("restore", backup_id, f"volumes/{restored}", "--mode", "full")
    assert export_digest(cluster, f"volumes/{restored}") == export_digest(
        cluster, f"volumes/{name}@{snapshot_name(backup_id)}")
    line = Cli(cluster, prefix, {}).fails("backups", "list")
    assert "format-1 repository (unauthenticated)" in line
    empty = Cli(cluster, f"{unique_name}-none/", {"RBD_RESTORE_REPOSITORY_KEY_FILE": ""})
    assert "holds no repository" in empty.fails("backup", f"volumes/{name}")
