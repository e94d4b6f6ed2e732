"""Load: many clients, three models, small queues, half of it streamed; nothing may be lost.

Starts a real requester (gunicorn, local actuator) serving three tiny models (a 2-layer Llama with random
weights and the embedded model's tokenizer: the work is the serving path, not the prose), each with a small
queue, and sends ``--requests`` completions from ``--clients`` concurrent clients, half of them streamed.
Every request must end ``200`` (a stream: with ``[DONE]``) or ``429`` with ``Retry-After``; anything else (a
5xx, a reset connection, a stream cut without ``[DONE]``) is counted as lost. The requester's memory (RSS of
its processes, workers and launcher excluded) is sampled throughout. Prints the counts and latency
percentiles; ``--out`` writes them as JSON. ``make load`` runs 1,000 requests from 100 clients; the tests run
a bounded version (``tests/test_load_process.py``).

``--sigterm-after N`` sends SIGTERM to the requester once N requests have ended, with the rest still being
sent. Then a request already in flight must still end ``200``/``429`` (or, past the drain deadline, a stream
with the ``shutting_down`` error event); one sent after the signal must get ``503`` with ``Retry-After`` or
find the listener closed: refused, or reset before any answer (TCP's race: connections the kernel queued
before gunicorn closed its listener are reset by the close; counted apart, in the report). The requester
must exit 0 and no process started for it (launcher, workers: found by a tag in their environment) may
outlive it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx

from fma_common.procs import free_port, start_gunicorn, stop_process_group, wait_ready

MODELS = ("tiny-a", "tiny-b", "tiny-c")


def tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer (converted once into the cache)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fma_worker.model_store import default_cache_dir, ensure_embedded_converted

    converted = ensure_embedded_converted("smollm2-135m-instruct", "float32", default_cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (converted / name).exists():
            shutil.copy(converted / name, folder / name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=2, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024


def requester_pids(root: int) -> list[int]:
    """The requester's own processes: the arbiter and its gevent worker (not the launcher, not workers)."""
    pids = [root]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if f"PPid:\t{root}\n" in status and b"fma_worker" not in cmd:
            pids.append(int(entry))
    return pids


def refused(resp: httpx.Response, body: str) -> str:
    """A 503 while the requester drains: fine when it says so and says when to retry."""
    if resp.status_code == 503 and '"shutting_down"' in body:
        return "503 shutting_down" if resp.headers.get("Retry-After") else "503 without Retry-After"
    return f"{resp.status_code} {body[:120]}"


def one(http: httpx.Client, model: str, stream: bool) -> tuple[str, float]:
    """One request; its outcome ("200", "429", or what went wrong) and its latency."""
    body = {"model": model, "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "stream": stream}
    started = time.perf_counter()
    answered = False  # a status line came back
    try:
        if not stream:
            resp = http.post("/v1/completions", json=body)
            answered = True
            if resp.status_code == 429:
                return ("429" if resp.headers.get("Retry-After") else "429 without Retry-After"), \
                    time.perf_counter() - started
            if resp.status_code != 200:
                return refused(resp, resp.text), time.perf_counter() - started
            answered = isinstance(resp.json()["choices"][0]["text"], str)  # a whole answer, not a cut one
            return ("200" if answered else "200 without text"), time.perf_counter() - started
        with http.stream("POST", "/v1/completions", json=body) as resp:
            answered = True
            if resp.status_code == 429:
                resp.read()
                return ("429" if resp.headers.get("Retry-After") else "429 without Retry-After"), \
                    time.perf_counter() - started
            if resp.status_code != 200:
                return refused(resp, resp.read().decode(errors="replace")), time.perf_counter() - started
            last = ""
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    last = line[6:]
                    if '"error"' in last:
                        err = json.loads(last)["error"]
                        # A queue full met while the stream waited for its worker is a 429 told in the stream.
                        named = {"queue_full": "429", "shutting_down": "stream ended at the drain deadline"}
                        return named.get(err.get("code"), f"stream error {err}"), time.perf_counter() - started
            return ("200" if last == "[DONE]" else "stream cut"), time.perf_counter() - started
    except httpx.ConnectError:
        return "connection refused", time.perf_counter() - started  # nothing was sent: the listener is closed
    except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
        if not answered:
            # Reset before any status line: a connection the kernel had queued when the listener closed, or a
            # kept-alive one closed as the request went out. The requester never read it, and the client knows.
            return "reset before any answer", time.perf_counter() - started
        return f"{type(exc).__name__} mid-answer", time.perf_counter() - started
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}", time.perf_counter() - started


