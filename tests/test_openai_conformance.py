"""Issue 27: our OpenAI surface held to OpenAI's own published API document, not to our pydantic models.

Two halves:

* **Every answer validates** against the official schemas (``tests/openai_spec``, converted from
  github.com/openai/openai-openapi at the commit ``schemas.json`` records): completions and chat, each streamed
  chunk of both, models, errors, embeddings and the Responses API, from the requester and from a worker.
* **Every optional top-level property** of ``CreateChatCompletionRequest`` and ``CreateCompletionRequest`` has a
  row in :data:`CASES`: honoured (its effect checked), accepted because it cannot change the answer (the answer
  checked equal to the same request without it), or refused with a 4xx naming it. The rows are read from the
  document, so a property a newer document adds fails here until it has a row. The table is written to
  ``docs/openai-conformance.md`` (``FMA_WRITE_DOCS=1`` rewrites it; a test keeps the two equal).

Where the document contradicts OpenAI's own API, the API wins and the patch says so where it is made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openai_spec import document, request_properties, violations
from openai_spec.vendor import to_json_schema

from conftest import EMBEDDED, gunicorn_worker, requester, sse_events, worker_env

DOC = Path(__file__).resolve().parents[1] / "docs" / "openai-conformance.md"
EMBED = "all-minilm-l6-v2"
MODELS = f"""\
defaults: {{idle_timeout: 300s}}
budget: {{max_loaded: 2, sleepers: 2}}
models:
  - name: {EMBEDDED}
    source: embedded:{EMBEDDED}
  - name: {EMBED}
    source: embedded:{EMBED}
    kind: embedding
"""
EOS = "2"  # <|im_end|>: biased away where a test needs exactly max_tokens tokens

# ---- the converter -----------------------------------------------------------------------------------------


def test_nullable_becomes_a_null_type_an_enum_member_or_an_any_of():
    assert to_json_schema({"type": "integer", "nullable": True}) == {"type": ["integer", "null"]}
    assert to_json_schema({"type": "string", "enum": ["a"], "nullable": True}) == {
        "type": ["string", "null"], "enum": ["a", None]}
    assert to_json_schema({"$ref": "#/components/schemas/X", "nullable": True}) == {
        "anyOf": [{"$ref": "#/$defs/X"}, {"type": "null"}]}
    assert to_json_schema({"type": "object", "properties": {"a": {"type": "string", "description": "d",
                                                                    "x-oaiMeta": {}}}}) == {
        "type": "object", "properties": {"a": {"type": "string"}}}
    assert to_json_schema({"type": "string", "nullable": False}) == {"type": "string"}


def test_the_vendored_schemas_say_where_they_come_from():
    source = document()["source"]
    assert source["repository"] == "https://github.com/openai/openai-openapi"
    assert len(source["commit"]) == 40 and source["commit"].startswith("f85dbe2")
    assert "CreateChatCompletionRequest" in document()["$defs"]


# ---- the servers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("conformance")
    models = tmp / "models.yaml"
    models.write_text(MODELS)
    with requester(tmp, models) as req:
        yield req


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    """A worker of its own (the requester's workers take only the requester's token)."""
    with gunicorn_worker(tmp_path_factory.mktemp("conformance-worker"),
                         worker_env(FMA_MODEL=EMBEDDED)) as server:
        yield server


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=180)


def events(resp: httpx.Response) -> list[Any]:
    """The JSON data of every server-sent event (with or without an ``event:`` line)."""
    assert resp.status_code == 200, resp.text
    out = []
    for block in resp.text.split("\n\n"):
        data = [line[len("data: "):] for line in block.splitlines() if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            out.append(json.loads("\n".join(data)))
    return out


# Where the document contradicts OpenAI's API, the API wins:
# * A streamed completion's chunks are ``CreateCompletionResponse`` objects, whose ``finish_reason`` the schema
#   makes a non-null enum; every chunk but a choice's last has ``finish_reason: null`` in OpenAI's answers (and
#   the legacy SDKs read it as optional), so chunks are checked with it nullable.
# * ``encoding_format: base64`` answers carry the vector as a base64 string where the schema says an array of
#   numbers; that string is what OpenAI sends and what the official SDK asks for by default and decodes.
def _completion_chunk_patch() -> dict[str, Any]:
    schema = json.loads(json.dumps(document()["$defs"]["CreateCompletionResponse"]))
    reason = schema["properties"]["choices"]["items"]["properties"]["finish_reason"]
    reason["type"], reason["enum"] = ["string", "null"], [*reason["enum"], None]
    return {"CreateCompletionResponse": schema}


def _base64_embedding_patch() -> dict[str, Any]:
    schema = json.loads(json.dumps(document()["$defs"]["Embedding"]))
    schema["properties"]["embedding"] = {"type": "string", "contentEncoding": "base64"}
    return {"Embedding": schema}


def stream_event_schemas() -> dict[str, str]:
    """``ResponseStreamEvent`` is an anyOf of 58 event schemas: each event type's own, so a violation reads as one."""
    defs = document()["$defs"]
    out = {}
    for option in defs["ResponseStreamEvent"]["anyOf"]:
        name = option["$ref"].rsplit("/", 1)[1]
        for kind in defs[name]["properties"]["type"]["enum"]:
            out[kind] = name
    return out


