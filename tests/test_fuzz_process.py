"""A bounded fuzz of both services from their own OpenAPI documents (schemathesis): no 5xx, no hang.

Operations excluded, and why: a worker's ``/sleep`` and ``/wake_up`` (after a fuzzed sleep every completion is
a 503 ``worker_sleeping``, which is the vLLM contract, not a failure); the requester's ``/v1/become-unready``
(its ``/ready`` is then a 503 by design) and the two dual-pods accelerator routes (500 "no GPUs found" on a
machine without GPUs, as the FMA requester answers). ``make fuzz`` runs the same with more examples.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import requester
from fma_common.procs import WORKER_APP, WORKER_CONFIG, free_port, start_gunicorn, stop_process_group, wait_ready

pytestmark = pytest.mark.process

EXAMPLES = int(os.environ.get("FMA_FUZZ_EXAMPLES", "6"))


def fuzz(url: str, *exclude: str, headers: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    st = Path(sys.executable).with_name("schemathesis")
    cmd = [str(st), "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples",
           str(EXAMPLES), "--seed", "7", "--workers", "1", "--request-timeout", "60", "--no-color"]
    for path in exclude:
        cmd += ["--exclude-path", path]
    for name, value in (headers or {}).items():
        cmd += ["--header", f"{name}: {value}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    counts = [line.strip() for line in out.stdout.splitlines() if "generated" in line or "Tested:" in line]
    print(f"fuzz {url}: " + "; ".join(counts))  # make fuzz shows these (pytest -s)
    assert any("Tested:" in c and not c.endswith(" 0") for c in counts), out.stdout[-3000:]
    return out


def test_fuzzing_the_worker_finds_no_server_error(tmp_path: Path, tiny_model_dir: Path):
    port = free_port()
    env = {**os.environ, "FMA_MODEL": "tiny", "FMA_MODEL_SOURCE": f"path:{tiny_model_dir}", "PORT": str(port),
           "FMA_HOST": "127.0.0.1", "FMA_MAX_TOKENS": "32", "FMA_LOG_LEVEL": "warning"}
    log = tmp_path / "worker.log"
    proc = start_gunicorn(WORKER_CONFIG, WORKER_APP, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 120, log)
        out = fuzz(url, "/sleep", "/wake_up")
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200, "still serving after the fuzz"
    finally:
        stop_process_group(proc, 30)


def test_fuzzing_the_requester_finds_no_server_error(tmp_path: Path, tiny_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text("models:\n"
                      f"  - {{name: tiny, source: 'path:{tiny_model_dir}'}}\n"
                      f"  - {{name: smollm2-135m-instruct, source: 'path:{tiny_model_dir}'}}\n")
    with requester(tmp_path, models, FMA_MAX_TOKENS="32") as req:
        out = fuzz(req.spi, "/v1/become-unready", "/v1/dual-pods/accelerators",
                   "/v1/dual-pods/accelerator-memory-usage")
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
        assert httpx.get(f"{req.probes}/health", timeout=10).status_code == 200
        resp = httpx.post(f"{req.spi}/v1/completions", timeout=120,
                          json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
        assert resp.status_code == 200, resp.text
