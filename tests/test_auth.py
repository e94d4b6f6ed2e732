"""API keys: inference and admin roles on the requester, the requester-only token on workers, keys never logged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_requester_app import MODELS, FakeActuator

from fma_common.auth import KeyRing, read_keys
from fma_common.errors import Forbidden, Unauthorized
from fma_requester.app import create_app, required_role
from fma_requester.registry import ModelRegistry
from fma_requester.settings import RequesterSettings

INFER, ADMIN = "sk-infer-0123456789", "sk-admin-9876543210"


def test_a_ring_without_keys_lets_everything_through():
    KeyRing().require(None, "admin")
    KeyRing.of([], []).require("Bearer anything", "infer")


def test_roles_401_for_no_or_unknown_keys_and_403_for_an_inference_key_on_admin_routes():
    ring = KeyRing.of([INFER], [ADMIN])
    ring.require(f"Bearer {INFER}", "infer")
    ring.require(f"Bearer {ADMIN}", "infer")  # admin keys may infer too
    ring.require(f"bearer  {ADMIN} ", "admin")
    for header in (None, "", f"Basic {INFER}", "Bearer", "Bearer wrong", f"Bearer {INFER}x", INFER):
        with pytest.raises(Unauthorized) as err:
            ring.require(header, "infer")
        assert err.value.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(Forbidden):
        ring.require(f"Bearer {INFER}", "admin")
    assert INFER not in repr(ring) and "2" not in repr(ring).split("(")[0]


def test_keys_come_from_the_variable_and_from_a_file_with_comments(tmp_path: Path):
    f = tmp_path / "keys"
    f.write_text("# rotated 2026-12\nk-file-1\n\n  k-file-2  \n")
    assert read_keys(" k1, ,k2 ", f) == ["k1", "k2", "k-file-1", "k-file-2"]
    with pytest.raises(ValueError, match="cannot read the key file"):
        read_keys(None, tmp_path / "missing")


def test_which_routes_need_which_role():
    assert required_role("GET", "/health") is None and required_role("GET", "/metrics") is None
    assert required_role("GET", "/ready") is None and required_role("GET", "/ui/app.js") is None
    assert required_role("GET", "/") is None, "the index and the status page's shell"
    assert required_role("POST", "/v1/completions") == "infer"
    assert required_role("GET", "/v1/models") == "infer"
    assert required_role("GET", "/v1/workers") == "infer" and required_role("GET", "/v1/workers/a/b") == "infer"
    assert required_role("POST", "/") == "infer", "CloudEvents; worker-control types are checked per event"
    for method, path in (("POST", "/v1/workers/a/sleep"), ("POST", "/v1/workers/org/a/warm"),
                         ("DELETE", "/v1/workers/a"), ("POST", "/v1/become-unready"), ("POST", "/v1/become-ready")):
        assert required_role(method, path) == "admin", (method, path)


@pytest.fixture()
def secured(caplog):
    fake = FakeActuator()
    registry = ModelRegistry.from_text(
        "models:\n" + "".join(f"  - {{name: {m}, source: 'embedded:smollm2-135m-instruct'}}\n" for m in MODELS))
    caplog.set_level(logging.DEBUG)
    settings = RequesterSettings.from_env({"FMA_LOG_LEVEL": "debug", "FMA_API_KEYS": INFER, "FMA_ADMIN_KEYS": ADMIN})
    return create_app(settings, registry=registry, actuator=fake).test_client(), fake


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_requester_checks_keys_and_answers_in_the_openai_envelope(secured, caplog):
    client, fake = secured
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    resp = client.get("/v1/models")
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.get_json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers=bearer("nope")).status_code == 401
    assert client.get("/v1/models", headers=bearer(INFER)).status_code == 200
    denied = client.post("/v1/workers/model-b/warm", headers=bearer(INFER))
    assert denied.status_code == 403 and denied.get_json()["error"]["code"] == "insufficient_permissions"
    assert ("ensure_ready", "model-b") not in fake.calls, "refused before anything happened"
    assert client.post("/v1/workers/model-b/warm", headers=bearer(ADMIN)).status_code == 200
    assert client.post("/v1/become-unready", headers=bearer(INFER)).status_code == 403
    assert client.get("/ready").status_code == 200, "a refused become-unready changed nothing"
    # A worker-control CloudEvent is an admin's; a completion event an inference key's.
    event = {"specversion": "1.0", "id": "e1", "source": "/t", "type": "ai.llm-d.fma.worker.release.requested",
             "subject": "model-b", "datacontenttype": "application/json", "data": {"model": "model-b"}}
    ce = {"Content-Type": "application/cloudevents+json"}
    assert client.post("/", json=event, headers=ce).status_code == 401
    assert client.post("/", json=event, headers={**ce, **bearer(INFER)}).status_code == 403
    assert client.post("/", json=event, headers={**ce, **bearer(ADMIN)}).status_code == 200
    logged = "\n".join(r.getMessage() for when in ("setup", "call") for r in caplog.get_records(when))
    assert INFER not in logged and ADMIN not in logged, "keys never reach the logs"
    assert "auth on" in logged


def test_with_auth_off_the_start_up_log_says_so_and_warns_beyond_loopback(caplog):
    registry = ModelRegistry.from_text("models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct'}\n")
    caplog.set_level(logging.INFO)
    create_app(RequesterSettings.from_env({"FMA_BIND": "127.0.0.1:18080"}), registry=registry,
               actuator=FakeActuator())
    assert "auth is off" in caplog.text and "loopback only" in caplog.text
    caplog.clear()
    create_app(RequesterSettings.from_env({"FMA_BIND": "0.0.0.0:18080"}), registry=registry,
               actuator=FakeActuator())
    warning = [r for r in caplog.records if r.levelno == logging.WARNING and "auth is off" in r.getMessage()]
    assert warning and "0.0.0.0:18080" in warning[0].getMessage()


@pytest.mark.slow  # 35 s; make test-slow (CI time); keys are also checked app-level in this file
@pytest.mark.process
def test_keys_end_to_end_with_the_openai_client_and_workers_that_answer_only_the_requester(tmp_path: Path,
                                                                                          tiny_model_dir: Path):
    import httpx
    import openai

    from conftest import requester

    keys = tmp_path / "admin-keys"
    keys.write_text(f"# mounted from a Secret\n{ADMIN}\n")
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: tiny, source: 'path:{tiny_model_dir}'}}\n")
    with requester(tmp_path, models, FMA_API_KEYS=INFER, FMA_ADMIN_KEYS_FILE=str(keys)) as req:
        client = openai.OpenAI(base_url=f"{req.spi}/v1", api_key=INFER, max_retries=0, timeout=120)
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{req.spi}/v1", api_key="sk-wrong", max_retries=0).models.list()
        with pytest.raises(openai.PermissionDeniedError):
            client.post("/workers/tiny/sleep", cast_to=object, options={"params": {"level": 1}})
        slept = httpx.post(f"{req.spi}/v1/workers/tiny/sleep", params={"level": 1}, headers=bearer(ADMIN),
                           timeout=60)
        assert slept.status_code == 200, slept.text
        # The worker answers only its requester: a direct call without the token is refused, probes are not.
        url = httpx.get(f"{req.spi}/v1/workers/tiny", headers=bearer(INFER), timeout=10).json()["url"]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        direct = httpx.post(f"{url}/wake_up", timeout=10)
        assert direct.status_code == 401 and direct.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{url}/wake_up", headers=bearer(INFER), timeout=10).status_code == 401, \
            "a client's key is not the worker's token"
        assert worker_state_with(req.spi, "tiny")["state"] == "sleeping"
        logs = req.log() + "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
        assert INFER not in logs and ADMIN not in logs
        assert "auth on: KeyRing(1 inference key(s), 1 admin key(s))" in req.log()


def worker_state_with(url: str, model: str) -> dict:
    import httpx

    data = httpx.get(f"{url}/v1/workers", headers=bearer(ADMIN), timeout=10).json()["data"]
    return next(w for w in data if w["model"] == model)
