"""Issue 26, through a real requester and real workers: a hub model's first cold start fetches it into the model
cache exactly once, two models on one repository started at once fetch it once, a cold start after scale to
zero fetches nothing, and a missing model is a clear error on the first request. The hub is the stand-in
(hub_standin.py) reached by the real ``huggingface_hub`` client through ``HF_ENDPOINT``."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from hub_standin import HubStandIn, Repo

from conftest import requester, worker_state

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    files = Repo.from_folder(tiny_model_dir).files
    hub = HubStandIn({"acme/tiny": Repo(dict(files)), "acme/shared": Repo(dict(files)),
                      "acme/gated": Repo(dict(files), token="hf_the_right_one")})
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
  - name: gated
    source: hf:acme/gated
    env: {HF_TOKEN: hf_a_wrong_one}
  - name: gated-ok
    source: hf:acme/gated
    env: {HF_TOKEN: hf_the_right_one}
""")
    # HF_HOME apart: huggingface_hub copies a file it already holds in its own cache instead of downloading it
    with requester(tmp, models, HF_ENDPOINT=url, HF_HUB_OFFLINE="0", FMA_CACHE_DIR=str(tmp / "cache"),
                   HF_HOME=str(tmp / "hf-home")) as req:
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
    # Once fetched, a folder like any other: the launcher prepared its parts, and the second worker used them.
    assert "launcher prepared tiny ahead" in req.log()
    worker_log = (req.log_path.parent / "logs" / "worker-tiny.log").read_text()
    assert worker_log.count("the launcher prepared") >= 1, worker_log[-2000:]


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


def test_a_refused_token_is_a_clear_error_on_the_first_request_and_never_shown(served):
    req, _hub = served
    resp = ask(req.spi, "gated")
    assert 400 <= resp.status_code < 600 and resp.status_code != 500, resp.text
    assert "gated or private" in resp.json()["error"]["message"], resp.text
    assert "hf_a_wrong_one" not in resp.text and "hf_a_wrong_one" not in req.log()
    assert ask(req.spi, "gated-ok").status_code == 200
    logs = [req.log(), *(p.read_text(errors="replace") for p in (req.log_path.parent / "logs").glob("*.log"))]
    assert not any("hf_the_right_one" in text or "hf_a_wrong_one" in text for text in logs), "a token in a log"


def test_fma_models_pull_fills_the_cache_ahead_with_progress_and_fma_models_shows_it(served):
    from test_cli_process import run

    req, hub = served
    hub.repos["acme/pulled"] = Repo(dict(hub.repos["acme/tiny"].files))
    # A model file change is picked up by the requester's watcher; here the cache is filled for "tiny" again:
    # pull asks the hub for the revision's commit now, and fetches nothing it already holds.
    before = len(hub.downloads("acme/tiny"))
    out = run("models", "pull", "tiny", "--url", req.spi)
    assert out.returncode == 0, out.stderr
    assert "in the model cache" in out.stdout and len(hub.downloads("acme/tiny")) == before
    table = run("models", "--url", req.spi).stdout.splitlines()
    assert table[0].split() == ["MODEL", "KIND", "STATE", "BACKEND", "CACHE", "ALIASES"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert "cached" in rows["tiny"] and "not cached" in rows["ghost"], table
    ghost = run("models", "pull", "ghost", "--url", req.spi)
    assert ghost.returncode != 0 and "no model acme/ghost on the hub" in ghost.stderr, ghost.stderr
    embedded = httpx.post(f"{req.spi}/v1/models/tiny/pull", timeout=60)
    assert embedded.status_code == 200
    card = httpx.get(f"{req.spi}/v1/models/tiny", timeout=30).json()
    assert card["cache"]["state"] == "cached" and card["cache"]["bytes"] > 0 and card["source"] == "hf:acme/tiny"
    assert card["cache"]["dtype"] == "float32" and "cached" in rows["tiny"] and "float32" in rows["tiny"]
