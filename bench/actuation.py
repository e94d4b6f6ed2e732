"""Actuation benchmark: time to first token through the requester, by path.

Runs a real requester (gunicorn + gevent, local actuator) and measures, from
the client, the seconds from sending a streamed completion to receiving its
first token when the model's worker is:

* ``naive_cold`` - what a user would write without this project: a fresh Python process that imports
                   transformers, loads the converted folder with ``from_pretrained`` and generates one
                   token (wall time from spawning it to that token; no server);
* ``cold_plain_process`` - our worker started as a plain new process (``FMA_LAUNCHER=false``);
* ``cold_after_start`` - the first request sent right after ``fma serve`` started (the launcher may
                   still be pre-warming, as for a ``make run`` user);
* ``cold``       - not running, forked from the pre-warmed launcher (the default);
* ``wake_l1``    - asleep at level 1 (weights in host memory);
* ``wake_l2``    - asleep at level 2 (weights dropped, reloaded from the converted cache);
* ``warm``       - running and awake.

``proxy_overhead`` compares warm streams sent straight to the worker and
through the requester, interleaved. ``floor`` gives what no actuation can beat
on this machine: host memory copy bandwidth and the time to read the converted
weights from the page cache.
Writes ``bench/results/actuation.json`` (design.md's format, with labels, ratios and the raw runs) and a
bar chart ``actuation.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from common import machine, stream_once, summary

from fma_common.procs import free_port, start_gunicorn, stop_process_group, wait_ready
from fma_worker import dtype_policy
from fma_worker.model_store import EMBEDDED_MODELS, default_cache_dir, ensure_embedded_converted

MODEL = "smollm2-135m-instruct"
PROMPT = "Once upon a time"
WORKER_TOKEN = "bench-worker-token"  # workers answer only their requester; the hop row calls one directly
# What dtype "auto" serves on this machine (the local rows use the default models file, dtype auto): the floor,
# the plain script and the labels use the same.
SERVED = dtype_policy.choose("auto", "cpu", EMBEDDED_MODELS[MODEL].checkpoint_dtype, dtype_policy.host_native("cpu"))


def floor() -> dict[str, float]:
    size = 256 * 1024 * 1024
    src = bytearray(b"\x01") * size
    dst = bytearray(size)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst[:] = src  # one memcpy
        best = min(best, time.perf_counter() - t)
    folder = ensure_embedded_converted(MODEL, SERVED.dtype, default_cache_dir())
    weights = folder / "model.safetensors"
    reads = []
    for _ in range(3):
        t = time.perf_counter()
        with open(weights, "rb") as f:
            while f.read(16 << 20):
                pass
        reads.append(time.perf_counter() - t)
    return {"memcpy_gbps": round(size / best / 1e9, 2), "weights_read_s": round(min(reads), 4),
            "weights_bytes": weights.stat().st_size}


NAIVE = """
import time, sys
t0 = float(sys.argv[2])
import torch, transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok("Once upon a time", return_tensors="pt")
model.generate(**ids, max_new_tokens=1, do_sample=False)
print(time.time() - t0)
"""


def naive_cold() -> float:
    """The plain script, in a fresh interpreter: spawn to first token, wall time."""
    import subprocess

    folder = ensure_embedded_converted(MODEL, SERVED.dtype, default_cache_dir())  # loads in its config's dtype
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", NAIVE, str(folder), repr(time.time())], capture_output=True,
                         text=True, env=env, timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


class Requester:
    def __init__(self, workdir: Path, launcher: bool, extra_env: dict[str, str] | None = None,
                 wait_prewarm: bool = True) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / f"requester-{uuid.uuid4().hex[:6]}.log"
        env = {**os.environ, "FMA_BIND": f"127.0.0.1:{port}", "FMA_LAUNCHER": "true" if launcher else "false",
               "FMA_WORKER_TOKEN": WORKER_TOKEN,
               "FMA_WORKER_LOG_DIR": str(workdir / "logs"), "FMA_LOG_LEVEL": "info"}
        env.pop("FMA_MODELS", None)
        env.update(extra_env or {})
        self.proc = start_gunicorn("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", env, self.log)
        wait_ready(self.url, self.proc, 60, self.log)
        if launcher and wait_prewarm:
            # Cold starts from the steady state: the launcher has imported torch and prepared the model.
            deadline = time.monotonic() + 120
            while "launcher prepared" not in self.log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise TimeoutError("launcher did not pre-warm and prepare the model")
                time.sleep(0.1)
        self.http = httpx.Client(base_url=self.url, timeout=600)

    def ttft(self) -> float:
        return stream_once(self.http, MODEL, PROMPT, 4)[0]

    def last_start(self) -> dict[str, float]:
        """The last cold start's timeline (spawn, gunicorn, app, load phases, ready_seen), from the status."""
        start = self.http.get(f"/v1/workers/{MODEL}").json().get("last_start") or {}
        return start.get("steps") or {}

    def release(self) -> None:
        self.http.delete(f"/v1/workers/{MODEL}").raise_for_status()

    def sleep(self, level: int) -> None:
        self.http.post(f"/v1/workers/{MODEL}/sleep", params={"level": level}).raise_for_status()

    def close(self) -> None:
        self.http.close()
        stop_process_group(self.proc, 60)


