from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rbd_restore import config
from rbd_restore.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    path.chmod(0o640)
    return str(path)


def test_a_file_every_user_can_read_is_refused_when_it_holds_a_secret(
        tmp_path: Path) -> None:
    path = write(tmp_path, '[fetcher]\nsecret = "s"\n')
    Path(path).chmod(0o644)
    with pytest.raises(ConfigError, match=r"holds fetcher.secret and every user can read "
                       r"it: chmod o-r"):
        config.load(path)
    Path(path).chmod(0o640)  # the usual root:rbd-restore 0640 is fine
    assert config.load(path).fetcher.secret == "s"


def test_a_file_without_secrets_may_be_readable_but_never_writable_by_all(
        tmp_path: Path) -> None:
    path = write(tmp_path, '[s3]\nbucket = "b"\n')
    Path(path).chmod(0o644)
    assert config.load(path).s3.bucket == "b"
    Path(path).chmod(0o646)
    with pytest.raises(ConfigError, match="can be changed by every user"):
        config.load(path)


def test_full_file_round_trips_through_render(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    text = config.render_toml({
        "ceph": {"conf": "/x/ceph.conf", "keyring": "/x/k", "client_name": "client.bob"},
        "s3": {"endpoint": "http://h:1", "access_key": "A", "secret_key": 'q"\\z',
               "bucket": "b", "max_attempts": 3},
    })
    cfg = config.load(write(tmp_path, text))
    assert cfg.ceph.rados_id == "bob"
    assert cfg.s3.secret_key == 'q"\\z'
    assert cfg.s3.max_attempts == 3
    assert cfg.pools.restore_default == "volumes"


def test_environment_overrides_every_field(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBD_RESTORE_S3_BUCKET", "from-env")
    monkeypatch.setenv("RBD_RESTORE_S3_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("RBD_RESTORE_CEPH_CONF", "/env/ceph.conf")
    cfg = config.load(write(tmp_path, '[s3]\nbucket = "file"\n'))
    assert cfg.s3.bucket == "from-env"
    assert cfg.s3.max_attempts == 5
    assert cfg.ceph.conf == "/env/ceph.conf"


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBD_RESTORE_CONFIG", write(tmp_path, '[s3]\nbucket = "b"\n'))
    assert config.load().s3.bucket == "b"


def test_aws_variables_are_the_credential_fallback(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    cfg = config.load(write(tmp_path, "[s3]\n"))
    assert (cfg.s3.access_key, cfg.s3.secret_key) == ("AK", "SK")
    assert "SK" not in repr(cfg)


@pytest.mark.parametrize(("text", "needle"), [
    ("[s3]\nbucket = 3\n", "s3.bucket"),
    ("[s3]\nbukket = 'x'\n", "s3.bukket"),
    ("[nope]\n", "nope"),
    ("s3 = 1\n", "s3"),
    ("[s3]\nmax_attempts = 'many'\n", "s3.max_attempts"),
    ("[s3]\nmax_attempts = 0\n", "s3.max_attempts"),
    ("[s3]\nsign_payload = 2\n", "s3.sign_payload"),
    ("[s3\n", "not valid TOML"),
])
def test_malformed_files_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert needle in err.value.message
    assert "\n" not in err.value.message


def test_missing_file_and_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "absent.toml"))
    monkeypatch.delenv("RBD_RESTORE_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="RBD_RESTORE_CONFIG"):
        config.load(None)


def test_require_names_the_missing_field() -> None:
    with pytest.raises(ConfigError, match=r"s3\.endpoint .*RBD_RESTORE_S3_ENDPOINT"):
        config.require("", "s3.endpoint")


class _Captured(Exception):
    pass


@pytest.mark.parametrize(("sign", "signed"), [(0, False), (1, True)])
def test_sign_payload_decides_what_a_put_declares(sign: int, signed: bool) -> None:
    from rbd_restore.repo.store import make_client

    settings = config.S3Settings(endpoint="http://127.0.0.1:9", access_key="k",
                                 secret_key="s", bucket="b", sign_payload=sign)
    client = make_client(settings)
    seen: dict[str, str | bytes] = {}

    def capture(request: object, **_: object) -> None:
        seen.update({k.lower(): v for k, v in getattr(request, "headers", {}).items()})
        raise _Captured  # stop before anything reaches the network

    client.meta.events.register("before-send.s3.PutObject", capture)
    with pytest.raises(_Captured):
        client.put_object(Bucket="b", Key="k", Body=b"chunk bytes")
    declared = seen["x-amz-content-sha256"]
    declared = declared.decode() if isinstance(declared, bytes) else declared
    assert (declared != "UNSIGNED-PAYLOAD") is signed


def test_role_tokens_must_differ(tmp_path: Path) -> None:
    path = write(tmp_path, '[fetcher]\ncontrol_token = "t"\nrunner_token = "t"\n')
    with pytest.raises(ConfigError, match="must all differ"):
        config.load(path)


@pytest.mark.parametrize("endpoint", [
    "foo", "http://", "ftp://s3.example:7480", "http://127.0.0.1:99999", "http://host:port",
    "https://s3.example/?x=1", "127.0.0.1:7480", "http://user:pw@s3.example"])
def test_an_endpoint_that_is_no_http_url_is_refused_by_name(endpoint: str) -> None:
    for section, key in (("s3", "endpoint"), ("fetcher", "public_url"),
                         ("fetcher", "control_url")):
        with pytest.raises(ConfigError, match=rf"config field {section}.{key}: .*http\(s\) URL"):
            config.from_mapping({section: {key: endpoint}})


@pytest.mark.parametrize("endpoint", [
    "", "http://127.0.0.1:7480", "https://s3.example.com", "https://[::1]:7480/",
    "https://s3.eu-west-1.amazonaws.com", "http://rgw.ceph.internal:8080/s3"])
def test_http_urls_are_endpoints(endpoint: str) -> None:
    assert config.from_mapping({"s3": {"endpoint": endpoint}}).s3.endpoint == endpoint


@pytest.mark.parametrize("region", ["bad region!", "eu_west_1", "-eu", "x" * 64])
def test_a_region_botocore_would_refuse_is_refused_by_name(region: str) -> None:
    with pytest.raises(ConfigError, match=r"config field s3\.region: "):
        config.from_mapping({"s3": {"region": region}})


@pytest.mark.parametrize("region", ["", "us-east-1", "eu-central-1", "default", "zg1"])
def test_region_names_pass(region: str) -> None:
    """"" leaves the region to botocore (AWS_DEFAULT_REGION, ~/.aws/config)."""
    assert config.from_mapping({"s3": {"region": region}}).s3.region == region


@pytest.mark.parametrize("keys", [{"access_key": "a"}, {"secret_key": "s"}])
def test_half_a_key_pair_is_refused(keys: dict[str, str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """One of the two set (and the other not in the environment either) signs with
    None: botocore's TypeError, not a refusal."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"s3\.access_key and s3\.secret_key go together"):
        config.from_mapping({"s3": keys})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert config.from_mapping({"s3": keys}).s3.secret_key == keys.get("secret_key", "s")


@pytest.mark.parametrize("bucket", ["Bad_Bucket!", "a/b", "x" * 256, "with space"])
def test_a_bucket_name_s3_cannot_have_is_refused(bucket: str) -> None:
    with pytest.raises(ConfigError, match=r"config field s3\.bucket: "):
        config.from_mapping({"s3": {"bucket": bucket}})


@pytest.mark.parametrize("bucket", ["", "rbd-restore", "backups.site-a", "Legacy_RGW_bucket"])
def test_bucket_names_pass(bucket: str) -> None:
    assert config.from_mapping({"s3": {"bucket": bucket}}).s3.bucket == bucket


def test_a_ca_bundle_that_is_missing_or_no_pem_is_refused_where_s3_is_used(
        tmp_path: Path) -> None:
    from rbd_restore.repo.store import ObjectStore

    settings = config.S3Settings(endpoint="https://127.0.0.1:9", access_key="a",
                                 secret_key="s", bucket="b")
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    for path, said in ((tmp_path / "none.pem", "does not exist"),
                       (not_pem, "cannot be used"), (tmp_path, "cannot be used")):
        with pytest.raises(ConfigError, match=rf"s3\.ca_bundle: {path} {said}"):
            ObjectStore(dataclasses.replace(settings, ca_bundle=str(path)))


def test_a_url_with_credentials_is_refused_without_echoing_them() -> None:
    for url in ("http://AKIA:s3cr3t@s3.example", "http://AKIA:s3cr3t@s3.example:99999/"):
        with pytest.raises(ConfigError) as refused:
            config.from_mapping({"s3": {"endpoint": url}})
        assert "s3cr3t" not in str(refused.value) and "AKIA" not in str(refused.value)
