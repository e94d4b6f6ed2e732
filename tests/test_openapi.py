"""The OpenAPI 3.1 documents at /openapi.json: generated from the validating models, equal to the routes."""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from test_requester_app import MODELS, FakeActuator

from fma_requester.app import create_app as create_requester
from fma_requester.registry import ModelRegistry
from fma_requester.settings import RequesterSettings
from fma_worker.app import create_app as create_worker
from fma_worker.settings import WorkerSettings


@pytest.fixture(scope="module")
def apps(tiny_model_dir: Path):
    registry = ModelRegistry.from_text(
        "models:\n" + "".join(f"  - {{name: {m}, source: 'embedded:smollm2-135m-instruct'}}\n" for m in MODELS))
    requester = create_requester(RequesterSettings.from_env({"FMA_LOG_LEVEL": "warning"}), registry=registry,
                                 actuator=FakeActuator())
    worker = create_worker(WorkerSettings.from_env({"FMA_MODEL": "tiny", "FMA_MODEL_SOURCE": f"path:{tiny_model_dir}",
                                                    "FMA_LOG_LEVEL": "warning"}), start_loading=False)
    return {"requester": requester, "worker": worker}


def served(app) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = "/".join("{" + part[1:-1].split(":")[-1] + "}" if part.startswith("<") else part
                        for part in rule.rule.split("/"))
        out |= {(m.lower(), path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


@pytest.mark.parametrize("service", ["requester", "worker"])
def test_the_document_lists_exactly_the_routes_served(apps, service: str):
    doc = apps[service].test_client().get("/openapi.json").get_json()
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"] == f"fma {service}"
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served(apps[service])
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "200" in op["responses"], (method, path)
            for status, answer in op["responses"].items():
                if status != "200":
                    assert answer["content"]["application/json"]["schema"] == \
                        {"$ref": "#/components/schemas/ErrorEnvelope"}, (method, path, status)


@pytest.mark.parametrize("service", ["requester", "worker"])
def test_the_request_schemas_are_the_validating_models_own(apps, service: str):
    doc = apps[service].test_client().get("/openapi.json").get_json()
    op = doc["paths"]["/v1/completions"]["post"]
    schema = {**op["requestBody"]["content"]["application/json"]["schema"], "components": doc["components"]}
    validator = Draft202012Validator(schema)
    assert validator.is_valid({"model": "m", "prompt": "Hello", "max_tokens": 5, "stream": True})
    assert not validator.is_valid({"model": "m", "prompt": "Hello", "max_tokens": "5"}), "strict, like the model"
    assert not validator.is_valid({"prompt": "Hello"}), "model is required"
    Draft202012Validator.check_schema(schema)
    for sub in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(sub)


def test_the_documents_are_open_with_auth_on(tiny_model_dir: Path):
    registry = ModelRegistry.from_text("models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct'}\n")
    app = create_requester(RequesterSettings.from_env({"FMA_API_KEYS": "k"}), registry=registry,
                           actuator=FakeActuator())
    assert app.test_client().get("/openapi.json").status_code == 200
    worker = create_worker(WorkerSettings.from_env({"FMA_MODEL": "tiny", "FMA_MODEL_SOURCE": f"path:{tiny_model_dir}",
                                                    "FMA_WORKER_TOKEN": "t"}), start_loading=False)
    assert worker.test_client().get("/openapi.json").status_code == 200
    assert worker.test_client().get("/v1/models").status_code == 401


@pytest.mark.parametrize("service", ["requester", "worker"])
def test_the_document_is_built_on_first_use_not_at_start(service: str, tiny_model_dir: Path, monkeypatch):
    """Building it (every route's pydantic schema) took 30 ms of each worker's cold start, on the thread that
    binds the socket while the weights load on theirs."""
    import fma_common.openapi

    calls = []
    real = fma_common.openapi.document
    monkeypatch.setattr(fma_common.openapi, "document", lambda *a: calls.append(a) or real(*a))
    if service == "worker":
        app = create_worker(WorkerSettings.from_env({"FMA_MODEL": "tiny", "FMA_MODEL_SOURCE": f"path:{tiny_model_dir}",
                                                     "FMA_LOG_LEVEL": "warning"}), start_loading=False)
    else:
        registry = ModelRegistry.from_text("models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct'}\n")
        app = create_requester(RequesterSettings.from_env({"FMA_LOG_LEVEL": "warning"}), registry=registry,
                               actuator=FakeActuator())
    assert calls == [], "the document was built at start"
    first = app.test_client().get("/openapi.json").get_json()
    assert app.test_client().get("/openapi.json").get_json() == first and len(calls) == 1
