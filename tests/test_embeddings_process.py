"""Issue 25, through a real requester (local actuator, real workers): embeddings with the second embedded model,
the Responses API on the chat path, aliases and metadata, both kinds under one budget. The official ``openai``
client, unmodified, is the client; sentence-transformers is the reference for the vectors."""

from __future__ import annotations

import base64
import struct
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import EMBEDDED, requester, worker_state

pytestmark = pytest.mark.process

EMBED = "all-minilm-l6-v2"
SENTENCES = [
    "The cat sat on the mat.", "A dog slept on the rug.", "Stock markets fell sharply on Monday.",
    "The recipe needs two cups of flour.", "She plays the violin in an orchestra.", "Rain is expected tomorrow.",
    "Quantum computers use qubits.", "He forgot his umbrella at the station.", "The museum opens at nine.",
    "Bananas are rich in potassium.", "The train to Paris was delayed.", "Write unit tests for every bug fix.",
    "A lighthouse guided the ships home.", "Mount Everest is the highest mountain.", "Tea or coffee?",
    "Knative scales services to zero when they are idle.",
]

MODELS = f"""\
defaults: {{idle_timeout: 300s}}
budget: {{max_loaded: 2, sleepers: 2}}
models:
  - name: {EMBEDDED}
    source: embedded:{EMBEDDED}
    aliases: [smollm2]
    description: the chat model
  - name: {EMBED}
    source: embedded:{EMBED}
    kind: embedding
    aliases: [sentence-transformers/all-MiniLM-L6-v2]
    description: the embedding model
  - name: hidden-chat
    source: embedded:{EMBEDDED}
    unlisted: true
"""


@pytest.fixture(scope="module")
def reference() -> object:
    """sentence-transformers' own model, from the folder the worker converted (the same files as the wheel's zip)."""
    from sentence_transformers import SentenceTransformer

    from fma_worker.model_store import default_cache_dir, ensure_embedded_converted

    return SentenceTransformer(str(ensure_embedded_converted(EMBED, "float32", default_cache_dir())), device="cpu")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("embeddings")
    models = tmp / "models.yaml"
    models.write_text(MODELS)
    with requester(tmp, models) as req:
        yield req


def client(req) -> openai.OpenAI:
    """Used in a ``with`` block: a keep-alive connection left open holds the requester's shutdown for its
    graceful timeout (30 s), as a real client's would."""
    return openai.OpenAI(base_url=f"{req.spi}/v1", api_key="unused", max_retries=0, timeout=180)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


def test_embeddings_through_a_cold_start_equal_sentence_transformers_own(served, reference):
    assert worker_state(served.spi, EMBED)["state"] == "cold"
    with client(served) as c:
        one = c.embeddings.create(model=EMBED, input=SENTENCES[0])  # the SDK asks for base64 and decodes it
        assert len(one.data) == 1 and len(one.data[0].embedding) == 384
        assert one.usage.prompt_tokens == one.usage.total_tokens > 0
        expected = reference.encode(SENTENCES, normalize_embeddings=False)
        assert cosine(one.data[0].embedding, expected[0].tolist()) >= 0.9999
        batch = c.embeddings.create(model=EMBED, input=SENTENCES, encoding_format="float")
        assert [d.index for d in batch.data] == list(range(16))
        for got, want in zip(batch.data, expected, strict=True):
            assert cosine(got.embedding, want.tolist()) >= 0.9999
            assert abs(sum(x * x for x in got.embedding) - 1.0) < 1e-4, "normalised, as the model's modules say"
        # Token ids: the tokenizer's own ids for a sentence give the same vector as its text.
        ids = reference.tokenizer(SENTENCES[2])["input_ids"]
        by_ids = c.embeddings.create(model=EMBED, input=[ids, ids[:5]], encoding_format="float")
        assert cosine(by_ids.data[0].embedding, expected[2].tolist()) >= 0.9999
        assert by_ids.usage.prompt_tokens == len(ids) + 5
        # base64 on the wire is the float32 vector's little-endian bytes.
        raw = httpx.post(f"{served.spi}/v1/embeddings", timeout=60, json={
            "model": EMBED, "input": SENTENCES[1], "encoding_format": "base64"}).json()
        packed = base64.b64decode(raw["data"][0]["embedding"])
        vector = struct.unpack(f"<{len(packed) // 4}f", packed)
        assert len(vector) == 384 and cosine(list(vector), expected[1].tolist()) >= 0.9999
        # By an alias: the same model, one worker.
        aliased = c.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=SENTENCES[0])
        assert aliased.model == EMBED and cosine(aliased.data[0].embedding, one.data[0].embedding) > 0.99999


@pytest.mark.parametrize("level", [1, 2])
def test_the_embedding_worker_sleeps_and_wakes_verified_and_gives_the_same_vectors(served, level):
    with client(served) as c:
        before = c.embeddings.create(model=EMBED, input=SENTENCES[:4], encoding_format="float")
        slept = httpx.post(f"{served.spi}/v1/workers/{EMBED}/sleep", params={"level": level}, timeout=60)
        assert slept.status_code == 200 and slept.json()["state"] == "sleeping", slept.text
        after = c.embeddings.with_raw_response.create(model=EMBED, input=SENTENCES[:4], encoding_format="float")
        assert after.headers["X-FMA-Actuation"].startswith("wake;")
        for a, b in zip(before.data, after.parse().data, strict=True):
            assert a.embedding == b.embedding, "the canary-verified wake brings back the same weights"


