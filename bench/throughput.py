"""Throughput benchmark: the worker under load, the requester hop, many models on one machine.

Everything runs as real servers driven over HTTP, the way users drive them:

* ``worker``: our worker (defaults: continuous batching on), chat requests of
  ``--new-tokens`` greedy tokens, one at a time, then from 1, 2, 4, 8 and 16
  concurrent clients (tokens/s over the wall time, time to first token p50/p99).
* ``peers``: the same load against ``transformers serve`` on the same converted
  folder, without and with ``--continuous-batching`` (fewer requests: the
  batching peer makes a lone request crawl). This *uniform* load is the best
  case for a left-padded batch: every client sends the same prompt and the same
  ``max_tokens``, so no row waits on another's padding and none leaves early.
* ``mixed``: our worker and ``transformers serve --continuous-batching`` side by
  side under a *mixed* load: prompt lengths and ``max_tokens`` drawn per request
  from a stated, seeded distribution (``mixed_plan``), the same sequence for
  both, at 1, 8 and 16 clients. Every prompt is new: each opens with its own
  number, and each round draws its own sequence, so no server answers a round
  from a prompt it kept the round before.
* ``requester_hop``: the same streaming load sent directly to a worker and
  through the requester, interleaved in rounds, in one run.
* ``many_models``: a requester with 12 copies of the embedded model and a
  budget of 3 awake; many clients pick models at random (seeded, a few hot).

Writes ``bench/results/throughput.json`` and ``throughput.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from common import machine

from fma_common.procs import WORKER_APP, WORKER_CONFIG, free_port, start_gunicorn, stop_process_group, wait_ready

# The requester's workers answer only its token; the hop benchmark calls them directly too, so it sets one.
# The requester ignores the header (no API keys configured), so every client may send it.
WORKER_TOKEN = "bench-worker-token"
AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}"}
MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who learns to paint, with many details."}]
LEVELS = (1, 2, 4, 8, 16)
REPO = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Counter:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def chat_stream(http: httpx.Client, model: str, new_tokens: int, ours: bool,
                messages: list[dict] | None = None) -> tuple[float, str, float]:
    """One greedy streamed chat: (time to first token, text, wall seconds)."""
    body: dict = {"model": model, "messages": messages or MESSAGES, "max_tokens": new_tokens, "temperature": 0,
                  "stream": True}
    if ours:
        body["logit_bias"] = {"2": -100}  # <|im_end|>: every request makes exactly new_tokens tokens
    started = time.perf_counter()
    ttft = None
    text = ""
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"{resp.status_code}: {resp.text[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    text += piece
    return ttft or 0.0, text, time.perf_counter() - started


def drive(url: str, clients: int, jobs: list, one: Callable[[httpx.Client, Any], Any]) -> tuple[list, float]:
    """``jobs`` taken in order by ``clients`` threads at once, each with its own pooled client: the results of
    ``one(http, job)`` and the wall time; raises if any job failed."""
    results: list = []
    errors: list[str] = []
    nxt = [0]
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=900, headers=AUTH) as http:
            while True:
                with lock:
                    if nxt[0] >= len(jobs):
                        return
                    job = jobs[nxt[0]]
                    nxt[0] += 1
                try:
                    result = one(http, job)
                except Exception as exc:
                    errors.append(str(exc))
                    continue
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    return results, wall


def load(url: str, model: str, clients: int, requests: int, new_tokens: int, count: Counter, ours: bool) -> dict:
    """``requests`` chats from ``clients`` threads at once; tokens/s over the wall time."""
    def one(http: httpx.Client, _job: int) -> tuple[float, int]:
        ttft, text, _ = chat_stream(http, model, new_tokens, ours)
        return ttft, count.tokens(text)

    results, wall = drive(url, clients, list(range(requests)), one)
    ttfts, tokens = [r[0] for r in results], [r[1] for r in results]
    return {"tokens_per_s": round(sum(tokens) / wall, 2), "ttft_p50_s": round(pct(ttfts, 0.5), 4),
            "ttft_p99_s": round(pct(ttfts, 0.99), 4), "requests": len(tokens),
            "mean_tokens": round(statistics.mean(tokens), 1)}


# ---- the mixed workload ------------------------------------------------------------------------------

MIXED_LEVELS = (1, 8, 16)
MIXED_SEED = 21
# Prompt length in words (about 1.3 tokens each): mostly short, some long, as chat traffic is.
MIXED_WORDS = ((8, 0.35), (24, 0.25), (64, 0.2), (160, 0.15), (320, 0.05))
MIXED_NEW_TOKENS = (8, 128)  # max_tokens, uniform between these
_WORDS = ("the dragon learned to paint the mountains at dawn with colours nobody in the valley had seen and "
          "every evening the villagers climbed the hill to watch the sky change").split()


def mixed_seed(clients: int, round_index: int) -> int:
    """The plan of one level in one round: another sequence each round (a repeated one would be answered from
    the prompts a prefix cache kept the round before)."""
    return MIXED_SEED + clients + 1000 * round_index


def mixed_plan(requests: int, seed: int = MIXED_SEED) -> list[tuple[list[dict], int]]:
    """``requests`` chats: (messages, max_tokens), prompt lengths and max_tokens drawn from the stated
    distribution with a fixed seed, so every server gets the same sequence. Each prompt opens with its own
    story number, so two prompts share only the chat template and the words before that number."""
    rng = random.Random(seed)
    plan = []
    for i in range(requests):
        words = rng.choices([w for w, _ in MIXED_WORDS], [p for _, p in MIXED_WORDS])[0]
        text = " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(words))
        story = rng.randrange(100_000, 1_000_000)
        plan.append(([{"role": "user", "content": f"Continue story {story}: {text}"}],
                     rng.randint(*MIXED_NEW_TOKENS)))
    return plan


def chat_plan_item(http: httpx.Client, model: str, messages: list[dict], new_tokens: int, ours: bool) -> str:
    return chat_stream(http, model, new_tokens, ours, messages)[1]


def load_mixed(url: str, model: str, clients: int, plan: list[tuple[list[dict], int]], count: Counter,
               ours: bool) -> dict:
    """The plan's requests, in order, from ``clients`` threads at once; tokens/s over the wall time and the
    time to first token's p50 and p99."""
    def one(http: httpx.Client, job: tuple[list[dict], int]) -> tuple[int, float]:
        ttft, text, _wall = chat_stream(http, model, job[1], ours, job[0])
        return count.tokens(text), ttft

    results, wall = drive(url, clients, plan, one)
    tokens = [n for n, _ in results]
    ttfts = [t for _, t in results]
    return {"tokens_per_s": round(sum(tokens) / wall, 2), "requests": len(tokens), "tokens": sum(tokens),
            "wall_s": round(wall, 2), "ttft_p50_s": round(pct(ttfts, 0.5), 3), "ttft_p99_s": round(pct(ttfts, 0.99), 3)}


