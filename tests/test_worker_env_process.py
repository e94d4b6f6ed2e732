"""A worker forked from the pre-warmed launcher behaves like a plain process, per-model env included.

The launcher imported huggingface_hub and transformers under the
requester's environment; a model's own ``env`` (here ``HF_HOME`` pointing at
a hub cache that only it has, and ``HF_HUB_OFFLINE``) must still be what its
worker uses, with the launcher and without it. A variable that cannot be
re-read after fork (``OMP_NUM_THREADS``) makes the worker a plain process.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import requester, worker_state

pytestmark = pytest.mark.process

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """A Hugging Face hub cache (HF_HOME) holding ``repo`` at one revision, as huggingface_hub lays it out."""
    org, name = repo.split("/")
    base = root / "hub" / f"models--{org}--{name}"
    snapshot = base / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, snapshot / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(REVISION)
    return root


def effective_hub(log: str) -> dict:
    line = next(line for line in log.splitlines() if "hub settings in effect:" in line)
    return ast.literal_eval(line.split("hub settings in effect:", 1)[1].strip())


@pytest.mark.parametrize("launcher", ["true", "false"])
def test_per_model_hub_settings_reach_the_worker_with_and_without_the_launcher(tmp_path: Path, tiny_model_dir: Path,
                                                                              launcher: str):
    home = hub_cache(tmp_path / "model-hf-home", "fake-org/tiny", tiny_model_dir)
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  - name: tiny\n"
        "    source: hf:fake-org/tiny\n"
        f"    env: {{HF_HOME: '{home}', HF_HUB_OFFLINE: '1'}}\n"
        "  - name: tiny-omp\n"
        f"    source: path:{tiny_model_dir}\n"
        "    env: {OMP_NUM_THREADS: '1'}\n")
    # The requester (and so the launcher) runs with another hub home and offline mode off.
    with requester(tmp_path, models, FMA_LAUNCHER=launcher, HF_HOME=str(tmp_path / "requester-hf-home"),
                   HF_HUB_OFFLINE="0") as req:
        resp = httpx.post(f"{req.spi}/v1/completions", timeout=120,
                          json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
        assert resp.status_code == 200, resp.text
        seen = effective_hub((tmp_path / "logs" / "worker-tiny.log").read_text())
        assert seen == {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": True}
        resp = httpx.post(f"{req.spi}/v1/completions", timeout=120,
                          json={"model": "tiny-omp", "prompt": "Hello", "max_tokens": 3})
        assert resp.status_code == 200, resp.text
        assert worker_state(req.spi, "tiny-omp")["state"] == "ready"
        started = [line for line in req.log().splitlines() if "starting worker for" in line]
        how = {m: next(line for line in started if f"for {m} on" in line) for m in ("tiny", "tiny-omp")}
        if launcher == "true":
            assert "launcher" in how["tiny"], "the hub settings are re-read: no need to give up the fork"
            assert "plain" in how["tiny-omp"] and "OMP_NUM_THREADS differ(s) from the launcher's" in req.log()
        else:
            assert "plain" in how["tiny"] and "plain" in how["tiny-omp"]
