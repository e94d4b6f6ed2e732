"""Process tests: real gunicorn, the real embedded model, the official openai client."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import EMBEDDED, gunicorn_worker, sse_events, worker_env

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, converted_model_dir: Path):
    with gunicorn_worker(tmp_path_factory.mktemp("worker"), worker_env(FMA_MAX_TOKENS="512")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_completion_is_coherent_english(client: openai.OpenAI):
    resp = client.completions.create(model=EMBEDDED, prompt="Once upon a time", max_tokens=30, temperature=0)
    text = resp.choices[0].text
    assert text.startswith(", the city of Nova Haven was a thriving metropolis")
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 30 and resp.usage.prompt_tokens == 4


def test_chat_answers_and_stops_on_its_own(client: openai.OpenAI):
    resp = client.chat.completions.create(
        model=EMBEDDED, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens < 60


def test_streamed_completion_equals_the_unstreamed_one(client: openai.OpenAI):
    args = {"model": EMBEDDED, "prompt": "The best thing about Paris is", "max_tokens": 24, "temperature": 0}
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) >= 10, "tokens must be flushed one by one, not buffered"


def test_streamed_chat_equals_the_unstreamed_one(client: openai.OpenAI):
    args = {"model": EMBEDDED, "temperature": 0, "max_tokens": 40,
            "messages": [{"role": "user", "content": "Write one sentence about why the sky is blue."}]}
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_stop_sequences_cut_before_the_stop_streaming_and_not(client: openai.OpenAI):
    args = {"model": EMBEDDED, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
            "stop": ["skyscrapers", "zebra"]}
    resp = client.completions.create(**args)
    assert resp.choices[0].text == ", the city of Nova Haven was a thriving metropolis, with towering "
    assert resp.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text
    assert not any("sky" in c.choices[0].text for c in streamed), "a partial stop string leaked"


def test_same_seed_same_text(client: openai.OpenAI):
    args = {"model": EMBEDDED, "prompt": "The three most important inventions are", "max_tokens": 20,
            "temperature": 0.9, "top_p": 0.95}
    a = client.completions.create(**args, seed=42).choices[0].text
    b = client.completions.create(**args, seed=42).choices[0].text
    c = client.completions.create(**args, seed=43).choices[0].text
    assert a == b
    assert a != c


def test_requests_without_sampling_use_the_models_recommended_defaults(client: openai.OpenAI):
    args = {"model": EMBEDDED, "prompt": "Hello, world!", "max_tokens": 30, "seed": 5}
    implicit = client.completions.create(**args).choices[0].text
    explicit = client.completions.create(**args, temperature=0.2, top_p=0.9).choices[0].text
    assert implicit == explicit
    assert len(implicit.split()) > 5


def test_n_choices_with_a_seed_differ_from_each_other(client: openai.OpenAI):
    resp = client.completions.create(model=EMBEDDED, prompt="My favourite food is", max_tokens=8,
                                     temperature=1.0, n=3, seed=1)
    assert len(resp.choices) == 3
    assert len({c.text for c in resp.choices}) > 1


@pytest.mark.parametrize("kwargs, error, code", [
    ({"model": "gpt-9"}, openai.NotFoundError, "model_not_found"),
    ({"max_tokens": 100_000}, openai.BadRequestError, "invalid_request"),
    ({"prompt": "word " * 9000}, openai.BadRequestError, "context_length_exceeded"),
    ({"logprobs": 2}, openai.BadRequestError, "unsupported_parameter"),
    ({"temperature": 7}, openai.BadRequestError, "invalid_request"),
    ({"max_tokens": "ten"}, openai.BadRequestError, "invalid_request"),
    ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "invalid_request"),
])
def test_bad_input_is_a_clear_4xx(client: openai.OpenAI, kwargs, error, code):
    args = {"model": EMBEDDED, "prompt": "Hello", "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        client.completions.create(**args)
    assert info.value.body["code"] == code
    assert info.value.body["message"]


def test_invalid_json_and_oversized_body(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        resp = http.post("/v1/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
        resp = http.post("/v1/completions", json={"model": EMBEDDED, "prompt": "x" * (2 << 20)})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"


def test_probes_answer_while_a_long_generation_streams(server):
    with httpx.Client(base_url=server.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json={"model": EMBEDDED, "prompt": "Tell me a long story",
                                                        "max_tokens": 200, "stream": True}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        with httpx.Client(base_url=server.url, timeout=5) as probe:
            assert probe.get("/health").status_code == 200
            assert probe.get("/ready").status_code == 200
            assert "fma_worker_in_flight" in probe.get("/metrics").text
    # The client went away after one chunk: the worker must stop generating and free its slot.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if 'fma_worker_in_flight{model="smollm2-135m-instruct"} 0.0' in httpx.get(f"{server.url}/metrics").text:
            break
        time.sleep(0.05)
    else:
        pytest.fail("generation kept running after the client disconnected")


def test_metrics_after_traffic(server):
    text = httpx.get(f"{server.url}/metrics").text
    assert 'fma_worker_requests_total{endpoint="/v1/completions",model="smollm2-135m-instruct",status="200"}' in text
    assert "fma_worker_time_to_first_token_seconds_count" in text
    assert 'fma_worker_load_seconds_count{model="smollm2-135m-instruct",phase="total"} 1.0' in text


def test_full_queue_is_429_with_retry_after(tmp_path: Path, converted_model_dir: Path):
    with gunicorn_worker(tmp_path, worker_env(FMA_MAX_BATCH="1", FMA_MAX_QUEUE="0")) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json={"model": EMBEDDED, "prompt": "Count slowly",
                                                        "max_tokens": 200, "stream": True}) as busy:
        assert next(line for line in busy.iter_lines() if line.startswith("data: "))
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=EMBEDDED, prompt="Hi", max_tokens=2)
        assert int(info.value.response.headers["Retry-After"]) >= 1


def test_sigterm_drains_the_request_in_flight(tmp_path: Path, converted_model_dir: Path):
    with gunicorn_worker(tmp_path, worker_env()) as srv:
        result: dict[str, object] = {}
        started = threading.Event()

        def call() -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as http, \
                    http.stream("POST", "/v1/completions", json={"model": EMBEDDED, "prompt": "Once upon a time",
                                                                "max_tokens": 60, "temperature": 0,
                                                                "stream": True}) as resp:
                result["status"] = resp.status_code
                chunks = []
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line)
                        started.set()
                result["events"] = sse_events("\n\n".join(chunks))

        t = threading.Thread(target=call)
        t.start()
        assert started.wait(60)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["status"] == 200
        events = result["events"]
        assert events[-1] == "[DONE]", "the in-flight stream must complete, not be cut"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(60) == 0


# Level 2 in both dtypes a worker may compute in here: the weights given back are the dtype's own (538 MB in float32,
# 269 MB in bfloat16), and the wake's canary runs in that dtype.
@pytest.mark.parametrize(("level", "dtype", "freed"), [(1, "auto", 0), (2, "float32", 400e6), (2, "bfloat16", 200e6)])
def test_sleep_wake_cycle_over_http(tmp_path: Path, converted_model_dir: Path, level: int, dtype: str, freed: float):
    with gunicorn_worker(tmp_path, worker_env(FMA_LOG_LEVEL="info", FMA_DTYPE=dtype)) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as http:
        body = {"model": EMBEDDED, "prompt": "The best thing about Paris is", "max_tokens": 24, "temperature": 0}
        before = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        awake_rss = float(next(line.split()[-1] for line in http.get("/metrics").text.splitlines()
                               if line.startswith("fma_worker_resident_bytes ")))
        slept = http.post("/sleep", params={"level": level}).json()
        assert slept["is_sleeping"] is True and slept["level"] == level
        if level == 2:  # the weights are given back to the OS, and the reply says so
            assert awake_rss - slept["resident_bytes"] > freed, (awake_rss, slept["resident_bytes"])
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        assert http.get("/ready").status_code == 503
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "worker_sleeping"
        assert http.post("/wake_up").json()["is_sleeping"] is False
        assert http.get("/ready").status_code == 200
        after = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        if level == 2:  # the weights were dropped and reloaded; on a CPU level 1 leaves them untouched
            assert after == before
        log = srv.log()
        assert f"asleep at level {level}" in log and f"awake from level {level}" in log


# ---- continuous batching over HTTP -------------------------------------------------------------------


def _stream(url: str, prompt: str, max_tokens: int, out: list, started: threading.Event | None = None) -> None:
    body = {"model": EMBEDDED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, timeout=120) as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if started is not None:
                    started.set()
        out.append((r.status_code, sse_events("\n\n".join(lines))))


def test_concurrent_openai_requests_share_steps_and_answer_as_they_would_alone(server, client: openai.OpenAI):
    prompts = ["Once upon a time", "The capital of France is", "My favourite food is", "In the year 2050,"]
    alone = [client.completions.create(model=EMBEDDED, prompt=p, max_tokens=24, temperature=0).choices[0].text
             for p in prompts]
    before = httpx.get(f"{server.url}/metrics").text
    answers: dict[int, str] = {}

    def one(i: int) -> None:
        answers[i] = client.completions.create(model=EMBEDDED, prompt=prompts[i], max_tokens=24,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [answers[i] for i in range(len(prompts))] == alone
    after = httpx.get(f"{server.url}/metrics").text

    def wide_steps(text: str) -> float:
        le1 = float(next(line.split()[-1] for line in text.splitlines()
                         if line.startswith(f'fma_worker_batch_rows_bucket{{le="1.0",model="{EMBEDDED}"}}')))
        total = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith(f'fma_worker_batch_rows_count{{model="{EMBEDDED}"}}')))
        return total - le1

    assert wide_steps(after) - wide_steps(before) >= 10, "decode steps carried more than one request"


def test_sleep_during_a_batch_waits_for_it_to_drain(tmp_path: Path, converted_model_dir: Path):
    with gunicorn_worker(tmp_path, worker_env()) as srv:
        results: list = []
        started = [threading.Event() for _ in range(3)]
        threads = [threading.Thread(target=_stream, args=(srv.url, p, 40, results, started[i]))
                   for i, p in enumerate(["Once upon a time", "The sea was", "Dear diary,"])]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        slept = httpx.post(f"{srv.url}/sleep", params={"level": 1}, timeout=120)
        assert slept.status_code == 200 and slept.json()["is_sleeping"] is True
        assert len(results) == 3, "sleep answered only once the batch had drained"
        for status, events in results:
            assert status == 200 and events[-1] == "[DONE]"
            assert events[-2]["choices"][0]["finish_reason"] == "length"
        for t in threads:
            t.join(10)


def test_a_client_that_disconnects_frees_its_rows(server):
    body = {"model": EMBEDDED, "prompt": "Tell me a long story", "max_tokens": 300, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 10
    gauge = f'fma_worker_in_flight{{model="{EMBEDDED}"}} 0.0'
    while gauge not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline, "the generation went on for a client that left"
        time.sleep(0.05)