def bench_mixed(servers: list[tuple[str, str, str, bool]], count: Counter, per_client: int,
                rounds: int) -> dict:
    """Each level on each server in turn, ``rounds`` times (the median is kept)."""
    samples: dict[str, dict[str, list[dict]]] = {label: {} for label, *_ in servers}
    for r in range(rounds):
        for c in MIXED_LEVELS:
            plan = mixed_plan(max(4, c * per_client), mixed_seed(c, r))
            for label, url, model, ours in servers:
                res = load_mixed(url, model, c, plan, count, ours)
                samples[label].setdefault(str(c), []).append(res)
                print(f"round {r + 1} mixed {label}: {c} clients {res['tokens_per_s']} tok/s "
                      f"({res['tokens']} tokens, {res['requests']} requests)", file=sys.stderr)
    out: dict[str, dict] = {}
    for label, levels in samples.items():
        out[label] = {c: {**min(runs, key=lambda x: x["tokens_per_s"]),
                          "tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in runs), 2),
                          "tokens_per_s_runs": [x["tokens_per_s"] for x in runs]} for c, runs in levels.items()}
    return out


def start_worker(workdir: Path, env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "FMA_HOST": "127.0.0.1", "FMA_LOG_LEVEL": "warning", "FMA_MODEL": MODEL,
           **(env_extra or {})}
    log = workdir / f"worker-{port}.log"
    proc = start_gunicorn(WORKER_CONFIG, WORKER_APP, env, log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, 300, log, interval=0.05)
    return proc, url


