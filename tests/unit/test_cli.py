"""The CLI's contract: one line and a non-zero exit for every known failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rbd_restore.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("rbd-restore ")


def test_unknown_log_level_is_one_line() -> None:
    result = run("--log-level", "chatty", "dev", "status", "--dir", "/nonexistent")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1
    assert "log level" in result.stderr


def test_dev_status_of_missing_cluster() -> None:
    result = run("dev", "status", "--dir", "/nonexistent/x")
    assert result.returncode == 8
    assert result.stderr.strip() == "rbd-restore: error: /nonexistent/x holds no embedded cluster"


def test_parser_errors_are_one_line() -> None:
    cases = {("gc", "--bogus"): "No such option: --bogus (see 'rbd-restore gc --help')",
             ("nosuchcmd",): "No such command 'nosuchcmd' (see 'rbd-restore --help')",
             ("restore",): "Missing argument 'backup_id' (see 'rbd-restore restore --help')"}
    for args, message in cases.items():
        result = run(*args)
        assert result.returncode == 2, args
        assert result.stderr == f"rbd-restore: error: {message}\n"


def test_help_still_exits_zero() -> None:
    result = run("profile", "show", "--help")
    assert result.returncode == 0
    assert "Usage: rbd-restore profile show" in result.stdout


def test_commands_without_a_repository_do_not_load_its_stack() -> None:
    """`restore --mode instant` is timed from its start to ready: the repository's stack
    (cryptography, urllib3, botocore) cost it a tenth of a second it never used."""
    probe = ("import sys, rbd_restore.cli.main; print(' '.join(sorted(m for m in ("
             "'rbd_restore.repo.keyring', 'rbd_restore.repo.store', 'cryptography', "
             "'botocore', 'urllib3') if m in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True).stdout.split()
    assert loaded == []


def test_bad_s3_settings_are_a_config_error(tmp_path: Path) -> None:
    """Not an internal error (botocore's ValueError), nor S3 "unreachable" after
    retries with backoff for a URL that can never work."""
    conf = tmp_path / "c.toml"
    conf.write_text('[s3]\nbucket = "b"\naccess_key = "a"\nsecret_key = "s"\n')
    conf.chmod(0o600)
    for name, value in (("ENDPOINT", "foo"), ("ENDPOINT", "http://127.0.0.1:99999"),
                        ("REGION", "bad region!"), ("BUCKET", "Bad_Bucket!"),
                        ("ACCESS_KEY", "")):
        failed = subprocess.run(
            [sys.executable, "-m", "rbd_restore.cli", "--config", str(conf), "backups",
             "list"], capture_output=True, text=True, timeout=60,
            env={**os.environ, f"RBD_RESTORE_S3_{name}": value})
        assert failed.returncode == 3, failed.stderr
        assert f"s3.{name.lower()}" in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1


def test_a_bad_fetcher_control_url_is_a_config_error(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[fetcher]\ncontrol_url = "foo"\ncontrol_token = "t"\n')
    conf.chmod(0o600)
    failed = run("--config", str(conf), "fetcher", "session", "list")
    assert failed.returncode == 3, failed.stderr
    assert failed.stderr.strip().startswith("rbd-restore: error: config field "
                                            "fetcher.control_url: 'foo' is no http(s) URL")
