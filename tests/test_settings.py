"""Typed settings: one definition per setting, validated at start-up, and the README generated from it."""

from __future__ import annotations

import pytest

from conftest import REPO
from fma_cli.docs import blocks, render, settings_classes
from fma_common.settings import EnvSettings, SettingsError, describe, markdown_table, parse_duration, setting
from fma_requester.knative import KnativeSettings
from fma_requester.settings import RequesterSettings
from fma_worker.settings import WorkerSettings


def test_defaults_serve_the_embedded_model():
    s = WorkerSettings.from_env({})
    assert s.model == "smollm2-135m-instruct"
    assert s.source == "embedded:smollm2-135m-instruct"
    assert s.port == 8000 and s.device == "auto" and s.max_tokens == 2048 and s.queue_timeout_s == 60.0


def test_derived_defaults_follow_the_values_they_come_from():
    s = WorkerSettings.from_env({"FMA_MAX_BATCH": "4", "FMA_MAX_QUEUE": "10", "XDG_CACHE_HOME": "/x"})
    assert s.worker_threads == 4 + 10 + 8 and s.torch_threads >= 1
    assert str(s.cache_dir) == "/x/fma"
    assert str(WorkerSettings.from_env({"FMA_CACHE_DIR": "/c", "XDG_CACHE_HOME": "/x"}).cache_dir) == "/c"


@pytest.mark.parametrize("env, message", [
    ({"FMA_MAX_TOKENS": "lots"}, "FMA_MAX_TOKENS: Input should be a valid integer"),
    ({"FMA_MAX_TOKENS": "0"}, "FMA_MAX_TOKENS: Input should be greater than or equal to 1"),
    ({"FMA_DEVICE": "tpu"}, "FMA_DEVICE"),
    ({"FMA_DTYPE": "int3"}, "FMA_DTYPE"),
    ({"FMA_MODEL": "mystery"}, "FMA_MODEL_SOURCE: required"),
    ({"FMA_MODEL_SOURCE": "nowhere"}, "FMA_MODEL_SOURCE"),
    ({"FMA_QUEUE_TIMEOUT": "soon"}, "FMA_QUEUE_TIMEOUT: 'soon' is not a duration"),
    ({"FMA_LOG_PROMPTS": "maybe"}, "FMA_LOG_PROMPTS: 'maybe' is not a boolean"),
])
def test_bad_values_stop_start_up_naming_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        WorkerSettings.from_env(env)


def test_an_empty_variable_is_unset_unless_empty_means_something():
    assert WorkerSettings.from_env({"FMA_MAX_TOKENS": ""}).max_tokens == 2048
    assert KnativeSettings.from_env({}).owner_service == "fma-requester"
    assert KnativeSettings.from_env({"FMA_OWNER_SERVICE": ""}).owner_service == ""


def test_durations():
    assert parse_duration("300s") == 300
    assert parse_duration("5m") == 300
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2") == 2


def test_describe_masks_secrets_but_not_token_counts():
    class S(EnvSettings):
        max_tokens: int = setting("X_MAX_TOKENS", "5", "tokens")
        api_keys: str = setting("X_API_KEYS", "sk-123", "keys")

    assert describe(S.from_env({})) == {"max_tokens": 5, "api_keys": "***"}


@pytest.mark.parametrize("env, message", [
    ({"FMA_BIND": "localhost"}, "HOST:PORT"),
    ({"FMA_BIND": "127.0.0.1:99999"}, "HOST:PORT"),
    ({"FMA_ACTUATOR": "docker"}, "FMA_ACTUATOR"),
    ({"FMA_EVICT_SLEEP_LEVEL": "3"}, "FMA_EVICT_SLEEP_LEVEL"),
])
def test_bad_requester_values_stop_start_up(env, message):
    with pytest.raises(SettingsError, match=message):
        RequesterSettings.from_env(env)


def test_requester_binds_both_fma_ports_locally_and_port_in_knative():
    assert RequesterSettings.from_env({}).binds == ("127.0.0.1:8080", "127.0.0.1:8081")
    # Knative: every route on $PORT, and on the pod's loopback at 8081 for the FMA example's port-forward (issue 26).
    assert RequesterSettings.from_env({"PORT": "9000"}).binds == ("0.0.0.0:9000", "127.0.0.1:8081")
    assert RequesterSettings.from_env({"PORT": "8081"}).binds == ("0.0.0.0:8081",)
    assert RequesterSettings.from_env({"PORT": "9000", "FMA_SPI_PORT": "0"}).binds == ("0.0.0.0:9000",)
    assert RequesterSettings.from_env({"PORT": "9000", "FMA_BIND": "0.0.0.0:1"}).binds == ("0.0.0.0:1",)


def test_every_setting_has_a_variable_a_default_and_a_meaning():
    for cls in settings_classes().values():
        for env, shown, meaning in cls.rows():
            assert env and shown and meaning and not meaning.startswith(env), (cls.__name__, env)


def test_written_defaults_are_the_values_the_settings_really_take():
    for cls in settings_classes().values():
        defaults = cls.from_env({})
        for name, field in cls.model_fields.items():
            extra = field.json_schema_extra or {}
            if not isinstance(extra, dict) or "env" not in extra or field.default is None:
                continue
            # What the README shows, read back as the variable, gives the default.
            again = cls.from_env({extra["env"]: extra["shown"]})
            assert getattr(again, name) == getattr(defaults, name), (cls.__name__, name)


@pytest.mark.parametrize("service", ["worker", "requester", "knative"])
def test_readme_tables_are_generated_from_the_settings(service: str):
    readme = (REPO / "README.md").read_text()
    tables = blocks(readme)
    assert service in tables, f"README has no <!-- settings:{service} --> block"
    assert tables[service] == markdown_table(settings_classes()[service]), \
        "README and settings disagree: run `make docs`"
    assert render(readme) == readme


def test_tls_needs_both_files_and_they_must_exist(tmp_path):
    from fma_common.settings import SettingsError
    from fma_requester.settings import RequesterSettings

    cert = tmp_path / "server.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError, match="set both"):
        RequesterSettings.from_env({"FMA_TLS_CERTFILE": str(cert)})
    with pytest.raises(SettingsError, match="not a readable file"):
        RequesterSettings.from_env({"FMA_TLS_CERTFILE": str(cert), "FMA_TLS_KEYFILE": str(tmp_path / "nope")})
    key = tmp_path / "key.pem"
    key.write_text("x")
    assert RequesterSettings.from_env({"FMA_TLS_CERTFILE": str(cert), "FMA_TLS_KEYFILE": str(key)}).tls_keyfile == key