def start_peer(folder: Path, workdir: Path, batching: bool, dtype: str = "float32") -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    args = [str(exe), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--dtype", dtype, "--log-level", "warning"]
    if batching:
        args.append("--continuous-batching")
    log = (workdir / f"peer-{port}.log").open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited: {(workdir / f'peer-{port}.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("transformers serve did not start")


def bench_servers(servers: list[tuple[str, str, str, bool, tuple[int, ...]]], count: Counter, new_tokens: int,
                  sequential: int, per_client: int, rounds: int) -> dict[str, dict]:
    """Every measurement on every server in turn, ``rounds`` times (the median is kept): the machine's drift
    over the run then falls on all of them alike. ``servers``: (label, url, model name, ours?, levels)."""
    samples: dict[str, dict[str, list[dict]]] = {label: {} for label, *_ in servers}
    for _label, url, model, ours, _levels in servers:
        chat_stream(httpx.Client(base_url=url, timeout=600, headers=AUTH), model, 4, ours)  # warm: kernels, allocator
    for r in range(rounds):
        for label, url, model, ours, _levels in servers:
            samples[label].setdefault("sequential", []).append(load(url, model, 1, sequential, new_tokens, count,
                                                                    ours))
            print(f"round {r + 1} {label}: one at a time {samples[label]['sequential'][-1]['tokens_per_s']} tok/s",
                  file=sys.stderr)
        for c in LEVELS:
            for label, url, model, ours, levels in servers:
                if c not in levels:
                    continue
                res = load(url, model, c, max(c * per_client, 4 if c == 1 else c), new_tokens, count, ours)
                samples[label].setdefault(str(c), []).append(res)
                print(f"round {r + 1} {label}: {c} clients {res['tokens_per_s']} tok/s, ttft p50 {res['ttft_p50_s']}s "
                      f"p99 {res['ttft_p99_s']}s", file=sys.stderr)

    def median_run(runs: list[dict]) -> dict:
        """tokens/s: the median over rounds (the mean of two); the other fields from the slower round."""
        out = dict(min(runs, key=lambda x: x["tokens_per_s"]))
        out["tokens_per_s"] = round(statistics.median(x["tokens_per_s"] for x in runs), 2)
        out["tokens_per_s_runs"] = [x["tokens_per_s"] for x in runs]
        return out

    out = {}
    for label, runs in samples.items():
        seq = median_run(runs.pop("sequential"))
        out[label] = {"sequential": {"tokens_per_s": seq["tokens_per_s"], "tokens_per_s_runs": seq["tokens_per_s_runs"],
                                     "requests": seq["requests"]},
                      "concurrency": {c: median_run(v) for c, v in runs.items()}}
    return out


# ---- the requester hop ---------------------------------------------------------------------------

def start_requester(workdir: Path, models_yaml: str, **env: str) -> tuple[subprocess.Popen, str]:
    models = workdir / f"models-{free_port()}.yaml"
    models.write_text(models_yaml)
    p1, p2 = free_port(), free_port()
    full = {**os.environ, "FMA_BIND": f"127.0.0.1:{p1},127.0.0.1:{p2}", "FMA_MODELS": str(models),
            "FMA_WORKER_LOG_DIR": str(workdir / "logs"), "FMA_LOG_LEVEL": "warning",
            "FMA_WORKER_TOKEN": WORKER_TOKEN, **env}
    log = workdir / f"requester-{p1}.log"
    proc = start_gunicorn("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", full, log, cwd=REPO)
    wait_ready(f"http://127.0.0.1:{p1}", proc, 60, log)
    return proc, f"http://127.0.0.1:{p2}"


def bench_hop(workdir: Path, count: Counter, new_tokens: int, rounds: int, clients: int) -> dict:
    proc, req = start_requester(workdir, f"models:\n  - {{name: {MODEL}, source: 'embedded:{MODEL}'}}\n")
    try:
        httpx.post(f"{req}/v1/workers/{MODEL}/warm", timeout=300).raise_for_status()
        direct = httpx.get(f"{req}/v1/workers/{MODEL}").json()["url"]
        chat_stream(httpx.Client(base_url=direct, timeout=600, headers=AUTH), MODEL, 4, True)
        tput = {"direct": [], "via": []}
        for _ in range(rounds):  # interleaved: the machine's drift hits both alike
            for name, url in (("direct", direct), ("via", req)):
                tput[name].append(load(url, MODEL, clients, clients * 2, new_tokens, count, True)["tokens_per_s"])
        lat = {"direct": [], "via": []}
        with httpx.Client(base_url=direct, timeout=60, headers=AUTH) as d, httpx.Client(base_url=req, timeout=60) as v:
            for _ in range(40):
                for name, http in (("direct", d), ("via", v)):
                    lat[name].append(chat_stream(http, MODEL, 2, True)[0])
    finally:
        stop_process_group(proc)
    d_tps, v_tps = statistics.median(tput["direct"]), statistics.median(tput["via"])
    return {"direct_tokens_per_s": round(d_tps, 2), "via_requester_tokens_per_s": round(v_tps, 2),
            "ratio": round(v_tps / d_tps, 3),
            "added_p50_ms": round((pct(lat["via"], 0.5) - pct(lat["direct"], 0.5)) * 1000, 2),
            "added_p99_ms": round((pct(lat["via"], 0.99) - pct(lat["direct"], 0.99)) * 1000, 2),
            "clients": clients, "rounds": rounds, "latency_pairs": len(lat["via"])}


# ---- many models -----------------------------------------------------------------------------------

AWAKE_PHASES = {"starting", "ready", "going_to_sleep", "waking"}


def metric_sum(text: str, name: str, label: str = "") -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*{label}[^}}]*\}} ([0-9.e+-]+)$", text,
                                                       flags=re.M))


