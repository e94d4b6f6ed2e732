"""The requester function built as knative/func's host builder builds it, then served by func-python.

The steps are knative/func's (``pkg/oci/python_builder.go`` at c18d604): the scaffolding
``templates/python/scaffolding/instanced-http`` (vendored in tests/data/knative-func-c18d604/) written beside the
function, with ``f`` linking the function's folder; a fresh virtual environment with nothing of this project;
``pip install --upgrade pip`` and ``pip install . --target lib`` (func-python and the function's own
dependencies from the package registry); then ``python service/main.py`` with only ``lib`` on its path, as the
image runs it. The requester runs in knative mode against the fake API server and the Knative simulator, whose
pods are real worker processes with the embedded model: a cold start, a completion, a stream and a chat, through
func-python's hypercorn and the WSGI bridge. The worker function, built the same way, serves the converted model
from a folder (``path:``: a function image embeds no model) a completion, and sleeps and wakes.

Run by ``make functions`` (it installs from the registry, about 30 s with a warm pip cache), not ``make test``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from knative_sim import SimulatedKnative
from knative_webhook import ClusterConfig
from kube_fake import FakeKube, load_role, write_kubeconfig
from test_knative import NS, RBAC, seed_requester

from conftest import EMBEDDED, REPO, free_port

pytestmark = [pytest.mark.process, pytest.mark.functions]

SCAFFOLD = REPO / "tests/data/knative-func-c18d604/scaffolding/instanced-http"


def host_build(function: Path, into: Path) -> Path:
    """The host builder's steps; returns the build folder (its lib/ holds everything the image runs)."""
    build = into / ".func" / "build"
    shutil.copytree(SCAFFOLD, build)
    (build / "f").symlink_to(function, target_is_directory=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(build / ".venv")], check=True, timeout=120)
    python = build / ".venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "pip"], check=True,
                   timeout=300)
    pip = build / ".venv" / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", "--upgrade", "pip"], cwd=build, check=True, timeout=300)
    subprocess.run([str(pip), "install", "-q", ".", "--target", "lib"], cwd=build, check=True, timeout=900)
    return build


