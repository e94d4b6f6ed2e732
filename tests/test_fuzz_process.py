"""A bounded fuzz of both services from their own OpenAPI documents (schemathesis): no 5xx, no hang.

Operations excluded, and why: a worker's ``/sleep`` and ``/wake_up`` (after a fuzzed sleep every completion is
a 503 ``worker_sleeping``, which is the vLLM contract, not a failure); the requester's ``/v1/become-unready``
(its ``/ready`` is then a 503 by design) and the two dual-pods accelerator routes (500 "no GPUs found" on a
machine without GPUs, as the FMA requester answers). ``make fuzz`` runs the same with more examples.

CloudEvents are not in an OpenAPI document (``POST /`` takes any body), so hypothesis generates them: binary
and structured mode, valid and broken attributes (specversion, id, source, type, subject, extensions,
datacontenttype), and data that is a completion request, a control request, random JSON or random bytes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import requester
from fma_common.events import STRUCTURED_CONTENT_TYPE
from fma_common.procs import WORKER_APP, WORKER_CONFIG, free_port, start_gunicorn, stop_process_group, wait_ready
from fma_requester import protocol as p

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


# ---- CloudEvents, generated --------------------------------------------------------------------

HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)  # what a header holds
MODELS = st.sampled_from(["tiny", "tiny", "tiny", "nope", "", "TINY", "t" * 300])
TYPES = st.one_of(st.sampled_from(p.REQUEST_TYPES + p.REPLY_TYPES), HEADER_TEXT)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=30))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                    max_leaves=12)
COMPLETION = st.fixed_dictionaries(
    {"model": MODELS},
    optional={"prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3), JSON),
              "max_tokens": st.one_of(st.integers(-5, 40), JSON), "temperature": st.one_of(st.floats(-1, 3), JSON),
              "stream": st.booleans(), "stop": st.one_of(st.text(max_size=5), JSON), "n": st.integers(0, 3),
              "extra": JSON})
DATA = st.one_of(COMPLETION, st.fixed_dictionaries({"model": MODELS}), JSON, st.binary(max_size=60))
# Extension names: valid ones ([a-z0-9]) and invalid ones that are still header names (HTTP tokens).
EXTENSIONS = st.dictionaries(st.one_of(st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True),
                                       st.from_regex(r"[A-Za-z0-9_.~!#$&'*+^`|-]{1,12}", fullmatch=True)),
                             HEADER_TEXT, max_size=3)
VALID_EXTENSIONS = st.dictionaries(st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True).filter(
    lambda k: k not in {"id", "source", "type", "specversion", "subject", "datacontenttype", "time"}),
    HEADER_TEXT, max_size=2)


@st.composite
def cloudevents(draw: st.DrawFn) -> tuple[str, dict[str, str], bytes]:
    """One event as it arrives over HTTP: (mode, headers, body). Half are well formed with random content
    (so the completion and control paths run); the rest break the envelope too."""
    wild = draw(st.booleans())
    attrs: dict[str, object] = {
        "specversion": draw(st.sampled_from(["1.0", "1.0", "0.3", "2.0", ""])) if wild else "1.0",
        "id": draw(st.one_of(st.uuids().map(str), HEADER_TEXT)),
        "source": draw(st.one_of(st.just("/fuzz"), HEADER_TEXT)),
        "type": draw(TYPES if wild else st.sampled_from(p.REQUEST_TYPES)),
    }
    subject = draw(st.one_of(st.none(), MODELS))
    if subject is not None:
        attrs["subject"] = subject
    if wild:
        for key in draw(st.sets(st.sampled_from(["specversion", "id", "source", "type"]), max_size=1)):
            del attrs[key]  # a required attribute missing, now and then
    attrs.update(draw(EXTENSIONS if wild else VALID_EXTENSIONS))
    data = draw(DATA if wild else st.one_of(COMPLETION, st.fixed_dictionaries({"model": MODELS})))
    ctype = draw(st.sampled_from(["application/json", "text/plain", None, "x/unknown"])) if wild \
        else "application/json"
    if draw(st.booleans()):  # binary mode: attributes in ce-* headers, data in the body
        headers = {f"ce-{k}": str(v).strip(" ") for k, v in attrs.items()}  # h11 refuses edge spaces
        if ctype:
            headers["Content-Type"] = ctype
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        return "binary", headers, body
    envelope = dict(attrs)
    if isinstance(data, bytes):
        envelope["data_base64"] = base64.b64encode(data).decode()
    else:
        envelope["data"] = data
    if ctype:
        envelope["datacontenttype"] = ctype
    if wild:
        for key in draw(st.sets(st.sampled_from(["specversion", "type", "id"]), max_size=1)):
            envelope[key] = draw(JSON)  # a wrongly typed attribute
    body = json.dumps(envelope).encode()
    if wild and draw(st.integers(0, 4)) == 0:
        body = body[:draw(st.integers(0, len(body)))]  # cut short
    return "structured", {"Content-Type": STRUCTURED_CONTENT_TYPE}, body


def check_event_answer(mode: str, headers: dict[str, str], body: bytes, resp: httpx.Response) -> str:
    """The contract of design.md for one event: a 200 reply in the same mode, or a 4xx/429 envelope."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:500], headers, body[:200])
    if resp.status_code != 200:
        error = resp.json()["error"]
        assert error["message"] and error["type"], resp.text
        return str(resp.status_code)
    if mode == "binary":
        assert resp.headers["ce-specversion"] == "1.0" and resp.headers["ce-type"] in p.REPLY_TYPES, resp.headers
        # Header values are percent-encoded (the HTTP binding's "HTTP Header Values"): compare them decoded.
        assert unquote(resp.headers["ce-requestid"]) == unquote(headers["ce-id"]), (resp.headers, headers)
        reply_type, data = resp.headers["ce-type"], resp.json()
    else:
        assert resp.headers["content-type"].startswith(STRUCTURED_CONTENT_TYPE), resp.headers
        reply = resp.json()
        assert reply["specversion"] == "1.0" and reply["type"] in p.REPLY_TYPES, reply
        assert reply["requestid"] == json.loads(body)["id"]
        reply_type, data = reply["type"], reply["data"]
    if reply_type in (p.COMPLETION_FAILED, p.WORKER_FAILED):
        assert data["error"]["message"] and data["error"]["type"], data  # a failed reply carries the envelope
    return reply_type.rsplit(".", 1)[-1]


