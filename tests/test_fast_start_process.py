"""Fast cold starts, end to end: a forked worker with the launcher's prepared parts, its timeline, its memory.

A real requester (gunicorn) with the local actuator and the embedded model: one model is forked from the
pre-warmed launcher, which prepared its config, tokenizer and empty model before the fork; an identical one
must start as a plain process (a ``TRANSFORMERS_*`` variable the launcher cannot honour after fork). Both must
write the same greedy text, token for token.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import EMBEDDED, requester, wait_for, worker_state

pytestmark = pytest.mark.process

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


def greedy(client: OpenAI, model: str) -> list[str]:
    texts = [client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in PROMPTS]
    chat = client.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": "Name a colour."}])
    return [*texts, chat.choices[0].message.content or ""]


@pytest.mark.slow
def test_a_forked_worker_with_prepared_parts_writes_what_a_fresh_process_writes(tmp_path: Path,
                                                                                converted_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text("models:\n"
                      f"  - {{name: forked, source: 'embedded:{EMBEDDED}'}}\n"
                      f"  - {{name: fresh, source: 'embedded:{EMBEDDED}', env: {{TRANSFORMERS_VERBOSITY: error}}}}\n")
    with requester(tmp_path, models, FMA_LAUNCHER="true") as req:
        wait_for(lambda: "launcher prepared forked ahead" in req.log(), 120, "the launcher to prepare the model")
        client = OpenAI(base_url=f"{req.spi}/v1", api_key="unused", max_retries=0, timeout=180)
        forked, fresh = greedy(client, "forked"), greedy(client, "fresh")
        assert forked == fresh
        assert all(text.strip() for text in forked), forked
        started = [line for line in req.log().splitlines() if "starting worker for" in line]
        assert any("for forked on" in line and "launcher" in line for line in started)
        assert any("for fresh on" in line and "plain" in line for line in started)
        assert "the launcher prepared" in (tmp_path / "logs" / "worker-forked.log").read_text()
        assert "the launcher prepared" not in (tmp_path / "logs" / "worker-fresh.log").read_text()
        # The start's timeline: nothing spent on the tokenizer or the modules, both built before the fork.
        steps = worker_state(req.spi, "forked")["last_start"]["steps"]
        assert steps["tokenizer"] < 0.05 and steps["skeleton"] == 0.0, steps
        assert {"spawn", "app", "engine", "weights", "ready_seen", "total"} <= set(steps)
        assert "worker_process" not in steps, "forked from the launcher: one process, no gunicorn arbiter"
        plain = worker_state(req.spi, "fresh")["last_start"]["steps"]
        assert {"arbiter", "worker_process"} <= set(plain), plain
        assert plain["tokenizer"] > steps["tokenizer"], (plain, steps)


def proportional_set_size(pids: list[int]) -> int:
    """Bytes of memory these processes account for (PSS: pages shared between them counted once)."""
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) * 1024
    return total


def resident_set_size(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) * 1024


def test_memory_comes_back_to_the_baseline_after_the_worker_stops(tmp_path: Path, converted_model_dir: Path):
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: {EMBEDDED}, source: 'embedded:{EMBEDDED}'}}\n")
    with requester(tmp_path, models, FMA_LAUNCHER="true") as req:
        wait_for(lambda: "launcher prepared" in req.log(), 120, "the launcher to prepare the model")
        baseline = proportional_set_size(req.tagged_pids())
        resp = httpx.post(f"{req.spi}/v1/completions", timeout=180,
                          json={"model": EMBEDDED, "prompt": "Hello", "max_tokens": 2})
        assert resp.status_code == 200, resp.text
        running = proportional_set_size(req.tagged_pids())
        workers = req.worker_pids()
        resident = sum(resident_set_size(pid) for pid in workers)
        assert resident > 538e6, f"the worker holds the 538 MB of weights ({resident / 1e6:.0f} MB resident)"
        assert httpx.delete(f"{req.spi}/v1/workers/{EMBEDDED}", timeout=60).status_code == 200
        wait_for(lambda: not set(workers) & set(req.tagged_pids()), 30, "the worker process to exit")
        after = proportional_set_size(req.tagged_pids())
        assert after - baseline < 50e6, f"baseline {baseline / 1e6:.0f} MB, running {running / 1e6:.0f} MB, " \
                                        f"after stop {after / 1e6:.0f} MB"
