"""Embeddings throughput: our embedding worker through the requester against sentence-transformers in a plain script.

Workload: each client sends requests of 16 sentences (a fixed list of short English sentences, 8-14 tokens each),
one after another; 1 client, then 8 at once. Ours: ``POST /v1/embeddings`` through a requester (local actuator)
whose worker is warm (one request first); concurrent requests share forward passes in the worker. The baseline is
what a user would write without us: ``SentenceTransformer(folder).encode(sentences, batch_size=16)`` in one process
on the same converted folder, one thread per client. Both float32 (the model's own dtype), CPU, this machine.
Rounds alternate (ours, theirs) so drift hits both. Result: ``bench/results/embeddings.json``.

    .venv/bin/python bench/embeddings.py [--rounds 3] [--requests 6]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from common import machine

from fma_common.procs import free_port, start_gunicorn, stop_process_group, wait_ready
from fma_worker.model_store import default_cache_dir, ensure_embedded_converted

MODEL = "all-minilm-l6-v2"
SENTENCES = [
    "The cat sat on the mat.", "A dog slept on the rug.", "Stock markets fell sharply on Monday.",
    "The recipe needs two cups of flour.", "She plays the violin in an orchestra.", "Rain is expected tomorrow.",
    "Quantum computers use qubits.", "He forgot his umbrella at the station.", "The museum opens at nine.",
    "Bananas are rich in potassium.", "The train to Paris was delayed.", "Write unit tests for every bug fix.",
    "A lighthouse guided the ships home.", "Mount Everest is the highest mountain.", "Tea or coffee?",
    "Knative scales services to zero when they are idle.",
]
CLIENTS = (1, 8)


def run_clients(clients: int, requests: int, one_request) -> float:
    """Sentences per second with ``clients`` threads each sending ``requests`` requests of 16 sentences."""
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(requests):
                one_request()
        except BaseException as exc:  # reported below, never a silently lower number
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return clients * requests * len(SENTENCES) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="requests per client per measurement")
    parser.add_argument("--out", type=Path, default=Path("bench/results/embeddings.json"))
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    folder = ensure_embedded_converted(MODEL, "float32", default_cache_dir())
    torch.set_num_threads(os.cpu_count() or 1)
    reference = SentenceTransformer(str(folder), device="cpu")
    reference.encode(SENTENCES, batch_size=16)  # warm

    sides = ("ours_base64", "ours_float", "sentence_transformers")
    results: dict[str, dict[int, list[float]]] = {name: {c: [] for c in CLIENTS} for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models.yaml"
        models.write_text(f"models:\n  - {{name: {MODEL}, source: 'embedded:{MODEL}', kind: embedding, "
                          "dtype: float32}\n")
        port = free_port()
        env = {**os.environ, "FMA_BIND": f"127.0.0.1:{port}", "FMA_MODELS": str(models), "FMA_LOG_LEVEL": "warning",
               "FMA_WORKER_LOG_DIR": str(Path(tmp) / "logs")}
        log = Path(tmp) / f"requester-{uuid.uuid4().hex[:6]}.log"
        proc = start_gunicorn("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", env, log)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, 60, log)
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                limits=httpx.Limits(max_connections=32))
            def ours(encoding: str) -> None:
                resp = http.post("/v1/embeddings", json={"model": MODEL, "input": SENTENCES,
                                                         "encoding_format": encoding})
                resp.raise_for_status()
                data = resp.json()["data"]
                assert len(data) == len(SENTENCES)
                if encoding == "base64":  # decoded as the official SDK decodes it
                    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="float32") for d in data]
                    assert vectors[0].shape == (384,)

            def theirs() -> None:
                assert len(reference.encode(SENTENCES, batch_size=16)) == len(SENTENCES)

            ours("float")  # cold start, then warm
            fns = {"ours_base64": lambda: ours("base64"), "ours_float": lambda: ours("float"),
                   "sentence_transformers": theirs}
            for r in range(args.rounds):
                for clients in CLIENTS:
                    for name, fn in fns.items():
                        rate = run_clients(clients, args.requests, fn)
                        results[name][clients].append(round(rate, 1))
                        print(f"round {r + 1} {name:22} {clients} client(s): {rate:.1f} sentences/s", file=sys.stderr)
            http.close()
        finally:
            stop_process_group(proc, 60)

    medians = {name: {str(c): statistics.median(v) for c, v in per.items()} for name, per in results.items()}
    report = {
        "machine": machine(), "model": MODEL,
        "labels": {"device": "cpu", "dtype": "float32", "workload": f"requests of {len(SENTENCES)} short sentences "
                   f"(8-14 tokens), {args.requests} per client per measurement, clients {list(CLIENTS)}",
                   "ours": "POST /v1/embeddings through the requester (local actuator), worker warm; base64 (what "
                           "the official SDK asks for by default, decoded with numpy) and float (JSON numbers)",
                   "baseline": "sentence-transformers SentenceTransformer.encode(batch_size=16) in one process, one "
                               "thread per client, same converted folder", "rounds": args.rounds},
        "metric": "sentences embedded per second (median of rounds)",
        "raw": {name: {str(c): v for c, v in per.items()} for name, per in results.items()},
        "median": medians,
        "ratio_ours_over_baseline": {f"{name}/{c}": round(medians[name][str(c)] /
                                                          medians["sentence_transformers"][str(c)], 3)
                                     for name in sides[:2] for c in CLIENTS},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["median"]), json.dumps(report["ratio_ours_over_baseline"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
