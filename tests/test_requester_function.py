"""The requester as a Knative Function (functions/requester/function), in process, through its ASGI handle.

With the local actuator and the tiny model: a cold start and a completion, a chat completion, eight streams at
once each getting its first chunk without waiting for the others, and ``stop()`` draining and stopping its
workers. The scaffold func builds around this (pip, func-python's hypercorn) is issue 23's next part.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from test_worker_function import load_function, request

pytestmark = pytest.mark.process


@pytest.fixture()
def requester_function(tmp_path: Path, tiny_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: tiny, source: 'path:{tiny_model_dir}', dtype: float32}}\n")
    instance = load_function("requester").new()
    instance.start({"FMA_MODELS": str(models), "FMA_WORKER_LOG_DIR": str(tmp_path / "logs"),
                    "FMA_LOG_LEVEL": "warning", "FMA_DRAIN_TIMEOUT": "5s"})
    assert instance.ready() == (True, "ready")
    yield instance
    instance.stop()


def test_a_cold_start_a_completion_and_a_chat_through_the_functions_handle(requester_function: Any):
    status, body = asyncio.run(request(requester_function, "GET", "/v1/models"))
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["tiny"]
    status, body = asyncio.run(request(requester_function, "POST", "/v1/completions",
                                       {"model": "tiny", "prompt": "Hello", "max_tokens": 3}))
    assert status == 200 and json.loads(body)["choices"], body[:300]
    status, body = asyncio.run(request(requester_function, "POST", "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"


def test_eight_streams_get_their_first_chunk_without_waiting_for_each_other(requester_function: Any):
    asyncio.run(request(requester_function, "POST", "/v1/completions",
                        {"model": "tiny", "prompt": "warm", "max_tokens": 1}))  # the worker started

    async def stream() -> tuple[float, float]:
        t0 = time.monotonic()
        firsts: list[float] = []
        raw = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 120, "stream": True}).encode()
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
                 "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 1),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
        sent = [False]

        async def receive() -> dict[str, Any]:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body", b"").startswith(b"data: {"):
                firsts.append(time.monotonic() - t0)

        await requester_function.handle(scope, receive, send)
        return firsts[0], time.monotonic() - t0

    async def all_of_them() -> list[tuple[float, float]]:
        return await asyncio.gather(*(stream() for _ in range(8)))

    results = asyncio.run(all_of_them())
    first_tokens = sorted(r[0] for r in results)
    whole = min(r[1] for r in results)
    print(f"8 streams: first tokens {[round(t, 2) for t in first_tokens]} s; the shortest stream took {whole:.2f} s")
    assert first_tokens[-1] < whole, "every stream's first token came before any stream had ended: none waited"