def wait_func_ready(url: str, log: Path, timeout: float) -> None:
    """Until func-python's readiness endpoint (answered from the instance's ready()) says 200, or fail with the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/readiness", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(log.read_text()[-3000:])


def test_the_requester_built_by_the_host_builder_serves_through_func_python(tmp_path: Path,
                                                                         converted_model_dir: Path):
    t0 = time.monotonic()
    build = host_build(REPO / "functions" / "requester", tmp_path)
    lib = build / "lib"
    print(f"host build in {time.monotonic() - t0:.1f} s")
    for package in ("function", "fma_requester", "fma_common", "func_python", "service"):
        assert (lib / package).is_dir(), f"{package} is in lib"
    assert not (lib / "torch").exists() and not (lib / "gevent").exists(), "the requester needs neither"

    kube = FakeKube(role=load_role(*RBAC)).start()
    # The shipped worker template mounts the model cache claim: its flag on, as config-features.yaml asks.
    sim = SimulatedKnative(kube, tmp_path, cache_dir=converted_model_dir.parents[2], default="process", speed=10,
                           config=ClusterConfig(features={"kubernetes.podspec-persistent-volume-claim": "enabled"}),
                           claims={"fma-models": tmp_path / "fma-models"})
    proc = None
    try:
        seed_requester(kube, "t")
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, kube.url, namespace=NS)
        models = tmp_path / "models.yaml"
        models.write_text(f"models:\n  - {{name: {EMBEDDED}, source: 'embedded:{EMBEDDED}', dtype: float32, "
                          "knative: {gpus: 0}}\n")
        port = free_port()
        # Only lib on the path, and the image's command; the environment is what func.yaml's run.envs and the
        # cluster would give it (here: the fake API server and the shipped worker template).
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(lib),
               "LISTEN_ADDRESS": f"127.0.0.1:{port}", "FMA_ACTUATOR": "knative", "KUBECONFIG": str(kubeconfig),
               "FMA_NAMESPACE": NS, "FMA_MODELS": str(models), "FMA_WORKER_TOKEN": "t",
               "FMA_WORKER_TEMPLATE": str(REPO / "knative" / "base" / "worker-template.yaml"),
               "FMA_STREAM_KEEPALIVE": "0.5s"}
        log = (tmp_path / "function.log").open("w")
        proc = subprocess.Popen([str(build / ".venv" / "bin" / "python"), "service/main.py"], cwd=build, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_func_ready(url, tmp_path / "function.log", 60)
        assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok", "the app's own probe, not func's"

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        started = time.monotonic()
        first = client.completions.create(model=EMBEDDED, prompt="Once upon a time", max_tokens=8, temperature=0)
        print(f"cold start and completion through func-python in {time.monotonic() - started:.1f} s")
        assert first.choices[0].text
        chunks = list(client.completions.create(model=EMBEDDED, prompt="Hello", max_tokens=8, stream=True))
        assert len(chunks) >= 2 and "".join(c.choices[0].text for c in chunks if c.choices)
        chat = client.chat.completions.create(model=EMBEDDED, temperature=0, max_tokens=30, messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
        assert "Paris" in chat.choices[0].message.content

        # Eight streams at once through func-python: none waits for another to start.
        def stream(out: list[float]) -> None:
            t = time.monotonic()
            with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                    "model": EMBEDDED, "prompt": "Tell me a story", "max_tokens": 24, "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        out.append(time.monotonic() - t)
            out.append(time.monotonic() - t)

        import threading

        results: list[list[float]] = [[] for _ in range(8)]
        threads = [threading.Thread(target=stream, args=(r,)) for r in results]
        for th in threads:
            th.start()
        for th in threads:
            th.join(180)
        firsts = sorted(r[0] for r in results)
        shortest = min(r[-1] for r in results)
        print(f"8 streams through func-python: first tokens {[round(f, 2) for f in firsts]} s, "
              f"the shortest stream {shortest:.2f} s")
        assert firsts[-1] < shortest, "every stream had its first token before any stream ended"

        # A client that leaves mid-stream: the requester closes its upstream stream, the worker frees the row.
        (pod,) = sim.live_pods(f"fma-worker-{EMBEDDED}")

        def in_flight() -> float:
            text = httpx.get(f"{pod.url}/metrics", timeout=10).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("fma_worker_in_flight{"))

        with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                "model": EMBEDDED, "prompt": "Tell me a long story", "max_tokens": 1500, "stream": True}) as resp:
            seen = 0
            for line in resp.iter_lines():
                seen += line.startswith("data: {")
                if seen >= 3:
                    break
        left = time.monotonic()
        while in_flight() and time.monotonic() - left < 20:
            time.sleep(0.1)
        print(f"a stream left after 3 tokens: its worker row freed {time.monotonic() - left:.2f} s later")
        assert in_flight() == 0, "freed long before 1500 tokens"

        # SIGTERM with streams open: each ends with [DONE] or an error event, never cut without a word.
        import signal

        ends: list[list[str]] = [[] for _ in range(3)]
        started = [threading.Event() for _ in range(3)]

        def long_stream(i: int) -> None:
            try:
                with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                        "model": EMBEDDED, "prompt": "Tell me a long story", "max_tokens": 1500,
                        "stream": True, "logit_bias": {"2": -100}}) as resp:  # no end-of-text: it runs long
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            ends[i].append(line)
                            started[i].set()
            except httpx.HTTPError as exc:
                ends[i].append(f"transport error: {exc}")
                started[i].set()

        threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        assert all(e.wait(60) for e in started)
        proc.send_signal(signal.SIGTERM)
        for th in threads:
            th.join(60)
        last = [lines[-1] for lines in ends]
        print(f"SIGTERM with 3 streams open, their last lines: {[line[:80] for line in last]}")
        assert all(line == "data: [DONE]" or '"shutting_down"' in line for line in last), last
        assert any('"shutting_down"' in line for line in last), "1500 tokens outlast the 3 s grace: said so"
        assert proc.wait(30) == 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        sim.stop()
        kube.stop()


def test_the_requester_folder_alone_with_make_function_sources_builds_and_serves(tmp_path: Path):
    """What the pack and s2i builders and on-cluster builds see: the function's folder and nothing beside it."""
    tree = tmp_path / "tree" / "functions"
    shutil.copytree(REPO / "functions" / "common", tree / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "functions" / "requester", tree / "requester",
                    ignore=shutil.ignore_patterns("__pycache__", "vendored"))
    (tree / "worker").mkdir()  # the target fills both functions
    subprocess.run(["make", "-s", "function-sources", f"FUNCTIONS={tree}"], cwd=REPO, check=True, timeout=60)
    alone = tmp_path / "alone" / "requester"
    shutil.copytree(tree / "requester", alone)
    assert not (alone.parent / "common").exists()
    build = host_build(alone, tmp_path / "alone")
    assert (build / "lib" / "fma_common" / "wire.py").is_file()
    assert not (build / "lib" / "fma_worker").exists(), "the wire types are shared code now"
    kube = FakeKube(role=load_role(*RBAC)).start()
    try:
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, kube.url, namespace=NS)
        models = tmp_path / "models.yaml"
        models.write_text(f"models:\n  - {{name: {EMBEDDED}, source: 'embedded:{EMBEDDED}', knative: {{gpus: 0}}}}\n")
        proc, url = start_function(build, {
            "FMA_ACTUATOR": "knative", "KUBECONFIG": str(kubeconfig), "FMA_NAMESPACE": NS, "FMA_MODELS": str(models),
            "FMA_WORKER_TOKEN": "t", "FMA_WORKER_TEMPLATE": str(REPO / "knative" / "base" / "worker-template.yaml")},
            tmp_path, "alone")
        try:
            wait_func_ready(url, tmp_path / "alone.log", 60)
            assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]] == [EMBEDDED]
            schema = httpx.get(f"{url}/openapi.json", timeout=10).json()
            assert "CompletionRequest" in json.dumps(schema), "the wire types came with fma_common"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        kube.stop()


