"""Worker benchmark: start-up, load throughput, time to first token, decode speed.

Starts real worker processes (gunicorn, the checked-in config) for the embedded
model and measures from the outside, over HTTP, the way a user would:

* ``process_ready_s``  - spawn -> ``/ready`` 200 (interpreter, imports, weights, warm-up)
* ``load_s``           - the worker's own load time (``fma_worker_load_seconds{phase="total"}``)
* ``weights_s`` / ``load_mb_per_s`` - the weight-loading phase and its throughput
* ``ttft_s``           - request sent -> first streamed token (prompt of 5 tokens)
* ``decode_tok_s``     - completion tokens / wall time, one greedy stream of 128 tokens
* ``concurrent_tok_s`` - total tokens/s with ``--clients`` simultaneous requests,
                          with ``FMA_MAX_CONCURRENCY`` = clients and 1 torch thread each

Writes ``bench/results/throughput.json``: ``{"machine", "model", "runs", "results": {NAME: {min, median, max}}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import machine, stream_once, summary

from fma_common.procs import WORKER_APP, WORKER_CONFIG, free_port, start_gunicorn, stop_process_group, wait_ready

MODEL = "smollm2-135m-instruct"
PROMPT = "Once upon a time"


def metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{labels}\}} ([0-9.e+-]+)$", text, flags=re.M)
    if not match:
        raise KeyError(f"{name}{{{labels}}} not in /metrics")
    return float(match.group(1))


def run_worker(env_extra: dict[str, str], workdir: Path):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "FMA_HOST": "127.0.0.1", "FMA_LOG_LEVEL": "warning",
           "FMA_MODEL": MODEL, **env_extra}
    log = workdir / f"worker-{port}.log"
    t0 = time.perf_counter()
    proc = start_gunicorn(WORKER_CONFIG, WORKER_APP, env, log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, 300, log, interval=0.01)
    return proc, url, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    args = parser.parse_args()

    results: dict[str, list[float]] = {k: [] for k in (
        "process_ready_s", "load_s", "weights_s", "load_mb_per_s", "ttft_s", "decode_tok_s", "concurrent_tok_s")}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for run in range(args.runs):
            proc, url, ready = run_worker({}, workdir)
            try:
                with httpx.Client(base_url=url, timeout=300) as http:
                    text = http.get("/metrics").text
                    results["process_ready_s"].append(ready)
                    results["load_s"].append(metric(text, "fma_worker_load_seconds_sum",
                                                    f'model="{MODEL}",phase="total"'))
                    results["weights_s"].append(metric(text, "fma_worker_load_seconds_sum",
                                                       f'model="{MODEL}",phase="weights"'))
                    results["load_mb_per_s"].append(
                        metric(text, "fma_worker_load_bytes_per_second", f'model="{MODEL}"') / 1e6)
                    ttft, tokens, wall = stream_once(http, MODEL, PROMPT, args.max_tokens)
                    results["ttft_s"].append(ttft)
                    results["decode_tok_s"].append(tokens / wall)
            finally:
                stop_process_group(proc)
            print(f"run {run + 1}: ready {ready:.2f}s, ttft {ttft * 1000:.0f} ms, {tokens / wall:.1f} tok/s",
                  file=sys.stderr)

        clients = args.clients
        proc, url, _ = run_worker({"FMA_MAX_CONCURRENCY": str(clients), "FMA_TORCH_THREADS": "1"}, workdir)
        try:
            with httpx.Client(base_url=url, timeout=300) as http:
                stream_once(http, MODEL, PROMPT, 8)  # warm
                for _ in range(args.runs):
                    totals: list[int] = []

                    def one(http: httpx.Client = http, totals: list[int] = totals) -> None:
                        totals.append(stream_once(http, MODEL, PROMPT, args.max_tokens)[1])

                    threads = [threading.Thread(target=one) for _ in range(clients)]
                    t0 = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    results["concurrent_tok_s"].append(sum(totals) / (time.perf_counter() - t0))
        finally:
            stop_process_group(proc)

    report = {"machine": machine(), "model": MODEL, "runs": args.runs,
              "settings": {"max_tokens": args.max_tokens, "clients": clients, "prompt": PROMPT},
              "results": {name: summary(values) for name, values in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