def warm_then_wakes(req: Requester, results: dict[str, list[float]]) -> None:
    """One round on a running worker: two warm requests, then a wake from each sleep level."""
    for _ in range(2):
        results["warm"].append(req.ttft())
    for level in (1, 2):
        req.sleep(level)
        results[f"wake_l{level}"].append(req.ttft())


def knative_section(workdir: Path, runs: int, dtype: str) -> dict[str, object]:
    """Cold and wake through the Knative path: a requester in knative mode, the fake API server and the
    Knative simulator (tests/), whose pods are real worker processes behind its activator and queue-proxy."""
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from knative_sim import SimulatedKnative
    from kube_fake import FakeKube

    results: dict[str, list[float]] = {k: [] for k in ("cold_new_service", "cold", "wake_l1", "wake_l2", "warm")}
    kube = FakeKube().start()
    kube.put_object({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                     "metadata": {"name": "fma-requester", "namespace": "bench"}, "spec": {}})
    cache = ensure_embedded_converted(MODEL, dtype, default_cache_dir()).parents[2]
    speed = 10.0
    sim = SimulatedKnative(kube, workdir, cache_dir=cache, default="process", speed=speed)
    service = "fma-worker-smollm2-135m-instruct"
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sim",
        "clusters": [{"name": "sim", "cluster": {"server": kube.url}}], "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "u", "namespace": "bench"}}]}))
    models = workdir / "models.yaml"
    # gpus 0: a worker given a GPU on this CPU machine refuses to start (issue 22's check), as it should.
    models.write_text(f"models:\n  - {{name: {MODEL}, source: 'embedded:{MODEL}', dtype: {dtype}, "
                      "knative: {gpus: 0}}\n")
    env = {"FMA_ACTUATOR": "knative", "KUBECONFIG": str(kubeconfig), "FMA_NAMESPACE": "bench",
           "FMA_MODELS": str(models)}
    req = Requester(workdir, launcher=False, extra_env=env)
    steps: dict[str, list[float]] = {}
    try:
        results["cold_new_service"].append(req.ttft())  # creates the Service, its Revision and first pod
        for _ in range(runs):
            warm_then_wakes(req, results)
            req.release()  # answers once Knative has the release; the pod goes after the stable window and drain
            sim.wait_until(lambda: not sim.pods(service), 600, "the released pod to be gone, drain included")
            results["cold"].append(req.ttft())  # re-pinned, then scaled from zero by the activator
            for step, secs in req.last_start().items():
                steps.setdefault(step, []).append(secs)
        counts = {"revisions_created": sim.revisions_created.get(service, 0),
                  "pods_started": sim.pods_started.get(service, 0)}
    finally:
        req.close()
        sim.stop()
        kube.stop()
    for name, values in results.items():
        print(f"knative {dtype} {name:16} " + " ".join(f"{v:.3f}" for v in values), file=sys.stderr)
    return {"metric": "time to first token through the requester in knative mode, seconds", "dtype": dtype,
            "setup": f"fake API server + Knative simulator (clock x{speed:g}); each pod is a real worker process "
                     "(a plain process: no pre-warmed launcher on this path) behind the simulated activator and "
                     "queue-proxy; a real cluster adds scheduling, image pulls and network hops",
            "results": {name: summary(values) for name, values in results.items()},
            "cold_start_timeline": {step: summary(values) for step, values in steps.items()}, **counts}


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("naive_cold", "cold_plain_process", "cold_after_start", "cold", "wake_l2", "wake_l1",
                         "warm") if n in report["results"]]
    medians = [report["results"][n]["median"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    bars = ax.barh(names[::-1], medians[::-1], color=["#888" if n == "naive_cold" else "#1f77b4"
                                                     for n in names[::-1]])
    for bar, value in zip(bars, medians[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.3f} s", va="center", fontsize=8)
    ax.set_xlabel("time to first token, seconds (median)")
    ax.set_title(f"{report['model']}, {report['labels']['device']}, local actuator, page cache warm, "
                 f"{report['runs']} runs", fontsize=9)
    ax.set_xlim(0, max(medians) * 1.25)
    fig.tight_layout()
    fig.savefig(path)


def knative_baseline(workdir: Path, rev: str, rounds: int, dtype: str, runs: int = 3,
                     current_rev: str = "") -> dict[str, object]:
    """The Knative cold start of commit ``rev`` beside this checkout's, alternating, in one run: its requester
    and pods import that commit's packages (``PYTHONPATH`` to a worktree, ahead of the editable install), the
    simulator and this script stay this checkout's. With ``current_rev`` the other side is that commit's too
    (a worktree), so the checkout may change while it runs."""
    repo = Path(__file__).resolve().parents[1]
    trees = {}
    for side, ref in (("baseline", rev), ("current", current_rev)):
        if ref:
            trees[side] = workdir / f"{side}-{ref}"
            subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-f", str(trees[side]), ref],
                           check=True, capture_output=True)
    commit = subprocess.run(["git", "-C", str(trees["baseline"]), "rev-parse", "--short", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    current = subprocess.run(["git", "-C", str(trees.get("current", repo)), "rev-parse", "--short", "HEAD"],
                             check=True, capture_output=True, text=True).stdout.strip()

    def paths(tree: Path) -> str:
        return os.pathsep.join(str(tree / "functions" / p) for p in ("requester", "worker", "common", "cli"))
    sides: dict[str, list[float]] = {"baseline": [], "current": []}
    totals: dict[str, list[float]] = {"baseline": [], "current": []}
    saved = os.environ.get("PYTHONPATH")
    try:
        for _ in range(rounds):
            for side in ("baseline", "current"):
                if side in trees:
                    os.environ["PYTHONPATH"] = paths(trees[side])
                elif saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
                where = workdir / f"{side}-{len(sides[side])}"
                where.mkdir()
                got = knative_section(where, runs, dtype)
                sides[side].append(got["results"]["cold"]["median"])  # type: ignore[index]
                totals[side].append(got["cold_start_timeline"].get("total", {}).get("median", 0.0))  # type: ignore
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        for tree in trees.values():
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
    pairs = [round(c / b - 1, 3) for b, c in zip(sides["baseline"], sides["current"], strict=True)]
    return {"metric": "Knative cold start (released, from zero) time to first token, median of each round's "
                      f"{runs} runs, seconds", "dtype": dtype, "baseline_commit": commit,
            "current_commit": current + ("" if "current" in trees else " (the checkout)"),
            "rounds": {"baseline": sides["baseline"], "current": sides["current"]},
            "start_total": totals, "change_per_round": pairs,
            "change_median": round(statistics.median(pairs), 3)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--overhead-runs", type=int, default=40)
    parser.add_argument("--skip-knative", action="store_true")
    parser.add_argument("--knative-dtypes", default=f"float32,{SERVED.dtype}",
                        help="the Knative path once per dtype, in this order (float32 was the only one before)")
    parser.add_argument("--knative-baseline", metavar="REV", default="",
                        help="also run the Knative cold path of this commit (a git worktree), interleaved with "
                             "this checkout's, in the served dtype: the same-run comparison issue 24 asks for")
    parser.add_argument("--knative-baseline-rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/actuation.json"))
    args = parser.parse_args()
    results: dict[str, list[float]] = {k: [] for k in ("naive_cold", "cold_plain_process", "cold_after_start",
                                                         "cold", "wake_l1", "wake_l2", "warm")}
    overhead: dict[str, list[float]] = {"direct": [], "via_requester": []}
    steps: dict[str, dict[str, list[float]]] = {"cold": {}, "cold_plain_process": {}, "cold_after_start": {}}

    def record_steps(row: str, req: Requester, ttft: float) -> None:
        got = req.last_start()
        if got:  # the rest of the time to first token: the request's own path (routing, proxy, the first token)
            got = {**got, "first_token": ttft - got.get("total", 0.0)}
        for step, secs in got.items():
            steps[row].setdefault(step, []).append(secs)
    floor_now = floor()  # also reads the weights once: every row below runs with a warm page cache

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for _ in range(args.runs):
            results["naive_cold"].append(naive_cold())
        plain = Requester(workdir, launcher=False)
        try:
            for _ in range(args.runs):
                results["cold_plain_process"].append(plain.ttft())
                record_steps("cold_plain_process", plain, results["cold_plain_process"][-1])
                plain.release()
        finally:
            plain.close()
        for _ in range(args.runs):
            fresh = Requester(workdir, launcher=True, wait_prewarm=False)
            try:
                results["cold_after_start"].append(fresh.ttft())
                record_steps("cold_after_start", fresh, results["cold_after_start"][-1])
            finally:
                fresh.close()

        req = Requester(workdir, launcher=True)
        try:
            for _ in range(args.runs):
                results["cold"].append(req.ttft())
                record_steps("cold", req, results["cold"][-1])
                warm_then_wakes(req, results)
                req.release()
            # What the requester adds to a warm request: the same stream sent
            # straight to the worker and through the requester, interleaved.
            req.ttft()
            worker_url = req.http.get("/v1/workers").json()["data"][0]["url"]
            with httpx.Client(base_url=worker_url, timeout=600,
                              headers={"Authorization": f"Bearer {WORKER_TOKEN}"}) as direct:
                for _ in range(args.overhead_runs):
                    overhead["direct"].append(stream_once(direct, MODEL, PROMPT, 4)[0])
                    overhead["via_requester"].append(req.ttft())
        finally:
            req.close()
        for name, values in results.items():
            print(f"{name:10} " + " ".join(f"{v:.3f}" for v in values), file=sys.stderr)
        dtypes = dict.fromkeys(args.knative_dtypes.split(","))
        knative = None if args.skip_knative else {d: knative_section(workdir, args.runs, d) for d in dtypes}
        if knative is not None and args.knative_baseline:
            knative["baseline"] = knative_baseline(workdir, args.knative_baseline, args.knative_baseline_rounds,
                                                   SERVED.dtype)

    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    medians = {name: statistics.median(values) for name, values in results.items()}
    load_gbps = [floor_now["weights_bytes"] / secs / 1e9 for secs in steps["cold"].get("weights", []) if secs > 0]
    diffs = sorted(v - d for d, v in zip(overhead["direct"], overhead["via_requester"], strict=True))
    report = {"machine": machine(), "model": MODEL, "runs": args.runs,
              "metric": "time to first token through the requester, seconds",
              "labels": {"actuator": "local", "device": device, "page_cache": "warm (weights read once first)",
                         "dtype": f"{SERVED.dtype} (dtype auto: {SERVED.reason}); the plain script loads the same "
                                  "converted folder",
                         "wake_l1": "on a CPU device level 1 moves no weights (they stay in host memory)"
                                    if device == "cpu" else "weights to pinned host memory and back",
                         "naive_cold": "plain script in a fresh process: import transformers, from_pretrained, "
                                       "generate 1 token (no server)"},
              "results": {name: summary(values) for name, values in results.items()},
              "raw": {name: [round(v, 4) for v in values] for name, values in results.items()},
              "floor": floor_now,
              "cold_start_timeline": {
                  "what": "where each cold start's seconds went, from the requester asking for a worker: spawn "
                          "(launcher fork or process start, to gunicorn reading its config), arbiter, worker_process, "
                          "app, engine, then the load phases (prepare, tokenizer, skeleton, weights), ready_seen "
                          "(ready until the requester knew), total; first_token is the rest of the time to first "
                          "token (the request's routing, proxying and its first forward pass)",
                  **{row: {step: summary(v) for step, v in by_step.items()} for row, by_step in steps.items()
                     if by_step}},
              "load_throughput": {"gbps": summary(load_gbps) if load_gbps else None,
                                  "over_memcpy": round(statistics.median(load_gbps) / floor_now["memcpy_gbps"], 3)
                                  if load_gbps else None,
                                  "what": "weight bytes / the worker's weights phase (mapped from the safetensors "
                                          "file, every page touched) in the cold row"},
              "ratios": {"naive_over_cold": round(medians["naive_cold"] / medians["cold"], 2),
                         "naive_over_cold_after_start": round(medians["naive_cold"] / medians["cold_after_start"], 2),
                         "cold_over_weights_read": round(medians["cold"] / floor_now["weights_read_s"], 2),
                         "wake_l2_over_weights_read": round(medians["wake_l2"] / floor_now["weights_read_s"], 2)},
              "proxy_overhead": {
                  "direct": summary(overhead["direct"]), "via_requester": summary(overhead["via_requester"]),
                  "median_ms": round((statistics.median(overhead["via_requester"])
                                      - statistics.median(overhead["direct"])) * 1000, 2),
                  "paired_ms": {"p10": round(diffs[len(diffs) // 10] * 1000, 2),
                                "p50": round(diffs[len(diffs) // 2] * 1000, 2),
                                "p90": round(diffs[(9 * len(diffs)) // 10] * 1000, 2)}}}
    print(f"ratios: {report['ratios']}", file=sys.stderr)
    if knative is not None:
        report["knative"] = knative
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    chart(report, args.out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("results", "floor", "ratios", "load_throughput", "proxy_overhead",
                                             "knative")
                      if k in report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
