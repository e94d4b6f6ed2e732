"""Requester end to end: real gunicorn (gevent), real worker processes, the real model."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import EMBEDDED, Requester, requester, wait_for, worker_state

pytestmark = pytest.mark.process


def models_yaml(tmp_path: Path, **model: object) -> Path:
    lines = ["defaults: {idle_timeout: 300s, max_queue: 64, queue_timeout: 120s}",
             "budget: {max_loaded: 2, sleepers: 1}", "models:",
             f"  - name: {EMBEDDED}", f"    source: embedded:{EMBEDDED}", "    dtype: float32"]
    lines += [f"    {k}: {v}" for k, v in model.items()]
    lines += ["  - name: broken", f"    source: path:{tmp_path}"]
    path = tmp_path / "models.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, converted_model_dir: Path):
    tmp = tmp_path_factory.mktemp("requester")
    with requester(tmp, models_yaml(tmp)) as req:
        yield req


def test_fma_example_checks_cold_start_then_warm(shared: Requester):
    # The FMA requester example's Verify and Send Requests steps: probes port, then SPI port.
    assert httpx.get(f"{shared.probes}/health").status_code == 200
    assert httpx.get(f"{shared.probes}/ready").text == "OK\n"
    assert worker_state(shared.spi)["state"] == "cold"
    resp = httpx.post(f"{shared.spi}/v1/completions", timeout=120,
                      json={"model": EMBEDDED, "prompt": "Hello, world!", "max_tokens": 50})
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-FMA-Actuation"].startswith("cold;")
    assert len(resp.json()["choices"][0]["text"].split()) > 5
    status = worker_state(shared.spi)
    assert status["state"] == "ready" and status["last_actuation"]["path"] == "cold"
    assert status["last_actuation"]["seconds"] > 0
    again = httpx.post(f"{shared.probes}/v1/completions", timeout=60,
                       json={"model": EMBEDDED, "prompt": "Hi", "max_tokens": 2})
    assert again.headers["X-FMA-Actuation"].startswith("warm;")
    assert worker_state(shared.spi)["last_actuation"]["path"] == "warm"
    assert "cold start of" in shared.log()
    metrics = httpx.get(f"{shared.spi}/metrics").text
    assert f'fma_actuation_seconds_count{{model="{EMBEDDED}",path="cold"}} 1.0' in metrics


def test_openai_client_through_the_requester_streaming_and_not(shared: Requester):
    client = openai.OpenAI(base_url=f"{shared.spi}/v1", api_key="x", max_retries=0, timeout=120)
    args = {"model": EMBEDDED, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert len(chunks) >= 10
    chat = client.chat.completions.create(model=EMBEDDED, temperature=0, max_tokens=30, messages=[
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    assert "Paris" in chat.choices[0].message.content
    streamed = list(client.chat.completions.create(model=EMBEDDED, temperature=0, max_tokens=30, stream=True,
                                                   messages=[{"role": "user", "content": "What is the capital "
                                                              "of France? Answer in one sentence."}]))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_a_relayed_stream_has_each_header_once(shared: Requester):
    body = {"model": EMBEDDED, "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{shared.spi}/v1/completions", json=body, timeout=120) as resp:
        resp.read()
    for name in ("cache-control", "x-accel-buffering", "content-type"):
        assert len(resp.headers.get_list(name)) == 1, (name, resp.headers.get_list(name))
    assert resp.headers["x-accel-buffering"] == "no" and resp.headers["cache-control"] == "no-cache"


def test_unknown_model_is_404_naming_the_available_ones(shared: Requester):
    client = openai.OpenAI(base_url=f"{shared.spi}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt="x")
    assert info.value.body["code"] == "model_not_found"
    assert EMBEDDED in info.value.body["message"]


def test_worker_that_cannot_start_fails_fast_with_the_reason(shared: Requester):
    t0 = time.monotonic()
    resp = httpx.post(f"{shared.spi}/v1/completions", timeout=120, json={"model": "broken", "prompt": "x"})
    assert resp.status_code == 503
    assert "config.json" in resp.json()["error"]["message"] or "not ready" in resp.json()["error"]["message"]
    assert time.monotonic() - t0 < 60
    status = worker_state(shared.spi, "broken")
    assert status["state"] == "failed" and status["error"]
    # Right after a failure, requests do not restart it in a loop: they are told when the retry comes.
    again = httpx.post(f"{shared.spi}/v1/completions", timeout=30, json={"model": "broken", "prompt": "x"})
    assert again.status_code == 503 and "next retry in" in again.json()["error"]["message"]
    assert int(again.headers["Retry-After"]) in range(1, 6)
    assert shared.log().count("(failure 1; next start in 5 s)") == 1 and "(failure 2" not in shared.log(), \
        "one failure, counted once, and the backoff starts at its base"


def test_client_that_gives_up_does_not_cancel_the_cold_start(tmp_path: Path, converted_model_dir: Path):
    with requester(tmp_path, models_yaml(tmp_path)) as req:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{req.spi}/v1/completions", timeout=0.3,
                       json={"model": EMBEDDED, "prompt": "Hello", "max_tokens": 2})
        wait_for(lambda: worker_state(req.spi)["state"] == "ready", 120, "the abandoned start to finish")
        assert req.log().count("starting worker for smollm2-135m-instruct") == 1


def test_requester_process_never_loads_torch(shared: Requester):
    # torch's shared libraries would be mapped if it were imported (transformers is pure Python,
    # so its absence is checked through sys.modules in test_requester_imports.py).
    httpx.post(f"{shared.spi}/v1/workers/{EMBEDDED}/warm", timeout=120).raise_for_status()
    for pid in shared.requester_pids():
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps and "libc10" not in maps


def test_requester_memory_stays_under_150_mib(shared: Requester):
    for pid in shared.requester_pids():
        rss_kib = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS")))
        assert rss_kib < 150 * 1024, f"requester process {pid} uses {rss_kib} KiB"


def test_twenty_concurrent_first_requests_start_exactly_one_worker(tmp_path: Path, converted_model_dir: Path):
    with requester(tmp_path, models_yaml(tmp_path)) as req:
        results: list[int] = []

        def call() -> None:
            r = httpx.post(f"{req.spi}/v1/completions", timeout=120,
                           json={"model": EMBEDDED, "prompt": "Hello", "max_tokens": 3})
            results.append(r.status_code)

        threads = [threading.Thread(target=call) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert results == [200] * 20
        assert req.log().count("starting worker for smollm2-135m-instruct") == 1
        assert len(req.worker_pids()) == 1  # forked from the launcher: one process serves (fma_worker.single)


def test_full_queue_is_429_with_retry_after(tmp_path: Path, converted_model_dir: Path):
    with requester(tmp_path, models_yaml(tmp_path, max_queue=2)) as req:
        statuses: list[tuple[int, str | None]] = []

        def call() -> None:
            r = httpx.post(f"{req.spi}/v1/completions", timeout=120,
                           json={"model": EMBEDDED, "prompt": "Hello", "max_tokens": 2})
            statuses.append((r.status_code, r.headers.get("Retry-After")))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        codes = sorted(code for code, _ in statuses)
        assert codes == [200, 200, 429, 429, 429, 429]
        assert all(int(ra) >= 1 for code, ra in statuses if code == 429)


def test_idle_worker_scales_to_zero(tmp_path: Path, converted_model_dir: Path):
    with requester(tmp_path, models_yaml(tmp_path, idle_timeout="2s")) as req:
        assert httpx.post(f"{req.spi}/v1/workers/{EMBEDDED}/warm", timeout=120).json()["state"] == "ready"
        assert req.worker_pids()
        wait_for(lambda: worker_state(req.spi)["state"] == "cold", 30, "idle scale to zero")
        wait_for(lambda: not req.worker_pids(), 30, "the worker process to exit")
        assert "after 2 s idle" in req.log()


def test_killed_worker_mid_stream_gives_an_error_event_then_recovers(tmp_path: Path, converted_model_dir: Path):
    with requester(tmp_path, models_yaml(tmp_path)) as req:
        body = {"model": EMBEDDED, "prompt": "Tell me a long story", "max_tokens": 300, "stream": True}
        events: list[str] = []
        with httpx.Client(timeout=120) as http, http.stream("POST", f"{req.spi}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line)
                if len(events) == 3:
                    for pid in req.worker_pids():
                        os.kill(pid, signal.SIGKILL)
        assert '"error"' in events[-1] and "[DONE]" not in events[-1]
        wait_for(lambda: worker_state(req.spi)["state"] in ("failed", "cold"), 10, "the crash to be noticed")
        resp = httpx.post(f"{req.spi}/v1/completions", timeout=120,
                          json={"model": EMBEDDED, "prompt": "Hello", "max_tokens": 3})
        assert resp.status_code == 200


@pytest.mark.parametrize("launcher", ["true", "false"])
def test_sigterm_on_the_requester_leaves_no_child_processes(tmp_path: Path, converted_model_dir: Path,
                                                            launcher: str):
    with requester(tmp_path, models_yaml(tmp_path), FMA_LAUNCHER=launcher) as req:
        status = httpx.post(f"{req.spi}/v1/workers/{EMBEDDED}/warm", timeout=120).json()
        assert status["state"] == "ready"
        assert req.worker_pids()
        events: list[str] = []
        with httpx.Client(timeout=120) as http, http.stream(
                "POST", f"{req.spi}/v1/completions",
                json={"model": EMBEDDED, "prompt": "Once upon a time", "max_tokens": 40, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 1:
                        req.proc.send_signal(signal.SIGTERM)  # mid-stream: the stream must still finish
        assert events[-1] == "data: [DONE]", "SIGTERM must drain the in-flight stream"
        assert req.proc.wait(90) == 0
        wait_for(lambda: not req.tagged_pids(), 15, "every child process (launcher and workers) to exit")


def test_sigterm_does_not_wait_for_a_client_that_keeps_an_idle_connection_open(tmp_path: Path):
    """A kept-alive connection between requests (an HTTP client's pool; Knative's queue-proxy keeps them too)
    held the requester's SIGTERM for the whole drain timeout: gunicorn's gevent worker waits for every
    connection's handler, and an idle one waits for the next request until the keep-alive timeout (75 s).
    Found through the embeddings tests, whose unclosed clients cost 30 s a requester."""
    with requester(tmp_path, models_yaml(tmp_path), FMA_DRAIN_TIMEOUT="60s") as req, \
            httpx.Client(timeout=30) as http:
        assert http.get(f"{req.spi}/health").status_code == 200  # the connection stays open in the pool
        assert http.get(f"{req.probes}/health").status_code == 200
        req.proc.send_signal(signal.SIGTERM)
        # Nothing is in flight: the drain has nothing to wait for but those idle connections (60 s before).
        assert req.proc.wait(20) == 0


def test_sigterm_answers_a_request_still_waiting_for_its_worker_with_503_shutting_down(tmp_path: Path,
                                                                                     converted_model_dir: Path):
    """Issue 21, defect 7: a non-streamed request waiting for a worker (here: for the budget, while the only
    awake place is busy past the drain) got no answer and was reset at the drain deadline; now it gets 503
    shutting_down with Retry-After before the deadline."""
    import threading

    models = tmp_path / "models.yaml"
    models.write_text("budget: {max_loaded: 1, sleepers: 0}\nmodels:\n"
                      + "".join(f"  - {{name: {m}, source: 'embedded:{EMBEDDED}', dtype: float32}}\n"
                                for m in ("a", "b")))
    with requester(tmp_path, models, FMA_DRAIN_TIMEOUT="4s") as req:
        httpx.post(f"{req.spi}/v1/workers/a/warm", timeout=120).raise_for_status()
        streaming = threading.Event()
        answers: list[httpx.Response] = []

        def long_stream() -> None:  # not streamed: it holds a's place through the whole drain
            body = {"model": "a", "prompt": "Tell me a long story", "max_tokens": 2000, "logit_bias": {"2": -100}}
            streaming.set()
            try:
                httpx.post(f"{req.spi}/v1/completions", json=body, timeout=120)
            except httpx.HTTPError:
                pass  # cut at the drain deadline: what is in flight past it is gunicorn's to end

        def waiting_request() -> None:
            answers.append(httpx.post(f"{req.spi}/v1/completions", timeout=120,
                                      json={"model": "b", "prompt": "Hello", "max_tokens": 4}))

        threads = [threading.Thread(target=long_stream), threading.Thread(target=waiting_request)]
        threads[0].start()
        assert streaming.wait(60)
        wait_for(lambda: worker_state(req.spi, "a")["in_flight"] == 1, 30, "a to be busy")
        threads[1].start()
        wait_for(lambda: worker_state(req.spi, "b")["queued"] == 1, 30, "b's request to wait for the budget")
        req.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        (answer,) = answers
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "shutting_down" and answer.headers["Retry-After"] == "1"
        assert req.proc.wait(60) == 0
        # The worker still generating for a's request ends too: its requester is gone (the lifeline).
        wait_for(lambda: not req.tagged_pids(), 15, "every child process to exit")


def test_sigkill_on_the_requester_still_leaves_no_workers(tmp_path: Path, converted_model_dir: Path):
    with requester(tmp_path, models_yaml(tmp_path)) as req:
        httpx.post(f"{req.spi}/v1/workers/{EMBEDDED}/warm", timeout=120).raise_for_status()
        for pid in req.requester_pids():
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not req.tagged_pids(), 60, "orphaned workers and launcher to notice and exit")


@pytest.mark.slow
def test_requester_holds_256_concurrent_streams(tmp_path: Path, tiny_model_dir: Path):
    """A burst of 256 streaming requests for a cold model: one requester process
    (gevent) holds all 256 connections open while the worker starts, then
    streams every answer to the end."""
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  - name: tiny\n"
        f"    source: path:{tiny_model_dir}\n"
        "    max_queue: 300\n"
        "    env: {FMA_MAX_BATCH: '4', FMA_MAX_QUEUE: '300', FMA_WORKER_THREADS: '320',"
        " FMA_QUEUE_TIMEOUT: '300s', FMA_TORCH_THREADS: '1'}\n")
    with requester(tmp_path, models) as req:
        outcomes: list[bool] = []
        go = threading.Barrier(257)

        def stream() -> None:
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 16, "stream": True}
            with httpx.Client(timeout=300) as http:
                go.wait()
                try:
                    with http.stream("POST", f"{req.spi}/v1/completions", json=body) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                        outcomes.append(r.status_code == 200 and lines[-1] == "data: [DONE]")
                except httpx.HTTPError:
                    outcomes.append(False)

        threads = [threading.Thread(target=stream) for _ in range(256)]
        for t in threads:
            t.start()
        go.wait(60)
        peak = 0

        def all_open() -> bool:
            nonlocal peak
            status = worker_state(req.spi, "tiny")
            peak = max(peak, status["queued"] + status["in_flight"])
            return peak >= 256

        wait_for(all_open, 120, "256 requests held open by the requester at once")
        for t in threads:
            t.join(300)
        assert outcomes.count(True) == 256
        assert req.log().count("starting worker for tiny") == 1
        for pid in req.requester_pids():
            rss_kib = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                               if line.startswith("VmRSS")))
            assert rss_kib < 150 * 1024, f"requester process {pid} uses {rss_kib} KiB with 256 streams"


def test_budget_evicts_the_least_recently_used_idle_worker_and_wakes_it_later(tmp_path: Path,
                                                                            tiny_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text(
        "budget: {max_loaded: 1, sleepers: 1}\n"
        "models:\n"
        f"  - {{name: tiny-a, source: 'path:{tiny_model_dir}'}}\n"
        f"  - {{name: tiny-b, source: 'path:{tiny_model_dir}'}}\n")
    with requester(tmp_path, models) as req:
        def complete(model: str) -> httpx.Response:
            return httpx.post(f"{req.spi}/v1/completions", timeout=120,
                              json={"model": model, "prompt": "Hello", "max_tokens": 2})

        assert complete("tiny-a").status_code == 200
        assert complete("tiny-b").status_code == 200
        assert worker_state(req.spi, "tiny-a")["state"] == "sleeping"  # evicted, kept asleep
        assert worker_state(req.spi, "tiny-b")["state"] == "ready"
        resp = complete("tiny-a")
        assert resp.status_code == 200 and resp.headers["X-FMA-Actuation"].startswith("wake;")
        assert worker_state(req.spi, "tiny-b")["state"] == "sleeping"
        assert "evicting tiny-a" in req.log() and "evicting tiny-b" in req.log()
        metrics = httpx.get(f"{req.spi}/metrics").text
        assert 'fma_evictions_total{model="tiny-a"} 1.0' in metrics


def test_client_disconnect_closes_the_upstream_stream(shared: Requester):
    httpx.post(f"{shared.spi}/v1/workers/{EMBEDDED}/warm", timeout=120).raise_for_status()
    worker_url = worker_state(shared.spi)["url"]
    body = {"model": EMBEDDED, "prompt": "Tell me a long story", "max_tokens": 300, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{shared.spi}/v1/completions", json=body) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data: "))
    # The client left after one chunk; the worker must stop generating (300 tokens would take ~15 s).
    wait_for(lambda: f'fma_worker_in_flight{{model="{EMBEDDED}"}} 0.0' in httpx.get(f"{worker_url}/metrics").text,
             8, "the worker to stop generating for a client that left")
    wait_for(lambda: worker_state(shared.spi)["in_flight"] == 0, 5, "the requester to release its lease")


def test_cli_manifests_prints_the_worker_service(tmp_path: Path):
    import subprocess
    import sys

    import yaml

    done = subprocess.run([sys.executable, "-m", "fma_cli.main", "manifests", EMBEDDED, "--namespace", "llm"],
                          capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path)
    (svc,) = list(yaml.safe_load_all(done.stdout))
    assert svc["kind"] == "Service" and svc["metadata"]["name"] == "fma-worker-smollm2-135m-instruct"
    assert svc["metadata"]["namespace"] == "llm"
    # What the deployed example would create: its models file and worker template, and it says so.
    assert "knative/base/models.yaml" in done.stderr and "knative/base/worker-template.yaml" in done.stderr
    assert svc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "16Gi"
    assert svc["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    bad = subprocess.run([sys.executable, "-m", "fma_cli.main", "manifests", "nope"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "not configured" in bad.stderr


def test_preloaded_model_is_ready_before_any_request(tmp_path: Path, tiny_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: tiny, source: 'path:{tiny_model_dir}', preload: true}}\n")
    with requester(tmp_path, models) as req:
        wait_for(lambda: worker_state(req.spi, "tiny")["state"] == "ready", 120, "the preloaded worker")
        assert not [line for line in req.log().splitlines() if "POST /v1/completions" in line]


def test_sigterm_with_streams_longer_than_the_drain_ends_each_with_done_or_an_error(tmp_path: Path,
                                                                                      converted_model_dir: Path):
    """No stream is cut silently: past the drain deadline a stream still running ends with one error event."""
    import threading

    with requester(tmp_path, models_yaml(tmp_path), FMA_DRAIN_TIMEOUT="4s") as req:
        httpx.post(f"{req.spi}/v1/workers/{EMBEDDED}/warm", timeout=120).raise_for_status()
        results: list[list[str]] = []
        started = [threading.Event() for _ in range(6)]

        def stream(i: int) -> None:
            lines: list[str] = []
            body = {"model": EMBEDDED, "prompt": "Tell me a long story", "max_tokens": 2000 if i % 2 else 8,
                    "stream": True, "logit_bias": {"2": -100}}
            try:
                with httpx.Client(timeout=120) as http, http.stream("POST", f"{req.spi}/v1/completions",
                                                                   json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            lines.append(line)
                            started[i].set()
            except httpx.HTTPError as exc:
                lines.append(f"transport error: {exc}")
            results.append(lines)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        req.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert len(results) == 6
        done = [r for r in results if r[-1] == "data: [DONE]"]
        cut = [r for r in results if r[-1] != "data: [DONE]"]
        assert len(done) >= 3, "the short streams finished within the drain"
        for lines in cut:
            assert '"shutting_down"' in lines[-1], f"a stream cut without saying why: {lines[-1][:200]}"
        assert cut, "the 2000-token streams outlast a 4 s drain"
        assert req.proc.wait(60) == 0
        wait_for(lambda: not req.tagged_pids(), 15, "every child process to exit")
