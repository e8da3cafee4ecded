"""The S3 object store's settings: Qtap's services.object_stores, the flags, the keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowtap.cli import build_parser, config_from_args
from flowtap.config import ConfigError, SensorConfig
from flowtap.settings import yamlfile
from flowtap.settings.options import SettingError
from flowtap.sinks.objects import S3Settings, Secret, _credentials


def _config(*argv: str) -> SensorConfig:
    args = build_parser(given_only=True).parse_args(["run", *argv])
    args._given_only = True
    return config_from_args(args, environ={})


def test_qtap_s3_store_with_keys_from_env_and_text(tmp_path: Path) -> None:
    path = tmp_path / "qtap.yaml"
    path.write_text(
        "version: 2\nservices:\n  object_stores:\n    - id: b\n      type: s3\n"
        "      endpoint: minio:9000\n      bucket: bodies\n      region: eu-west-1\n"
        "      insecure: true\n      access_url: https://o.example/{{BUCKET}}/{{DIGEST}}\n"
        "      access_key: {type: env, value: MY_KEY}\n"
        "      secret_key: {type: text, value: hunter2}\n"
    )
    config = _config("--config", str(path))
    settings = config.s3_settings()
    assert settings == S3Settings(
        "minio:9000",
        "bodies",
        "eu-west-1",
        True,
        "https://o.example/{{BUCKET}}/{{DIGEST}}",
        Secret(env="MY_KEY"),
        Secret(text="hunter2"),
    )
    assert settings.url("ab12") == "https://o.example/bodies/ab12"
    assert settings.endpoint_url == "http://minio:9000"
    assert "hunter2" not in repr(config)
    assert _credentials(settings, {"MY_KEY": "AK"}) == {
        "aws_access_key_id": "AK",
        "aws_secret_access_key": "hunter2",
    }


def test_flags_and_the_default_url() -> None:
    config = _config("--s3-endpoint", "s3.example:443", "--s3-bucket", "b")
    settings = config.s3_settings()
    assert settings is not None
    assert settings.url("ff") == "https://s3.example:443/b/ff"
    assert _config().s3_settings() is None  # the default: bodies inline
    with pytest.raises(ConfigError, match="needs both an endpoint and a bucket"):
        _config("--s3-endpoint", "s3.example:443").validate()
    for endpoint in ("s3.example:port", "ftp://s3.example", ":9000"):
        with pytest.raises(ConfigError, match="not an S3 endpoint; use HOST:PORT"):
            _config("--s3-endpoint", endpoint, "--s3-bucket", "b").validate()
    _config("--s3-endpoint", "http://127.0.0.1:9000", "--s3-bucket", "b").validate()


def test_keys_from_flowtap_variables_else_boto3s_chain() -> None:
    settings = S3Settings("h:1", "b")
    env = {"FLOWTAP_S3_ACCESS_KEY": "A", "FLOWTAP_S3_SECRET_KEY": "S"}
    assert _credentials(settings, env) == {"aws_access_key_id": "A", "aws_secret_access_key": "S"}
    assert _credentials(settings, {}) == {}


@pytest.mark.parametrize(
    ("store", "error"),
    [
        (
            "type: s3\n      bucket: b\n",
            ":4: services.object_stores[0]: an s3 store needs endpoint",
        ),
        ("type: gcs\n", ":4: services.object_stores[0].type: 'gcs' is not one of s3, stdout"),
        ("type: stdout\n      bucket: b\n", ":4: services.object_stores[0]: bucket: only for"),
        (
            "type: s3\n      endpoint: e\n      bucket: b\n      access_key: {type: vault}\n",
            ":7: services.object_stores[0].access_key: needs a type (env or text) and a value",
        ),
        (
            "type: s3\n      endpoint: e\n      bucket: b\n      insecure: maybe\n",
            ":7: services.object_stores[0].insecure: true or false",
        ),
    ],
)
def test_refusals_name_the_place(tmp_path: Path, store: str, error: str) -> None:
    path = tmp_path / "qtap.yaml"
    path.write_text("version: 2\nservices:\n  object_stores:\n    - " + store)
    with pytest.raises(SettingError) as caught:
        yamlfile.load(path)
    assert str(caught.value).startswith(f"{path}{error}"), str(caught.value)