def test_generated_cloudevents_in_both_modes_get_no_server_error(tmp_path: Path, tiny_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: tiny, source: 'path:{tiny_model_dir}'}}\n")
    outcomes: dict[str, int] = {}
    with requester(tmp_path, models, FMA_MAX_TOKENS="32") as req, httpx.Client(timeout=60) as client:

        # Besides what hypothesis draws (its choice can differ from one session to another), one valid completion
        # in each mode, so the run always reaches a worker.
        valid = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}

        @settings(max_examples=EXAMPLES * 20, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(cloudevents())
        @example(("binary", {"ce-specversion": "1.0", "ce-id": "fuzz-valid-1", "ce-source": "/fuzz",
                             "ce-type": p.COMPLETION_REQUESTED, "Content-Type": "application/json"},
                  json.dumps(valid).encode()))
        @example(("structured", {"Content-Type": STRUCTURED_CONTENT_TYPE},
                  json.dumps({"specversion": "1.0", "id": "fuzz-valid-2", "source": "/fuzz",
                              "type": p.COMPLETION_REQUESTED, "datacontenttype": "application/json",
                              "data": valid}).encode()))
        def check(event: tuple[str, dict[str, str], bytes]) -> None:
            mode, headers, body = event
            resp = client.post(f"{req.spi}/", headers=headers, content=body)
            outcome = f"{mode} {check_event_answer(mode, headers, body, resp)}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        check()
        print(f"cloudevents fuzz: {sum(outcomes.values())} events; " +
              ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
        assert httpx.get(f"{req.probes}/health", timeout=10).status_code == 200
        assert any(k.endswith("succeeded") for k in outcomes), f"no event got as far as a completion: {outcomes}"
        assert any(k.startswith("binary") for k in outcomes) and any(k.startswith("structured") for k in outcomes)
        resp = httpx.post(f"{req.spi}/v1/completions", timeout=120,
                          json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
        assert resp.status_code == 200, resp.text
