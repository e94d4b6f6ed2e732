"""Worker app tests: Flask test client, real loading code, a tiny random model.

The tiny model's prose is gibberish, but it runs the real engine: tokenizer,
KV-cache decoding, sampling, stop handling, limits, sleep and wake.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import sse_events
from fma_worker.app import create_app
from fma_worker.settings import WorkerSettings

MODEL = "tiny"


def make_app(model_dir: Path, **env: str):
    settings = WorkerSettings.from_env({
        "FMA_MODEL": MODEL, "FMA_MODEL_SOURCE": f"path:{model_dir}", "FMA_LOG_LEVEL": "warning",
        "FMA_MAX_TOKENS": "64", **env})
    app = create_app(settings)
    engine = app.extensions["fma"]["engine"]
    assert engine.wait_until_settled(60) == "ready", engine.error
    return app


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path):
    return make_app(tiny_model_dir, FMA_MAX_BODY_BYTES="4096")


@pytest.fixture()
def client(app):
    return app.test_client()


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", **body})


def assert_envelope(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    err = resp.get_json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["message"]
    if code:
        assert err["code"] == code
    if param:
        assert err["param"] == param
    return err


def test_ready_with_wait_holds_the_answer_until_the_model_is_loaded(tiny_model_dir: Path):
    import threading
    import time

    settings = WorkerSettings.from_env({"FMA_MODEL": MODEL, "FMA_MODEL_SOURCE": f"path:{tiny_model_dir}",
                                        "FMA_LOG_LEVEL": "warning"})
    app = create_app(settings, start_loading=False)
    engine = app.extensions["fma"]["engine"]
    c = app.test_client()
    assert c.get("/ready").status_code == 503  # a probe without wait answers at once
    held = c.get("/ready?wait=0.2")
    assert held.status_code == 503 and held.get_json()["status"] == "loading"
    threading.Timer(0.3, engine.start).start()
    asked = time.monotonic()
    resp = c.get("/ready?wait=30")
    assert resp.status_code == 200 and time.monotonic() - asked < 25, "answered when loading ended, not at the wait"
    body = resp.get_json()
    assert body["status"] == "ready"
    steps = body["start"]["steps"]
    assert {"weights", "tokenizer", "prepare"} <= set(steps) and all(v >= 0 for v in steps.values())
    assert body["start"]["ready_at"] <= time.time()
    assert c.get("/ready").data == b"OK\n"
    assert_envelope(c.get("/ready?wait=31"), 400, param="wait")


def test_health_ready_and_models_answer(client):
    assert client.get("/health").status_code == 200
    assert client.get("/ready").data == b"OK\n"
    models = client.get("/v1/models").get_json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 256


def test_greedy_completion_reports_usage_and_length(client):
    body = complete(client, max_tokens=8, temperature=0).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["prompt_tokens"] == 2
    assert body["usage"]["total_tokens"] == 10
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")


def test_eos_ends_a_choice_with_stop(client):
    # A huge bias on <|im_end|> (id 2) makes the first token EOS.
    body = complete(client, max_tokens=8, temperature=0, logit_bias={"2": 100}).get_json()
    assert body["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    assert body["usage"]["completion_tokens"] == 1


def test_stop_sequence_cuts_the_text_before_it_streaming_and_not(client):
    full = complete(client, max_tokens=24, temperature=0).get_json()["choices"][0]["text"]
    stop = full[8:12]
    assert stop.strip(), f"pick a visible stop from {full!r}"
    expected = full[:full.index(stop)]
    cut = complete(client, max_tokens=24, temperature=0, stop=[stop]).get_json()["choices"][0]
    assert cut == {"index": 0, "text": expected, "logprobs": None, "finish_reason": "stop"}
    raw = complete(client, max_tokens=24, temperature=0, stop=stop, stream=True).get_data(as_text=True)
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_same_seed_gives_same_text_and_other_seed_differs(client):
    a = complete(client, max_tokens=16, temperature=1.0, seed=7).get_json()["choices"][0]["text"]
    b = complete(client, max_tokens=16, temperature=1.0, seed=7).get_json()["choices"][0]["text"]
    c = complete(client, max_tokens=16, temperature=1.0, seed=8).get_json()["choices"][0]["text"]
    assert a == b
    assert a != c


def test_n_and_prompt_list_number_choices_per_prompt(client):
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": ["one", "two"], "n": 2,
                                                "max_tokens": 3, "seed": 1}).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 2 * 1
    assert body["usage"]["completion_tokens"] == 4 * 3


def test_echo_prepends_the_prompt(client):
    text = complete(client, max_tokens=2, temperature=0, echo=True).get_json()["choices"][0]["text"]
    assert text.startswith("Hello there")


def test_token_id_prompt_is_accepted_and_bad_ids_are_refused(client):
    assert complete(client, prompt=[19556, 654], max_tokens=2).status_code == 200
    assert_envelope(complete(client, prompt=[999999], max_tokens=2), 400, param="prompt")


def test_streaming_completion_with_usage_chunk(client):
    resp = complete(client, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    events = sse_events(resp.get_data(as_text=True))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 5


def test_chat_stream_starts_with_role_and_ends_with_finish_reason(client):
    resp = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
    events = sse_events(resp.get_data(as_text=True))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["object"] == "chat.completion.chunk"


def test_chat_non_stream_shape(client):
    body = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 3, "temperature": 0}).get_json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 3


# ---- bad input: every case is a 4xx envelope ---------------------------------

def test_invalid_json_is_400(client):
    resp = client.post("/v1/completions", data=b"{not json", content_type="application/json")
    assert "not valid JSON" in assert_envelope(resp, 400)["message"]


def test_empty_body_is_400(client):
    assert_envelope(client.post("/v1/completions", data=b""), 400)


def test_wrong_type_is_400_naming_the_field(client):
    assert_envelope(complete(client, max_tokens="ten"), 400, param="max_tokens")


def test_unknown_model_is_404_model_not_found(client):
    err = assert_envelope(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404,
                          code="model_not_found")
    assert MODEL in err["message"]


def test_max_tokens_over_limit_is_400(client):
    assert "limit of 64" in assert_envelope(complete(client, max_tokens=65), 400, param="max_tokens")["message"]


def test_prompt_longer_than_context_is_400(client):
    err = assert_envelope(complete(client, prompt="word " * 300, max_tokens=1), 400,
                          code="context_length_exceeded")
    assert "256" in err["message"]


def test_body_over_the_size_limit_is_413(client):
    assert_envelope(complete(client, prompt="x" * 10_000), 413, code="payload_too_large")


@pytest.mark.parametrize("body", [{"seed": 2**64 - 1}, {"seed": -(2**63)}, {"logit_bias": {"5": 1.5}}])
def test_the_extremes_of_valid_values_are_served(client, body):
    assert complete(client, max_tokens=2, **body).status_code == 200


@pytest.mark.parametrize("body, param", [({"seed": 2**64}, "seed"), ({"logit_bias": {"\u00b2": 1}}, "logit_bias")])
def test_values_that_used_to_crash_the_worker_are_400(client, body, param):
    assert_envelope(complete(client, max_tokens=2, **body), 400, param=param)


def test_unsupported_parameter_is_400(client):
    assert_envelope(complete(client, logprobs=3), 400, code="unsupported_parameter", param="logprobs")


def test_unknown_route_and_wrong_method_use_the_envelope(client):
    assert_envelope(client.get("/v1/nothing"), 404)
    assert_envelope(client.get("/v1/completions"), 405)


# ---- sleep and wake -----------------------------------------------------------

@pytest.mark.parametrize("level", [1, 2])
def test_sleep_refuses_inference_and_wake_serves_again(tiny_model_dir: Path, level: int):
    app = make_app(tiny_model_dir)
    engine = app.extensions["fma"]["engine"]
    c = app.test_client()
    weights, first = engine._model, next(engine._model.parameters()).data_ptr()
    loaded = {n: (p.dtype, p.requires_grad, p.shape) for n, p in engine._model.named_parameters()}
    before = complete(c, max_tokens=10, temperature=0).get_json()["choices"][0]["text"]
    resp = c.post(f"/sleep?level={level}")
    assert resp.get_json()["is_sleeping"] is True
    if level == 2:  # the weights are gone while asleep (the modules are kept, their parameters emptied)
        assert engine._model is None
        assert all(p.device.type == "meta" for p in engine._skeleton.parameters())
    assert c.get("/is_sleeping").get_json() == {"is_sleeping": True}
    assert c.get("/ready").status_code == 503
    assert_envelope(complete(c, max_tokens=2), 503, code="worker_sleeping")
    assert c.post("/wake_up").get_json()["is_sleeping"] is False
    assert c.get("/ready").status_code == 200
    after = complete(c, max_tokens=10, temperature=0).get_json()["choices"][0]["text"]
    if level == 1:
        # A CPU device has nowhere to move the weights: level 1 keeps them where they are (on a GPU they go
        # to pinned host memory and back; that path needs a GPU). Nothing was reloaded.
        assert engine._model is weights and next(engine._model.parameters()).data_ptr() == first
    else:
        assert all(p.device.type == "cpu" for p in engine._model.parameters()), "mapped again from the folder"
        assert after == before, "the reloaded weights are the same weights"
        # Issue 24: the emptied modules came back with requires_grad=False, and a bfloat16 linear over such a
        # weight copies it on every call in torch 2.13 on a CPU (every forward after a level-2 wake 3x slower).
        assert {n: (p.dtype, p.requires_grad, p.shape) for n, p in engine._model.named_parameters()} == loaded
    metrics = c.get("/metrics").get_data(as_text=True)
    assert f'fma_worker_sleep_seconds_count{{level="{level}",model="tiny"}} 1.0' in metrics
    assert f'fma_worker_wake_seconds_count{{level="{level}",model="tiny"}} 1.0' in metrics


@pytest.mark.parametrize("level", [1, 2])
def test_a_wake_that_brings_back_damaged_weights_fails_with_the_reason(tiny_model_dir: Path, tmp_path: Path,
                                                                       level: int):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    app = make_app(folder)
    engine = app.extensions["fma"]["engine"]
    c = app.test_client()
    assert c.post(f"/sleep?level={level}").status_code == 200
    if level == 1:  # the weights kept in memory get damaged while asleep
        with torch.no_grad():
            next(engine._model.parameters()).mul_(-3.0)
    else:  # the folder a level-2 wake reloads from changed under the worker
        shard = next(folder.glob("*.safetensors"))
        tensors = load_file(shard)
        save_file({k: (v * -3.0 if v.dim() == 2 else v) for k, v in tensors.items()}, shard,
                  metadata={"format": "pt"})
    resp = c.post("/wake_up")
    err = assert_envelope(resp, 503, code="worker_failed")
    assert f"wake from level {level} failed verification" in err["message"]
    # Level 1 on a CPU moved nothing, so the same memory must hold the same values; level 2 reloaded them,
    # so the canary's logits must match those recorded before the first sleep.
    assert ("weights kept in memory changed" if level == 1 else "canary's top tokens") in err["message"]
    assert c.get("/ready").status_code == 503 and engine.state == "failed"
    assert_envelope(complete(c, max_tokens=2), 503, code="worker_failed")


def test_a_level_2_sleep_waits_for_the_batchers_last_step_before_emptying_the_weights(tiny_model_dir: Path):
    """Issue 21, defect 4: the weights were emptied, then the batcher waited for: a cancelled stream's last step
    could run on emptied parameters. Now the batcher goes idle first, and a batch that will not is a 409."""
    import fma_worker.engine as engine_module

    app = make_app(tiny_model_dir)
    engine = app.extensions["fma"]["engine"]
    c = app.test_client()
    order: list[str] = []
    real_wait, real_emptied = engine.batcher.wait_idle, engine_module._emptied
    engine.batcher.wait_idle = lambda timeout: order.append("batch idle") or real_wait(timeout)
    engine_module._emptied = lambda model, torch: order.append("weights emptied") or real_emptied(model, torch)
    try:
        assert c.post("/sleep?level=2").status_code == 200
        assert order == ["batch idle", "weights emptied"]
        assert c.post("/wake_up").status_code == 200
        engine.batcher.wait_idle = lambda timeout: False  # a step that does not end in time
        busy = c.post("/sleep?level=2")
        assert_envelope(busy, 409)
        assert engine._model is not None and c.get("/ready").status_code == 200, "refused: still serving"
    finally:
        engine_module._emptied = real_emptied


def test_a_batchs_kv_cache_stays_within_the_admitted_budget_with_a_long_row_beside_short_ones(tiny_model_dir: Path):
    """Issue 21, defect 2: admission summed each request's own length, but the batch's cache is padded to its
    longest row; with one long request beside short ones it held many times FMA_MAX_BATCH_TOKENS."""
    import threading

    app = make_app(tiny_model_dir, FMA_MAX_BATCH_TOKENS="600", FMA_MAX_BATCH="16", FMA_QUEUE_TIMEOUT="60s",
                   FMA_MAX_TOKENS="200")
    engine = app.extensions["fma"]["engine"]
    engine.batcher.peak_kv_slots = 0
    results: list[int] = []

    def ask(prompt: str, max_tokens: int) -> None:
        resp = app.test_client().post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logit_bias": {"0": -100, "1": -100, "2": -100}})
        results.append(resp.status_code)

    long = threading.Thread(target=ask, args=("hello " * 60, 150))  # about 210 slots per row
    long.start()
    shorts = [threading.Thread(target=ask, args=("hi", 6)) for _ in range(10)]
    for t in shorts:
        t.start()
    for t in [long, *shorts]:
        t.join(120)
    assert results == [200] * 11
    assert 0 < engine.batcher.peak_kv_slots <= 600, f"the cache held {engine.batcher.peak_kv_slots} slots"


def test_bad_sleep_level_is_400(client):
    assert_envelope(client.post("/sleep?level=3"), 400, param="level")


def test_metrics_expose_requests_tokens_ttft_and_load(client):
    complete(client, max_tokens=2)
    text = client.get("/metrics").get_data(as_text=True)
    for series in ("fma_worker_requests_total", "fma_worker_prompt_tokens_total",
                   "fma_worker_completion_tokens_total", "fma_worker_time_to_first_token_seconds_bucket",
                   "fma_worker_load_seconds_bucket", "fma_worker_load_bytes_per_second",
                   'fma_worker_state{model="tiny",state="ready"} 1.0'):
        assert series in text


def test_model_that_fails_to_load_reports_why_on_ready(tmp_path: Path):
    settings = WorkerSettings.from_env({"FMA_MODEL": "broken", "FMA_MODEL_SOURCE": f"path:{tmp_path}",
                                        "FMA_LOG_LEVEL": "critical"})
    app = create_app(settings)
    assert app.extensions["fma"]["engine"].wait_until_settled(30) == "failed"
    c = app.test_client()
    body = c.get("/ready")
    assert body.status_code == 503 and "config.json" in body.get_json()["error"]
    assert_envelope(c.post("/v1/completions", json={"model": "broken", "prompt": "x"}), 503, code="worker_failed")


# ---- CloudEvents ----------------------------------------------------------------

def test_cloudevent_binary_completion_gets_a_binary_reply(client):
    resp = client.post("/", json={"prompt": "Hello", "max_tokens": 3}, headers={
        "ce-specversion": "1.0", "ce-type": "ai.llm-d.fma.completion.requested", "ce-source": "/test",
        "ce-id": "evt-1", "ce-subject": MODEL})
    assert resp.status_code == 200
    assert resp.headers["ce-type"] == "ai.llm-d.fma.completion.succeeded"
    assert resp.headers["ce-requestid"] == "evt-1"
    assert resp.headers["ce-id"] != "evt-1"
    assert resp.get_json()["usage"]["completion_tokens"] == 3


def test_cloudevent_structured_bad_data_gets_a_failed_reply(client):
    event = {"specversion": "1.0", "type": "ai.llm-d.fma.completion.requested", "source": "/test", "id": "evt-2",
             "subject": MODEL, "datacontenttype": "application/json", "data": {"prompt": "x", "max_tokens": -1}}
    resp = client.post("/", json=event, content_type="application/cloudevents+json")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/cloudevents+json")
    reply = resp.get_json()
    assert reply["type"] == "ai.llm-d.fma.completion.failed"
    assert reply["requestid"] == "evt-2"
    assert reply["data"]["error"]["param"] == "max_tokens"


def test_cloudevent_of_unknown_type_or_malformed_is_400(client):
    resp = client.post("/", json={}, headers={"ce-specversion": "1.0", "ce-type": "com.example.other",
                                              "ce-source": "/t", "ce-id": "1"})
    assert_envelope(resp, 400)
    assert_envelope(client.post("/", data=b"{oops", content_type="application/cloudevents+json"), 400)
    assert_envelope(client.post("/", json={"no": "headers"}), 400)


HOSTILE = [
    (b'{"model": "tiny", "prompt": "\\ud800"}', "surrogate"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}', "surrogate"),
    (b'{"model": "tiny", "prompt": "x", "stop": ["\\ud83d"]}', "surrogate"),
    (b'{"model": "tiny", "prompt": "x", "user": ' + b"[" * 1500 + b"]" * 1500 + b"}", "nested too deeply"),
    (b'{"model": "tiny", "prompt": "x", "metadata": ' + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"}", "nested too deeply"),
]


@pytest.mark.parametrize(("raw", "why"), HOSTILE, ids=["lone-surrogate-prompt", "lone-surrogate-chat",
                                                       "lone-surrogate-stop", "1500-deep", "70-deep"])
def test_hostile_json_is_a_clear_400_never_a_500(client, raw: bytes, why: str):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    resp = client.post(path, data=raw, content_type="application/json")
    err = assert_envelope(resp, 400)
    assert why in err["message"]
    # a valid surrogate pair is fine: it is one character
    assert complete(client, prompt="\U0001f600 hi", max_tokens=2).status_code == 200
