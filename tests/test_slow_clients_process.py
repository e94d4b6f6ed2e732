"""Slow and idle clients hold connections, not the requester: everyone else is still served.

The requester is one gevent process; a client that stops reading blocks only the greenlet writing to it,
and an idle kept-alive connection costs a socket and a parked greenlet, up to ``FMA_CONNECTIONS``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from conftest import requester

pytestmark = pytest.mark.process

IDLE = 500


def tiny_models(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny model with room for a long answer (its rotary positions have no weights to outgrow)."""
    long = tmp_path / "tiny-long"
    shutil.copytree(tiny_model_dir, long)
    config = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: tiny, source: 'path:{long}'}}\n"
                      f"  - {{name: tiny-2, source: 'path:{tiny_model_dir}'}}\n")
    return models


def connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    where = urlparse(url)
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window stays small
    sock.connect((where.hostname, where.port))
    return sock


@contextlib.contextmanager
def held(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def request_bytes(path: str, body: bytes = b"", method: str = "POST") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: fma\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def test_a_reader_that_never_reads_and_500_idle_connections_do_not_stop_others(tmp_path: Path,
                                                                                tiny_model_dir: Path):
    with requester(tmp_path, tiny_models(tmp_path, tiny_model_dir), FMA_MAX_TOKENS="8000") as req:
        httpx.post(f"{req.spi}/v1/workers/tiny/warm", timeout=120).raise_for_status()
        with held([]) as socks:
            for _ in range(IDLE):  # kept alive after one answered request, then silent
                s = connect(req.spi)
                s.sendall(request_bytes("/health", method="GET"))
                socks.append(s)
            for s in socks:
                assert s.recv(4096).startswith(b"HTTP/1.1 200"), "each got its answer and stays open"
            for _ in range(50):  # half a request line, then nothing (slowloris)
                s = connect(req.spi)
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: fma\r\nContent-Le")
                socks.append(s)
            stalled = connect(req.spi, rcvbuf=4096)  # asks for a long stream and never reads a byte of it
            socks.append(stalled)
            stalled.sendall(request_bytes("/v1/completions", (
                b'{"model": "tiny", "prompt": "Once upon a time", "max_tokens": 6000, "temperature": 0, '
                b'"stream": true}')))
            time.sleep(2)  # the stream fills the socket buffers and its writer blocks

            client = openai.OpenAI(base_url=f"{req.spi}/v1", api_key="x", max_retries=0, timeout=60)
            for model in ("tiny", "tiny", "tiny-2"):  # the stalled stream's model, and a cold one
                out = client.completions.create(model=model, prompt="Hello", max_tokens=4)
                assert out.choices[0].text is not None
            chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=4, stream=True))
            assert chunks, "a stream beside the stalled one flows"
            assert httpx.get(f"{req.probes}/health", timeout=10).status_code == 200
            workers = {w["model"]: w for w in httpx.get(f"{req.spi}/v1/workers", timeout=10).json()["data"]}
            assert workers["tiny"]["in_flight"] >= 1, "the stalled stream is still open, holding only its slot"
        # The stalled client is gone: its stream is closed upstream and its slot given back.
        deadline = time.monotonic() + 30
        while httpx.get(f"{req.spi}/v1/workers", timeout=10).json()["data"][0]["in_flight"]:
            assert time.monotonic() < deadline, "the stalled stream's lease was never given back"
            time.sleep(0.2)
