"""Load: many clients, three models, small queues, half of it streamed; nothing may be lost.

Starts a real requester (gunicorn, local actuator) serving three tiny models (a 2-layer Llama with random
weights and the embedded model's tokenizer: the work is the serving path, not the prose), each with a small
queue, and sends ``--requests`` completions from ``--clients`` concurrent clients, half of them streamed.
Every request must end ``200`` (a stream: with ``[DONE]``) or ``429`` with ``Retry-After``; anything else (a
5xx, a reset connection, a stream cut without ``[DONE]``) is counted as lost. The requester's memory (RSS of
its processes, workers and launcher excluded) is sampled throughout. Prints the counts and latency
percentiles; ``--out`` writes them as JSON. ``make load`` runs 1,000 requests from 100 clients; the tests run
a bounded version (``tests/test_load_process.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
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


def one(http: httpx.Client, model: str, stream: bool) -> tuple[str, float]:
    """One request; its outcome ("200", "429", or what went wrong) and its latency."""
    body = {"model": model, "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "stream": stream}
    started = time.perf_counter()
    try:
        if not stream:
            resp = http.post("/v1/completions", json=body)
            if resp.status_code == 429:
                return ("429" if resp.headers.get("Retry-After") else "429 without Retry-After"), \
                    time.perf_counter() - started
            if resp.status_code != 200:
                return f"{resp.status_code} {resp.text[:120]}", time.perf_counter() - started
            answered = isinstance(resp.json()["choices"][0]["text"], str)  # a whole answer, not a cut one
            return ("200" if answered else "200 without text"), time.perf_counter() - started
        with http.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code == 429:
                resp.read()
                return ("429" if resp.headers.get("Retry-After") else "429 without Retry-After"), \
                    time.perf_counter() - started
            if resp.status_code != 200:
                return f"{resp.status_code} {resp.read()[:120]!r}", time.perf_counter() - started
            last = ""
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    last = line[6:]
                    if '"error"' in last:
                        err = json.loads(last)["error"]
                        # A queue full met while the stream waited for its worker is a 429 told in the stream.
                        return ("429" if err.get("code") == "queue_full" else f"stream error {err}"), \
                            time.perf_counter() - started
            return ("200" if last == "[DONE]" else "stream cut"), time.perf_counter() - started
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}", time.perf_counter() - started


def run(requests: int, clients: int, workdir: Path, max_queue: int = 4) -> dict:
    model_dir = tiny_model(workdir / "tiny")
    models = workdir / "models.yaml"
    models.write_text("models:\n" + "".join(
        f"  - {{name: {m}, source: 'path:{model_dir}', max_queue: {max_queue}, queue_timeout: 10s}}\n"
        for m in MODELS))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "requester.log"
    env = {**os.environ, "FMA_BIND": f"127.0.0.1:{port}", "FMA_MODELS": str(models),
           "FMA_WORKER_LOG_DIR": str(workdir / "logs"), "FMA_LOG_LEVEL": "warning"}
    proc = start_gunicorn("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", env, log)
    outcomes: Counter[str] = Counter()
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
                    outcome, secs = one(http, MODELS[n % len(MODELS)], stream=n % 2 == 1)
                    with lock:
                        outcomes[outcome] += 1
                        if outcome == "200":
                            latencies.append(secs)

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        stop.set()
        stop_process_group(proc, 60)
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else 0.0

    lost = {k: v for k, v in outcomes.items() if k not in ("200", "429")}
    return {"requests": requests, "clients": clients, "models": len(MODELS), "max_queue": max_queue,
            "outcomes": dict(outcomes), "lost": sum(lost.values()), "lost_by_kind": lost,
            "latency_s_of_200s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0),
                                  "mean": round(statistics.fmean(latencies), 3) if latencies else 0.0},
            "wall_s": round(wall, 1), "requester_peak_rss_mib": round(peak["rss_mib"], 1),
            "healthy_after": healthy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fma-load-") as tmp:
        report = run(args.requests, args.clients, Path(tmp), args.max_queue)
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
