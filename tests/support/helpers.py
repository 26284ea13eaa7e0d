"""Helpers for tests that drive the real CLI against the session's cluster."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rbd_restore import devcluster

# The interpreter that runs rbd-restore: this one, or the project's when the tests run
# in another environment (the Cinder tests, in Cinder's own virtualenv).
PYTHON = os.environ.get("RBD_RESTORE_PYTHON", sys.executable)


@dataclass
class Cli:
    """Runs ``rbd-restore`` with the cluster's config and a repository prefix of its own."""

    cluster: devcluster.ClusterInfo
    prefix: str
    extra_env: dict[str, str]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "RBD_RESTORE_CONFIG": str(self.cluster.config),
                "RBD_RESTORE_S3_PREFIX": self.prefix, **self.extra_env, **(extra or {})}

    @staticmethod
    def command(*args: str) -> list[str]:
        return [PYTHON, "-m", "rbd_restore.cli", *args]

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args),
                              capture_output=True, text=True, env=self.env(env),
                              timeout=timeout, check=False)

    def json(self, *args: str, env: dict[str, str] | None = None) -> Any:
        result = self.run(*args, "--json", env=env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def fails(self, *args: str, env: dict[str, str] | None = None,
              timeout: float = 300) -> str:
        """Run a command that must fail with one line on stderr; return that line."""
        result = self.run(*args, env=env, timeout=timeout)
        assert result.returncode != 0, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "Traceback" not in result.stderr
        return lines[0]


def repository(cli: Cli) -> Any:
    """The repository ``cli`` uses, opened with the cluster's key, for tests that read or
    damage what is stored (``tests/integration/test_encryption.py`` reads it without the
    package)."""
    import dataclasses

    from rbd_restore import config
    from rbd_restore.repo import keyring

    cfg = config.load(str(cli.cluster.config))
    return keyring.open_repository(dataclasses.replace(cfg.s3, prefix=cli.prefix),
                                   cfg.repository)


def manifest_body(cli: Cli, backup_id: str) -> dict[str, Any]:
    """The JSON of a stored manifest, opened."""
    repo = repository(cli)
    stored = repo.store.get(repo.keys.manifest(backup_id))
    body: dict[str, Any] = json.loads(repo.codec.manifest_text(stored, backup_id))
    return body


def put_manifest_body(cli: Cli, backup_id: str, body: dict[str, Any]) -> None:
    """Store ``body`` as the manifest, sealed as the repository seals manifests but with
    its MAC left as it is: an edit only a key holder could make look right."""
    repo = repository(cli)
    data = json.dumps(body).encode()
    if repo.codec.encrypted:
        data = repo.codec.current.seal(b"manifest:" + backup_id.encode(), data)
    repo.store.put(repo.keys.manifest(backup_id), data)


def put_chunk_content(cli: Cli, chunk_id: str, plain: bytes) -> None:
    """Store ``plain`` under ``chunk_id``, framed and sealed as a real chunk: only the
    check of the content against its (keyed) id can catch it."""
    repo = repository(cli)
    repo.put_chunk(chunk_id, repo.codec.encode_chunk(chunk_id, plain))


def export_digest(cluster: devcluster.ClusterInfo, spec: str) -> str:
    """SHA-256 of ``rbd export`` of an image or snapshot: the whole content."""
    proc = subprocess.Popen(["rbd", "-c", str(cluster.ceph_conf), "export", spec, "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    digest = hashlib.sha256()
    assert proc.stdout is not None
    for block in iter(lambda: proc.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
        digest.update(block)
    assert proc.wait() == 0, f"rbd export {spec} failed"
    return digest.hexdigest()


def du_used(cluster: devcluster.ClusterInfo, spec: str) -> int:
    out = subprocess.run(["rbd", "-c", str(cluster.ceph_conf), "du", spec, "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    images = json.loads(out)["images"]
    return sum(int(i["used_size"]) for i in images if i["name"] == spec.split("/")[-1]
               and not i.get("snapshot"))


def scatter_random_data(image: Any, rng: random.Random, writes: int,
                        max_len: int = 300_000) -> None:
    """Random bytes at random offsets, including the image's last partial chunk."""
    size = image.size()
    for _ in range(writes):
        length = rng.randint(1, max_len)
        offset = rng.randrange(0, max(1, size - length))
        image.write(rng.randbytes(length), offset)
    image.write(rng.randbytes(min(size, 777)), size - min(size, 777))


def new_image(ioctx: Any, images: list[str], size: int) -> str:
    """A new, empty image of ``size`` bytes, registered for removal after the test."""
    import rbd

    name = f"img-{uuid.uuid4().hex[:10]}"
    rbd.RBD().create(ioctx, name, size, old_format=False)
    images.append(name)
    return name


def wait_for(condition: Callable[[], Any], timeout: float = 60, every: float = 0.2) -> Any:
    """``condition()``'s first true value, asked every ``every`` s; fails after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(every)
    return value


def mon_command(rados_cluster: Any, prefix: str, **args: Any) -> Any:
    """A monitor command as the admin, its JSON answer (None for none); fails on error."""
    ret, out, err = rados_cluster.mon_command(
        json.dumps({"prefix": prefix, "format": "json", **args}), b"", timeout=30)
    assert ret == 0, err
    return json.loads(out) if out.strip() else None
