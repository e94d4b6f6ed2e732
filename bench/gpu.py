"""GPU actuation benchmark: one script, one GPU, under five minutes, nothing downloaded.

What it measures, on the real worker (gunicorn + the engine) and the real launcher (``fma_worker.launcher``):

* ``floor``       - pinned host-to-device copy bandwidth (on ``--device cpu``: a memory copy), the speed no
                    weight load can beat;
* ``load``        - the worker's own weights phase: bytes / seconds (``fma_worker_load_bytes_per_second``);
* ``naive_cold``  - the baseline: a fresh Python process running the plain script a user would write
                    (``from_pretrained(device_map=...)``, generate one token), spawn to token;
* ``cold_plain``  - our worker as a fresh process, spawn to the first token of a one-token completion;
* ``cold``        - our worker forked from the pre-warmed launcher (which prepared the tokenizer and config);
* ``wake_l1`` / ``wake_l2`` - from sleep level 1 (weights in pinned host memory) / level 2 (weights dropped),
                    the wake and the first token, with the device memory each sleep freed;
* ``warm``        - a one-token completion on an awake worker.

The model is built here: a Llama of about 0.85 B parameters with random weights (``--size 1b``, 1.7 GB in
bfloat16; ``--size tiny`` for a CPU check), saved as safetensors into ``$FMA_CACHE_DIR/models`` with a
tokenizer trained on the spot, so the script needs no network. The accelerator machine has torch and
transformers but not the worker's web stack: ``--wheels DIR`` (``make bench-gpu-wheels`` fills
``bench/wheels``) unpacks the wheels there into a temporary folder first. Nothing else is installed.
Works with transformers 5.17 (the GPU machine's) and the version this project pins.

    python bench/gpu.py --wheels bench/wheels --out bench/results/gpu.json      # on the GPU machine
    python bench/gpu.py --device cpu --size tiny --runs 1 --out /tmp/gpu.json     # the CPU check (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SOURCES = [REPO / "functions" / "common", REPO / "functions" / "worker"]
NEEDED = ("flask", "gunicorn", "pydantic", "prometheus_client", "cloudevents", "accelerate")
SIZES = {  # Llama shapes: 0.85 B parameters (1.7 GB in bfloat16), and a toy for the CPU check
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024},
}


def summary(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4),
            "max": round(max(values), 4), "runs": len(values)}


# ---- dependencies ----------------------------------------------------------------------------------------


def unpack_wheels(wheels: Path, target: Path) -> list[str]:
    """Unzip every wheel into ``target`` (a wheel is a zip of importable files): no pip, no network."""
    names = []
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
        names.append(wheel.name.split("-")[0])
    return names


def environment(wheels: Path | None, workdir: Path) -> dict[str, str]:
    """PYTHONPATH for this process and every child: the repo's sources, then unpacked wheels if needed."""
    paths = [str(p) for p in SOURCES]
    missing = [m for m in NEEDED if not _importable(m)]
    if missing:
        if wheels is None or not wheels.is_dir():
            raise SystemExit(f"missing {', '.join(missing)}: pass --wheels DIR (make bench-gpu-wheels fills "
                             "bench/wheels)")
        target = workdir / "deps"
        print(f"unpacking {len(unpack_wheels(wheels, target))} wheels for {', '.join(missing)}", flush=True)
        paths.append(str(target))
    for p in reversed(paths):
        sys.path.insert(0, p)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(":"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    return env


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---- the model -------------------------------------------------------------------------------------------


def build_model(size: str, device: str, cache: Path) -> tuple[Path, int]:
    """A random-weight Llama and a freshly trained byte-level BPE tokenizer, saved once into the cache."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = cache / "models" / f"gpu-bench-llama-{size}" / f"bfloat16-tf{transformers.__version__}"
    marker = folder / "fma-bench-complete.json"
    if marker.is_file():
        return folder, json.loads(marker.read_text())["bytes"]
    folder.mkdir(parents=True, exist_ok=True)
    shape = SIZES[size]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(shape["vocab_size"], 1024), special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog. Once upon a time there was a model that woke fast."]
    tok.train_from_iterator(corpus * 50, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    config = transformers.LlamaConfig(**shape, max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device if device.startswith("cuda") else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(folder), safe_serialization=True)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    marker.write_text(json.dumps({"bytes": nbytes}))
    return folder, nbytes


def floor(device: str) -> dict[str, float]:
    """Pinned host-to-device bandwidth (GB/s), best of 5 copies of 1 GiB; a memory copy on a CPU."""
    import torch

    size = (1 << 30) if device.startswith("cuda") else (256 << 20)
    best = float("inf")
    if device.startswith("cuda"):
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(size, dtype=torch.uint8, device=device)
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        del host, dev
        torch.cuda.empty_cache()
        return {"pinned_h2d_gbps": round(size / best / 1e9, 2)}
    src = torch.ones(size, dtype=torch.uint8)
    dst = torch.empty_like(src)
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return {"memcpy_gbps": round(size / best / 1e9, 2)}


# ---- HTTP, with the standard library (the GPU machine has no httpx) -------------------------------------------


def call(url: str, path: str, body: dict[str, Any] | None = None, timeout: float = 600) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None or
                                 path.startswith(("/sleep", "/wake")) else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_ready(url: str, proc_alive, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc_alive():
            raise RuntimeError(f"the worker at {url} exited before it was ready")
        try:
            status, body = call(url, "/ready?wait=5", timeout=10)
            if status == 200:
                return
            if isinstance(body, dict) and body.get("status") == "failed":
                raise RuntimeError(f"the worker failed: {body.get('error')}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.01)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def one_token(url: str) -> float:
    started = time.perf_counter()
    status, body = call(url, "/v1/completions", {"model": "bench", "prompt": "Once upon a time", "max_tokens": 1,
                                                 "temperature": 0})
    if status != 200:
        raise RuntimeError(f"completion answered {status}: {body}")
    return time.perf_counter() - started


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(base: dict[str, str], folder: Path, device: str, port: int) -> dict[str, str]:
    return {**base, "FMA_MODEL": "bench", "FMA_MODEL_SOURCE": f"path:{folder}", "FMA_DTYPE": "bfloat16",
            "FMA_DEVICE": device, "PORT": str(port), "FMA_HOST": "127.0.0.1", "FMA_LOG_LEVEL": "warning",
            "FMA_SPAWNED_AT": repr(time.time())}


def metric(url: str, name: str) -> float | None:
    _status, text = call(url, "/metrics")
    for line in str(text).splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---- the measurements ------------------------------------------------------------------------------------

NAIVE = """
import sys, time
t0 = float(sys.argv[3])
import torch, transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
kw = {"device_map": sys.argv[2]} if sys.argv[2].startswith("cuda") else {}
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, **kw)
ids = tok("Once upon a time", return_tensors="pt").to(model.device)
model.generate(**ids, max_new_tokens=1, do_sample=False)
if sys.argv[2].startswith("cuda"):
    torch.cuda.synchronize()