def test_fma_embed_and_fma_models_show_vectors_kinds_and_aliases(served):
    import json
    import subprocess
    import sys

    def fma(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fma_cli.main", *args, "--url", served.spi],
                              capture_output=True, text=True, timeout=120)

    out = fma("embed", "sentence-transformers/all-MiniLM-L6-v2", "The cat sat on the mat.", "Tea or coffee?")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("384 dims  [") and lines[0].endswith("The cat sat on the mat.")
    assert lines[-1].endswith(f"model {EMBED}")
    as_json = json.loads(fma("embed", EMBED, "hello", "-o", "json").stdout)
    assert len(as_json["data"][0]["embedding"]) == 384
    table = fma("models").stdout.splitlines()
    assert table[0].split() == ["MODEL", "KIND", "STATE", "BACKEND", "CACHE", "ALIASES"]
    row = next(line for line in table if line.startswith(EMBED))
    assert "embedding" in row and "in the image" in row and "sentence-transformers/all-MiniLM-L6-v2" in row
    wrong = fma("embed", EMBEDDED, "hello")
    assert wrong.returncode != 0 and "is a chat model" in wrong.stderr, wrong.stderr


def test_bad_embedding_requests_are_clear_4xx(served):
    with client(served) as c:
        cases = [({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[]]}, "input"),
                 ({"input": "x", "dimensions": 100}, "dimensions"), ({"input": "x", "encoding_format": "hex"},
                                                                      "encoding_format"),
                 ({"input": [[10**9]]}, "prompt"), ({"input": "word " * 400}, "input")]
        for extra, param in cases:
            resp = httpx.post(f"{served.spi}/v1/embeddings", timeout=60, json={"model": EMBED, **extra})
            assert resp.status_code == 400, (extra, resp.text)
            assert resp.json()["error"]["param"] == param, (extra, resp.text)
        with pytest.raises(openai.BadRequestError) as err:  # a chat model on /v1/embeddings, and the reverse
            c.embeddings.create(model=EMBEDDED, input="hello")
        assert err.value.code == "wrong_model_kind" and "/v1/completions" in err.value.message
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
        assert err.value.code == "wrong_model_kind" and "/v1/embeddings" in err.value.message


def test_models_carry_kind_aliases_and_descriptions_and_hide_the_unlisted(served):
    listed = httpx.get(f"{served.spi}/v1/models", timeout=10).json()["data"]
    by_id = {m["id"]: m for m in listed}
    assert set(by_id) == {EMBEDDED, EMBED}, "hidden-chat is served but not listed"
    assert by_id[EMBED]["kind"] == "embedding" and by_id[EMBEDDED]["kind"] == "chat"
    assert by_id[EMBEDDED]["aliases"] == ["smollm2"] and by_id[EMBED]["description"] == "the embedding model"
    one = httpx.get(f"{served.spi}/v1/models/sentence-transformers/all-MiniLM-L6-v2", timeout=10)
    assert one.status_code == 200 and one.json()["id"] == EMBED
    assert httpx.get(f"{served.spi}/v1/models/hidden-chat", timeout=10).json()["id"] == "hidden-chat"
    missing = httpx.get(f"{served.spi}/v1/models/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    with client(served) as c:
        models = c.models.list()
    assert {m.id for m in models.data} == {EMBEDDED, EMBED}


def test_the_responses_api_non_streamed_streamed_and_refused(served):
    with client(served) as c:
        resp = c.responses.create(model="smollm2", input="What is the capital of France? Answer in one sentence.",
                                  instructions="You are terse.", max_output_tokens=24, temperature=0)
        assert resp.status in ("completed", "incomplete") and resp.model == EMBEDDED
        assert "Paris" in resp.output_text
        assert resp.usage.input_tokens > 0 and 0 < resp.usage.output_tokens <= 24
        assert resp.store is False
        events = list(c.responses.create(model=EMBEDDED, input=[{"role": "user", "content": "Say hello."}],
                                         max_output_tokens=8, temperature=0, stream=True))
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert "response.output_text.delta" in kinds
        assert kinds[-1] in ("response.completed", "response.incomplete")
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events[-1].response
        assert final.output_text == text and final.usage.output_tokens > 0
        assert [e.sequence_number for e in events] == list(range(len(events)))
        for bad, param in [({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
                           ({"tools": [{"type": "web_search"}]}, "tools")]:
            with pytest.raises(openai.BadRequestError) as err:
                c.responses.create(model=EMBEDDED, input="hi", **bad)
            assert err.value.body["param"] == param, bad
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model=EMBED, input="hi")
        assert err.value.code == "wrong_model_kind"


def test_a_budget_of_one_loaded_worker_serves_chat_and_embeddings_in_turn_never_both_loaded(tmp_path: Path):
    models = tmp_path / "models.yaml"
    # No sleepers: a worker put away is stopped, so "loaded" is unambiguous (a CPU sleeper keeps its weights).
    models.write_text(MODELS.replace("max_loaded: 2, sleepers: 2", "max_loaded: 1, sleepers: 0"))
    loaded_together: list[list[str]] = []
    stop = threading.Event()
    with requester(tmp_path, models) as req:
        def sample() -> None:
            while not stop.is_set():
                try:
                    data = httpx.get(f"{req.spi}/v1/workers", timeout=5).json()["data"]
                except httpx.HTTPError:
                    continue
                awake = [w["model"] for w in data if w["state"] in ("starting", "ready")]
                if len(awake) > 1:
                    loaded_together.append(awake)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with client(req) as c:
            try:
                for _ in range(2):
                    chat = c.chat.completions.create(model=EMBEDDED, max_tokens=4, temperature=0,
                                                     messages=[{"role": "user", "content": "Hi"}])
                    assert chat.choices[0].message.content
                    vec = c.embeddings.create(model=EMBED, input="hello world", encoding_format="float")
                    assert len(vec.data[0].embedding) == 384
            finally:
                stop.set()
                sampler.join(timeout=5)
    assert not loaded_together, f"two workers loaded at once under max_loaded 1: {loaded_together[:3]}"
