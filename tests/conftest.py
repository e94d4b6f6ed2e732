"""Shared fixtures: the converted embedded model, a tiny model, real gunicorn servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fma_common.procs import (
    WORKER_APP,
    WORKER_CONFIG,
    free_port,
    start_gunicorn,
    stop_process_group,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = "smollm2-135m-instruct"

# Every process the tests start inherits this, so strays can be found at the end.
SESSION_TAG = uuid.uuid4().hex
os.environ["FMA_TEST_SESSION"] = SESSION_TAG


def _session_processes() -> list[int]:
    found = []
    marker = f"FMA_TEST_SESSION={SESSION_TAG}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if marker in Path(f"/proc/{entry}/environ").read_bytes() and \
                    "State:\tZ" not in Path(f"/proc/{entry}/status").read_text():
                found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_stray_processes() -> Iterator[None]:
    """After the whole run, nothing the tests started may still be running."""
    yield
    deadline = time.monotonic() + 20
    stray = _session_processes()
    while stray and time.monotonic() < deadline:
        time.sleep(0.2)
        stray = _session_processes()
    for pid in stray:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not stray, f"processes left running by the tests (now killed): {stray}"


# The end-to-end suite deploys the whole example (minutes): `make e2e` runs it (FMA_E2E=1), `make test` does not;
# nor the functions built as func's host builder builds them, from the package registry (`make functions`).
collect_ignore_glob = ([] if os.environ.get("FMA_E2E") else ["e2e/*"]) + \
    ([] if os.environ.get("FMA_FUNCTIONS") else ["test_function_build.py", "test_requester_function.py"]) + \
    ([] if os.environ.get("FMA_COLD_SUBSCRIBER") else ["test_cold_subscriber.py"])  # make cold-subscriber, ~1 min


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow (about 3.5 minutes together) run with `make test-slow` (FMA_SLOW=1), not `make test`: CI
    runs `make test` and must end inside 20 minutes."""
    if os.environ.get("FMA_SLOW"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]

@contextmanager
def loaded_engine(folder: Path, **env: str) -> Iterator:
    """The embedded model's engine, loaded in process from ``folder`` with these worker settings; closed after."""
    from fma_worker.engine import Engine
    from fma_worker.metrics import WorkerMetrics
    from fma_worker.settings import WorkerSettings

    settings = WorkerSettings.from_env({"FMA_MODEL": EMBEDDED, "FMA_LOG_LEVEL": "warning",
                                        "FMA_MODEL_SOURCE": f"path:{folder}", **env})
    engine = Engine(settings, WorkerMetrics(EMBEDDED))
    try:
        engine.load()
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def converted_model_dir() -> Path:
    """The embedded model converted into the user's cache (what `make run` uses).

    Converting takes ~30 s the first time on a fresh machine; later runs reuse it.
    """
    from fma_worker.model_store import default_cache_dir, ensure_embedded_converted

    return ensure_embedded_converted(EMBEDDED, "float32", default_cache_dir())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, converted_model_dir: Path) -> Path:
    """A 2-layer Llama with random weights and the real SmolLM2 tokenizer.

    It loads through the same code path (``path:`` source) as any local model,
    in a fraction of a second, for tests that check plumbing, not prose.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (converted_model_dir / name).exists():
            shutil.copy(converted_model_dir / name, out / name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def worker_env(**overrides: str) -> dict[str, str]:
    env = {"FMA_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}
    env.update(overrides)
    return env


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def gunicorn_worker(tmp_path: Path, env: Mapping[str, str], *, ready_timeout: float = 120.0,
                    wait: bool = True) -> Iterator[Server]:
    """A real worker: gunicorn with the checked-in config on a free port."""
    port = free_port()
    full_env = {**os.environ, **env, "PORT": str(port), "FMA_HOST": "127.0.0.1"}
    log_path = tmp_path / f"worker-{port}.log"
    proc = start_gunicorn(WORKER_CONFIG, WORKER_APP, full_env, log_path, cwd=REPO)
    server = Server(proc, port, log_path)
    try:
        if wait:
            wait_ready(server.url, proc, ready_timeout, log_path)
        yield server
    finally:
        stop_process_group(proc)


def sse_events(raw: str) -> list[object]:
    out: list[object] = []
    for block in raw.split("\n\n"):
        block = block.strip()
        if not block.startswith("data: "):
            continue
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- requester processes -------------------------------------------------------

@dataclass
class Requester:
    proc: object
    probes: str
    spi: str
    tag: str
    log_path: Path

    def worker_pids(self) -> list[int]:
        """Worker processes started by this requester (found by an env tag they inherit).

        Workers forked by the pre-warmed launcher keep the launcher's command
        line, so the launcher itself (a direct child of the requester) is left out.
        """
        requester = set(self.requester_pids())
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in requester:
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                env = Path(f"/proc/{entry}/environ").read_bytes()
                ppid = int(next(line.split()[1] for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                                if line.startswith("PPid:")))
            except (OSError, StopIteration):
                continue
            if b"fma_worker" not in cmd or f"FMA_TEST_TAG={self.tag}".encode() not in env:
                continue
            if b"fma_worker.launcher" in cmd and ppid in requester:
                continue  # the launcher, not a worker
            pids.append(int(entry))
        return pids

    def tagged_pids(self) -> list[int]:
        """Every live process started for this requester: itself, launcher, workers."""
        pids = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and f"FMA_TEST_TAG={self.tag}".encode() in Path(f"/proc/{entry}/environ") \
                        .read_bytes() and "State:\tZ" not in Path(f"/proc/{entry}/status").read_text():
                    pids.append(int(entry))
            except OSError:
                continue
        return pids

    def requester_pids(self) -> list[int]:
        pids = [self.proc.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    status = Path(f"/proc/{entry}/status").read_text()
                except OSError:
                    continue
                if f"PPid:\t{self.proc.pid}\n" in status and "fma_worker" not in \
                        Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry))
        return pids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def requester(tmp_path: Path, models: Path, **env: str) -> Iterator[Requester]:
    p1, p2 = free_port(), free_port()
    tag = uuid.uuid4().hex
    full = {**os.environ, "FMA_BIND": f"127.0.0.1:{p1},127.0.0.1:{p2}", "FMA_MODELS": str(models),
            "FMA_WORKER_LOG_DIR": str(tmp_path / "logs"), "FMA_TEST_TAG": tag, "FMA_LOG_LEVEL": "info",
            "FMA_RESTART_BACKOFF": "5s", **env}
    log_path = tmp_path / "requester.log"
    proc = start_gunicorn("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", full, log_path, cwd=REPO)
    req = Requester(proc, f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}", tag, log_path)
    try:
        wait_ready(req.probes, proc, 60, log_path)
        yield req
    finally:
        stop_process_group(proc, 60)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def worker_state(url: str, model: str = EMBEDDED) -> dict:
    data = httpx.get(f"{url}/v1/workers", timeout=10).json()["data"]
    return next(w for w in data if w["model"] == model)
