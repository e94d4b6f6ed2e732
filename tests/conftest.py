"""Shared fixtures: the converted embedded model, a tiny model, real gunicorn servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

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
