"""The worker as a Knative Function (functions/worker/function): func-python's instance protocol, in process.

``new()``, then ``start(cfg)`` with the configuration func-python passes (an environment), then requests through
the instance's ASGI ``handle`` as func-python's server delivers them: a completion, a streamed completion whose
client leaves early (its batch row freed, as under gunicorn), sleep and wake; ``alive()``/``ready()`` follow the
model; ``stop()`` drains. The scaffold func builds around this (pip, func-python's hypercorn) is issue 23's next
part.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_asgi_wsgi import call, scope

from conftest import REPO


def load_function(name: str) -> Any:
    """functions/NAME/function as the package `function` (what the host builder installs), loaded from its path."""
    spec = importlib.util.spec_from_file_location(f"function_{name}", REPO / "functions" / name / "function" /
                                                  "__init__.py",
                                                  submodule_search_locations=[str(REPO / "functions" / name /
                                                                                  "function")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def request(instance: Any, method: str, path: str, body: dict | None = None, *,
                  leave_after: int | None = None, query: bytes = b"") -> tuple[int, bytes]:
    """One request through the instance's ASGI handle, as func-python's server delivers it (test_asgi_wsgi.call)."""
    raw = json.dumps(body).encode() if body is not None else b""
    sc = {**scope(path, len(raw), query), "method": method}
    status, chunks = await call(instance.handle, sc, raw, disconnect_after=leave_after)
    return status, b"".join(chunk for _, chunk in chunks)


@pytest.fixture()
def worker(tiny_model_dir: Path):
    instance = load_function("worker").new()
    assert instance.ready() == (False, "starting")
    instance.start({"FMA_MODEL": "tiny", "FMA_MODEL_SOURCE": f"path:{tiny_model_dir}", "FMA_DTYPE": "float32",
                    "FMA_DEVICE": "cpu", "FMA_LOG_LEVEL": "warning", "FMA_GRACEFUL_TIMEOUT": "5s"})
    deadline = time.monotonic() + 120
    while not instance.ready()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    yield instance
    instance.stop()


def test_a_completion_through_the_functions_handle(worker: Any):
    assert worker.ready() == (True, "ready") and worker.alive() == (True, "ready")
    status, body = asyncio.run(request(worker, "POST", "/v1/completions",
                                       {"model": "tiny", "prompt": "Hello", "max_tokens": 3}))
    assert status == 200 and json.loads(body)["object"] == "text_completion"
    status, body = asyncio.run(request(worker, "GET", "/loaded"))
    assert status == 200, "the app's own probes stay the app's"


def test_a_stream_left_early_frees_its_row(worker: Any):
    engine = worker.engine
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 240, "stream": True, "temperature": 1.0, "seed": 1}
    t0 = time.monotonic()
    status, whole = asyncio.run(request(worker, "POST", "/v1/completions", body))
    full_s = time.monotonic() - t0
    assert status == 200 and whole.count(b"data: ") > 50
    t1 = time.monotonic()
    status, part = asyncio.run(request(worker, "POST", "/v1/completions", body, leave_after=3))
    assert status == 200 and part.startswith(b"data: ")
    while engine.in_flight and time.monotonic() - t1 < 10:
        time.sleep(0.005)
    freed_s = time.monotonic() - t1
    print(f"whole stream {full_s:.2f} s; a stream left after 3 chunks had its row freed {freed_s:.2f} s after it began")
    assert engine.in_flight == 0 and freed_s < full_s / 2, "freed when the client left, not at the stream's end"


def test_sleep_and_wake_through_the_functions_handle(worker: Any):
    status, _ = asyncio.run(request(worker, "POST", "/sleep", query=b"level=1"))
    assert status == 200 and worker.ready() == (True, "sleeping"), "asleep it stays ready (loaded)"
    status, _ = asyncio.run(request(worker, "POST", "/wake_up"))
    assert status == 200 and worker.ready() == (True, "ready")