def generation_shapes(url: str) -> list[str]:
    """Completions and chat, plain and streamed (usage chunk included), with n = 2: every violation found."""
    found: list[str] = []
    base = {"model": EMBEDDED, "max_tokens": 6, "temperature": 0}
    resp = post(url, "/v1/completions", {**base, "prompt": ["Hello", "The sky is"], "n": 2})
    assert resp.status_code == 200, resp.text
    found += violations("CreateCompletionResponse", resp.json())
    chunks = events(post(url, "/v1/completions", {**base, "prompt": "Hello", "n": 2, "echo": True, "stream": True,
                                                  "stream_options": {"include_usage": True}}))
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    for chunk in chunks:
        found += violations("CreateCompletionResponse", chunk, _completion_chunk_patch())
    chat = {**base, "messages": [{"role": "user", "content": "Say hi."}], "n": 2}
    resp = post(url, "/v1/chat/completions", chat)
    assert resp.status_code == 200, resp.text
    found += violations("CreateChatCompletionResponse", resp.json())
    chunks = events(post(url, "/v1/chat/completions", {**chat, "stream": True,
                                                       "stream_options": {"include_usage": True}}))
    assert chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-1]["choices"] == []
    for chunk in chunks:
        found += violations("CreateChatCompletionStreamResponse", chunk)
    return found


def error_shapes(url: str, *, requester: bool) -> list[str]:
    found: list[str] = []
    bad = [
        post(url, "/v1/chat/completions", {"model": EMBEDDED, "messages": [{"role": "user", "content": "x"}],
                                           "temperature": 9}),
        post(url, "/v1/chat/completions", {"model": EMBEDDED, "messages": [{"role": "user", "content": "x"}],
                                           "tools": [{"type": "function", "function": {"name": "f"}}]}),
        post(url, "/v1/completions", {"model": EMBEDDED, "prompt": "x", "suffix": "y"}),
        httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"}),
        post(url, "/v1/completions", {"model": "no-such-model", "prompt": "x"}),
    ]
    if requester:
        bad.append(post(url, "/v1/embeddings", {"model": EMBEDDED, "input": "x"}))  # wrong_model_kind
        bad.append(httpx.get(f"{url}/v1/models/no-such-model", timeout=30))
    for resp in bad:
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
        found += violations("ErrorResponse", resp.json())
    return found


def test_every_answer_of_the_requester_validates_against_openais_schemas(served):
    found = generation_shapes(served.spi)
    listing = httpx.get(f"{served.spi}/v1/models", timeout=30).json()
    found += violations("ListModelsResponse", listing)
    found += violations("Model", httpx.get(f"{served.spi}/v1/models/{EMBEDDED}", timeout=30).json())
    found += error_shapes(served.spi, requester=True)
    vectors = post(served.spi, "/v1/embeddings", {"model": EMBED, "input": ["a", "b"], "encoding_format": "float"})
    assert vectors.status_code == 200, vectors.text
    found += violations("CreateEmbeddingResponse", vectors.json())
    packed = post(served.spi, "/v1/embeddings", {"model": EMBED, "input": "a"})
    assert isinstance(packed.json()["data"][0]["embedding"], list)  # float when encoding_format is not given
    packed = post(served.spi, "/v1/embeddings", {"model": EMBED, "input": "a", "encoding_format": "base64"})
    found += violations("CreateEmbeddingResponse", packed.json(), _base64_embedding_patch())
    question = {"model": EMBEDDED, "input": "Say hi.", "max_output_tokens": 6, "temperature": 0}
    resp = post(served.spi, "/v1/responses", question)
    assert resp.status_code == 200, resp.text
    found += violations("Response", resp.json())
    streamed = events(post(served.spi, "/v1/responses", {**question, "stream": True}))
    assert streamed[-1]["type"] in ("response.completed", "response.incomplete")
    for event in streamed:
        found += violations("ResponseStreamEvent", event)
    by_type = stream_event_schemas()
    for event in streamed:
        found += violations(by_type[event["type"]], event)  # its own event schema: a clear message if not
    assert found == [], "\n".join(found)