def tagged(tag: str) -> list[int]:
    """Live processes started for this run (the requester, its launcher and workers inherit the tag)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and f"FMA_LOAD_TAG={tag}".encode() in Path(f"/proc/{entry}/environ").read_bytes() \
                    and "State:\tZ" not in Path(f"/proc/{entry}/status").read_text():
                pids.append(int(entry))
        except OSError:
            continue
    return pids


# What a request may end with: before the SIGTERM, and (sent or still in flight) after it.
FINE = {"200", "429"}
# A request sent just before the signal may reach the requester after it: the 503 says it was never admitted
# (the requester answers it before any work), so it was not in flight there.
FINE_IN_FLIGHT_AT_SIGTERM = FINE | {"stream ended at the drain deadline", "503 shutting_down"}
FINE_SENT_AFTER_SIGTERM = FINE | {"503 shutting_down", "connection refused", "reset before any answer"}


def run(requests: int, clients: int, workdir: Path, max_queue: int = 4, sigterm_after: int | None = None) -> dict:
    model_dir = tiny_model(workdir / "tiny")
    models = workdir / "models.yaml"
    models.write_text("models:\n" + "".join(
        f"  - {{name: {m}, source: 'path:{model_dir}', max_queue: {max_queue}, queue_timeout: 10s}}\n"
        for m in MODELS))
    port = free_port()
    tag = uuid.uuid4().hex
    url = f"http://127.0.0.1:{port}"
    log = workdir / "requester.log"
    env = {**os.environ, "FMA_BIND": f"127.0.0.1:{port}", "FMA_MODELS": str(models),
           "FMA_WORKER_LOG_DIR": str(workdir / "logs"), "FMA_LOG_LEVEL": "warning", "FMA_LOAD_TAG": tag}
    proc = start_gunicorn("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", env, log)
    outcomes: Counter[str] = Counter()
    phases: dict[str, Counter[str]] = {"in_flight_at_sigterm": Counter(), "sent_after_sigterm": Counter()}
    sigterm: dict[str, float] = {}  # when it was sent (perf_counter)
    latencies: list[float] = []
    peak = {"rss_mib": 0.0}
    stop = threading.Event()
    lock = threading.Lock()
    try:
        wait_ready(url, proc, 60, log)
        with httpx.Client(base_url=url, timeout=300) as warm:  # start the three workers first
            for m in MODELS:
                warm.post(f"/v1/workers/{m}/warm").raise_for_status()

        def sample() -> None:
            while not stop.is_set():
                peak["rss_mib"] = max(peak["rss_mib"], sum(rss_mib(p) for p in requester_pids(proc.pid)))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        counter = iter(range(requests))

        def client(index: int) -> None:
            with httpx.Client(base_url=url, timeout=300) as http:
                for n in counter:
                    sent = time.perf_counter()
                    outcome, secs = one(http, MODELS[n % len(MODELS)], stream=n % 2 == 1)
                    with lock:
                        if "at" in sigterm:
                            phase = "sent_after_sigterm" if sent >= sigterm["at"] else "in_flight_at_sigterm"
                            phases[phase][outcome] += 1
                        outcomes[outcome] += 1
                        if outcome == "200":
                            latencies.append(secs)
                        if sigterm_after is not None and sum(outcomes.values()) == sigterm_after:
                            sigterm["at"] = time.perf_counter()
                            proc.send_signal(signal.SIGTERM)  # the others are mid-request, or about to send

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        exit_code: int | None = None
        survivors: list[int] = []
        if "at" in sigterm:
            exit_code = proc.wait(120)
            exit_s = time.perf_counter() - sigterm["at"]
            deadline = time.monotonic() + 15  # the launcher and workers see their lifeline close
            while (survivors := [p for p in tagged(tag) if p != proc.pid]) and time.monotonic() < deadline:
                time.sleep(0.1)
            healthy = exit_code == 0 and not survivors
        else:
            healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        stop.set()
        stop_process_group(proc, 60)
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else 0.0

    if "at" in sigterm:
        before = outcomes - phases["in_flight_at_sigterm"] - phases["sent_after_sigterm"]
        lost = Counter({k: v for k, v in before.items() if k not in FINE})
        lost.update({f"in flight at SIGTERM: {k}": v for k, v in phases["in_flight_at_sigterm"].items()
                     if k not in FINE_IN_FLIGHT_AT_SIGTERM})
        lost.update({f"sent after SIGTERM: {k}": v for k, v in phases["sent_after_sigterm"].items()
                     if k not in FINE_SENT_AFTER_SIGTERM})
        shutdown = {"after_requests": sigterm_after, "exit_code": exit_code, "exit_s": round(exit_s, 2),
                    "in_flight_at_sigterm": dict(phases["in_flight_at_sigterm"]),
                    "sent_after_sigterm": dict(phases["sent_after_sigterm"]), "surviving_children": survivors}
    else:
        lost = Counter({k: v for k, v in outcomes.items() if k not in FINE})
        shutdown = None
    return {"requests": requests, "clients": clients, "models": len(MODELS), "max_queue": max_queue,
            "outcomes": dict(outcomes), "lost": sum(lost.values()), "lost_by_kind": lost,
            "latency_s_of_200s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0),
                                  "mean": round(statistics.fmean(latencies), 3) if latencies else 0.0},
            "wall_s": round(wall, 1), "requester_peak_rss_mib": round(peak["rss_mib"], 1),
            "healthy_after": healthy, "sigterm": shutdown}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--sigterm-after", type=int, default=None, help="SIGTERM the requester after N requests")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fma-load-") as tmp:
        report = run(args.requests, args.clients, Path(tmp), args.max_queue, args.sigterm_after)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    ok = report["lost"] == 0 and report["healthy_after"] and report["requester_peak_rss_mib"] < 150
    print("PASS: nothing lost" if ok else "FAIL: see lost_by_kind / healthy_after / requester_peak_rss_mib",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
