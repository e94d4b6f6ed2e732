"""Reloading the models file: the watcher, and a running requester that picks a change up."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from conftest import requester, wait_for, worker_state
from fma_requester.reload import FileWatcher


def test_the_watcher_calls_back_only_when_contents_change_and_survives_a_bad_edit(tmp_path: Path):
    f = tmp_path / "models.yaml"
    f.write_text("a")
    seen: list[str] = []

    def apply() -> None:
        text = f.read_text()
        if text == "bad":
            raise ValueError("models.yaml: not valid")
        seen.append(text)

    w = FileWatcher([f], 3600, apply)
    assert not w.check()
    f.write_text("a")  # same contents, new mtime: nothing to do
    assert not w.check()
    f.write_text("bad")
    assert w.check() and seen == []  # logged, the running models stay
    f.write_text("b")
    assert w.check() and seen == ["b"]


@pytest.mark.process
def test_a_running_requester_serves_a_changed_models_file(tmp_path: Path, tiny_model_dir: Path):
    models = tmp_path / "models.yaml"
    one = f"models:\n  - {{name: tiny-a, source: 'path:{tiny_model_dir}'}}\n"
    models.write_text(one)
    with requester(tmp_path, models, FMA_MODELS_RELOAD="0.2s") as req:
        assert httpx.post(f"{req.spi}/v1/workers/tiny-a/warm", timeout=120).json()["state"] == "ready"
        models.write_text(one + f"  - {{name: tiny-b, source: 'path:{tiny_model_dir}'}}\n")
        wait_for(lambda: "tiny-b" in [m["id"] for m in httpx.get(f"{req.spi}/v1/models").json()["data"]], 10,
                 "the added model")
        assert worker_state(req.spi, "tiny-a")["state"] == "ready", "the running worker was not touched"
        models.write_text(f"models:\n  - {{name: tiny-b, source: 'path:{tiny_model_dir}'}}\n")
        wait_for(lambda: "tiny-a" not in [m["id"] for m in httpx.get(f"{req.spi}/v1/models").json()["data"]], 10,
                 "the removed model")
        resp = httpx.post(f"{req.spi}/v1/completions", json={"model": "tiny-a", "prompt": "x"}, timeout=10)
        assert resp.status_code == 404
        wait_for(lambda: len(req.worker_pids()) == 0, 30, "the removed model's worker to stop")
        models.write_text("models: [")  # a broken edit
        time.sleep(0.5)
        assert [m["id"] for m in httpx.get(f"{req.spi}/v1/models").json()["data"]] == ["tiny-b"]
        assert "not applied" in req.log()