def test_every_answer_of_a_worker_validates_against_openais_schemas(worker):
    found = generation_shapes(worker.url)
    found += violations("ListModelsResponse", httpx.get(f"{worker.url}/v1/models", timeout=30).json())
    found += error_shapes(worker.url, requester=False)
    assert found == [], "\n".join(found)


# ---- the property table --------------------------------------------------------------------------------------

HONOURED, ACCEPTED, REFUSED = "honoured", "accepted (no effect on the answer)", "refused (400 naming it)"


@dataclass(frozen=True)
class Case:
    value: Any
    outcome: str
    why: str
    check: Callable[[Any, Any, Any], None] | None = None  # (answer, baseline answer, ask) for honoured ones


def _text(answer: dict[str, Any], i: int = 0) -> str:
    choice = answer["choices"][i]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _stream_text(raw: str) -> str:
    out = ""
    for e in sse_events(raw):
        if e != "[DONE]":
            for c in e["choices"]:
                out += (c.get("delta") or {}).get("content") or c.get("text") or ""
    return out


def _differs(answer, baseline, ask) -> None:
    assert _text(answer) != _text(baseline), "the answer did not change"


def _penalised(prop: str) -> Callable[[Any, Any, Any], None]:
    """A penalty only touches tokens already generated: 12 greedy tokens with none repeated (float32 on some
    CPUs) would not show it, so both answers are asked again at 40 tokens, where the baseline repeats."""
    def check(answer, baseline, ask) -> None:
        if _text(answer) != _text(baseline):
            return
        longer, penalised = ask({"max_tokens": 40}), ask({"max_tokens": 40, prop: 2.0})
        words = _text(longer).lower().split()
        assert len(set(words)) < len(words), f"the 40-token baseline repeats no word: {_text(longer)!r}"
        assert _text(penalised) != _text(longer), "the answer did not change"
    return check


def _exactly(n: int) -> Callable[[Any, Any, Any], None]:
    def check(answer, baseline, ask) -> None:
        assert answer["usage"]["completion_tokens"] == n and answer["choices"][0]["finish_reason"] == "length"
    return check


def _two_choices(answer, baseline, ask) -> None:
    assert sorted(c["index"] for c in answer["choices"]) == [0, 1]


def _seeded(answer, baseline, ask) -> None:
    again = ask({"seed": 1234, "temperature": 1.5})
    assert _text(again) == _text(answer), "the same seed gave another text"


def _stopped(answer, baseline, ask) -> None:
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert " " not in _text(answer).strip() and len(_text(answer)) < len(_text(baseline)), _text(answer)


def _biased(answer, baseline, ask) -> None:
    assert _text(answer) == " blue" * 12, _text(answer)


def _same_as_greedy(answer, baseline, ask) -> None:
    assert _text(answer) == _text(baseline)


def _echoed(answer, baseline, ask) -> None:
    assert _text(answer).startswith("The capital of France is") and _text(answer).endswith(_text(baseline))


def _streamed(answer, baseline, ask) -> None:
    assert isinstance(answer, str) and _stream_text(answer) == _text(baseline)