def bench_many(workdir: Path, models: int, clients: int, per_client: int, max_loaded: int, seed: int) -> dict:
    names = [f"smollm2-copy-{i:02d}" for i in range(models)]
    yaml = (f"defaults: {{idle_timeout: 600s, max_queue: 64, queue_timeout: 300s}}\n"
            f"budget: {{max_loaded: {max_loaded}, sleepers: 2}}\nmodels:\n"
            + "".join(f"  - {{name: {n}, source: 'embedded:{MODEL}'}}\n" for n in names))
    proc, req = start_requester(workdir, yaml)
    statuses: list[int] = []
    max_awake = [0]
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=req, timeout=10) as http:
            while not stop.is_set():
                try:
                    rows = http.get("/v1/workers").json()["data"]
                    max_awake[0] = max(max_awake[0], sum(1 for w in rows if w["phase"] in AWAKE_PHASES))
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)

    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(models)]  # a few hot models, a long tail
    plans = [[rng.choices(names, weights)[0] for _ in range(per_client)] for _ in range(clients)]

    def client(plan: list[str]) -> None:
        with httpx.Client(base_url=req, timeout=600) as http:
            for name in plan:
                try:
                    r = http.post("/v1/chat/completions", json={"model": name, "messages": MESSAGES,
                                                                "max_tokens": 8, "temperature": 0})
                    statuses.append(r.status_code)
                except httpx.HTTPError:
                    statuses.append(0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        threads = [threading.Thread(target=client, args=(p,)) for p in plans]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        text = httpx.get(f"{req}/metrics").text
    finally:
        stop.set()
        stop_process_group(proc)
    return {"models": models, "requests": len(statuses), "ok": statuses.count(200),
            "rejected_429": statuses.count(429), "failed": len(statuses) - statuses.count(200) - statuses.count(429),
            "cold_starts": int(metric_sum(text, "fma_actuation_seconds_count", 'path="cold"')),
            "wakes": int(metric_sum(text, "fma_actuation_seconds_count", 'path="wake"')),
            "evictions": int(metric_sum(text, "fma_evictions_total")), "max_awake": max_awake[0],
            "budget_max_loaded": max_loaded, "clients": clients, "wall_s": round(wall, 1)}


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    series = [("fma worker", report["worker"])] + [(name, data) for name, data in report.get("peers", {}).items()]
    for label, data in series:
        levels = sorted(int(c) for c in data["concurrency"])
        ax.plot(levels, [data["concurrency"][str(c)]["tokens_per_s"] for c in levels], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(LEVELS), [str(c) for c in LEVELS])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("tokens / s (all clients)")
    m = report["machine"]
    ax.set_title(f"{report['model']}, {report['new_tokens']} greedy tokens, {m.get('cpus')} CPU cores, CPU only",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=2, help="requests per client at each concurrency")
    parser.add_argument("--peers", default="plain,batching", help="transformers serve modes to run ('' for none)")
    parser.add_argument("--peer-levels", default="1,8", help="levels for plain transformers serve (it does not "
                                                              "batch: its rate is flat); the batching one gets all")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every measurement; the median is kept")
    parser.add_argument("--hop-rounds", type=int, default=3)
    parser.add_argument("--many-clients", type=int, default=16)
    parser.add_argument("--many-per-client", type=int, default=6)
    parser.add_argument("--skip", default="", help="comma-separated: worker (with the peers), mixed, hop, many")
    parser.add_argument("--mixed-dtypes", default="float32,bfloat16",
                        help="the mixed load runs once per dtype, ours and the peer both in it")
    parser.add_argument("--mixed-unpacked", action="store_true",
                        help="also our worker with FMA_PACK_WEIGHTS=false in the mixed load (before/after, one run)")
    parser.add_argument("--mixed-no-prefix-cache", action="store_true",
                        help="also our worker with FMA_PREFIX_CACHE_TOKENS=0 in the mixed load (before/after, one run)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    parser.add_argument("--chart-only", action="store_true", help="redraw the chart from --out and stop")
    args = parser.parse_args()
    if args.chart_only:
        rechart(args.out)
        return 0
    skip = set(filter(None, args.skip.split(",")))

    from transformers import AutoTokenizer

    from fma_worker.model_store import default_cache_dir, ensure_embedded_converted

    folder = ensure_embedded_converted(MODEL, "float32", default_cache_dir())
    count = Counter(AutoTokenizer.from_pretrained(str(folder)))
    report: dict = {"machine": machine(), "model": MODEL, "new_tokens": args.new_tokens,
                    "label": "CPU only, float32, warm caches (model converted and in the page cache), greedy chat "
                             "requests; tokens/s = generated tokens of all clients / wall time; uniform load: every "
                             "client the same prompt and max_tokens (the best case for left-padded batching)"}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "worker" not in skip:
            # Our worker and the peers, all up at once and measured in turn (see bench_servers).
            procs = []
            try:
                proc, url = start_worker(workdir, {"FMA_DTYPE": "float32"})  # as the peers (label)
                procs.append(proc)
                servers = [("fma worker", url, MODEL, True, LEVELS)]
                peer_levels = tuple(int(c) for c in args.peer_levels.split(","))
                for mode in filter(None, args.peers.split(",")):
                    proc, url = start_peer(folder, workdir, mode == "batching")
                    procs.append(proc)
                    name = "transformers serve" + (" --continuous-batching" if mode == "batching" else "")
                    servers.append((name, url, str(folder), False, LEVELS if mode == "batching" else peer_levels))
                measured = bench_servers(servers, count, args.new_tokens, args.sequential, args.per_client,
                                         args.rounds)
            finally:
                for proc in procs:
                    stop_process_group(proc)
            report["worker"] = measured.pop("fma worker")
            report["peers"] = measured
        else:
            for key in ("worker", "peers"):
                if key in previous:
                    report[key] = previous[key]
        if "mixed" not in skip:
            procs = []
            try:
                mixed = {}
                for dtype in args.mixed_dtypes.split(","):
                    # Each dtype's own converted folder, for both: the peer gets what our worker loads.
                    dtype_folder = ensure_embedded_converted(MODEL, dtype, default_cache_dir())
                    proc, url = start_worker(workdir, {"FMA_DTYPE": dtype})
                    procs.append(proc)
                    servers_mixed = [("fma worker", url, MODEL, True)]
                    if args.mixed_unpacked:
                        proc, url = start_worker(workdir, {"FMA_DTYPE": dtype, "FMA_PACK_WEIGHTS": "false"})
                        procs.append(proc)
                        servers_mixed.append(("fma worker, FMA_PACK_WEIGHTS=false", url, MODEL, True))
                    if args.mixed_no_prefix_cache:
                        proc, url = start_worker(workdir, {"FMA_DTYPE": dtype, "FMA_PREFIX_CACHE_TOKENS": "0"})
                        procs.append(proc)
                        servers_mixed.append(("fma worker, FMA_PREFIX_CACHE_TOKENS=0", url, MODEL, True))
                    proc, url = start_peer(dtype_folder, workdir, True, dtype)
                    procs.append(proc)
                    servers_mixed.append(("transformers serve --continuous-batching", url, str(dtype_folder), False))
                    for _label, url, model, ours in servers_mixed:  # warm: kernels, allocator
                        chat_plan_item(httpx.Client(base_url=url, timeout=600, headers=AUTH), model, MESSAGES, 4,
                                       ours)
                    mixed[dtype] = bench_mixed(servers_mixed, count, args.per_client, args.rounds)
                    while procs:  # one pair up at a time: two CPU servers would share the cores
                        stop_process_group(procs.pop())
            finally:
                for proc in procs:
                    stop_process_group(proc)
            report["mixed"] = {
                "label": (f"mixed load: per request a prompt of "
                          f"{', '.join(f'{w} words ({p:.0%})' for w, p in MIXED_WORDS)}"
                          f" and max_tokens uniform in {MIXED_NEW_TOKENS[0]}..{MIXED_NEW_TOKENS[1]} (seed "
                          f"{MIXED_SEED} + clients + 1000 x round), each prompt opening with its own story number, "
                          f"greedy, streamed chat; the same sequence for both servers; ours "
                          f"generates exactly max_tokens (EOS suppressed), the peer may stop earlier: tokens/s counts "
                          f"what each generated; per dtype, both servers computing in it (CPU, warm caches)"),
                "levels": list(MIXED_LEVELS), "requests_per_client": args.per_client, "rounds": args.rounds,
                "results_by_dtype": mixed}
            print(f"mixed: {json.dumps(mixed)}", file=sys.stderr)
        elif "mixed" in previous:
            report["mixed"] = previous["mixed"]
        if "hop" not in skip:
            report["requester_hop"] = bench_hop(workdir, count, args.new_tokens, args.hop_rounds, 4)
            print(f"requester hop: {report['requester_hop']}", file=sys.stderr)
        elif "requester_hop" in previous:
            report["requester_hop"] = previous["requester_hop"]
        if "many" not in skip:
            report["many_models"] = bench_many(workdir, 12, args.many_clients, args.many_per_client, 3, seed=7)
            print(f"many models: {report['many_models']}", file=sys.stderr)
        elif "many_models" in previous:
            report["many_models"] = previous["many_models"]
    for key, value in previous.items():  # earlier runs kept beside this one (another machine's mixed table)
        if key.startswith("previous_"):
            report.setdefault(key, value)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if "worker" in report:
        chart(report, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    return 0


def rechart(path: Path) -> None:
    """Redraw the chart from a results file (``python bench/throughput.py --chart-only``)."""
    chart(json.loads(path.read_text()), path.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
