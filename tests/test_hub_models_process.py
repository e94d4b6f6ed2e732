"""Issue 26, through a real requester and real workers: a hub model's first cold start fetches it into the model
cache exactly once, two models on one repository started at once fetch it once, a cold start after scale to
zero fetches nothing, and a missing model is a clear error on the first request. The hub is the stand-in
(hub_standin.py) reached by the real ``huggingface_hub`` client through ``HF_ENDPOINT``."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from conftest import requester, worker_state
from hub_standin import HubStandIn, Repo

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    files = Repo.from_folder(tiny_model_dir).files
    hub = HubStandIn({"acme/tiny": Repo(dict(files)), "acme/shared": Repo(dict(files))})
    url = hub.start()
    tmp = tmp_path_factory.mktemp("hub-models")
    models = tmp / "models.yaml"
    models.write_text("""\
defaults: {idle_timeout: 300s}
budget: {max_loaded: 3, sleepers: 0}
models:
  - name: tiny
    source: hf:acme/tiny
  - name: one
    source: hf:acme/shared
  - name: two
    source: hf:acme/shared
  - name: ghost
    source: hf:acme/ghost
""")
    with requester(tmp, models, HF_ENDPOINT=url, HF_HUB_OFFLINE="0", FMA_CACHE_DIR=str(tmp / "cache")) as req:
        yield req, hub
    hub.stop()


def ask(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=180,
                      json={"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0})


def test_a_hub_models_first_cold_start_fetches_it_once_and_a_cold_start_after_scale_to_zero_fetches_nothing(served):
    req, hub = served
    first = ask(req.spi, "tiny")
    assert first.status_code == 200, first.text
    counts = hub.downloads("acme/tiny")
    assert counts and set(counts.values()) == {1}, counts
    assert "model.safetensors" in counts
    assert httpx.delete(f"{req.spi}/v1/workers/tiny", timeout=60).status_code in (200, 202, 204)
    assert worker_state(req.spi, "tiny")["state"] in ("cold", "stopping")
    before = [r for r in hub.requests if "acme/tiny" in r[1]]
    again = ask(req.spi, "tiny")
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert [r for r in hub.requests if "acme/tiny" in r[1]] == before, "the second cold start reached the hub"


def test_two_models_on_one_repository_started_at_once_fetch_it_once(served):
    req, hub = served
    answers: dict[str, int] = {}
    start = threading.Barrier(2)

    def one(model: str) -> None:
        start.wait()
        answers[model] = ask(req.spi, model).status_code

    threads = [threading.Thread(target=one, args=(m,)) for m in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert answers == {"one": 200, "two": 200}
    assert set(hub.downloads("acme/shared").values()) == {1}, hub.downloads("acme/shared")


def test_a_model_missing_from_the_hub_is_a_clear_error_on_the_first_request(served):
    req, _hub = served
    resp = ask(req.spi, "ghost")
    assert 400 <= resp.status_code < 600 and resp.status_code != 500, resp.text
    assert "no model acme/ghost on the hub" in resp.json()["error"]["message"], resp.text