def _usage_chunk(answer, baseline, ask) -> None:
    last = [e for e in sse_events(answer) if e != "[DONE]"][-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == baseline["usage"]["completion_tokens"]


COMMON: dict[str, Case] = {
    "frequency_penalty": Case(2.0, HONOURED, "subtracted per earlier occurrence of a token",
                              _penalised("frequency_penalty")),
    "presence_penalty": Case(2.0, HONOURED, "subtracted once a token occurred", _penalised("presence_penalty")),
    "logit_bias": Case({"4461": 100}, HONOURED, "added to the logits before sampling (4461 is ' blue': "
                       "every token is it)", _biased),
    "max_tokens": Case(3, HONOURED, "the answer's length", _exactly(3)),
    "n": Case(2, HONOURED, "choices sharing one prefill", _two_choices),
    "seed": Case(1234, HONOURED, "per-request torch.Generator: same seed, same text, alone or batched", _seeded),
    "stop": Case(" ", HONOURED, "the answer ends before the first stop sequence", _stopped),
    "stream": Case(True, HONOURED, "server-sent events, the same text", _streamed),
    "stream_options": Case({"include_usage": True}, HONOURED,
                           "include_usage: a last chunk with usage and no choices; include_obfuscation is "
                           "accepted and has no effect (no padding field is sent)", _usage_chunk),
    "temperature": Case(1.5, HONOURED, "sampling temperature (0: greedy)", _differs),
    "top_p": Case(1e-9, HONOURED, "nucleus sampling: with a vanishing top_p only the likeliest token is left, so "
                  "a hot temperature gives the greedy text", _same_as_greedy),
    "user": Case("user-1234", ACCEPTED, "an end-user id for abuse tracking; not logged"),
}
CHAT: dict[str, Case] = {
    **COMMON,
    "audio": Case({"voice": "alloy", "format": "mp3"}, REFUSED, "audio output: this model answers in text"),
    "function_call": Case({"name": "get_weather"}, REFUSED, "no function calling ('none' is accepted)"),
    "functions": Case([{"name": "get_weather", "parameters": {"type": "object"}}], REFUSED,
                      "no function calling"),
    "logprobs": Case(True, REFUSED, "no logprobs (false is accepted)"),
    "max_completion_tokens": Case(3, HONOURED, "the answer's length, as max_tokens", _exactly(3)),
    "metadata": Case({"team": "search"}, ACCEPTED, "tags for stored completions; nothing is stored"),
    "modalities": Case(["text", "audio"], REFUSED, "text only (['text'] is accepted)"),
    "moderation": Case({"model": "omni-moderation-latest"}, REFUSED, "no moderated completions"),
    "parallel_tool_calls": Case(False, ACCEPTED, "only means something with tools, which are refused"),
    "prediction": Case({"type": "content", "content": "Paris"}, ACCEPTED,
                       "predicted output is a latency hint; the answer is the model's own either way"),
    "prompt_cache_key": Case("tenant-7", ACCEPTED, "a cache-routing hint; one worker per model here"),
    "prompt_cache_options": Case({"ttl": "30m"}, ACCEPTED, "prompt caching is not offered; no effect on the answer"),
    "prompt_cache_retention": Case("24h", ACCEPTED, "deprecated form of prompt_cache_options; no effect"),
    "reasoning_effort": Case("low", REFUSED, "this model does not reason ('none' is accepted)"),
    "response_format": Case({"type": "json_object"}, REFUSED,
                            "no structured outputs ({'type': 'text'} is accepted)"),
    "safety_identifier": Case("hashed-user", ACCEPTED, "abuse-tracking id; not logged"),
    "service_tier": Case("flex", REFUSED, "one service tier ('auto' and 'default' are accepted)"),
    "store": Case(True, REFUSED, "nothing is stored (false is accepted)"),
    "tool_choice": Case("required", REFUSED, "no tools ('none' and 'auto' are accepted)"),
    "tools": Case([{"type": "function", "function": {"name": "get_weather"}}], REFUSED, "no tool calling"),
    "top_logprobs": Case(2, REFUSED, "no logprobs"),
    "verbosity": Case("low", REFUSED, "not a reasoning model ('medium' is accepted)"),
    "web_search_options": Case({}, REFUSED, "no web search"),
}
COMPLETION: dict[str, Case] = {
    **COMMON,
    "best_of": Case(3, REFUSED, "no server-side best-of (equal to n is accepted)"),
    "echo": Case(True, HONOURED, "the prompt before the answer", _echoed),
    "logprobs": Case(1, REFUSED, "no logprobs"),
    "suffix": Case("and that is all.", REFUSED, "no insertion"),
}
ENDPOINTS = {"chat": ("CreateChatCompletionRequest", "/v1/chat/completions", CHAT),
             "completion": ("CreateCompletionRequest", "/v1/completions", COMPLETION)}


def optional_properties(endpoint: str) -> list[str]:
    props, required = request_properties(ENDPOINTS[endpoint][0])
    return sorted(set(props) - required)


def table() -> str:
    source = document()["source"]
    lines = [
        "# OpenAI request properties: what each does here",
        "",
        "Generated by `tests/test_openai_conformance.py` (`FMA_WRITE_DOCS=1 .venv/bin/python -m pytest "
        "tests/test_openai_conformance.py -k table` rewrites it) from OpenAI's published API document "
        f"({source['repository']}, `{source['path']}` at commit `{source['commit'][:7]}`, "
        f"version {source['info_version']}). Every optional top-level property of the two request schemas is "
        "sent to the requester with the value below; the test checks the outcome: **honoured** (its effect on "
        "the answer checked), **accepted** (the answer checked equal to the same request without it), or "
        "**refused** (a 400 whose `param` and message name it). None is silently ignored where it would change "
        "what the client gets back, and none gives a 5xx.",
        "",
    ]
    for endpoint, (schema, path, cases) in ENDPOINTS.items():
        lines += [f"## `{path}` (`{schema}`)", "", "| property | value sent | outcome | how |", "|---|---|---|---|"]
        for prop in optional_properties(endpoint):
            case = cases.get(prop)
            if case is None:
                lines.append(f"| `{prop}` | | **no row yet** | |")
                continue
            lines.append(f"| `{prop}` | `{json.dumps(case.value)}` | {case.outcome} | {case.why} |")
        lines.append("")
    return "\n".join(lines)


def test_the_property_table_in_docs_is_the_tests_own():
    if os.environ.get("FMA_WRITE_DOCS") == "1":
        DOC.write_text(table())
    assert DOC.read_text() == table(), "docs/openai-conformance.md is stale: rerun with FMA_WRITE_DOCS=1"


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_every_row_names_a_property_of_the_document(endpoint):
    stale = set(ENDPOINTS[endpoint][2]) - set(optional_properties(endpoint))
    assert not stale, f"rows for properties the document does not have: {sorted(stale)}"
    props, _ = request_properties(ENDPOINTS[endpoint][0])
    for prop, case in ENDPOINTS[endpoint][2].items():  # each value sent is one the document allows
        check = Draft202012Validator({"$defs": document()["$defs"], **props[prop]})
        assert not list(check.iter_errors(case.value)), f"{prop}: {case.value!r} is not valid per the document"


BASE = {
    "chat": {"model": EMBEDDED, "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
             "max_tokens": 12, "temperature": 0, "logit_bias": {EOS: -100}},
    "completion": {"model": EMBEDDED, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
                   "logit_bias": {EOS: -100}},
}


@pytest.mark.parametrize(("endpoint", "prop"), [(e, p) for e in sorted(ENDPOINTS) for p in optional_properties(e)])
def test_every_optional_property_is_honoured_accepted_or_refused_by_name(served, endpoint, prop):
    _schema, path, cases = ENDPOINTS[endpoint]
    case = cases.get(prop)
    assert case is not None, f"the document has a property with no row: {endpoint} {prop}; add a Case"

    def ask(extra: dict[str, Any]) -> Any:
        body = {**BASE[endpoint], **extra}
        if "max_completion_tokens" in extra:  # the two must not disagree; it replaces max_tokens
            del body["max_tokens"]
        if "logit_bias" in extra:
            body["logit_bias"] = {**BASE[endpoint]["logit_bias"], **extra["logit_bias"]}
        resp = post(served.spi, path, body)
        assert resp.status_code < 500, (resp.status_code, resp.text)
        if body.get("stream") and resp.status_code == 200:
            return resp.text
        return resp if resp.status_code >= 400 else resp.json()

    baseline = ask({})
    extra = {prop: case.value}
    if prop == "stream_options":
        extra["stream"] = True
    if prop == "top_p":
        extra.update(temperature=1.5, seed=99)
    if prop == "seed":
        extra["temperature"] = 1.5
    if prop == "temperature":
        extra["seed"] = 7
    answer = ask(extra)
    if case.outcome == REFUSED:
        assert isinstance(answer, httpx.Response) and 400 <= answer.status_code < 500, answer
        error = answer.json()["error"]
        assert error["param"] == prop and prop in error["message"], error
        return
    assert not isinstance(answer, httpx.Response), (answer.status_code, answer.text)
    if case.outcome == ACCEPTED:
        assert _text(answer) == _text(baseline), f"{prop} changed the answer"
        return
    assert case.check is not None
    case.check(answer, baseline, ask)