def start_function(build: Path, env: dict[str, str], tmp_path: Path, name: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (tmp_path / f"{name}.log").open("w")
    proc = subprocess.Popen([str(build / ".venv" / "bin" / "python"), "service/main.py"], cwd=build,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(build / "lib"),
                                 "LISTEN_ADDRESS": f"127.0.0.1:{port}", **env},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def test_the_worker_built_by_the_host_builder_serves_and_sleeps_through_func_python(tmp_path: Path,
                                                                                 converted_model_dir: Path):
    t0 = time.monotonic()
    build = host_build(REPO / "functions" / "worker", tmp_path)
    print(f"worker host build in {time.monotonic() - t0:.1f} s")
    assert (build / "lib" / "fma_worker").is_dir() and (build / "lib" / "torch").is_dir()
    proc, url = start_function(build, {"FMA_MODEL": EMBEDDED, "FMA_MODEL_SOURCE": f"path:{converted_model_dir}",
                                       "FMA_DTYPE": "float32", "FMA_DEVICE": "cpu"}, tmp_path, "worker")
    try:
        wait_func_ready(url, tmp_path / "worker.log", 120)
        print(f"worker function ready {time.monotonic() - t0:.1f} s after the build began")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        done = client.completions.create(model=EMBEDDED, prompt="Once upon a time", max_tokens=8, temperature=0)
        assert done.choices[0].text
        assert httpx.post(f"{url}/sleep", params={"level": 1}, timeout=60).status_code == 200
        assert httpx.get(f"{url}/is_sleeping", timeout=10).json()["is_sleeping"] is True
        assert httpx.get(f"{url}/health/readiness", timeout=10).status_code == 200, "asleep, still loaded"
        assert httpx.post(f"{url}/wake_up", timeout=60).status_code == 200
        again = client.completions.create(model=EMBEDDED, prompt="Once upon a time", max_tokens=8, temperature=0)
        assert again.choices[0].text == done.choices[0].text, "woken, the same weights"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