print(time.time() - t0)
"""


def naive_cold(env: dict[str, str], folder: Path, device: str) -> float:
    out = subprocess.run([sys.executable, "-c", NAIVE, str(folder), device, repr(time.time())], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"the plain script failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def cold_plain(env: dict[str, str], folder: Path, device: str, logs: Path) -> float:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with open(logs / "plain-worker.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:fma_worker.gunicorn_conf",
                                 "fma_worker.app:create_app()"], env=worker_env(env, folder, device, port),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, lambda: proc.poll() is None)
        one_token(url)
        return time.perf_counter() - started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


class Launcher:
    """``python -m fma_worker.launcher`` driven over its JSON-lines protocol, as the requester drives it."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.proc = subprocess.Popen([sys.executable, "-m", "fma_worker.launcher"], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(logs / "launcher.log", "ab"),
                                     start_new_session=True)
        self.ready = self._expect("ready")
        self.exits: set[int] = set()

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def _expect(self, op: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the launcher exited waiting for {op!r}; see {self.logs / 'launcher.log'}")
            msg = json.loads(line)
            if msg.get("op") == "exit":
                self.exits.add(msg["pid"])
            if msg.get("op") == op:
                return msg
            if msg.get("op") == "error":
                raise RuntimeError(msg.get("message"))

    def prepare(self, env: dict[str, str]) -> dict[str, Any]:
        self._send({"op": "prepare", "model": "bench", "env": env})
        return self._expect("prepared")

    def spawn(self, env: dict[str, str]) -> int:
        self._send({"op": "spawn", "id": 1, "env": env, "log": str(self.logs / "forked-worker.log")})
        return int(self._expect("spawned")["pid"])

    def stop(self, pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        while pid not in self.exits:
            self._expect("exit")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


def cold_forked(launcher: Launcher, folder: Path, device: str) -> tuple[float, str, int]:
    """Spawn to ready (the first token is timed by the caller): seconds, the worker's URL, its pid."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    pid = launcher.spawn(worker_env(launcher.env, folder, device, port))
    try:
        wait_ready(url, lambda: pid not in launcher.exits)
        return time.perf_counter() - started, url, pid
    except BaseException:
        launcher.stop(pid)
        raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--runs", type=int, default=5, help="runs of each fast measurement (fresh processes: fewer)")
    ap.add_argument("--wheels", type=Path, default=None, help="wheels of the worker's web stack to unpack")
    ap.add_argument("--cache", type=Path, default=None, help="where the model is built (default $FMA_CACHE_DIR)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = ap.parse_args()
    begun = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fma-bench-gpu-"))
    logs = work / "logs"
    logs.mkdir()
    env = environment(args.wheels, work)
    import torch
    import transformers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --size tiny for the CPU check")
    cache = args.cache or Path(os.environ.get("FMA_CACHE_DIR") or Path.home() / ".cache" / "fma")
    folder, weight_bytes = build_model(args.size, args.device, cache)
    print(f"model: {folder} ({weight_bytes / 1e9:.2f} GB)", flush=True)
    results: dict[str, list[float]] = {k: [] for k in ("naive_cold", "cold_plain", "cold", "warm", "wake_l1",
                                                      "wake_l2", "sleep_l1", "sleep_l2", "load_gbps")}
    freed: dict[str, list[float]] = {"l1": [], "l2": []}
    the_floor = floor(args.device)
    print(f"floor: {the_floor}", flush=True)
    slow_runs = max(1, min(args.runs, 3))
    for _ in range(slow_runs):  # fresh processes: each pays the imports
        results["naive_cold"].append(naive_cold(env, folder, args.device))
        results["cold_plain"].append(cold_plain(env, folder, args.device, logs))
    print(f"naive {results['naive_cold']}, plain {results['cold_plain']}", flush=True)
    launcher = Launcher(env, logs)
    try:
        prepared = launcher.prepare(worker_env(env, folder, args.device, 8000))
        for _ in range(args.runs):
            secs, url, pid = cold_forked(launcher, folder, args.device)
            first = one_token(url)
            results["cold"].append(secs + first)
            results["load_gbps"].append((metric(url, "fma_worker_load_bytes_per_second") or 0.0) / 1e9)
            results["warm"].append(min(one_token(url) for _ in range(3)))
            for level in (1, 2):
                status, slept = call(url, f"/sleep?level={level}")
                assert status == 200, slept
                results[f"sleep_l{level}"].append(float(slept["seconds"]))
                started = time.perf_counter()
                status, woke = call(url, "/wake_up")
                assert status == 200, woke
                one_token(url)
                results[f"wake_l{level}"].append(time.perf_counter() - started)
                if slept.get("device_memory_allocated") is not None:
                    freed[f"l{level}"].append((woke["device_memory_allocated"] - slept["device_memory_allocated"])
                                              / 1e9)
            launcher.stop(pid)
    finally:
        launcher.close()
    medians = {k: statistics.median(v) for k, v in results.items() if v}
    report = {
        "labels": {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
                   or "cpu", "actuator": "worker driven directly (gunicorn + engine), launcher over its protocol",
                   "model": f"random-weight Llama {args.size}, bfloat16, {weight_bytes / 1e9:.2f} GB",
                   "page_cache": "warm (the weights were just written or read)",
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "python": platform.python_version(),
                   "wake_l1": "weights to pinned host memory and back" if args.device.startswith("cuda") else
                   "CPU: level 1 moves no weights"},
        "floor": the_floor, "prepared": prepared,
        "results": {k: summary(v) for k, v in results.items() if v},
        "device_memory_freed_gb": {k: summary(v) for k, v in freed.items() if v},
        "ratios": {"naive_over_cold": round(medians["naive_cold"] / medians["cold"], 2),
                   "naive_over_cold_plain": round(medians["naive_cold"] / medians["cold_plain"], 2),
                   "load_over_floor": round(medians["load_gbps"] / next(iter(the_floor.values())), 3)},
        "seconds": round(time.monotonic() - begun, 1),
        "raw": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("floor", "results", "device_memory_freed_gb", "ratios", "seconds")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
