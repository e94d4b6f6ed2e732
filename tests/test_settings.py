"""Typed settings: defaults, validation at start-up, and the README in step."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from fma_common.settings import SettingsError, describe, parse_duration
from fma_worker.settings import WORKER_ENV, WorkerSettings


def test_defaults_serve_the_embedded_model():
    s = WorkerSettings.from_env({})
    assert s.model == "smollm2-135m-instruct"
    assert s.source == "embedded:smollm2-135m-instruct"
    assert s.port == 8000 and s.device == "auto"


@pytest.mark.parametrize("env, message", [
    ({"FMA_MAX_TOKENS": "lots"}, "FMA_MAX_TOKENS"),
    ({"FMA_MAX_TOKENS": "0"}, ">= 1"),
    ({"FMA_DEVICE": "tpu"}, "FMA_DEVICE"),
    ({"FMA_DTYPE": "int3"}, "FMA_DTYPE"),
    ({"FMA_MODEL": "mystery"}, "FMA_MODEL_SOURCE"),
    ({"FMA_MODEL_SOURCE": "nowhere"}, "FMA_MODEL_SOURCE"),
    ({"FMA_QUEUE_TIMEOUT": "soon"}, "FMA_QUEUE_TIMEOUT"),
    ({"FMA_LOG_PROMPTS": "maybe"}, "FMA_LOG_PROMPTS"),
])
def test_bad_values_stop_start_up_naming_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        WorkerSettings.from_env(env)


def test_durations():
    assert parse_duration("300s") == 300
    assert parse_duration("5m") == 300
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2") == 2


def test_describe_masks_secrets_but_not_token_counts():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class S:
        max_tokens: int = 5
        api_key: str = "sk-123"

    assert describe(S()) == {"max_tokens": 5, "api_key": "***"}


@pytest.mark.parametrize("env, message", [
    ({"FMA_BIND": "localhost"}, "HOST:PORT"),
    ({"FMA_BIND": "127.0.0.1:99999"}, "HOST:PORT"),
    ({"FMA_ACTUATOR": "docker"}, "FMA_ACTUATOR"),
    ({"FMA_EVICT_SLEEP_LEVEL": "3"}, "FMA_EVICT_SLEEP_LEVEL"),
])
def test_bad_requester_values_stop_start_up(env, message):
    from fma_requester.settings import RequesterSettings

    with pytest.raises(SettingsError, match=message):
        RequesterSettings.from_env(env)


def test_requester_binds_both_fma_ports_locally_and_port_in_knative():
    from fma_requester.settings import RequesterSettings

    assert RequesterSettings.from_env({}).binds == ("127.0.0.1:8080", "127.0.0.1:8081")
    assert RequesterSettings.from_env({"PORT": "9000"}).binds == ("0.0.0.0:9000",)


def _env_tables() -> dict[str, dict[str, tuple[str, str]]]:
    from fma_requester.knative import KNATIVE_ENV
    from fma_requester.settings import REQUESTER_ENV

    return {"worker": WORKER_ENV, "requester": REQUESTER_ENV, "knative": KNATIVE_ENV}


@pytest.mark.parametrize("service", ["worker", "requester", "knative"])
def test_readme_lists_every_setting(service: str):
    readme = (REPO / "README.md").read_text()
    listed = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, flags=re.M))
    missing = set(_env_tables()[service]) - listed
    assert not missing, f"README is missing {service} settings: {sorted(missing)}"
